// bsr_sddmm on the CPU (per-ISA): the gradient of blocks, g[s][i][j] = sum_t dY[t, br * r + i]
// X[t, bc * c + j] for the block p = slots[s] (every block without slots), in the accumulation
// dtype. Parallel over blocks; each entry sums TB lanes over the token blocks, then the lanes
// in a fixed order (deterministic). Padding rows / columns read zeros: their entries are 0.
#pragma once
#include "cpu/bsr_common_kernel.h"

namespace seft::cpu::SEFT_ISA {
namespace {

template <typename A, int R, int C>
void bsr_sddmm_block(const A* dyt, int64_t outp, const A* xt, int64_t inp, int64_t ntb, int64_t br, int64_t bc,
                     int64_t rr, int64_t cc, A* g) {
  constexpr int TB = kBsrTB;
  const int64_t r = R ? R : rr, c = C ? C : cc;
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < c; ++j) {
      A lane[TB] = {};
      for (int64_t tb = 0; tb < ntb; ++tb) {
        const A* d = dyt + (tb * outp + br * r + i) * TB;
        const A* x = xt + (tb * inp + bc * c + j) * TB;
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t) lane[t] += d[t] * x[t];
      }
      g[i * c + j] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    }
  }
}

template <typename A, typename V, typename I>
at::Tensor bsr_sddmm_typed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                           int64_t r, int64_t c, const at::Tensor& slots) {
  static_assert(kBsrTB == 8, "the lane sum below adds 8 lanes");
  const int64_t T = dy.size(0), out = dy.size(1), in = x.size(1);
  const int64_t nbr = crow.numel() - 1, outp = nbr * r, inp = ((in + c - 1) / c) * c;
  const bool all = !slots.defined();
  const int64_t n = all ? col.numel() : slots.numel();
  const auto acc_dtype = std::is_same<A, double>::value ? at::kDouble : at::kFloat;
  at::Tensor g = at::zeros({n, r, c}, dy.options().dtype(acc_dtype));
  if (T == 0 || n == 0) return g;
  constexpr int TB = kBsrTB;
  const int64_t ntb = (T + TB - 1) / TB;
  avec<A> dyt(size_t(ntb * outp * TB)), xt(size_t(ntb * inp * TB));
  bsr_pack<A, V>(dy.data_ptr<V>(), T, out, outp, dyt.data());
  bsr_pack<A, V>(x.data_ptr<V>(), T, in, inp, xt.data());
  const int32_t* cr = crow.data_ptr<int32_t>();
  const I* cl = col.data_ptr<I>();
  const int64_t* sl = all ? nullptr : slots.data_ptr<int64_t>();
  std::vector<int32_t> row_of(size_t(col.numel()));  // block row of every block
  for (int64_t br = 0; br < nbr; ++br)
    for (int32_t p = cr[br]; p < cr[br + 1]; ++p) row_of[p] = int32_t(br);
  A* gp = g.data_ptr<A>();
  with_block(r, c, [&](auto rc, auto cc) {
    constexpr int R = decltype(rc)::value, C = decltype(cc)::value;
    at::parallel_for(0, n, bsr_grain(n, n * r * c * T, 16), [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t p = all ? s : sl[s];
        bsr_sddmm_block<A, R, C>(dyt.data(), outp, xt.data(), inp, ntb, row_of[p], int64_t(cl[p]), r, c,
                                 gp + s * r * c);
      }
    });
  });
  return g;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
