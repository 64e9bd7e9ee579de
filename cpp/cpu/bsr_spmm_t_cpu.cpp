// bsr_spmm_t on the CPU: dX = dY W, W in r x c blocks, deterministic. Argument checks, then
// the kernel (bsr_spmm_t_kernel.h) of the ISA chosen at run time (isa.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/bsr_checks.h"
#include "common/checks.h"
#include "cpu/isa.h"

namespace seft::cpu {
namespace {

at::Tensor bsr_spmm_t_cpu(const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, int64_t in_features) {
  const char* op = "bsr_spmm_t";
  check_bsr_spmm_t_args(op, grad_out, crow, col, values, in_features, /*check_offsets=*/true);
  const at::Tensor cr = crow.contiguous(), cl = col.contiguous();
  check_bsr_cols_cpu(op, cr, cl, ceil_div(in_features, values.size(2)));
  at::Tensor dx = active_isa().bsr_spmm_t(as_2d(grad_out), cr, cl, values.contiguous(), in_features);
  return dx.view(with_last(grad_out.sizes(), in_features));
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("bsr_spmm_t", &bsr_spmm_t_cpu); }

}  // namespace seft::cpu
