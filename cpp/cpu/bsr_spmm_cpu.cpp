// bsr_spmm on the CPU: Y = X W^T (+ bias), W in r x c blocks. Argument checks (offsets and
// block columns on every call: O(blocks)), then the kernel (bsr_spmm_kernel.h) of the ISA
// chosen at run time (isa.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/bsr_checks.h"
#include "common/checks.h"
#include "cpu/isa.h"

namespace seft::cpu {
namespace {

at::Tensor bsr_spmm_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                        int64_t out_features, const std::optional<at::Tensor>& bias) {
  const char* op = "bsr_spmm";
  check_bsr_spmm_args(op, x, crow, col, values, out_features, bias, /*check_offsets=*/true);
  const at::Tensor cr = crow.contiguous(), cl = col.contiguous();
  check_bsr_cols_cpu(op, cr, cl, ceil_div(x.size(-1), values.size(2)));
  std::optional<at::Tensor> b;
  if (bias && bias->defined()) b = bias->contiguous();
  at::Tensor y = active_isa().bsr_spmm(as_2d(x), cr, cl, values.contiguous(), out_features, b);
  return y.view(with_last(x.sizes(), out_features));
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("bsr_spmm", &bsr_spmm_cpu); }

}  // namespace seft::cpu
