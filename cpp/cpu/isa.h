// CPU kernels are compiled once per instruction set (isa_base.cpp, isa_avx2.cpp,
// isa_avx512.cpp) and the
// op wrappers (csr_*_cpu.cpp) call the one in use (isa.cpp: active_isa, the cpu_isa op).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

namespace seft::cpu {

struct IsaKernels {
  const char* name;
  // x: (T, in) contiguous; returns (T, out) in x's dtype.
  at::Tensor (*spmm)(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                     const std::optional<at::Tensor>& bias);
  // dy: (T, out) contiguous; returns (T, in_features) in dy's dtype.
  at::Tensor (*spmm_t)(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                       int64_t in_features);
  // dy: (T, out), x: (T, in) contiguous; slots undefined -> every non-zero.
  at::Tensor (*sddmm)(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                      const at::Tensor& slots);
  // BSR (values [nblocks, r, c]): the same three ops on r x c blocks (bsr_<op>_kernel.h).
  at::Tensor (*bsr_spmm)(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                         int64_t out_features, const std::optional<at::Tensor>& bias);
  at::Tensor (*bsr_spmm_t)(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features);
  // slots undefined -> every block; returns [n, r, c] in the accumulation dtype.
  at::Tensor (*bsr_sddmm)(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          int64_t r, int64_t c, const at::Tensor& slots);
};

namespace base { extern const IsaKernels kernels; }
namespace avx2 { extern const IsaKernels kernels; }
namespace avx512 { extern const IsaKernels kernels; }

const IsaKernels& active_isa();
std::string cpu_isa(std::string choose);

}  // namespace seft::cpu
