// CPU implementations of the seft ops: argument checks, then the kernel set of the ISA
// chosen at run time (cpu_isa).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>

#include "cpu/checks.h"
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

// (..., n) -> (rows, n) without reshape(-1, n), which fails for n == 0.
at::Tensor as_2d(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, t.size(-1)}).contiguous();
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> s(sizes.begin(), sizes.end());
  s.back() = last;
  return s;
}

at::Tensor csr_spmm_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                        const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  const char* op = "csr_spmm";
  check_csr(op, crow, col, &values, x.device(), /*check_offsets=*/true);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension");
  check_dense(op, "x", x, x.size(-1), values.scalar_type(), values.device());
  const int64_t in = x.size(-1), out = crow.numel() - 1;
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();  // columns: checked by the kernel
  std::optional<at::Tensor> b;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1, op, ": bias must be 1-D of size out = ", out, ", got shape ", bias->sizes());
    check_dense(op, "bias", *bias, out, values.scalar_type(), values.device());
    b = bias->contiguous();
  }
  const at::Tensor x2 = as_2d(x);
  at::Tensor y = active_isa().spmm(x2, crow_c, col_c, values.contiguous(), b);
  return y.view(with_last(x.sizes(), out));
}

at::Tensor csr_spmm_t_cpu(const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, int64_t in_features) {
  const char* op = "csr_spmm_t";
  check_csr(op, crow, col, &values, grad_out.device(), /*check_offsets=*/true);
  const int64_t out = crow.numel() - 1;
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  check_dense(op, "grad_out", grad_out, out, values.scalar_type(), values.device());
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();  // columns: checked by the kernel
  const at::Tensor dy = as_2d(grad_out);
  at::Tensor dx = active_isa().spmm_t(dy, crow_c, col_c, values.contiguous(), in_features);
  return dx.view(with_last(grad_out.sizes(), in_features));
}

at::Tensor csr_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                         const at::Tensor& col, const std::optional<at::Tensor>& slots) {
  const char* op = "csr_sddmm";
  check_csr(op, crow, col, nullptr, x.device(), /*check_offsets=*/true);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension");
  TORCH_CHECK(is_supported_value_dtype(x.scalar_type()), op,
              ": x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  const int64_t in = x.size(-1), out = crow.numel() - 1;
  check_dense(op, "grad_out", grad_out, out, x.scalar_type(), x.device());
  TORCH_CHECK(grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1), op,
              ": grad_out ", grad_out.sizes(), " and x ", x.sizes(), " must have the same leading dimensions");
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();  // columns: checked by the kernel
  at::Tensor s;
  if (slots && slots->defined()) {
    TORCH_CHECK(slots->device() == x.device(), op, ": slots is on ", slots->device(), " but x is on ", x.device());
    s = slots->contiguous();
    check_slots_cpu(op, s, col.numel());
  }
  return active_isa().sddmm(as_2d(grad_out), as_2d(x), crow_c, col_c, s);
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) {
  m.impl("csr_spmm", &csr_spmm_cpu);
  m.impl("csr_spmm_t", &csr_spmm_t_cpu);
  m.impl("csr_sddmm", &csr_sddmm_cpu);
}

}  // namespace seft::cpu
