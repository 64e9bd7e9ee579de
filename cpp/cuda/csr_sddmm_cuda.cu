// csr_sddmm on CUDA: g[s] = sum_t dY[t, row(p)] X[t, col(p)], p = slots[s] (every non-zero
// without slots). Same schema, checks and semantics as the CPU op (cpp/cpu/csr_sddmm_cpu.cpp);
// slots are checked on the device once per version (cuda/check_cuda.h).
//   warp_sddmm  (CUDA cores, every dtype): one warp per output non-zero: lanes stride over tokens.
//   tc_sddmm    (tensor cores, bf16 / fp16 from 64 tokens; cuda/tc_tile.cuh): a dense
//               128 x 128 tile of dY^T X per block holding a non-zero (found through the
//               column-tile index), then the tile's non-zeros are gathered from shared memory.
// Every call is an NVTX range (seft::csr_sddmm).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/zeros.h>
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
#include "common/cuda_path.h"
#include "common/dtype_dispatch.h"
#include "common/structure_cache.h"
#include "cuda/check_cuda.h"
#include "cuda/common_cuda.h"
#include "cuda/few_common.cuh"
#include "cuda/nvtx_range.h"
#include "cuda/tc_tile.cuh"

namespace seft::cuda {
namespace {

// ------------------------------------------------------------------ warp_sddmm
// g[s] = sum_t dy[t, row(p)] * x[t, col(p)], p = slots ? slots[s] : s.
template <typename A, typename V, typename I>
__global__ void warp_sddmm_kernel(const int32_t* __restrict__ crow, const I* __restrict__ col,
                                  const int64_t* __restrict__ slots, const V* __restrict__ dy, const V* __restrict__ x,
                                  A* __restrict__ g, int64_t n, int64_t T, int64_t out, int64_t in, int64_t nnz) {
  const int lane = threadIdx.x % kWarp;
  const int64_t nwarps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t s = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; s < n; s += nwarps) {
    const int64_t p = slots ? slots[s] : s;
    int64_t lo = 0, hi = out;  // row: the last o with crow[o] <= p (skips empty rows)
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (crow[mid] <= p) lo = mid;
      else hi = mid;
    }
    const int64_t o = lo, c = (p >= 0 && p < nnz) ? static_cast<int64_t>(col[p]) : -1;
    A acc = A(0);
    if (c >= 0 && c < in)
      for (int64_t t = lane; t < T; t += kWarp) acc += static_cast<A>(dy[t * out + o]) * static_cast<A>(x[t * in + c]);
    acc = warp_sum(acc);
    if (lane == 0) g[s] = acc;
  }
}

at::Tensor warp_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                      const at::Tensor& slots) {
  const int64_t T = dy.size(0), out = crow.numel() - 1, in = x.size(1);
  const int64_t n = slots.defined() ? slots.numel() : col.numel();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (T == 0 || n == 0) return at::zeros({n}, x.options().dtype(acc_dtype));
  at::Tensor g = at::empty({n}, x.options().dtype(acc_dtype));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    using A = typename Acc<V>::type;
    warp_sddmm_kernel<A, V, I><<<blocks_for(n * kWarp), kBlock, 0, stream>>>(
        crow.const_data_ptr<int32_t>(), col.const_data_ptr<I>(),
        slots.defined() ? slots.const_data_ptr<int64_t>() : nullptr, dy.const_data_ptr<V>(), x.const_data_ptr<V>(),
        g.data_ptr<A>(), n, T, out, in, col.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g;
}

// ------------------------------------------------------------------ tc_sddmm
constexpr int kCLd = kBN + 4;  // fp32 C tile of tc_sddmm
constexpr size_t kSddmmSmem = std::max<size_t>(size_t(kBM) * kCLd * sizeof(float), 2 * size_t(kBK) * (kBM + kPad) * 2);

// grid (ceil(in / 128), ceil(out / 128)); dynamic shared memory kSddmmSmem.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) tc_sddmm_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                            const int32_t* __restrict__ tile_ptr, int64_t width,
                                                            const I* __restrict__ col, float* __restrict__ g,
                                                            int64_t T_, int64_t in, int64_t out, int64_t nnz,
                                                            bool vec_dy, bool vec_x) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);         // A[k][m] = dy[t0 + k][o0 + m]
  T* sb = sa + kBK * RowSlice<T>::kLd;        // B[k][n] = x[t0 + k][i0 + n]
  float* sc = reinterpret_cast<float*>(smem);  // after the loop: C[m][n]
  const Warp w;
  const int64_t tile = blockIdx.x, i0 = tile * kBN, o0 = int64_t(blockIdx.y) * kBM;
  {  // a tile without non-zeros has nothing to compute (block-uniform exit)
    const int64_t o = o0 + threadIdx.x;
    const bool any = threadIdx.x < kBM && o < out && tile_ptr[o * width + tile] < tile_ptr[o * width + tile + 1];
    if (!__syncthreads_or(any)) return;
  }
  RowSlice<T> a, b;
  FragC acc[2][4];
  zero(acc);
  slice_loop(
      (T_ + kBK - 1) / kBK,
      [&](int64_t s) {
        a.fetch(dy, T_, out, out, s * kBK, o0, vec_dy);
        b.fetch(x, T_, in, in, s * kBK, i0, vec_x);
      },
      [&] {
        a.store(sa);
        b.store(sb);
      },
      [&] { mma_slice<T, wmma::col_major, wmma::row_major>(acc, sa, RowSlice<T>::kLd, sb, RowSlice<T>::kLd, w); });
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      wmma::store_matrix_sync(sc + (w.m * 32 + i * 16) * kCLd + w.n * 64 + j * 16, acc[i][j], kCLd,
                              wmma::mem_row_major);
  __syncthreads();
  // gather: warp w takes rows 16w .. 16w + 15 of the tile
  for (int r = w.id * 16; r < w.id * 16 + 16; ++r) {
    const int64_t o = o0 + r;
    if (o >= out) break;
    const int64_t lo = clamp_offset(tile_ptr[o * width + tile], 0, nnz);
    const int64_t hi = clamp_offset(tile_ptr[o * width + tile + 1], lo, nnz);
    for (int64_t p = lo + w.lane; p < hi; p += 32) {
      const int64_t c = static_cast<int64_t>(col[p]) - i0;
      if (c >= 0 && c < kBN && c + i0 < in) g[p] = sc[r * kCLd + c];
    }
  }
}

at::Tensor tc_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& tile_ptr, const at::Tensor& col) {
  const int64_t T_ = dy.size(0), out = dy.size(1), in = x.size(1), nnz = col.numel();
  at::Tensor g = at::empty({nnz}, x.options().dtype(at::kFloat));
  if (nnz == 0) return g;
  if (T_ == 0) return g.zero_();
  const bool vec_dy = out % 8 == 0 && aligned16(dy.const_data_ptr());
  const bool vec_x = in % 8 == 0 && aligned16(x.const_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_tc(x.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using T = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    auto kernel = tc_sddmm_kernel<T, I>;
    // > 48 KB of dynamic shared memory must be allowed per function (and device): cheap to repeat
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSddmmSmem)));
    TORCH_CHECK((out + kBM - 1) / kBM <= 65535, "seft: csr_sddmm: too many rows for the tensor-core kernel");
    kernel<<<dim3(static_cast<unsigned>((in + kBN - 1) / kBN), static_cast<unsigned>((out + kBM - 1) / kBM)), kThreads,
             kSddmmSmem, stream>>>(static_cast<const T*>(dy.const_data_ptr()),
                                   static_cast<const T*>(x.const_data_ptr()), tile_ptr.const_data_ptr<int32_t>(),
                                   tile_ptr.size(1), col.const_data_ptr<I>(), g.data_ptr<float>(), T_, in, out, nnz,
                                   vec_dy, vec_x);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g;
}

// ------------------------------------------------------------------ the op
at::Tensor csr_sddmm_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                          const at::Tensor& col, const std::optional<at::Tensor>& slots) {
  const char* op = "csr_sddmm";
  const NvtxRange range("seft::csr_sddmm");
  check_sddmm_args(op, grad_out, x, crow, col, slots, /*check_offsets=*/false);
  const int64_t in = x.size(-1);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const at::Tensor tp = checked_tile_ptr(op, crow, col, crow_c, col_c, in);
  at::Tensor s;
  if (slots && slots->defined()) {
    s = slots->contiguous();
    checked_slots(*slots, col_c.numel(), [&] { check_on_device(op, crow_c, col_c, in, s); });
  }
  const at::Tensor dy = as_2d(grad_out);
  const at::Tensor x2 = as_2d(x);
  // Tensor cores compute all of dY^T X (by 128 x 128 tiles holding a non-zero); a few slots
  // (under 1 per 4096 weight entries) cost less one warp each.
  const int64_t out = crow.numel() - 1;
  const bool few_slots = s.defined() && s.numel() * 4096 < out * in && cuda_path() == CudaPath::kAuto;
  if (use_tensor_cores(x.scalar_type(), dy.size(0)) && !few_slots) {
    const at::Tensor g = tc_sddmm(dy, x2, tp, col_c);
    return s.defined() ? g.index_select(0, s) : g;
  }
  return warp_sddmm(dy, x2, crow_c, col_c, s);
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("csr_sddmm", &csr_sddmm_cuda); }

}  // namespace seft::cuda
