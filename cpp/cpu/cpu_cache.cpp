// A caching CPU allocator (the cpu_cache op): freed CPU blocks of at least kMinBytes are kept
// and handed to later allocations of the same size class, so that a training step's tensors
// reuse the pages of the previous step's instead of faulting in fresh, zeroed ones. With
// glibc's mmap threshold fixed (seft_ext._memory), every such tensor is otherwise a new map:
// on SmolLM2-135M that costs about 2 million page faults and half of each step's time.
// Smaller blocks go to the default allocator. Off until the op turns it on; off again, it
// frees what it holds, and allocations pass through to the default allocator.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>

#include <algorithm>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <new>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cpu/cpu_cache.h"

namespace seft::cpu {
namespace {

constexpr size_t kMinBytes = size_t(256) << 10;  // glibc's mmap threshold as the driver sets it
constexpr size_t kGranule = size_t(64) << 10;    // size classes: multiples of 64 KiB

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* p = reserve(n);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // A block of at least n bytes, 64-byte aligned, to be given back through release(): from the
  // cache when it is on and n is large, else from c10::alloc_cpu.
  void* reserve(size_t n) {
    const size_t want = (n + kGranule - 1) / kGranule * kGranule;
    void* p = nullptr;
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(m_);
      if (!enabled_ || n < kMinBytes) return c10::alloc_cpu(n);  // not cached (one lock: fine)
      size_t size = want;
      std::tie(p, size) = take(want);
      live_bytes_ += size;
      hwm_ = std::max(hwm_, live_bytes_);
      evict(drop);  // a miss: what is cached must fit under the high-water mark
      if (p != nullptr) live_[p] = size;
    }
    for (void* q : drop) c10::free_cpu(q);
    if (p != nullptr) return p;
    try {
      p = c10::alloc_cpu(want);  // outside the lock
    } catch (...) {  // out of memory: not in use after all
      std::lock_guard<std::mutex> g(m_);
      live_bytes_ -= want;
      throw;
    }
    std::lock_guard<std::mutex> g(m_);
    live_[p] = want;
    return p;
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  static void release_block(void* p) { release(p); }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // enable: -1 keep, 0 off (and empty), 1 on; limit: -1 keep (a lower one drops the least
  // recently freed blocks); returns the state and counters.
  std::vector<int64_t> control(int64_t enable, int64_t limit, bool empty) {
    std::vector<void*> drop;
    std::vector<int64_t> out;
    {
      std::lock_guard<std::mutex> g(m_);
      if (limit >= 0) limit_ = size_t(limit);
      if (enable >= 0) enabled_ = enable == 1;
      if (empty || !enabled_) take_all(drop);
      if (empty || !enabled_) hwm_ = live_bytes_;  // a new phase: its own high-water mark
      evict(drop);
      out = {enabled_ ? 1 : 0, int64_t(limit_), int64_t(cached_), int64_t(free_.size()), hits_, misses_,
             int64_t(live_bytes_), int64_t(hwm_)};
    }
    for (void* p : drop) c10::free_cpu(p);
    return out;
  }

  // fork() while another thread holds the lock (DataLoader workers): the child would wait
  // forever; hold it across the fork instead.
  static void lock_for_fork() { get().m_.lock(); }
  static void unlock_after_fork() { get().m_.unlock(); }

  static CachingCPUAllocator& get() {
    static auto* a = new CachingCPUAllocator();  // never destroyed: storages keep a pointer to it
    return *a;
  }

 private:
  // A cached block of at least `want` bytes and at most 1/8 more, and its size; or nullptr
  // and `want` (a miss).
  // Called with m_ held.
  std::pair<void*, size_t> take(size_t want) {
    auto it = free_.lower_bound(want);
    if (it == free_.end() || it->first > want + want / 8) {
      ++misses_;
      return {nullptr, want};
    }
    const std::pair<void*, size_t> got{it->second->second, it->first};
    cached_ -= it->first;
    order_.erase(it->second);
    free_.erase(it);
    ++hits_;
    return got;
  }

  void take_all(std::vector<void*>& drop) {
    for (auto& b : order_) drop.push_back(b.second);
    order_.clear();
    free_.clear();
    cached_ = 0;
  }

  // Caches a freed block, then drops the least recently freed ones while over the limit.
  void keep(void* p, size_t size, std::vector<void*>& drop) {
    order_.emplace_back(size, p);
    free_.emplace(size, std::prev(order_.end()));
    cached_ += size;
    evict(drop);
  }

  // Drops the least recently freed blocks while more than the limit is cached, or while the
  // blocks in use and cached exceed the most ever in use since the last empty: so the cache
  // never raises the process's peak above what its tensors needed at once.
  void evict(std::vector<void*>& drop) {
    while (cached_ > 0 && (cached_ > limit_ || live_bytes_ + cached_ > hwm_)) {
      const auto oldest = order_.begin();
      auto [lo, hi] = free_.equal_range(oldest->first);
      while (lo->second != oldest) ++lo;
      free_.erase(lo);
      cached_ -= oldest->first;
      drop.push_back(oldest->second);
      order_.erase(oldest);
    }
  }

  static void release(void* p) {
    if (p == nullptr) return;
    auto& a = get();
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(a.m_);
      auto it = a.live_.find(p);
      const size_t size = it == a.live_.end() ? 0 : it->second;
      if (it != a.live_.end()) a.live_.erase(it);
      a.live_bytes_ -= size;
      if (size != 0 && a.enabled_ && size <= a.limit_) a.keep(p, size, drop);
      else drop.push_back(p);  // small, off, or larger than the limit
    }
    for (void* q : drop) c10::free_cpu(q);
  }

  using Order = std::list<std::pair<size_t, void*>>;  // cached blocks, least recently freed first

  std::mutex m_;
  bool enabled_ = false;
  size_t limit_ = size_t(4) << 30;
  size_t cached_ = 0, live_bytes_ = 0, hwm_ = 0;  // bytes cached, handed out, most handed out
  int64_t hits_ = 0, misses_ = 0;
  Order order_;
  std::multimap<size_t, Order::iterator> free_;  // size class -> cached block
  std::unordered_map<void*, size_t> live_;       // block handed out -> its size class
};

}  // namespace

void* scratch_alloc(size_t bytes) {
  void* p = CachingCPUAllocator::get().reserve(bytes);
  if (p == nullptr && bytes != 0) throw std::bad_alloc();
  return p;
}

void scratch_free(void* p) { CachingCPUAllocator::release_block(p); }

std::vector<int64_t> cpu_cache(int64_t enable, int64_t limit, bool empty) {
  TORCH_CHECK(enable >= -1 && enable <= 1, "cpu_cache: enable must be -1 (keep), 0 (off) or 1 (on), got ", enable);
  TORCH_CHECK(limit >= -1, "cpu_cache: limit must be >= 0 bytes (or -1: keep), got ", limit);
  auto& a = CachingCPUAllocator::get();
  static std::once_flag installed;
  if (enable == 1) {
    std::call_once(installed, [] {
      pthread_atfork(&CachingCPUAllocator::lock_for_fork, &CachingCPUAllocator::unlock_after_fork,
                     &CachingCPUAllocator::unlock_after_fork);
    });
  }
  auto state = a.control(enable, limit, empty);
  // torch's allocator while off (its memory profiler sees the allocations); storages made while
  // on keep this allocator and its deleter, which passes through when off
  if (enable == 1) c10::SetCPUAllocator(&a, /*priority=*/0);
  if (enable == 0 && c10::GetCPUAllocator() == &a) c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), 0);
  return state;
}

}  // namespace seft::cpu
