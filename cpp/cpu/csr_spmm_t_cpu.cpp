// csr_spmm_t on the CPU: dX = dY W, deterministic. Argument checks, then the kernel
// (csr_spmm_t_kernel.h) of the ISA chosen at run time (isa.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/isa.h"

namespace seft::cpu {
namespace {

at::Tensor csr_spmm_t_cpu(const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, int64_t in_features) {
  check_spmm_t_args("csr_spmm_t", grad_out, crow, col, values, in_features, /*check_offsets=*/true);
  at::Tensor dx =
      active_isa().spmm_t(as_2d(grad_out), crow.contiguous(), col.contiguous(), values.contiguous(), in_features);
  return dx.view(with_last(grad_out.sizes(), in_features));
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("csr_spmm_t", &csr_spmm_t_cpu); }

}  // namespace seft::cpu
