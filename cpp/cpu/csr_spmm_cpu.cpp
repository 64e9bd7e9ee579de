// csr_spmm on the CPU: Y = X W^T (+ bias). Argument checks, then the kernel (csr_spmm_kernel.h)
// of the ISA chosen at run time (isa.cpp). Column indices are validated inside the kernel (a
// pre-pass shared with the panel index).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/checks.h"
#include "cpu/isa.h"

namespace seft::cpu {
namespace {

at::Tensor csr_spmm_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                        const std::optional<at::Tensor>& bias) {
  check_spmm_args("csr_spmm", x, crow, col, values, bias, /*check_offsets=*/true);
  std::optional<at::Tensor> b;
  if (bias && bias->defined()) b = bias->contiguous();
  at::Tensor y = active_isa().spmm(as_2d(x), crow.contiguous(), col.contiguous(), values.contiguous(), b);
  return y.view(with_last(x.sizes(), crow.numel() - 1));
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("csr_spmm", &csr_spmm_cpu); }

}  // namespace seft::cpu
