// csr_sddmm on the CPU: g[s] = sum_t dY[t, row(p)] X[t, col(p)], p = slots[s]. Argument checks
// (slots once per version, through the structure cache), then the kernel (csr_sddmm_kernel.h)
// of the ISA chosen at run time (isa.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/checks.h"
#include "common/structure_cache.h"
#include "cpu/isa.h"

namespace seft::cpu {
namespace {

at::Tensor csr_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         const std::optional<at::Tensor>& slots) {
  const char* op = "csr_sddmm";
  check_sddmm_args(op, grad_out, x, crow, col, slots, /*check_offsets=*/true);
  at::Tensor s;
  if (slots && slots->defined()) {
    s = slots->contiguous();
    checked_slots(*slots, col.numel(), [&] { check_slots_cpu(op, s, col.numel()); });  // once per version
  }
  return active_isa().sddmm(as_2d(grad_out), as_2d(x), crow.contiguous(), col.contiguous(), s);
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("csr_sddmm", &csr_sddmm_cpu); }

}  // namespace seft::cpu
