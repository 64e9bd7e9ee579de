// bsr_sddmm on the CPU (per-ISA): the gradient of blocks, g[s][i][j] = sum_t dY[t, br * r + i]
// X[t, bc * c + j] for the block p = slots[s] (every block without slots), in the accumulation
// dtype: per block a small dense product with the tokens as the reduction. dY and X are packed
// feature-major ([features][Tp], tokens zero padded to whole vectors); a tile of NI x NJ
// entries keeps one vector of token lanes per entry in registers (each loaded vector feeds NJ or
// NI FMAs), then sums the lanes in a fixed order. At few tokens (at most two vectors) the
// lane sums would cost more than the products: dY and X are packed token-major instead
// ([T][features], zero padded in features) and a block's r x c entries are accumulated token by
// token with its columns in the vector lanes (4x4, 8x8, 16x16 blocks). Parallel over blocks,
// each summed by one thread in one order (deterministic).
// Padding rows / columns read zeros: their entries are 0.
#pragma once
#include <utility>

#include "cpu/bsr_common_kernel.h"

namespace seft::cpu::SEFT_ISA {
namespace {

// g[i][j] (row stride c) for i < NI, j < NJ: sum over the nv token vectors of dy[i] * x[j].
template <typename A, int NI, int NJ>
__attribute__((always_inline)) inline void bsr_sddmm_tile(const A* dy, const A* x, int64_t Tp, int64_t nv, int64_t c,
                                                          A* g) {
  using Vt = vec_t<A>;
  constexpr int W = VecOf<A>::W;
  Vt acc[NI][NJ];
  for (int i = 0; i < NI; ++i)
    for (int j = 0; j < NJ; ++j) acc[i][j] = Vt{};
  for (int64_t v = 0; v < nv; ++v) {
    Vt a[NI], b[NJ];
#pragma GCC unroll 4
    for (int i = 0; i < NI; ++i) a[i] = *reinterpret_cast<const Vt*>(dy + i * Tp + v * W);
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) b[j] = *reinterpret_cast<const Vt*>(x + j * Tp + v * W);
#pragma GCC unroll 4
    for (int i = 0; i < NI; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) acc[i][j] += a[i] * b[j];
  }
  for (int i = 0; i < NI; ++i)
    for (int j = 0; j < NJ; ++j) g[i * c + j] = hsum(acc[i][j]);
}

// One block: dyb = dY's packed rows of its block row, xb = X's packed columns of its block column.
template <typename A, int R_, int C_>
void bsr_sddmm_block(const A* dyb, const A* xb, int64_t Tp, int64_t rr, int64_t cc, A* g) {
  const int64_t r = R_ ? R_ : rr, c = C_ ? C_ : cc, nv = Tp / VecOf<A>::W;
  const auto cols = [&](auto ni, int64_t i0, auto nj, int64_t j0) {
    constexpr int NI = decltype(ni)::value, NJ = decltype(nj)::value;
    bsr_sddmm_tile<A, NI, NJ>(dyb + i0 * Tp, xb + j0 * Tp, Tp, nv, c, g + i0 * c + j0);
  };
  for_chunks<4>(r, [&](auto ni, int64_t i0) {  // columns in tiles of 3 (of 2 when 3 would leave 1)
    if (c % 3 == 1) for_chunks<2>(c, [&](auto nj, int64_t j0) { cols(ni, i0, nj, j0); });
    else for_chunks<3>(c, [&](auto nj, int64_t j0) { cols(ni, i0, nj, j0); });
  });
}

// One R x C block at few tokens: dyb / xb = the block's first row / column in token-major packed
// dY / X (row strides ldy / ldx); g[i][j] = sum over t in order of dyb[t][i] * xb[t][j].
template <typename A, int R, int C>
void bsr_sddmm_block_few(const A* dyb, const A* xb, int64_t T, int64_t ldy, int64_t ldx, A* g) {
  A acc[R][C] = {};
  for (int64_t t = 0; t < T; ++t) {
    const A* d = dyb + t * ldy;
    const A* xr = xb + t * ldx;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const A a = d[i];
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) acc[i][j] += a * xr[j];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) g[i * C + j] = acc[i][j];
}

// Blocks [s0, s1) of the work list (block slot[s], or s without slots) in runs of `rows` block
// rows, each run in block-column order: a column's packed X serves the run's blocks in that
// column while the run's packed dY stays in L2. Each block's sum is independent of the order.
template <typename A, typename I, int R_, int C_>
void bsr_sddmm_range(const A* dyt, const A* xt, int64_t Tp, int64_t r, int64_t c, const int32_t* row_of, const I* col,
                     const int64_t* slot, int64_t rows, int64_t s0, int64_t s1, A* g) {
  std::vector<std::pair<int64_t, int64_t>> run;  // (block column, s)
  for (int64_t s = s0; s < s1;) {
    const int64_t br0 = row_of[slot ? slot[s] : s];
    run.clear();
    for (; s < s1; ++s) {
      const int64_t p = slot ? slot[s] : s;
      if (row_of[p] < br0 || row_of[p] >= br0 + rows) break;
      run.emplace_back(int64_t(col[p]), s);
    }
    std::sort(run.begin(), run.end());
    for (const auto& [bc, t] : run) {
      const int64_t p = slot ? slot[t] : t;
      bsr_sddmm_block<A, R_, C_>(dyt + row_of[p] * r * Tp, xt + bc * c * Tp, Tp, r, c, g + t * r * c);
    }
  }
}

// The same at few tokens: dyt / xt token-major ([T][outp] / [T][inp]), whose few rows stay in
// cache, so the blocks go in storage order.
template <typename A, typename I, int R, int C>
void bsr_sddmm_range_few(const A* dyt, const A* xt, int64_t T, int64_t outp, int64_t inp, const int32_t* row_of,
                         const I* col, const int64_t* slot, int64_t s0, int64_t s1, A* g) {
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t p = slot ? slot[s] : s;
    bsr_sddmm_block_few<A, R, C>(dyt + row_of[p] * R, xt + int64_t(col[p]) * C, T, outp, inp, g + s * R * C);
  }
}

// dst[t * np + j] = src[t * n + j] as A, 0 for n <= j < np (rows in parallel).
template <typename A, typename V>
void pack_token_major(const V* src, int64_t T, int64_t n, int64_t np, A* dst) {
  at::parallel_for(0, T, bsr_grain(T, T * np), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < n; ++j) dst[t * np + j] = static_cast<A>(src[t * n + j]);
      std::fill(dst + t * np + n, dst + (t + 1) * np, A(0));
    }
  });
}

template <typename A, typename V, typename I>
at::Tensor bsr_sddmm_typed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                           int64_t r, int64_t c, const at::Tensor& slots) {
  const int64_t T = dy.size(0), out = dy.size(1), in = x.size(1);
  const int64_t nbr = crow.numel() - 1, outp = nbr * r, inp = ((in + c - 1) / c) * c;
  const bool all = !slots.defined();
  const int64_t n = all ? col.numel() : slots.numel();
  const auto acc_dtype = std::is_same<A, double>::value ? at::kDouble : at::kFloat;
  at::Tensor g = at::zeros({n, r, c}, dy.options().dtype(acc_dtype));
  if (T == 0 || n == 0) return g;
  constexpr int W = VecOf<A>::W;
  const int64_t Tp = (T + W - 1) / W * W;
  const bool few = T <= 2 * W && r == c && (r == 4 || r == 8 || r == 16);
  avec<A> dyt(size_t(outp * Tp)), xt(size_t(inp * Tp));
  if (few) {
    pack_token_major<A, V>(dy.data_ptr<V>(), T, out, outp, dyt.data());
    pack_token_major<A, V>(x.data_ptr<V>(), T, in, inp, xt.data());
  } else {
    bsr_pack<A, V>(dy.data_ptr<V>(), T, out, outp, Tp, dyt.data());
    bsr_pack<A, V>(x.data_ptr<V>(), T, in, inp, Tp, xt.data());
  }
  const int32_t* cr = crow.data_ptr<int32_t>();
  const I* cl = col.data_ptr<I>();
  const int64_t* sl = all ? nullptr : slots.data_ptr<int64_t>();
  std::vector<int32_t> row_of(size_t(col.numel()));  // block row of every block
  for (int64_t br = 0; br < nbr; ++br)
    for (int32_t p = cr[br]; p < cr[br + 1]; ++p) row_of[p] = int32_t(br);
  A* gp = g.data_ptr<A>();
  const int64_t rows = std::max<int64_t>(1, (int64_t(256) << 10) / (r * Tp * int64_t(sizeof(A))));
  with_block(r, c, [&](auto rc, auto cc) {
    constexpr int R = decltype(rc)::value, C = decltype(cc)::value;
    at::parallel_for(0, n, bsr_grain(n, n * r * c * T, 16), [&](int64_t s0, int64_t s1) {
      if constexpr (R > 0) {
        if (few)
          return bsr_sddmm_range_few<A, I, R, C>(dyt.data(), xt.data(), T, outp, inp, row_of.data(), cl, sl, s0, s1,
                                                 gp);
      }
      bsr_sddmm_range<A, I, R, C>(dyt.data(), xt.data(), Tp, r, c, row_of.data(), cl, sl, rows, s0, s1, gp);
    });
  });
  return g;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
