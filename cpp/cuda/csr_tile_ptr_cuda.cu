// csr_tile_ptr on CUDA: the column-tile index of W (common/csr_tile_index.h), one thread per
// entry. build_tile_ptr also serves the pattern checks (cuda/check_cuda.cu: the tile-128 index
// cached with a checked pattern), _csr_adopt_pattern and csr_slot_union.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common/checks.h"
#include "common/csr_tile_index.h"
#include "cuda/check_cuda.h"
#include "cuda/common_cuda.h"

namespace seft::cuda {
namespace {

// Runs on a checked pattern only (the miss path of the structure check).
template <typename I>
__global__ void tile_ptr_kernel(const int32_t* __restrict__ crow, const I* __restrict__ col, int32_t* __restrict__ tp,
                                int64_t out, int64_t width, int64_t tile) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < out * width; e += stride)
    tp[e] = tile_ptr_entry(crow, col, e / width, e % width, tile);
}

at::Tensor csr_tile_ptr_cuda(const at::Tensor& crow, const at::Tensor& col, int64_t in_features, int64_t tile) {
  const char* op = "csr_tile_ptr";
  check_tile_ptr_args(op, crow, col, in_features, tile, crow.device());
  const c10::cuda::CUDAGuard guard(crow.device());
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const at::Tensor cached = checked_tile_ptr(op, crow, col, crow_c, col_c, in_features);
  return tile == kColTile ? cached.clone() : build_tile_ptr(crow_c, col_c, in_features, tile);
}

}  // namespace

at::Tensor build_tile_ptr(const at::Tensor& crow, const at::Tensor& col, int64_t in, int64_t tile) {
  const int64_t out = crow.numel() - 1, width = tile_ptr_width(in, tile);
  at::Tensor tp = at::empty({out, width}, crow.options());
  if (out == 0) return tp;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (col.scalar_type() == at::kShort) {
    tile_ptr_kernel<int16_t><<<blocks_for(out * width), kBlock, 0, stream>>>(
        crow.const_data_ptr<int32_t>(), col.const_data_ptr<int16_t>(), tp.data_ptr<int32_t>(), out, width, tile);
  } else {
    tile_ptr_kernel<int32_t><<<blocks_for(out * width), kBlock, 0, stream>>>(
        crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), tp.data_ptr<int32_t>(), out, width, tile);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return tp;
}

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("csr_tile_ptr", &csr_tile_ptr_cuda); }

}  // namespace seft::cuda
