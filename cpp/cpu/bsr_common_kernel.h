// Shared pieces of the BSR CPU kernels (per-ISA; included by kernels.h through the
// bsr_<op>_kernel.h files): operand packing, block shapes, and the blocked product that
// bsr_spmm and bsr_spmm_t share.
//
// The product: Y[t, o] = sum over the entries of o's block row of a block's weights times a
// packed input. An entry is a reduction block index and an ro x k block of weights read with
// strides (so, sk): W's r x c block for bsr_spmm (rows of W), its transpose for bsr_spmm_t
// (through a block-column index). The input is packed in token blocks of TB = NV vectors:
// [ntb][kp][TB], zero padded in tokens and features, so the kernels never branch on padding.
// A micro-kernel keeps RB output rows x TB tokens of accumulators in registers; each weight is
// broadcast once and feeds NV FMAs. Cache blocking: token blocks in groups, the reduction in
// panels whose packed input (group x panel) stays in L2, partial sums kept between panels in
// an accumulation-type buffer. Every output sums its entries in storage order, each entry's k
// terms in order, whatever the thread count (bitwise deterministic).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/kernel_common.h"

namespace seft::cpu::SEFT_ISA {
namespace {

// Below about this many multiply-adds a call runs on one thread: waking the pool costs more
// (milliseconds when the cores are busy). The split never changes a result (fixed orders).
constexpr int64_t kBsrSerialWork = int64_t(1) << 18;

// at::parallel_for's grain for n items of `work` multiply-adds in all: n (one thread) when small.
inline int64_t bsr_grain(int64_t n, int64_t work, int64_t min_grain = 1) {
  return work < kBsrSerialWork ? std::max<int64_t>(n, 1) : min_grain;
}

// dst[(b * np + j) * TB + i] = src[(b * TB + i) * n + j] (0 outside T x n), in chunks of
// 64 features per token block (parallel over chunks).
template <typename A, typename V>
void bsr_pack(const V* src, int64_t T, int64_t n, int64_t np, int64_t TB, A* dst) {
  constexpr int64_t JC = 64;
  const int64_t nb = (T + TB - 1) / TB, nj = (np + JC - 1) / JC;
  at::parallel_for(0, nb * nj, bsr_grain(nb * nj, nb * np * TB), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / nj, j0 = (u % nj) * JC, j1 = std::min(np, j0 + JC), je = std::max(j0, std::min(n, j1));
      A* d = dst + b * np * TB;
      pack_cols(src, n, b * TB, std::min(TB, T - b * TB), TB, j0, je, d);
      std::fill(d + je * TB, d + j1 * TB, A(0));
    }
  });
}

// Calls f(integral_constant<R>, integral_constant<C>) with the compile-time block shape for
// the shapes that have micro-kernels (4x4, 8x8, 16x16), or (0, 0): the run-time shape.
template <typename F>
void with_block(int64_t r, int64_t c, F&& f) {
  if (r == 4 && c == 4) return f(std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{});
  if (r == 8 && c == 8) return f(std::integral_constant<int, 8>{}, std::integral_constant<int, 8>{});
  if (r == 16 && c == 16) return f(std::integral_constant<int, 16>{}, std::integral_constant<int, 16>{});
  f(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
}

// Calls f(integral_constant<N>) for n in 1..4 (n > 4: 4).
template <typename F>
void with_small(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// Calls f(integral_constant<B>, b0) for consecutive chunks [b0, b0 + B) of [0, n): chunks of
// Max (4 or less, or 8), then the remainder in at most one chunk of 4 and one of 1-3
// (compile-time widths; a compile-time n folds the loop).
template <int Max, typename F>
__attribute__((always_inline)) inline void for_chunks(int64_t n, F&& f) {
  static_assert(Max <= 4 || Max == 8, "for_chunks: chunks of 1-4 or 8");
  int64_t b0 = 0;
  for (; b0 + Max <= n; b0 += Max) f(std::integral_constant<int, Max>{}, b0);
  if (b0 == n) return;
  if constexpr (Max == 8) {
    if (n - b0 >= 4) f(std::integral_constant<int, 4>{}, b0), b0 += 4;
    if (b0 == n) return;
  }
  if constexpr (Max > 1) {
    if (n - b0 == 1) return f(std::integral_constant<int, 1>{}, b0);
  }
  if constexpr (Max > 2) {
    if (n - b0 == 2) return f(std::integral_constant<int, 2>{}, b0);
  }
  if constexpr (Max > 3) {
    if (n - b0 == 3) return f(std::integral_constant<int, 3>{}, b0);
  }
}

template <typename A> using vec_t = typename VecOf<A>::type;
template <typename A, size_t... L>
inline vec_t<A> splat_lanes(A s, std::index_sequence<L...>) { return vec_t<A>{((void)L, s)...}; }
template <typename A> inline vec_t<A> splat(A s) { return splat_lanes(s, std::make_index_sequence<VecOf<A>::W>{}); }

// The blocked product's operands (see the top of this file).
template <typename A, typename V>
struct BsrMM {
  const int32_t* ptr;                 // entries of block row b: [ptr[b], ptr[b + 1])
  const int16_t* idx16;               // reduction block index of each entry (int16 or int32)
  const int32_t* idx32;
  const int32_t* slot;                // the entry's block in values (nullptr: the entry itself)
  const V* val;                       // values [nblocks, r, c]
  int64_t nrows, r, c;                // block rows of the product; W's block shape
  bool tr;                            // entries are W's blocks transposed (bsr_spmm_t)
  const A* xt;                        // packed input [ntb][kp][TB]
  int64_t kp, T, nout;                // padded reduction size, tokens, output features
  const V* bias;                      // per output feature, or nullptr
  V* y;                               // output [T, nout]
  int64_t group = 1, pb = 1, npan = 1;  // token blocks per group, reduction blocks per panel, panels
  A* buf = nullptr;                   // partial sums between panels [group][nrows * ro][TB]
  int64_t idx(int64_t e) const { return idx16 ? int64_t(idx16[e]) : int64_t(idx32[e]); }
};

// acc[i][v] += sum_j w[i * so + j * sk] * x[j * TB + v * W + lane] over j < k, j in order.
template <typename A, int RB, int NV>
__attribute__((always_inline)) inline void bsr_micro(const A* w, int64_t so, int64_t sk, int64_t k, const A* x,
                                                     vec_t<A> (&acc)[RB][NV]) {
  using Vt = vec_t<A>;
  constexpr int W = VecOf<A>::W, TB = W * NV;
#pragma GCC unroll 16
  for (int64_t j = 0; j < k; ++j) {
    const Vt* xp = reinterpret_cast<const Vt*>(x + j * TB);
    Vt xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = xp[v];
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const Vt b = splat(w[i * so + j * sk]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += b * xv[v];
    }
  }
}

// Output rows o0 .. o0 + RB of token block tb over the n entries of a segment (weights wp[e],
// input x + xo[e]): starts from 0 (first panel) or the buffer, ends in the buffer or, at the
// last panel, in y (plus the bias, in V; rows >= nout and padding tokens dropped).
template <typename A, typename V, int RB, int NV>
__attribute__((always_inline)) inline void bsr_tile(const BsrMM<A, V>& m, const A* const* wp, const int64_t* xo,
                                                    int64_t n, int64_t woff, int64_t so, int64_t sk, int64_t k,
                                                    const A* x, A* buf, int64_t o0, int64_t tb, bool first, bool last) {
  using Vt = vec_t<A>;
  constexpr int W = VecOf<A>::W, TB = W * NV;
  Vt acc[RB][NV];
  Vt* bv = reinterpret_cast<Vt*>(buf);
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? Vt{} : bv[i * NV + v];
  for (int64_t e = 0; e < n; ++e) bsr_micro<A, RB, NV>(wp[e] + woff, so, sk, k, x + xo[e], acc);
  if (!last) {
    for (int i = 0; i < RB; ++i)
      for (int v = 0; v < NV; ++v) bv[i * NV + v] = acc[i][v];
    return;
  }
  alignas(64) A tmp[RB * TB];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v) reinterpret_cast<Vt*>(tmp)[i * NV + v] = acc[i][v];
  const int64_t nt = std::min<int64_t>(TB, m.T - tb * TB), ni = std::min<int64_t>(RB, m.nout - o0);
  A b[RB];
  for (int64_t i = 0; i < ni; ++i) b[i] = m.bias ? static_cast<A>(m.bias[o0 + i]) : A(0);
  for (int64_t t = 0; t < nt; ++t) {
    V* yr = m.y + (tb * TB + t) * m.nout + o0;
    for (int64_t i = 0; i < ni; ++i) yr[i] = static_cast<V>(tmp[i * TB + t] + b[i]);
  }
}

// The entries of block row br in panel q (every remaining one at the last panel), from the
// cursor on: their weights as A (converted into wconv unless V is A) and input offsets.
template <typename A, typename V>
int64_t bsr_segment(const BsrMM<A, V>& m, int64_t br, int64_t q, int32_t& cur, int64_t rc, int64_t kTB,
                    std::vector<const A*>& wp, std::vector<int64_t>& xo, std::vector<A>& wconv) {
  const int32_t e0 = cur, end = m.ptr[br + 1];
  int32_t e1 = e0;
  if (q == m.npan - 1) {
    e1 = end;
  } else {
    while (e1 < end && m.idx(e1) < (q + 1) * m.pb) ++e1;
  }
  cur = e1;
  for (int32_t e = e0; e < e1; ++e) {
    const V* w = m.val + (m.slot ? int64_t(m.slot[e]) : int64_t(e)) * rc;
    if constexpr (std::is_same<A, V>::value) {
      wp[e - e0] = w;
    } else {
      A* d = wconv.data() + (e - e0) * rc;
      for (int64_t l = 0; l < rc; ++l) d[l] = static_cast<A>(w[l]);
      wp[e - e0] = d;
    }
    xo[e - e0] = m.idx(e) * kTB;
  }
  return e1 - e0;
}

// Block rows [br0, br1) of the product: token groups, then panels, then rows, token blocks and
// RB-row tiles (R_, C_: compile-time block shape, 0 for the run-time one).
template <typename A, typename V, int R_, int C_, int NV, bool TR>
void bsr_mm_rows(const BsrMM<A, V>& m, int64_t br0, int64_t br1) {
  constexpr int TB = VecOf<A>::W * NV;
  const int64_t r = R_ ? R_ : m.r, c = C_ ? C_ : m.c, rc = r * c;
  const int64_t ro = TR ? c : r, k = TR ? r : c, so = TR ? 1 : c, sk = TR ? c : 1;
  const int64_t ntb = (m.T + TB - 1) / TB, rop = m.nrows * ro;
  int64_t nmax = 0;
  for (int64_t br = br0; br < br1; ++br) nmax = std::max<int64_t>(nmax, m.ptr[br + 1] - m.ptr[br]);
  std::vector<const A*> wp(size_t(nmax) + 1);
  std::vector<int64_t> xo(size_t(nmax) + 1);
  std::vector<A> wconv(std::is_same<A, V>::value ? 0 : size_t(nmax * rc));
  std::vector<int32_t> cur(size_t(br1 - br0));
  for (int64_t g0 = 0; g0 < ntb; g0 += m.group) {
    const int64_t g1 = std::min(ntb, g0 + m.group);
    for (int64_t br = br0; br < br1; ++br) cur[br - br0] = m.ptr[br];
    for (int64_t q = 0; q < m.npan; ++q) {
      const bool first = q == 0, last = q == m.npan - 1;
      for (int64_t br = br0; br < br1; ++br) {
        const int64_t n = bsr_segment<A, V>(m, br, q, cur[br - br0], rc, k * TB, wp, xo, wconv);
        if (n == 0 && !first && !last) continue;
        for (int64_t tb = g0; tb < g1; ++tb) {
          const A* x = m.xt + tb * m.kp * TB;
          A* buf = m.buf ? m.buf + ((tb - g0) * rop + br * ro) * TB : nullptr;
          // One token vector: tiles of 8 rows keep 8 FMA chains in flight (4 leave the FMA
          // units half idle on their latency); 2-3 vectors: 4 rows (8-12 chains).
          for_chunks<NV == 1 ? 8 : 4>(ro, [&](auto rb, int64_t i0) {
            constexpr int RB = decltype(rb)::value;
            bsr_tile<A, V, RB, NV>(m, wp.data(), xo.data(), n, i0 * so, so, sk, k, x, buf ? buf + i0 * TB : nullptr,
                                   br * ro + i0, tb, first, last);
          });
        }
      }
    }
  }
}

// Runs the product: token-block width (NV vectors: 1, 2 or 3 by the token count), token groups
// and reduction panels (from the shapes only, never the thread count), parallel over block rows.
template <typename A, typename V>
void bsr_mm_run(BsrMM<A, V>& m, const at::Tensor& xsrc, int64_t kin) {
  constexpr int W = VecOf<A>::W;
  const int64_t nv = m.T <= W ? 1 : m.T <= 2 * W ? 2 : 3, TB = W * nv, ntb = (m.T + TB - 1) / TB;
  const int64_t k = m.tr ? m.r : m.c, ro = m.tr ? m.c : m.r, nk = m.kp / k;
  avec<A> xt(size_t(ntb * m.kp * TB));
  bsr_pack<A, V>(xsrc.data_ptr<V>(), m.T, kin, m.kp, TB, xt.data());
  m.xt = xt.data();
  // About 96 tokens per group; a panel's packed input (group x panel) in about 256 KiB of L2.
  m.group = std::max<int64_t>(1, 96 / TB);
  const int64_t gtok = std::min(ntb, m.group) * TB;
  const int64_t pb = std::max<int64_t>(1, (int64_t(256) << 10) / (gtok * k * int64_t(sizeof(A))));
  m.npan = std::max<int64_t>(1, (nk + pb - 1) / pb);
  m.pb = std::max<int64_t>(1, (nk + m.npan - 1) / m.npan);
  m.npan = std::max<int64_t>(1, (nk + m.pb - 1) / m.pb);
  avec<A> buf(m.npan > 1 ? size_t(std::min(ntb, m.group) * m.nrows * ro * TB) : 0);
  m.buf = m.npan > 1 ? buf.data() : nullptr;
  const int64_t work = (m.ptr[m.nrows] - m.ptr[0]) * m.r * m.c * m.T;
  with_block(m.r, m.c, [&](auto rr, auto cc) {
    constexpr int R = decltype(rr)::value, C = decltype(cc)::value;
    with_small(nv, [&](auto nvc) {
      constexpr int NV = decltype(nvc)::value;
      if constexpr (NV <= 3) {
        at::parallel_for(0, m.nrows, bsr_grain(m.nrows, work), [&](int64_t b0, int64_t b1) {
          if (m.tr) bsr_mm_rows<A, V, R, C, NV, true>(m, b0, b1);
          else bsr_mm_rows<A, V, R, C, NV, false>(m, b0, b1);
        });
      }
    });
  });
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
