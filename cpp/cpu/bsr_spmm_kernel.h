// bsr_spmm on the CPU (per-ISA): Y = X W^T + b with W in r x c blocks.
// Parallel over block rows; each block row walks a group of packed token blocks with its r x TB
// accumulators in registers (compile-time r, c for 4x4, 8x8, 16x16). Every output is summed
// in one fixed order (blocks, then the block's columns), whatever the thread count.
#pragma once
#include "cpu/bsr_common_kernel.h"

namespace seft::cpu::SEFT_ISA {
namespace {

template <typename A, typename V, typename I, int R, int C>
void bsr_spmm_brows(const int32_t* crow, const I* col, const V* val, int64_t rr, int64_t cc, const A* xt, int64_t inp,
                    const V* bias, int64_t T, int64_t out, int64_t br0, int64_t br1, V* y) {
  constexpr int TB = kBsrTB;
  const int64_t r = R ? R : rr, c = C ? C : cc;
  const int64_t ntb = (T + TB - 1) / TB;
  std::vector<A> heap(R ? 0 : size_t(r * TB));
  A local[R ? R * TB : 1];
  A* acc = R ? local : heap.data();
  // Token blocks in groups whose packed x (inp x TB each) fits in about 256 KiB, so the group
  // stays in L2 while the block rows walk it; the order of each output's sum is unchanged.
  const int64_t tile_bytes = std::max<int64_t>(1, inp * TB * int64_t(sizeof(A)));
  const int64_t group = std::max<int64_t>(1, (int64_t(256) << 10) / tile_bytes);
  for (int64_t g0 = 0; g0 < ntb; g0 += group) {
    const int64_t g1 = std::min(ntb, g0 + group);
    for (int64_t br = br0; br < br1; ++br) {
      for (int64_t tb = g0; tb < g1; ++tb) {
        const A* x = xt + tb * inp * TB;
        for (int64_t k = 0; k < r * TB; ++k) acc[k] = A(0);
        for (int32_t p = crow[br]; p < crow[br + 1]; ++p) {
          const V* w = val + int64_t(p) * r * c;
          const A* xb = x + int64_t(col[p]) * c * TB;
          for (int64_t j = 0; j < c; ++j) {
            const A* xr = xb + j * TB;
#pragma GCC unroll 16
            for (int64_t i = 0; i < r; ++i) {
              const A wij = static_cast<A>(w[i * c + j]);
#pragma GCC unroll 8
              for (int t = 0; t < TB; ++t) acc[i * TB + t] += wij * xr[t];
            }
          }
        }
        const int64_t nt = std::min<int64_t>(TB, T - tb * TB);
        for (int64_t i = 0; i < r && br * r + i < out; ++i) {
          const int64_t o = br * r + i;
          const A b = bias ? static_cast<A>(bias[o]) : A(0);
          for (int64_t t = 0; t < nt; ++t) y[(tb * TB + t) * out + o] = static_cast<V>(acc[i * TB + t] + b);
        }
      }
    }
  }
}

template <typename A, typename V, typename I>
at::Tensor bsr_spmm_typed(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                          int64_t out, const std::optional<at::Tensor>& bias) {
  const int64_t T = x.size(0), in = x.size(1), r = values.size(1), c = values.size(2);
  const int64_t nbr = crow.numel() - 1, nbc = (in + c - 1) / c, inp = nbc * c;
  at::Tensor y = at::empty({T, out}, x.options());
  if (T == 0 || out == 0) return y;
  constexpr int TB = kBsrTB;
  avec<A> xt(size_t(((T + TB - 1) / TB) * inp * TB));
  bsr_pack<A, V>(x.data_ptr<V>(), T, in, inp, xt.data());
  const int32_t* cr = crow.data_ptr<int32_t>();
  const I* cl = col.data_ptr<I>();
  const V* vl = values.data_ptr<V>();
  const V* bs = bias && bias->defined() ? bias->data_ptr<V>() : nullptr;
  V* yp = y.data_ptr<V>();
  with_block(r, c, [&](auto rc, auto cc) {
    constexpr int R = decltype(rc)::value, C = decltype(cc)::value;
    const int64_t work = col.numel() * r * c * T;
    at::parallel_for(0, nbr, bsr_grain(nbr, work), [&](int64_t b0, int64_t b1) {
      bsr_spmm_brows<A, V, I, R, C>(cr, cl, vl, r, c, xt.data(), inp, bs, T, out, b0, b1, yp);
    });
  });
  return y;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
