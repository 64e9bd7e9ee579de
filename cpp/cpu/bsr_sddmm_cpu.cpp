// bsr_sddmm on the CPU: the gradient of r x c blocks (all, or the slots' subset). Argument
// checks (offsets, block columns, slots), then the kernel (bsr_sddmm_kernel.h) of the ISA
// chosen at run time (isa.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/bsr_checks.h"
#include "common/checks.h"
#include "cpu/isa.h"

namespace seft::cpu {
namespace {

at::Tensor bsr_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         int64_t r, int64_t c, const std::optional<at::Tensor>& slots) {
  const char* op = "bsr_sddmm";
  check_bsr_sddmm_args(op, grad_out, x, crow, col, r, c, slots, /*check_offsets=*/true);
  const at::Tensor cr = crow.contiguous(), cl = col.contiguous();
  check_bsr_cols_cpu(op, cr, cl, ceil_div(x.size(-1), c));
  at::Tensor s;
  if (slots && slots->defined()) {
    s = slots->contiguous();
    check_slots_cpu(op, s, col.numel());
  }
  return active_isa().bsr_sddmm(as_2d(grad_out), as_2d(x), cr, cl, r, c, s);
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("bsr_sddmm", &bsr_sddmm_cpu); }

}  // namespace seft::cpu
