// Host-side pieces shared by the CUDA op files: the launch shape of the grid-stride kernels,
// the choice between the tensor-core and CUDA-core paths, and the column-tile index builder.
// Inputs of every kernel are contiguous, on the current device, already checked; x / dy are
// 2-D (tokens, features).
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_path.h"

namespace seft::cuda {

// Launch shape of the grid-stride kernels: 256 threads (8 warps) a block, at most 65535 blocks.
constexpr int kBlock = 256;
constexpr int64_t kMaxBlocks = 65535;
inline int blocks_for(int64_t threads) {
  return static_cast<int>(std::min<int64_t>((threads + kBlock - 1) / kBlock, kMaxBlocks));
}

// Token count from which bf16 / fp16 calls take the tensor-core path.
constexpr int64_t kTensorCoreMinTokens = 64;
// The tensor-core kernels take bf16 / fp16 only.
inline bool tc_supported(at::ScalarType v) { return v == at::kBFloat16 || v == at::kHalf; }

// The path of a call with `tokens` tokens (cuda_path() can force one; see common/cuda_path.h).
inline bool use_tensor_cores(at::ScalarType dtype, int64_t tokens) {
  switch (cuda_path()) {
    case CudaPath::kTensorCore: return tc_supported(dtype);
    case CudaPath::kCudaCore: return false;
    default: return tc_supported(dtype) && tokens >= kTensorCoreMinTokens;
  }
}

// The column-tile index (common/csr_tile_index.h), int32 (out, width) (csr_tile_ptr_cuda.cu).
at::Tensor build_tile_ptr(const at::Tensor& crow, const at::Tensor& col, int64_t in, int64_t tile);

}  // namespace seft::cuda
