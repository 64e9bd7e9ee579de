// The CUDA kernels behind the seft ops, by path. Inputs are contiguous, on the current
// device, already checked; x / dy are 2-D (tokens, features). The op wrappers in
// csr_ops_cuda.cu choose the path by dtype and token count.
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace seft::cuda {

// Launch shape of the grid-stride kernels: 256 threads (8 warps) a block, at most 65535 blocks.
constexpr int kBlock = 256;
constexpr int64_t kMaxBlocks = 65535;
inline int blocks_for(int64_t threads) {
  return static_cast<int>(std::min<int64_t>((threads + kBlock - 1) / kBlock, kMaxBlocks));
}

// Token count from which bf16 / fp16 calls take the tensor-core path.
constexpr int64_t kTensorCoreMinTokens = 64;
bool tc_supported(at::ScalarType values);

// csr_tc_kernels.cu (bf16 / fp16)
at::Tensor tc_spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                   const at::Tensor& bias, int64_t out);
at::Tensor tc_spmm_t(const at::Tensor& dy, const at::Tensor& tile_ptr, const at::Tensor& col, const at::Tensor& val,
                     int64_t in);
at::Tensor tc_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& tile_ptr, const at::Tensor& col);

// csr_few_kernels.cu (every dtype; the bandwidth-bound path for few tokens)
at::Tensor rows_spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                     const at::Tensor& bias, int64_t out);
at::Tensor cols_spmm_t(const at::Tensor& dy, const at::Tensor& tile_ptr, const at::Tensor& col, const at::Tensor& val,
                       int64_t in);
at::Tensor warp_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                      const at::Tensor& slots);
// The column-tile index (common/csr_tile_index.h) with tile kColTile, int32 (out, width).
at::Tensor build_tile_ptr(const at::Tensor& crow, const at::Tensor& col, int64_t in, int64_t tile);

}  // namespace seft::cuda
