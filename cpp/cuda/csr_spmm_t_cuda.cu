// csr_spmm_t on CUDA: dX = dY W, deterministic, without a transposed copy of W: both kernels
// walk W by column tiles through the column-tile index (common/csr_tile_index.h), built once
// per pattern and cached with its check (cuda/check_cuda.h). Same schema, checks and semantics
// as the CPU op (cpp/cpu/csr_spmm_t_cpu.cpp).
//   cols_spmm_t  (CUDA cores, every dtype): a block owns one column tile of dx (kColTile
//                inputs) for a group of tokens and a range of rows; each warp walks 4 of its
//                rows at a time (their loads in flight together), their non-zeros in that tile
//                located by the column-tile index, and accumulates into its own shared-memory
//                partial; the 8 partials are summed in a fixed order. The rows are split across
//                blocks until each SM has ~3 blocks; the splits' partials go to a workspace
//                summed in a fixed order.
//   tc_spmm_t    (tensor cores, bf16 / fp16 from 64 tokens; cuda/tc_tile.cuh): C[i][t] =
//                sum_o W[o][i] dy[t][o]; the block's 128 input columns are one column tile.
// Every call is an NVTX range (seft::csr_spmm_t).
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
#include "common/dtype_dispatch.h"
#include "cuda/check_cuda.h"
#include "cuda/common_cuda.h"
#include "cuda/few_common.cuh"
#include "cuda/nvtx_range.h"
#include "cuda/tc_tile.cuh"

namespace seft::cuda {
namespace {

// ------------------------------------------------------------------ cols_spmm_t
// grid (token groups, column tiles, row splits). partial: null when there is one split.
template <typename A, typename V, typename I, int G>
__global__ void __launch_bounds__(kBlock) cols_spmm_t_kernel(const V* __restrict__ dy,
                                                             const int32_t* __restrict__ tile_ptr, int64_t width,
                                                             const I* __restrict__ col, const V* __restrict__ val,
                                                             V* __restrict__ dx, A* __restrict__ partial, int64_t T,
                                                             int64_t in, int64_t out, int64_t nnz,
                                                             int64_t rows_per_split) {
  __shared__ A part[kBlock / kWarp][G][kColTile];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t0 = int64_t(blockIdx.x) * G, tile = blockIdx.y, i0 = tile * kColTile;
  const int nt = static_cast<int>(std::min<int64_t>(G, T - t0));
  const int64_t r0 = int64_t(blockIdx.z) * rows_per_split, r1 = std::min<int64_t>(out, r0 + rows_per_split);
  A* flat = &part[0][0][0];
  for (int e = threadIdx.x; e < (kBlock / kWarp) * G * kColTile; e += kBlock) flat[e] = A(0);
  __syncthreads();
  // R rows of this warp at a time (rows o, o + 8, ...): their loads are in flight together
  constexpr int R = 4, kWarps = kBlock / kWarp;
  for (int64_t o = r0 + warp; o < r1; o += int64_t(kWarps) * R) {  // warp-uniform loop
    int64_t lo[R], hi[R];
    A d[R][G];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t ok = o + int64_t(k) * kWarps;
      lo[k] = ok < r1 ? clamp_offset(tile_ptr[ok * width + tile], 0, nnz) : 0;
      hi[k] = ok < r1 ? clamp_offset(tile_ptr[ok * width + tile + 1], lo[k], nnz) : 0;
#pragma unroll
      for (int t = 0; t < G; ++t) d[k][t] = (lo[k] < hi[k] && t < nt) ? static_cast<A>(dy[(t0 + t) * out + ok]) : A(0);
    }
#pragma unroll
    for (int q = 0; q < kColTile / kWarp; ++q) {  // a row has at most kColTile non-zeros in a tile
      bool more = false;
#pragma unroll
      for (int k = 0; k < R; ++k) more |= lo[k] + q * kWarp < hi[k];
      if (!more) break;  // warp-uniform
      int32_t c[R];
      A v[R];
#pragma unroll
      for (int k = 0; k < R; ++k) {
        const int64_t p = lo[k] + q * kWarp + lane;
        const int64_t cc = p < hi[k] ? static_cast<int64_t>(col[p]) - i0 : -1;
        const bool ok = cc >= 0 && cc < kColTile && cc + i0 < in;
        c[k] = ok ? static_cast<int32_t>(cc) : -1;
        v[k] = ok ? static_cast<A>(val[p]) : A(0);
      }
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (c[k] >= 0) {
#pragma unroll
          for (int t = 0; t < G; ++t) part[warp][t][c[k]] += v[k] * d[k][t];
        }
        __syncwarp();  // another lane may hold the same column in the next row
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * kColTile; e += kBlock) {
    const int t = e / kColTile, c = e % kColTile;
    if (t >= nt || i0 + c >= in) continue;
    A s = A(0);
#pragma unroll
    for (int w = 0; w < kBlock / kWarp; ++w) s += part[w][t][c];
    const int64_t at = (t0 + t) * in + i0 + c;
    if (partial) partial[int64_t(blockIdx.z) * T * in + at] = s;
    else dx[at] = static_cast<V>(s);
  }
}

template <typename A, typename V>
__global__ void sum_splits_kernel(const A* __restrict__ partial, V* __restrict__ dx, int64_t n, int64_t splits) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    A s = A(0);
    for (int64_t z = 0; z < splits; ++z) s += partial[z * n + e];
    dx[e] = static_cast<V>(s);
  }
}

at::Tensor cols_spmm_t(const at::Tensor& dy, const at::Tensor& tile_ptr, const at::Tensor& col, const at::Tensor& val,
                       int64_t in) {
  const int64_t T = dy.size(0), out = dy.size(1);
  at::Tensor dx = at::empty({T, in}, dy.options());
  if (T == 0 || in == 0) return dx;
  if (out == 0) return dx.zero_();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = sm_count();
  dispatch_types(val.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    using A = typename Acc<V>::type;
    auto launch = [&](auto g) {
      constexpr int G = decltype(g)::value;
      const int64_t tiles = (in + kColTile - 1) / kColTile, groups = (T + G - 1) / G;
      TORCH_CHECK(tiles <= 65535, "seft: csr_spmm_t: more than 8.4 M input features for the CUDA-core kernel (", in,
                  ")");
      // Split the rows until each SM has ~3 blocks (what fits at ~80-128 registers a thread;
      // each warp keeps R rows' loads in flight), keeping >= 32 rows per split; the splits'
      // partials are summed in a fixed order.
      const int64_t want_blocks = int64_t(sms) * 3;
      const int64_t want = (want_blocks + tiles * groups - 1) / (tiles * groups);
      const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, (out + 31) / 32, 64}));
      const int64_t rows_per_split = (out + splits - 1) / splits;
      at::Tensor partial;
      if (splits > 1) partial = at::empty({splits, T, in}, dy.options().dtype(c10::CppTypeToScalarType<A>::value));
      const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
      cols_spmm_t_kernel<A, V, I, G><<<grid, kBlock, 0, stream>>>(
          dy.const_data_ptr<V>(), tile_ptr.const_data_ptr<int32_t>(), tile_ptr.size(1), col.const_data_ptr<I>(),
          val.const_data_ptr<V>(), dx.data_ptr<V>(), splits > 1 ? partial.data_ptr<A>() : nullptr, T, in, out,
          col.numel(), rows_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (splits > 1) {
        sum_splits_kernel<A, V>
            <<<blocks_for(T * in), kBlock, 0, stream>>>(partial.const_data_ptr<A>(), dx.data_ptr<V>(), T * in, splits);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    // a group of 1, 2, 4 or 8 tokens (4 at most for fp64: 8 warps x G x 128 accumulators <= 32 KB)
    if (T == 1) launch(std::integral_constant<int, 1>{});
    else if (T == 2) launch(std::integral_constant<int, 2>{});
    else if (T <= 4 || sizeof(A) == 8) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, group_tokens<A>()>{});
  });
  return dx;
}

// tc_spmm_t: W rows [o0, o0 + 32) x columns [i0, i0 + 128) (one column tile), stored
// A[k][m] = W[o0 + k][i0 + m] (column-major A for WMMA). Warp w owns rows 4w .. 4w + 3; a
// row has at most 128 non-zeros in the tile: 4 loads of 32 lanes.
template <typename T, typename I>
struct ColTileSlice {
  static constexpr int kRows = kBK / 8, kChunks = kBM / 32;
  static constexpr int kLd = kBM + kPad;
  int32_t c[kRows][kChunks];
  T v[kRows][kChunks];

  __device__ void fetch(const int32_t* tp, int64_t width, int64_t tile, const I* col, const T* val, int64_t out,
                        int64_t nnz, int64_t o0, int64_t i0, int64_t in) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t o = o0 + w * kRows + i;
      const int64_t lo = o < out ? clamp_offset(tp[o * width + tile], 0, nnz) : 0;
      const int64_t hi = o < out ? clamp_offset(tp[o * width + tile + 1], lo, nnz) : 0;
#pragma unroll
      for (int q = 0; q < kChunks; ++q) {
        const int64_t p = lo + q * 32 + lane;
        const int64_t cc = p < hi ? static_cast<int64_t>(col[p]) : -1;
        const bool ok = cc >= i0 && cc < i0 + kBM && cc < in;
        c[i][q] = ok ? static_cast<int32_t>(cc - i0) : -1;
        v[i][q] = ok ? val[p] : zero16<T>();
      }
    }
  }
  __device__ void store(T* s) const {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int q = 0; q < kChunks; ++q) s[(w * kRows + i) * kLd + q * 32 + lane] = zero16<T>();
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int q = 0; q < kChunks; ++q)
        if (c[i][q] >= 0) s[(w * kRows + i) * kLd + c[i][q]] = v[i][q];
  }
};

// ------------------------------------------------------------------ tc_spmm_t
// grid (ceil(T / 128), ceil(in / 128)).
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) tc_spmm_t_kernel(const T* __restrict__ dy,
                                                             const int32_t* __restrict__ tile_ptr, int64_t width,
                                                             const I* __restrict__ col, const T* __restrict__ val,
                                                             T* __restrict__ dx, int64_t T_, int64_t in, int64_t out,
                                                             int64_t nnz, bool vec) {
  __shared__ __align__(128) unsigned char sa_raw[kBK * ColTileSlice<T, I>::kLd * sizeof(T)];
  __shared__ __align__(128) unsigned char sb_raw[kBN * TokenSlice<T>::kLd * sizeof(T)];
  __shared__ __align__(128) float scratch[8][256];
  T* sa = reinterpret_cast<T*>(sa_raw);
  T* sb = reinterpret_cast<T*>(sb_raw);
  const Warp w;
  const int64_t t0 = int64_t(blockIdx.x) * kBN, tile = blockIdx.y, i0 = tile * kBM;
  ColTileSlice<T, I> a;
  TokenSlice<T> b;
  FragC acc[2][4];
  zero(acc);
  slice_loop((out + kBK - 1) / kBK,
             [&](int64_t s) {
               a.fetch(tile_ptr, width, tile, col, val, out, nnz, s * kBK, i0, in);
               b.fetch(dy, T_, out, out, t0, s * kBK, vec);
             },
             [&] {
               a.store(sa);
               b.store(sb);
             },
             [&] {
               mma_slice<T, wmma::col_major, wmma::col_major>(acc, sa, ColTileSlice<T, I>::kLd, sb, TokenSlice<T>::kLd,
                                                              w);
             });
  store_transposed(acc, scratch[w.id], dx, static_cast<const T*>(nullptr), in, T_, i0, t0, w);
}

at::Tensor tc_spmm_t(const at::Tensor& dy, const at::Tensor& tile_ptr, const at::Tensor& col, const at::Tensor& val,
                     int64_t in) {
  const int64_t T_ = dy.size(0), out = dy.size(1);
  at::Tensor dx = at::empty({T_, in}, dy.options());
  if (T_ == 0 || in == 0) return dx;
  if (out == 0) return dx.zero_();
  const bool vec = out % 8 == 0 && aligned16(dy.const_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_tc(val.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using T = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    tc_spmm_t_kernel<T, I><<<grid2((T_ + kBN - 1) / kBN, (in + kBM - 1) / kBM), kThreads, 0, stream>>>(
        static_cast<const T*>(dy.const_data_ptr()), tile_ptr.const_data_ptr<int32_t>(), tile_ptr.size(1),
        col.const_data_ptr<I>(), static_cast<const T*>(val.const_data_ptr()), static_cast<T*>(dx.data_ptr()), T_, in,
        out, col.numel(), vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

// ------------------------------------------------------------------ the op
at::Tensor csr_spmm_t_cuda(const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features) {
  const char* op = "csr_spmm_t";
  const NvtxRange range("seft::csr_spmm_t");
  check_spmm_t_args(op, grad_out, crow, col, values, in_features, /*check_offsets=*/false);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), val = values.contiguous();
  const at::Tensor tp = checked_tile_ptr(op, crow, col, crow_c, col_c, in_features);
  const at::Tensor dy = as_2d(grad_out);
  at::Tensor dx = use_tensor_cores(val.scalar_type(), dy.size(0)) ? tc_spmm_t(dy, tp, col_c, val, in_features)
                                                                  : cols_spmm_t(dy, tp, col_c, val, in_features);
  return dx.view(with_last(grad_out.sizes(), in_features));
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("csr_spmm_t", &csr_spmm_t_cuda); }

}  // namespace seft::cuda
