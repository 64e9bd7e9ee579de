// _csr_adopt_pattern on CUDA (the controller's, after an evolution step): the host copies of
// a pattern the caller has just uploaded are checked on the CPU, and the device tensors are
// recorded as checked in the structure cache (common/structure_cache.h) with their column-tile
// index: the next op call needs no device check and no sync.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "common/checks.h"
#include "common/csr_tile_index.h"
#include "common/structure_cache.h"
#include "cuda/common_cuda.h"

namespace seft::cuda {
namespace {

void csr_adopt_pattern_cuda(const at::Tensor& crow, const at::Tensor& col, int64_t in_features,
                            const at::Tensor& crow_host, const at::Tensor& col_host,
                            const std::optional<at::Tensor>& slots, const std::optional<at::Tensor>& slots_host) {
  const char* op = "_csr_adopt_pattern";
  check_adopt_args(op, crow, col, in_features, crow_host, col_host, slots, slots_host);
  if (slots && slots->defined()) remember_slots(*slots, col.numel());
  const c10::cuda::CUDAGuard guard(crow.device());
  // queued after the caller's uploads on this stream: the index is built from the new pattern
  remember_structure(crow, col, in_features,
                     build_tile_ptr(crow.contiguous(), col.contiguous(), in_features, kColTile));
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("_csr_adopt_pattern", &csr_adopt_pattern_cuda); }

}  // namespace seft::cuda
