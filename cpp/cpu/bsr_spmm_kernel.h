// bsr_spmm on the CPU (per-ISA): Y = X W^T + b with W in r x c blocks: the blocked product of
// bsr_common_kernel.h over W's block rows (entries: the blocks of a block row, in storage order).
#pragma once
#include "cpu/bsr_common_kernel.h"

namespace seft::cpu::SEFT_ISA {
namespace {

template <typename A, typename V, typename I>
at::Tensor bsr_spmm_typed(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                          int64_t out, const std::optional<at::Tensor>& bias) {
  const int64_t T = x.size(0), in = x.size(1), r = values.size(1), c = values.size(2);
  const int64_t nbr = crow.numel() - 1, inp = ((in + c - 1) / c) * c;
  at::Tensor y = at::empty({T, out}, x.options());
  if (T == 0 || out == 0) return y;
  BsrMM<A, V> m{};
  m.ptr = crow.data_ptr<int32_t>();
  if constexpr (std::is_same<I, int16_t>::value) m.idx16 = col.data_ptr<int16_t>();
  else m.idx32 = col.data_ptr<int32_t>();
  m.val = values.data_ptr<V>();
  m.nrows = nbr, m.r = r, m.c = c, m.tr = false;
  m.kp = inp, m.T = T, m.nout = out;
  m.bias = bias && bias->defined() ? bias->data_ptr<V>() : nullptr;
  m.y = y.data_ptr<V>();
  bsr_mm_run<A, V>(m, x, in);
  return y;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
