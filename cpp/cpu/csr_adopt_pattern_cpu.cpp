// _csr_adopt_pattern on the CPU: the checks only (CPU ops check their pattern every call; the
// CUDA op records the device tensors as checked: cpp/cuda/csr_adopt_pattern_cuda.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/checks.h"

namespace seft::cpu {
namespace {

void csr_adopt_pattern_cpu(const at::Tensor& crow, const at::Tensor& col, int64_t in_features,
                           const at::Tensor& crow_host, const at::Tensor& col_host,
                           const std::optional<at::Tensor>& slots, const std::optional<at::Tensor>& slots_host) {
  check_adopt_args("_csr_adopt_pattern", crow, col, in_features, crow_host, col_host, slots, slots_host);
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("_csr_adopt_pattern", &csr_adopt_pattern_cpu); }

}  // namespace seft::cpu
