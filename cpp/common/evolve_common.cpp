#include "common/evolve_common.h"

#include "common/checks.h"

namespace seft::cpu::evolve {

void check_evolve_args(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& theta,
                       const at::Tensor& delta_slots, int64_t in) {
  TORCH_CHECK(theta.defined(), op, ": theta must be a tensor");
  TORCH_CHECK(theta.device().is_cpu(), op, ": this op runs on the CPU, theta is on ", theta.device());
  check_csr(op, crow, col, &theta, theta.device(), /*check_offsets=*/true);
  TORCH_CHECK(in >= 0, op, ": in_features must be >= 0, got ", in);
  check_cols_cpu(op, crow.contiguous(), col.contiguous(), in);
  TORCH_CHECK(delta_slots.defined() && delta_slots.device() == theta.device(), op, ": delta_slots must be a tensor on ",
              theta.device());
  check_slots_cpu(op, delta_slots.contiguous(), col.numel());
}

}  // namespace seft::cpu::evolve
