// Shared by the evolution ops (grow scan, drop / grow / adapt): budget units, positions,
// a strict total order on scores, and argument checks.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace seft::cpu::evolve {

// The budget unit: which positions share one non-zero budget.
//   layer: the whole matrix; row: one output row; nm: M consecutive inputs of one row.
enum class Budget { layer, row, nm };

inline Budget parse_budget(const char* op, const std::string& s, int64_t nm_n, int64_t nm_m, int64_t in) {
  if (s == "layer") return Budget::layer;
  if (s == "row") return Budget::row;
  TORCH_CHECK(s == "nm", op, ": budget must be 'layer', 'row' or 'nm', got '", s, "'");
  TORCH_CHECK(nm_m >= 1 && nm_n >= 1 && nm_n <= nm_m, op, ": N:M needs 1 <= N <= M, got ", nm_n, ":", nm_m);
  TORCH_CHECK(in % nm_m == 0, op, ": N:M groups of M = ", nm_m, " must divide in_features = ", in);
  return Budget::nm;
}

// Positions are flat indices row * in + col (int64).
struct Units {
  Budget budget;
  int64_t in, m;
  int64_t of(int64_t pos) const {
    if (budget == Budget::layer) return 0;
    return of(pos / in, pos % in);
  }
  int64_t of(int64_t row, int64_t col) const {
    switch (budget) {
      case Budget::layer: return 0;
      case Budget::row: return row;
      default: return row * (in / m) + col / m;
    }
  }
};

// Scores are compared by value, then by position: a strict total order, so every selection
// below is unique and independent of thread count or algorithm.
struct Scored {
  double score;
  int64_t pos;
};
inline bool higher(const Scored& a, const Scored& b) {
  return a.score > b.score || (a.score == b.score && a.pos < b.pos);
}
inline bool lower(const Scored& a, const Scored& b) {
  return a.score < b.score || (a.score == b.score && a.pos < b.pos);
}

// Keeps the `cap` entries first under `before` (a strict total order) out of any number of
// pushes; amortised O(1) per push, memory <= 2 cap + 64 entries.
template <typename T, typename Before>
struct TopPool {
  int64_t cap;
  Before before;
  std::vector<T> items;
  bool has_worst = false;
  T worst{};  // after a compaction: the cap-th entry; nothing after it can enter any more

  TopPool(int64_t cap_, Before b) : cap(cap_), before(b) {}
  int64_t accepted = 0;  // entries that passed the bar when pushed

  // Start with a bar (an entry that ranks last among equals); see csr_grow_scan.
  void set_bar(const T& bar) {
    worst = bar;
    has_worst = true;
  }
  void push(const T& t) {
    if (cap <= 0 || (has_worst && !before(t, worst))) return;
    ++accepted;
    items.push_back(t);
    if (static_cast<int64_t>(items.size()) >= 2 * cap + 64) compact();
  }
  void compact() {
    if (static_cast<int64_t>(items.size()) <= cap) return;
    std::nth_element(items.begin(), items.begin() + (cap - 1), items.end(), before);
    items.resize(cap);
    worst = items[cap - 1];
    has_worst = true;
  }
  int64_t bytes() const { return static_cast<int64_t>(items.capacity() * sizeof(T)); }
  // A cheap pre-filter on the score alone: false means push() would reject the entry.
  template <bool kHigherFirst>
  bool may_enter(double score) const {
    if (cap <= 0) return false;
    if (!has_worst) return true;
    return kHigherFirst ? score >= worst.score : score <= worst.score;
  }
};

// Sorts (key, value) pairs by key, 0 <= key <= max_key: LSD radix sort, 11 bits a pass
// (as many passes as max_key needs). Stable; O(n) per pass.
template <typename V>
void radix_sort_by_key(std::vector<std::pair<int64_t, V>>& v, int64_t max_key) {
  constexpr int kBits = 11;
  constexpr size_t kBuckets = size_t(1) << kBits;
  std::vector<std::pair<int64_t, V>> tmp(v.size());
  for (int shift = 0; (max_key >> shift) > 0; shift += kBits) {
    std::vector<size_t> count(kBuckets + 1, 0);
    for (const auto& e : v) ++count[((e.first >> shift) & (kBuckets - 1)) + 1];
    for (size_t b = 0; b < kBuckets; ++b) count[b + 1] += count[b];
    for (const auto& e : v) tmp[count[(e.first >> shift) & (kBuckets - 1)]++] = e;
    v.swap(tmp);
  }
}

// Checks shared by both ops: the CSR (offsets and columns), theta and the delta slots
// (int64, strictly increasing, in [0, nnz)). Returns in / out.
void check_evolve_args(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& theta,
                       const at::Tensor& delta_slots, int64_t in);

}  // namespace seft::cpu::evolve
