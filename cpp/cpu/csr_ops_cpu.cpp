// CPU implementations of the seft ops: argument checks, then the kernel set of the ISA
// chosen at run time (cpu_isa).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>

#include "common/structure_cache.h"
#include "common/checks.h"
#include "cpu/isa.h"

namespace seft::cpu {

namespace {

bool cpu_has_avx2() {
#if defined(SEFT_HAVE_AVX2) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const IsaKernels* best_isa() {
#if defined(SEFT_HAVE_AVX2)
  if (cpu_has_avx2()) return &avx2::kernels;
#endif
  return &base::kernels;
}

const IsaKernels* initial_isa() {
  const char* env = std::getenv("SEFT_CPU_ISA");
  if (env && std::string(env) == "base") return &base::kernels;
  return best_isa();
}

std::atomic<const IsaKernels*>& isa_slot() {
  static std::atomic<const IsaKernels*> slot{initial_isa()};
  return slot;
}

}  // namespace

const IsaKernels& active_isa() { return *isa_slot().load(); }

std::string cpu_isa(std::string choose) {
  if (choose == "base") {
    isa_slot().store(&base::kernels);
  } else if (choose == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "cpu_isa: this build or this CPU has no AVX2 + FMA + F16C kernels");
#if defined(SEFT_HAVE_AVX2)
    isa_slot().store(&avx2::kernels);
#endif
  } else if (choose == "auto") {
    isa_slot().store(best_isa());
  } else {
    TORCH_CHECK(choose.empty(), "cpu_isa: expected '', 'auto', 'base' or 'avx2', got '", choose, "'");
  }
  return active_isa().name;
}

namespace {

// Column indices are validated inside the kernels (a pre-pass shared with the panel index).
at::Tensor csr_spmm_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                        const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  check_spmm_args("csr_spmm", x, crow, col, values, bias, /*check_offsets=*/true);
  std::optional<at::Tensor> b;
  if (bias && bias->defined()) b = bias->contiguous();
  at::Tensor y = active_isa().spmm(as_2d(x), crow.contiguous(), col.contiguous(), values.contiguous(), b);
  return y.view(with_last(x.sizes(), crow.numel() - 1));
}

at::Tensor csr_spmm_t_cpu(const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, int64_t in_features) {
  check_spmm_t_args("csr_spmm_t", grad_out, crow, col, values, in_features, /*check_offsets=*/true);
  at::Tensor dx = active_isa().spmm_t(as_2d(grad_out), crow.contiguous(), col.contiguous(), values.contiguous(),
                                      in_features);
  return dx.view(with_last(grad_out.sizes(), in_features));
}

at::Tensor csr_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                         const at::Tensor& col, const std::optional<at::Tensor>& slots) {
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

TORCH_LIBRARY_IMPL(seft, CPU, m) {
  m.impl("csr_spmm", &csr_spmm_cpu);
  m.impl("csr_spmm_t", &csr_spmm_t_cpu);
  m.impl("csr_sddmm", &csr_sddmm_cpu);
}

}  // namespace seft::cpu
