// CPU kernels, compiled once per instruction set: isa_<name>.cpp defines SEFT_ISA (the
// namespace) and includes this file with its own -m flags.
//
// Every kernel works on token blocks of TB tokens. A block of a dense (T, n) operand is
// packed transposed into an (n, TB) buffer of the accumulation type A (fp32, or fp64 for
// fp64 inputs), zero padded, so that each non-zero touches TB contiguous values: the inner
// loops are plain, fixed-length loops over tokens that the compiler vectorises. Values and
// indices are read in their storage types (bf16 / fp16 / int16) and widened on the fly.
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

#include "cpu/checks.h"
#include "cpu/isa.h"

namespace seft::cpu::SEFT_ISA {
namespace {

template <typename V> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// 32-byte vectors (one AVX register; two SSE registers on the base ISA). GCC vector types
// keep the per-token accumulators in registers, where plain arrays would spill to the stack.
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef double v4d __attribute__((vector_size(32), aligned(8)));
template <typename A> struct VecOf;
template <> struct VecOf<float> { using type = v8f; static constexpr int W = 8; };
template <> struct VecOf<double> { using type = v4d; static constexpr int W = 4; };

// Lane sums in one fixed order, ((v0+v1)+(v2+v3)) + ((v4+v5)+(v6+v7)), whether one vector is
// reduced (hsum) or four at once (hsum4, lane k = hsum(tk)): results match bit for bit.
typedef float v4f __attribute__((vector_size(16), aligned(4)));
inline float hsum(v8f v) {
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  return v[0] + v[4];
}
inline double hsum(v4d v) {
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2);
  return v[0] + v[2];
}
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

// Packed buffers are 64-byte aligned, so every TB-token row inside them is vector aligned.
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U> AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U> bool operator==(const AlignedAlloc<U>&) const { return true; }
  template <typename U> bool operator!=(const AlignedAlloc<U>&) const { return false; }
};
template <typename T> using avec = std::vector<T, AlignedAlloc<T>>;

constexpr int64_t kMaxTB = 64;

// Token-block width for T tokens: the smallest of 1, 8, 16, 32, 64 that covers T (capped).
inline int64_t token_block(int64_t T) {
  if (T <= 1) return 1;
  if (T <= 8) return 8;
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

// dst[j * TB + i] = src[(t0 + i) * n + j] for i < nt, 0 for nt <= i < TB.
template <typename A, typename V>
void pack_t(const V* src, int64_t n, int64_t t0, int64_t nt, int64_t TB, A* dst) {
  at::parallel_for(0, n, 512, [&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < TB; ++i) {
      if (i < nt) {
        const V* s = src + (t0 + i) * n;
        for (int64_t j = j0; j < j1; ++j) dst[j * TB + i] = static_cast<A>(s[j]);
      } else {
        for (int64_t j = j0; j < j1; ++j) dst[j * TB + i] = A(0);
      }
    }
  });
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
        s[q] = int32_t(std::lower_bound(col + s[q - 1], col + p1, q * cp,
                                        [](I c, int64_t v) { return int64_t(c) < v; }) - col);
    }
  });
  if (bad.load() < out) check_cols_cpu(op, crow_t, col_t, in);  // throws with the details
  TORCH_CHECK(bad.load() == out, op, ": invalid col indices in row ", bad.load());
  return P;
}

// ---------------------------------------------------------------- csr_spmm: Y = X W^T + b
// Each output row keeps TB token accumulators in registers; every non-zero adds
// w * XT[col] (TB contiguous values). With few tokens, N non-zeros are kept in flight in
// separate partial sums so that the FMA units stay busy.
template <typename A, typename V, typename I, int TB>
void spmm_rows(const Panels& P, const I* col, const V* val, const A* xt, const V* bias, int64_t r0, int64_t r1,
               int64_t nt, V* y, int64_t ldy) {
  using Vec = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  constexpr int NV = TB / W;
  constexpr int N = NV >= 8 ? 1 : 8 / NV;
  Vec part[kRowGroup][NV];  // partial sums of the group's rows between panels
  for (int64_t g0 = r0; g0 < r1; g0 += kRowGroup) {
    const int64_t g1 = std::min(r1, g0 + kRowGroup);
    for (int64_t q = 0; q < P.n; ++q) {
      const bool first = q == 0, last = q + 1 == P.n;
      for (int64_t o = g0; o < g1; ++o) {
        Vec acc[N][NV];
#pragma GCC unroll 64
        for (int k = 0; k < N * NV; ++k) acc[k / NV][k % NV] = Vec{};
        if (!first) {
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[0][v] = part[o - g0][v];
        }
        int32_t p = P.row(o)[q];
        const int32_t pe = P.row(o)[q + 1];
        for (; p + N <= pe; p += N) {
#pragma GCC unroll 8
          for (int k = 0; k < N; ++k) {
            const A w = static_cast<A>(val[p + k]);
            const Vec* x = reinterpret_cast<const Vec*>(xt + int64_t(col[p + k]) * TB);
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v) acc[k][v] += w * x[v];
          }
        }
        for (; p < pe; ++p) {
          const A w = static_cast<A>(val[p]);
          const Vec* x = reinterpret_cast<const Vec*>(xt + int64_t(col[p]) * TB);
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[0][v] += w * x[v];
        }
#pragma GCC unroll 8
        for (int k = 1; k < N; ++k)
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[0][v] += acc[k][v];
        if (!last) {
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) part[o - g0][v] = acc[0][v];
          continue;
        }
        A res[TB];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) *reinterpret_cast<Vec*>(res + v * W) = acc[0][v];
        const A b = bias ? static_cast<A>(bias[o]) : A(0);
        for (int64_t i = 0; i < nt; ++i) y[i * ldy + o] = static_cast<V>(res[i] + b);
      }
    }
  }
}

// A single token: a gather-dot per row (x is the packed (in x 1) vector).
template <typename A, typename V, typename I>
void spmv_rows(const int32_t* crow, const I* col, const V* val, const A* x, const V* bias, int64_t r0, int64_t r1,
               V* y) {
  for (int64_t o = r0; o < r1; ++o) {
    A s[4] = {0, 0, 0, 0};
    int32_t p = crow[o];
    const int32_t pe = crow[o + 1];
    for (; p + 4 <= pe; p += 4)
      for (int k = 0; k < 4; ++k) s[k] += static_cast<A>(val[p + k]) * x[col[p + k]];
    for (; p < pe; ++p) s[0] += static_cast<A>(val[p]) * x[col[p]];
    const A b = bias ? static_cast<A>(bias[o]) : A(0);
    y[o] = static_cast<V>(((s[0] + s[1]) + (s[2] + s[3])) + b);
  }
}

template <typename A, typename V, typename I>
at::Tensor spmm_typed(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                      const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  const int64_t T = x.size(0), in = x.size(1), out = crow.numel() - 1;
  at::Tensor y = at::empty({T, out}, x.options());
  const int64_t TB = token_block(T);
  const Panels P = build_panels<I>("csr_spmm", crow, col, in, panel_width<A>(TB, in));
  if (T == 0 || out == 0) return y;
  if (in == 0) return bias && bias->defined() ? y.copy_(bias->unsqueeze(0).expand({T, out})) : y.zero_();
  avec<A> xt(size_t(in * TB));
  const int32_t* cr = crow.data_ptr<int32_t>();
  const I* cl = col.data_ptr<I>();
  const V* vl = values.data_ptr<V>();
  const V* bs = bias && bias->defined() ? bias->data_ptr<V>() : nullptr;
  const V* xp = x.data_ptr<V>();
  V* yp = y.data_ptr<V>();
  const auto parts = balanced_rows(cr, out, num_parts(out));
  with_tb(TB, [&](auto tbc) {
    constexpr int TBc = decltype(tbc)::value;
    for (int64_t t0 = 0; t0 < T; t0 += TBc) {
      const int64_t nt = std::min<int64_t>(TBc, T - t0);
      pack_t<A, V>(xp, in, t0, nt, TBc, xt.data());
      at::parallel_for(0, int64_t(parts.size()) - 1, 1, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          if constexpr (TBc < VecOf<A>::W) spmv_rows<A, V, I>(cr, cl, vl, xt.data(), bs, parts[k], parts[k + 1], yp + t0 * out);
          else spmm_rows<A, V, I, TBc>(P, cl, vl, xt.data(), bs, parts[k], parts[k + 1], nt, yp + t0 * out, out);
        }
      });
    }
  });
  return y;
}

// ---------------------------------------------------------------- csr_spmm_t: dX = dY W
// Parallel over the column panels: each panel's dX block (CP x TB accumulators, in L1) is
// owned by one thread and summed over rows in ascending order, so the result is bitwise the
// same whatever the thread count. No transposed index: the panel starts say where each
// row's sorted columns enter the panel.
template <typename A, typename V, typename I, int TB>
void spmm_t_panel(const Panels& P, int64_t q, const I* col, const V* val, const A* dyt, int64_t out, A* buf) {
  using Vec = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  constexpr int NV = TB < W ? 1 : TB / W;
  const int64_t j0 = q * P.cp;
  for (int64_t o = 0; o < out; ++o) {
    int32_t p = P.row(o)[q];
    const int32_t pe = P.row(o)[q + 1];
    if (p == pe) continue;
    if constexpr (TB < W) {
      const A dy = dyt[o];
      for (; p < pe; ++p) buf[int64_t(col[p]) - j0] += static_cast<A>(val[p]) * dy;
    } else {
      Vec dy[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) dy[v] = reinterpret_cast<const Vec*>(dyt + o * TB)[v];
      for (; p < pe; ++p) {
        const A w = static_cast<A>(val[p]);
        Vec* d = reinterpret_cast<Vec*>(buf + (int64_t(col[p]) - j0) * TB);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) d[v] += w * dy[v];
      }
    }
  }
}

// Many tokens: inside a panel, the non-zeros of each group of kColGroupRows rows are first
// listed by column (once per call; ascending rows within a column), so each column sums
// its group's contributions in registers and touches the dX block once per group instead
// of once per non-zero. Workspace: 5 bytes per non-zero of the panel, freed with it.
constexpr int64_t kColGroupRows = 64;

template <typename A, typename V, typename I, int TB>
void spmm_t_panel_bycol(const Panels& P, int64_t q, int64_t w, const I* col, const V* val, const A* dyt_all,
                        int64_t out, int64_t T, int64_t in, V* dxp) {
  using Vec = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  constexpr int NV = TB / W;
  const int64_t j0 = q * P.cp;
  const int64_t ngroups = (out + kColGroupRows - 1) / kColGroupRows;
  std::vector<int32_t> coff(size_t(ngroups * (w + 1) + 1), 0);
  for (int64_t o = 0; o < out; ++o) {
    int32_t* cg = coff.data() + (o / kColGroupRows) * (w + 1) + 1;
    for (int32_t p = P.row(o)[q]; p < P.row(o)[q + 1]; ++p) ++cg[int64_t(col[p]) - j0];
  }
  for (size_t i = 1; i < coff.size(); ++i) coff[i] += coff[i - 1];
  std::vector<int32_t> pos(coff.begin(), coff.end() - 1), ep(size_t(coff.back()));
  std::vector<uint8_t> er(size_t(coff.back()));
  for (int64_t o = 0; o < out; ++o) {
    int32_t* pg = pos.data() + (o / kColGroupRows) * (w + 1);
    for (int32_t p = P.row(o)[q]; p < P.row(o)[q + 1]; ++p) {
      const int32_t k = pg[int64_t(col[p]) - j0]++;
      ep[k] = p;
      er[k] = uint8_t(o % kColGroupRows);
    }
  }
  avec<A> buf(size_t(w * TB));
  for (int64_t t0 = 0; t0 < T; t0 += TB) {
    const A* dyt = dyt_all + (t0 / TB) * out * TB;
    std::fill(buf.begin(), buf.end(), A(0));
    for (int64_t g = 0; g < ngroups; ++g) {
      const A* dyg = dyt + g * kColGroupRows * TB;
      const int32_t* cg = coff.data() + g * (w + 1);
      for (int64_t c = 0; c < w; ++c) {
        int32_t k = cg[c];
        const int32_t ke = cg[c + 1];
        if (k == ke) continue;
        Vec acc[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[v] = Vec{};
        for (; k < ke; ++k) {
          const A wv = static_cast<A>(val[ep[k]]);
          const Vec* d = reinterpret_cast<const Vec*>(dyg + int64_t(er[k]) * TB);
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[v] += wv * d[v];
        }
        Vec* bc = reinterpret_cast<Vec*>(buf.data() + c * TB);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) bc[v] += acc[v];
      }
    }
    const int64_t nt = std::min<int64_t>(TB, T - t0);
    for (int64_t i = 0; i < nt; ++i) {
      V* drow = dxp + (t0 + i) * in + j0;
      for (int64_t j = 0; j < w; ++j) drow[j] = static_cast<V>(buf[j * TB + i]);
    }
  }
}

template <typename A, typename V, typename I>
at::Tensor spmm_t_typed(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col,
                        const at::Tensor& values, int64_t in) {
  const int64_t T = dy.size(0), out = dy.size(1);
  at::Tensor dx = at::empty({T, in}, dy.options());
  const int64_t TB = token_block(T);
  const Panels P = build_panels<I>("csr_spmm_t", crow, col, in, panel_width<A>(TB, in));
  if (T == 0 || in == 0) return dx;
  if (out == 0 || col.numel() == 0) return dx.zero_();
  const I* cl = col.data_ptr<I>();
  const V* vl = values.data_ptr<V>();
  const V* dyp = dy.data_ptr<V>();
  V* dxp = dx.data_ptr<V>();
  with_tb(TB, [&](auto tbc) {
    constexpr int TBc = decltype(tbc)::value;
    const int64_t nblocks = (T + TBc - 1) / TBc;
    if constexpr (TBc >= VecOf<A>::W) {
      if (nblocks >= 2) {  // column-grouped: pack every token block once, then one pass per panel
        avec<A> dyt(size_t(nblocks * out * TBc));
        for (int64_t bl = 0; bl < nblocks; ++bl)
          pack_t<A, V>(dyp, out, bl * TBc, std::min<int64_t>(TBc, T - bl * TBc), TBc, dyt.data() + bl * out * TBc);
        at::parallel_for(0, P.n, 1, [&](int64_t b, int64_t e) {
          for (int64_t q = b; q < e; ++q)
            spmm_t_panel_bycol<A, V, I, TBc>(P, q, std::min(in, (q + 1) * P.cp) - q * P.cp, cl, vl, dyt.data(), out,
                                             T, in, dxp);
        });
        return;
      }
    }
    avec<A> dyt(size_t(out * TBc));
    for (int64_t t0 = 0; t0 < T; t0 += TBc) {
      const int64_t nt = std::min<int64_t>(TBc, T - t0);
      pack_t<A, V>(dyp, out, t0, nt, TBc, dyt.data());
      at::parallel_for(0, P.n, 1, [&](int64_t b, int64_t e) {
        avec<A> buf(static_cast<size_t>(P.cp * TBc));
        for (int64_t q = b; q < e; ++q) {
          const int64_t j0 = q * P.cp, j1 = std::min(in, j0 + P.cp);
          std::fill(buf.begin(), buf.end(), A(0));
          spmm_t_panel<A, V, I, TBc>(P, q, cl, vl, dyt.data(), out, buf.data());
          for (int64_t i = 0; i < nt; ++i) {
            V* drow = dxp + (t0 + i) * in;
            for (int64_t j = j0; j < j1; ++j) drow[j] = static_cast<V>(buf[(j - j0) * TBc + i]);
          }
        }
      });
    }
  });
  return dx;
}

// ---------------------------------------------------------------- csr_sddmm
// Per non-zero: one vector accumulator over the token block (sequential FMAs), then the
// lane sum; the same order on every path (rows, slots, batched by four).
// (A, not the vector type, is the template parameter: GCC drops a typedef's reduced
// alignment when the typedef itself is a template argument.)
template <typename A, int NV>
inline typename VecOf<A>::type dot_vec(const typename VecOf<A>::type* a, const typename VecOf<A>::type* b) {
  typename VecOf<A>::type s = a[0] * b[0];
#pragma GCC unroll 16
  for (int v = 1; v < NV; ++v) s += a[v] * b[v];
  return s;
}

template <typename A, int TB>
inline A dot_tb(const A* a, const A* b) {
  using Vec = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  if constexpr (TB < W) {
    A s = 0;
    for (int i = 0; i < TB; ++i) s += a[i] * b[i];
    return s;
  } else {
    return hsum(dot_vec<A, TB / W>(reinterpret_cast<const Vec*>(a), reinterpret_cast<const Vec*>(b)));
  }
}

template <typename A, typename I, int TB>
void sddmm_rows(const Panels& P, const I* col, const A* dyt, const A* xt, int64_t r0, int64_t r1, A* g) {
  using Vec = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  for (int64_t g0 = r0; g0 < r1; g0 += kRowGroup) {
    const int64_t g1 = std::min(r1, g0 + kRowGroup);
    for (int64_t q = 0; q < P.n; ++q) {
      for (int64_t o = g0; o < g1; ++o) {
        int32_t p = P.row(o)[q];
        const int32_t pe = P.row(o)[q + 1];
        if (p == pe) continue;
        if constexpr (TB < W) {
          for (; p < pe; ++p) g[p] += dot_tb<A, TB>(dyt + o * TB, xt + int64_t(col[p]) * TB);
        } else {
          constexpr int NV = TB / W;
          Vec dy[NV];  // the row's token block stays in registers across its non-zeros
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) dy[v] = reinterpret_cast<const Vec*>(dyt + o * TB)[v];
          auto xv = [&](int32_t pp) { return reinterpret_cast<const Vec*>(xt + int64_t(col[pp]) * TB); };
          for (; p + 4 <= pe; p += 4)
            add_hsum4(g + p, dot_vec<A, NV>(dy, xv(p)), dot_vec<A, NV>(dy, xv(p + 1)),
                      dot_vec<A, NV>(dy, xv(p + 2)), dot_vec<A, NV>(dy, xv(p + 3)));
          for (; p < pe; ++p) g[p] += hsum(dot_vec<A, NV>(dy, xv(p)));
        }
      }
    }
  }
}

template <typename A, typename I, int TB>
void sddmm_slots(const int32_t* crow, int64_t out, const I* col, const int64_t* slots, const A* dyt,
                 const A* xt, int64_t s0, int64_t s1, A* g) {
  if (s0 >= s1) return;
  // row of the first slot: the last o with crow[o] <= p (empty rows skipped)
  int64_t o = int64_t(std::upper_bound(crow, crow + out + 1, slots[s0],
                                       [](int64_t v, int32_t c) { return v < int64_t(c); }) - crow) - 1;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t p = slots[s];
    while (crow[o + 1] <= p) ++o;
    g[s] += dot_tb<A, TB>(dyt + o * TB, xt + int64_t(col[p]) * TB);
  }
}

template <typename A, typename V, typename I>
at::Tensor sddmm_typed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow,
                       const at::Tensor& col, const at::Tensor& slots) {
  const int64_t T = dy.size(0), out = dy.size(1), in = x.size(1);
  const bool all = !slots.defined();
  const int64_t n = all ? col.numel() : slots.numel();
  const auto acc_dtype = std::is_same<A, double>::value ? at::kDouble : at::kFloat;
  at::Tensor g = at::zeros({n}, dy.options().dtype(acc_dtype));
  const int64_t TB = token_block(T);
  const Panels P = build_panels<I>("csr_sddmm", crow, col, in, all ? panel_width<A>(TB, in) : std::max<int64_t>(in, 1));
  if (T == 0 || n == 0) return g;
  avec<A> dyt(size_t(out * TB)), xt(size_t(in * TB));
  const int32_t* cr = crow.data_ptr<int32_t>();
  const I* cl = col.data_ptr<I>();
  const int64_t* sl = all ? nullptr : slots.data_ptr<int64_t>();
  A* gp = g.data_ptr<A>();
  const auto parts = all ? balanced_rows(cr, out, num_parts(out)) : std::vector<int64_t>{};
  with_tb(TB, [&](auto tbc) {
    constexpr int TBc = decltype(tbc)::value;
    for (int64_t t0 = 0; t0 < T; t0 += TBc) {
      const int64_t nt = std::min<int64_t>(TBc, T - t0);
      pack_t<A, V>(dy.data_ptr<V>(), out, t0, nt, TBc, dyt.data());
      pack_t<A, V>(x.data_ptr<V>(), in, t0, nt, TBc, xt.data());
      if (all) {
        at::parallel_for(0, int64_t(parts.size()) - 1, 1, [&](int64_t b, int64_t e) {
          for (int64_t k = b; k < e; ++k) sddmm_rows<A, I, TBc>(P, cl, dyt.data(), xt.data(), parts[k], parts[k + 1], gp);
        });
      } else {
        at::parallel_for(0, n, 2048, [&](int64_t s0, int64_t s1) {
          sddmm_slots<A, I, TBc>(cr, out, cl, sl, dyt.data(), xt.data(), s0, s1, gp);
        });
      }
    }
  });
  return g;
}

// ---------------------------------------------------------------- dtype dispatch
template <typename F>
void dispatch_types(at::ScalarType v, at::ScalarType idx, F&& f) {
  auto with_index = [&](auto vtag) {
    using V = typename decltype(vtag)::type;
    if (idx == at::kShort) f(vtag, std::common_type<int16_t>{});
    else f(vtag, std::common_type<int32_t>{});
    (void)sizeof(V);
  };
  switch (v) {
    case at::kFloat: with_index(std::common_type<float>{}); break;
    case at::kDouble: with_index(std::common_type<double>{}); break;
    case at::kBFloat16: with_index(std::common_type<c10::BFloat16>{}); break;
    case at::kHalf: with_index(std::common_type<c10::Half>{}); break;
    default: TORCH_CHECK(false, "seft: unsupported value dtype ", v);
  }
}

at::Tensor spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  at::Tensor y;
  dispatch_types(values.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    y = spmm_typed<typename Acc<V>::type, V, I>(x, crow, col, values, bias);
  });
  return y;
}

at::Tensor spmm_t(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col,
                  const at::Tensor& values, int64_t in) {
  at::Tensor dx;
  dispatch_types(values.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    dx = spmm_t_typed<typename Acc<V>::type, V, I>(dy, crow, col, values, in);
  });
  return dx;
}

at::Tensor sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                 const at::Tensor& slots) {
  at::Tensor g;
  dispatch_types(x.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    g = sddmm_typed<typename Acc<V>::type, V, I>(dy, x, crow, col, slots);
  });
  return g;
}

}  // namespace

const IsaKernels kernels{SEFT_ISA_NAME, &spmm, &spmm_t, &sddmm};

}  // namespace seft::cpu::SEFT_ISA
