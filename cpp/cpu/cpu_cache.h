// The cpu_cache op: a caching CPU allocator for large blocks (cpu_cache.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace seft::cpu {
// enable: -1 keep, 0 off (frees what is cached), 1 on; limit: bytes cached at most (-1 keep);
// empty: free what is cached. Returns [enabled, limit, cached bytes, cached blocks, hits, misses,
// bytes in use, most bytes in use since the last empty].
std::vector<int64_t> cpu_cache(int64_t enable, int64_t limit, bool empty);

// The kernels' scratch buffers (kernel_common.h's AlignedAlloc): 64-byte aligned, from the cache
// when it is on and the buffer is large, else from c10::alloc_cpu.
void* scratch_alloc(size_t bytes);
void scratch_free(void* p);
}  // namespace seft::cpu
