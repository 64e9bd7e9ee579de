// CPU kernels, compiled once per instruction set: isa_<name>.cpp defines SEFT_ISA (the
// namespace) and includes this file with its own -m flags.
//
// Every kernel works on token blocks of TB tokens. A block of a dense (T, n) operand is
// packed transposed into an (n, TB) buffer of the accumulation type A (fp32, or fp64 for
// fp64 inputs), zero padded, so that each non-zero touches TB contiguous values: the inner
// loops are plain, fixed-length loops over tokens that the compiler vectorises. Values and
// indices are read in their storage types (bf16 / fp16 / int16) and widened on the fly.
//
// This file: vector types, packing, token blocks, row partitions, column panels.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/cpu_cache.h"

#include "common/checks.h"
#include "cpu/isa.h"

namespace seft::cpu::SEFT_ISA {
namespace {

template <typename V> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Vectors of SEFT_VEC_BYTES (32: one AVX register, two SSE registers on the base ISA; 64:
// one AVX-512 register). GCC vector types keep the per-token accumulators in registers, where
// plain arrays would spill to the stack.
#ifndef SEFT_VEC_BYTES
#define SEFT_VEC_BYTES 32
#endif
typedef float v4f __attribute__((vector_size(16), aligned(4)));
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef double v4d __attribute__((vector_size(32), aligned(8)));
typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef double v8d __attribute__((vector_size(64), aligned(8)));
#if SEFT_VEC_BYTES == 64
typedef v16f vec_float;
typedef v8d vec_double;
#else
typedef v8f vec_float;
typedef v4d vec_double;
#endif
template <typename A> struct VecOf;
template <> struct VecOf<float> {
  using type = vec_float;
  static constexpr int W = SEFT_VEC_BYTES / 4;
};
template <> struct VecOf<double> {
  using type = vec_double;
  static constexpr int W = SEFT_VEC_BYTES / 8;
};
static_assert(alignof(vec_float) == 4 && alignof(vec_double) == 8, "vectors may be unaligned");

// Lane sums in one fixed order, ((v0+v1)+(v2+v3)) + ((v4+v5)+(v6+v7)) (64-byte vectors first
// add their upper half to their lower half), whether one vector is reduced (hsum) or four at
// once (add_hsum4, lane k = hsum(tk)): results match bit for bit.
inline float hsum(v8f v) {
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  return v[0] + v[4];
}
inline double hsum(v4d v) {
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2);
  return v[0] + v[2];
}
inline v8f fold(v16f v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline v4d fold(v8d v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7); }
inline float hsum(v16f v) { return hsum(fold(v)); }
inline double hsum(v8d v) { return hsum(fold(v)); }
inline void add_hsum4(float* g, v8f t0, v8f t1, v8f t2, v8f t3) {
  const v8f h01 = __builtin_shufflevector(t0, t1, 0, 8, 2, 10, 4, 12, 6, 14) +
                  __builtin_shufflevector(t0, t1, 1, 9, 3, 11, 5, 13, 7, 15);  // t0_01 t1_01 t0_23 t1_23 ..
  const v8f h23 = __builtin_shufflevector(t2, t3, 0, 8, 2, 10, 4, 12, 6, 14) +
                  __builtin_shufflevector(t2, t3, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f h = __builtin_shufflevector(h01, h23, 0, 1, 8, 9, 4, 5, 12, 13) +
                __builtin_shufflevector(h01, h23, 2, 3, 10, 11, 6, 7, 14, 15);  // t0..t3 (0123), t0..t3 (4567)
  const v4f r = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  v4f gv;
  __builtin_memcpy(&gv, g, sizeof(gv));
  gv += r;
  __builtin_memcpy(g, &gv, sizeof(gv));
}
inline void add_hsum4(double* g, v4d t0, v4d t1, v4d t2, v4d t3) {
  const v4d h01 = __builtin_shufflevector(t0, t1, 0, 4, 2, 6) + __builtin_shufflevector(t0, t1, 1, 5, 3, 7);
  const v4d h23 = __builtin_shufflevector(t2, t3, 0, 4, 2, 6) + __builtin_shufflevector(t2, t3, 1, 5, 3, 7);
  const v4d r = __builtin_shufflevector(h01, h23, 0, 1, 4, 5) + __builtin_shufflevector(h01, h23, 2, 3, 6, 7);
  for (int k = 0; k < 4; ++k) g[k] += r[k];
}
inline void add_hsum4(float* g, v16f t0, v16f t1, v16f t2, v16f t3) {
  add_hsum4(g, fold(t0), fold(t1), fold(t2), fold(t3));
}
inline void add_hsum4(double* g, v8d t0, v8d t1, v8d t2, v8d t3) {
  add_hsum4(g, fold(t0), fold(t1), fold(t2), fold(t3));
}

// Packed buffers are 64-byte aligned, so every TB-token row inside them is vector aligned; large
// ones come from the caching CPU allocator when it is on (cpu_cache.h).
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U> AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(scratch_alloc(n * sizeof(T))); }
  void deallocate(T* p, size_t) { scratch_free(p); }
  template <typename U> bool operator==(const AlignedAlloc<U>&) const { return true; }
  template <typename U> bool operator!=(const AlignedAlloc<U>&) const { return false; }
};
template <typename T> using avec = std::vector<T, AlignedAlloc<T>>;

constexpr int64_t kMaxTB = 64;

// Token-block width for T tokens: the smallest of 1, 8, 16, 32, 64 that covers T (capped),
// and at least one vector of A when T > 1.
template <typename A>
inline int64_t token_block(int64_t T) {
  if (T <= 1) return 1;
  if (T <= 8 && VecOf<A>::W <= 8) return 8;
  if (T <= 16) return 16;
  if (T <= 32) return 32;
  return kMaxTB;
}

template <typename F>
void with_tb(int64_t tb, F&& f) {
  switch (tb) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    default: f(std::integral_constant<int, 64>{}); break;
  }
}

// dst[j * TB + i] = src[(t0 + i) * n + j] for j in [j0, j1), i < nt; 0 for nt <= i < TB. In
// strips of 16 tokens: each destination line is written whole at once and the strip's 16 source
// rows stay in L1 (a token-major walk writes at a stride of TB values, which for a large TB maps
// every line to a few cache sets).
template <typename A, typename V>
inline void pack_cols(const V* src, int64_t n, int64_t t0, int64_t nt, int64_t TB, int64_t j0, int64_t j1, A* dst) {
  for (int64_t i0 = 0; i0 < TB; i0 += 16) {
    const int64_t i1 = std::min<int64_t>(TB, i0 + 16), iv = std::min(std::max(nt, i0), i1);
    for (int64_t j = j0; j < j1; ++j) {
      A* d = dst + j * TB;
      const V* s = src + t0 * n + j;
      for (int64_t i = i0; i < iv; ++i) d[i] = static_cast<A>(s[i * n]);
      for (int64_t i = iv; i < i1; ++i) d[i] = A(0);
    }
  }
}

// dst[j * TB + i] = src[(t0 + i) * n + j] for i < nt, 0 for nt <= i < TB.
template <typename A, typename V>
void pack_t(const V* src, int64_t n, int64_t t0, int64_t nt, int64_t TB, A* dst) {
  at::parallel_for(0, n, 512, [&](int64_t j0, int64_t j1) { pack_cols(src, n, t0, nt, TB, j0, j1, dst); });
}

// Row ranges of roughly equal non-zero counts (plus a per-row cost), so threads balance.
inline std::vector<int64_t> balanced_rows(const int32_t* crow, int64_t out, int64_t parts) {
  std::vector<int64_t> b(parts + 1, out);
  b[0] = 0;
  const double total = double(crow[out]) + double(out) * 4;
  int64_t o = 0;
  for (int64_t k = 1; k < parts; ++k) {
    const double target = total * double(k) / double(parts);
    while (o < out && double(crow[o]) + double(o) * 4 < target) ++o;
    b[k] = o;
  }
  return b;
}

inline void note_bad(std::atomic<int64_t>& bad, int64_t o) {
  int64_t cur = bad.load();
  while (o < cur && !bad.compare_exchange_weak(cur, o)) {}
}

inline int64_t num_parts(int64_t out) {
  return std::max<int64_t>(1, std::min<int64_t>(out, 4 * at::get_num_threads()));
}

// Column panels: the columns are cut into panels of CP columns so that a panel of the
// packed operand (CP x TB values) stays in L1 while a group of rows walks its non-zeros.
// One pre-pass per call validates every row (sorted, unique, in range: a branch-free loop
// the compiler vectorises) and records where each row enters each panel.
constexpr int64_t kPanelBytes = 32 * 1024;
constexpr int64_t kRowGroup = 32;

template <typename A>
inline int64_t panel_width(int64_t TB, int64_t in) {
  const int64_t cp = std::max<int64_t>(64, kPanelBytes / (TB * int64_t(sizeof(A))));
  const int64_t n = std::max<int64_t>(1, (in + cp - 1) / cp);  // equal panels, rounded to 16
  return std::max<int64_t>(1, ((in + n - 1) / n + 15) / 16 * 16);
}

struct Panels {
  int64_t cp = 1, n = 1;       // panel width, panel count
  std::vector<int32_t> start;  // start[o * (n + 1) + q]: first non-zero of row o in panel q
  const int32_t* row(int64_t o) const { return start.data() + o * (n + 1); }
};

template <typename I>
inline bool row_valid(const I* c, int64_t len, int64_t in) {
  if (len == 0) return true;
  if (int64_t(c[0]) < 0 || int64_t(c[len - 1]) >= in) return false;
  int bad = 0;
  for (int64_t i = 1; i < len; ++i) bad |= c[i] <= c[i - 1];
  return !bad;
}

// Throws (with the first bad row and column) unless every row is valid.
template <typename I>
Panels build_panels(const char* op, const at::Tensor& crow_t, const at::Tensor& col_t, int64_t in, int64_t cp) {
  const int32_t* crow = crow_t.data_ptr<int32_t>();
  const I* col = col_t.data_ptr<I>();
  const int64_t out = crow_t.numel() - 1;
  Panels P;
  P.cp = cp;
  P.n = std::max<int64_t>(1, (in + cp - 1) / cp);
  P.start.resize(size_t(out * (P.n + 1)));
  std::atomic<int64_t> bad{out};
  at::parallel_for(0, out, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; ++o) {
      const int32_t p0 = crow[o], p1 = crow[o + 1];
      int32_t* s = P.start.data() + o * (P.n + 1);
      s[0] = p0;
      s[P.n] = p1;
      if (!row_valid(col + p0, p1 - p0, in)) {
        note_bad(bad, o);
        for (int64_t q = 1; q < P.n; ++q) s[q] = p1;
        continue;
      }
      for (int64_t q = 1; q < P.n; ++q)
        s[q] = int32_t(
            std::lower_bound(col + s[q - 1], col + p1, q * cp, [](I c, int64_t v) { return int64_t(c) < v; }) - col);
    }
  });
  if (bad.load() < out) check_cols_cpu(op, crow_t, col_t, in);  // throws with the details
  TORCH_CHECK(bad.load() == out, op, ": invalid col indices in row ", bad.load());
  return P;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
