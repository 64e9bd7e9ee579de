// bsr_sddmm on the CPU (per-ISA): the gradient of blocks, g[s][i][j] = sum_t dY[t, br * r + i]
// X[t, bc * c + j] for the block p = slots[s] (every block without slots), in the accumulation
// dtype: per block a small dense product with the tokens as the reduction. dY and X are packed
// feature-major ([features][Tp], tokens zero padded to whole vectors); a tile of NI x NJ
// entries keeps one vector of token lanes per entry in registers (each loaded vector feeds NJ or
// NI FMAs), then sums the lanes in a fixed order. Parallel over blocks, each summed by one
// thread in one order (deterministic).
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
  avec<A> dyt(size_t(outp * Tp)), xt(size_t(inp * Tp));
  bsr_pack<A, V>(dy.data_ptr<V>(), T, out, outp, Tp, dyt.data());
  bsr_pack<A, V>(x.data_ptr<V>(), T, in, inp, Tp, xt.data());
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
      bsr_sddmm_range<A, I, R, C>(dyt.data(), xt.data(), Tp, r, c, row_of.data(), cl, sl, rows, s0, s1, gp);
    });
  });
  return g;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
