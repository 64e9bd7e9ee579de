// bsr_spmm_t on the CPU (per-ISA): dX = dY W with W in r x c blocks, no transposed copy.
// Parallel over token blocks: each owns its tokens' dX and walks every block in storage
// order with the block's r x TB slice of dY in registers, so every dX entry is summed in one
// fixed order whatever the thread count (deterministic).
#pragma once
#include "cpu/bsr_common_kernel.h"

namespace seft::cpu::SEFT_ISA {
namespace {

template <typename A, typename V, typename I, int R, int C>
void bsr_spmm_t_tblock(const int32_t* crow, const I* col, const V* val, int64_t rr, int64_t cc, int64_t nbr,
                       const A* dyt, int64_t outp, A* dxt, int64_t inp) {
  constexpr int TB = kBsrTB;
  const int64_t r = R ? R : rr, c = C ? C : cc;
  std::fill(dxt, dxt + inp * TB, A(0));
  for (int64_t br = 0; br < nbr; ++br) {
    const A* dy = dyt + br * r * TB;
    for (int32_t p = crow[br]; p < crow[br + 1]; ++p) {
      const V* w = val + int64_t(p) * r * c;
      A* dxb = dxt + int64_t(col[p]) * c * TB;
      for (int64_t j = 0; j < c; ++j) {
        A acc[TB];
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t) acc[t] = dxb[j * TB + t];
#pragma GCC unroll 16
        for (int64_t i = 0; i < r; ++i) {
          const A wij = static_cast<A>(w[i * c + j]);
#pragma GCC unroll 8
          for (int t = 0; t < TB; ++t) acc[t] += wij * dy[i * TB + t];
        }
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t) dxb[j * TB + t] = acc[t];
      }
    }
  }
}

template <typename A, typename V, typename I>
at::Tensor bsr_spmm_t_typed(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col,
                            const at::Tensor& values, int64_t in) {
  const int64_t T = dy.size(0), out = dy.size(1), r = values.size(1), c = values.size(2);
  const int64_t nbr = crow.numel() - 1, outp = nbr * r, inp = ((in + c - 1) / c) * c;
  at::Tensor dx = at::empty({T, in}, dy.options());
  if (T == 0 || in == 0) return dx;
  constexpr int TB = kBsrTB;
  const int64_t ntb = (T + TB - 1) / TB;
  avec<A> dyt(size_t(ntb * outp * TB));
  bsr_pack<A, V>(dy.data_ptr<V>(), T, out, outp, dyt.data());
  const int32_t* cr = crow.data_ptr<int32_t>();
  const I* cl = col.data_ptr<I>();
  const V* vl = values.data_ptr<V>();
  V* dxp = dx.data_ptr<V>();
  with_block(r, c, [&](auto rc, auto cc) {
    constexpr int R = decltype(rc)::value, C = decltype(cc)::value;
    const int64_t work = col.numel() * r * c * T;
    at::parallel_for(0, ntb, bsr_grain(ntb, work), [&](int64_t b0, int64_t b1) {
      avec<A> dxt(size_t(inp * TB));
      for (int64_t tb = b0; tb < b1; ++tb) {
        bsr_spmm_t_tblock<A, V, I, R, C>(cr, cl, vl, r, c, nbr, dyt.data() + tb * outp * TB, outp, dxt.data(), inp);
        const int64_t nt = std::min<int64_t>(TB, T - tb * TB);
        for (int64_t t = 0; t < nt; ++t) {
          V* d = dxp + (tb * TB + t) * in;
          for (int64_t k = 0; k < in; ++k) d[k] = static_cast<V>(dxt[k * TB + t]);
        }
      }
    });
  });
  return dx;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
