// Shared by the CUDA-core kernels (rows_spmm, cols_spmm_t, warp_sddmm): every dtype, fp32
// accumulation (fp64 for fp64). They are the path for few tokens (decode, small batches),
// where the work is reading W once, and for fp32 / fp64 at any token count (the tensor-core
// path is bf16 / fp16 only). All are deterministic. Offsets are clamped to [0, nnz] and column
// indices bounds-checked, so a pattern changed behind the checks' back cannot make them read or
// write out of bounds.
#pragma once
#include <c10/cuda/CUDAException.h>

#include <cuda_runtime.h>

#include <cstdint>

namespace seft::cuda {

constexpr int kWarp = 32;

template <typename V> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
// Tokens per group: the group's accumulators live in registers (rows_spmm) or shared memory
// (cols_spmm_t: 8 warps x group x kColTile accumulators = 32 KB).
template <typename A> constexpr int group_tokens() { return sizeof(A) == 8 ? 4 : 8; }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {  // fixed order: the same bits every run
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

inline int sm_count() {  // of the current device (ATen's device-properties header needs cuSPARSE's)
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

}  // namespace seft::cuda
