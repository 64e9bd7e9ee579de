// CUDA-core kernels, every dtype (fp32 accumulation; fp64 for fp64). They are the path for
// few tokens (decode, small batches), where the work is reading W once, and for fp32 / fp64
// at any token count (the tensor-core path is bf16 / fp16 only).
//
//   rows_spmm    one warp per (row, group of up to 8 tokens): lanes stride over the row's
//                non-zeros with 4-8 loads of col and of values in flight per lane, each
//                (col, value) read once and applied to the group's tokens, then a fixed-order
//                shuffle reduction per token.
//   cols_spmm_t  dx = dy W without a transposed copy: a block owns one column tile of dx
//                (kColTile inputs) for a group of tokens and a range of rows; each warp walks
//                4 of its rows at a time (their loads in flight together), their non-zeros in
//                that tile located by the column-tile index, and accumulates into its own
//                shared-memory partial; the 8 partials are summed in a fixed order. The rows
//                are split across blocks until each SM has ~3 blocks; the splits' partials go
//                to a workspace summed in a fixed order.
//   warp_sddmm   one warp per output non-zero: lanes stride over tokens.
// All are deterministic. Offsets are clamped to [0, nnz] and column indices bounds-checked, so
// a pattern changed behind the checks' back cannot make them read or write out of bounds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/csr_tile_index.h"
#include "cuda/kernels_cuda.h"
#include "common/dtype_dispatch.h"

namespace seft::cuda {
namespace {

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

int sm_count() {  // of the current device (ATen's device-properties header needs cuSPARSE's)
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

// ------------------------------------------------------------------ rows_spmm
template <typename A, typename V, typename I, int G>
__global__ void rows_spmm_kernel(const int32_t* __restrict__ crow, const I* __restrict__ col,
                                 const V* __restrict__ val, const V* __restrict__ x, const V* __restrict__ bias,
                                 V* __restrict__ y, int64_t T, int64_t rows, int64_t in, int64_t nnz) {
  const int lane = threadIdx.x % kWarp;
  const int64_t nwarps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  const int64_t items = (T + G - 1) / G * rows;
  for (int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; w < items; w += nwarps) {
    const int64_t t0 = w / rows * G, o = w % rows;  // adjacent warps: adjacent rows
    const int nt = static_cast<int>(std::min<int64_t>(G, T - t0));
    const V* xg = x + t0 * in;
    A acc[G];
#pragma unroll
    for (int t = 0; t < G; ++t) acc[t] = A(0);
    const int64_t lo = clamp_offset(crow[o], 0, nnz), hi = clamp_offset(crow[o + 1], lo, nnz);
    // U loads of col and of val per lane in flight before their use: bandwidth needs them
    constexpr int U = G >= 4 ? 4 : 8;
    for (int64_t base = lo + lane; base < hi; base += int64_t(kWarp) * U) {
      int32_t c[U];
      A v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t p = base + int64_t(u) * kWarp;
        c[u] = p < hi ? static_cast<int32_t>(col[p]) : -1;
        v[u] = p < hi ? static_cast<A>(val[p]) : A(0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c[u] < 0 || c[u] >= in) continue;
#pragma unroll
        for (int t = 0; t < G; ++t)
          if (t < nt) acc[t] += v[u] * static_cast<A>(xg[t * in + c[u]]);
      }
    }
    const A b = bias ? static_cast<A>(bias[o]) : A(0);
#pragma unroll
    for (int t = 0; t < G; ++t) {
      const A s = warp_sum(acc[t]);
      if (lane == t && t < nt) y[(t0 + t) * rows + o] = static_cast<V>(s + b);
    }
  }
}

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
      for (int t = 0; t < G; ++t)
        d[k][t] = (lo[k] < hi[k] && t < nt) ? static_cast<A>(dy[(t0 + t) * out + ok]) : A(0);
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

// ------------------------------------------------------------------ warp_sddmm
// g[s] = sum_t dy[t, row(p)] * x[t, col(p)], p = slots ? slots[s] : s.
template <typename A, typename V, typename I>
__global__ void warp_sddmm_kernel(const int32_t* __restrict__ crow, const I* __restrict__ col,
                                  const int64_t* __restrict__ slots, const V* __restrict__ dy,
                                  const V* __restrict__ x, A* __restrict__ g, int64_t n, int64_t T, int64_t out,
                                  int64_t in, int64_t nnz) {
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
      for (int64_t t = lane; t < T; t += kWarp)
        acc += static_cast<A>(dy[t * out + o]) * static_cast<A>(x[t * in + c]);
    acc = warp_sum(acc);
    if (lane == 0) g[s] = acc;
  }
}

// Runs on a checked pattern only (the miss path of the structure check).
template <typename I>
__global__ void tile_ptr_kernel(const int32_t* __restrict__ crow, const I* __restrict__ col,
                                int32_t* __restrict__ tp, int64_t out, int64_t width, int64_t tile) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < out * width; e += stride)
    tp[e] = tile_ptr_entry(crow, col, e / width, e % width, tile);
}

}  // namespace

at::Tensor rows_spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                     const at::Tensor& bias, int64_t out) {
  const int64_t T = x.size(0), in = x.size(1);
  at::Tensor y = at::empty({T, out}, x.options());
  if (T == 0 || out == 0) return y;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(val.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    using A = typename Acc<V>::type;
    const V* b = bias.defined() ? bias.const_data_ptr<V>() : nullptr;
    const int64_t threads = (T + 7) / 8 * out * kWarp;
    // a group of 1, 2, 4 or 8 tokens: no idle accumulators for T < 8
    auto launch = [&](auto g) {
      constexpr int G = decltype(g)::value;
      rows_spmm_kernel<A, V, I, G><<<blocks_for(threads), kBlock, 0, stream>>>(
          crow.const_data_ptr<int32_t>(), col.const_data_ptr<I>(), val.const_data_ptr<V>(), x.const_data_ptr<V>(), b,
          y.data_ptr<V>(), T, out, in, col.numel());
    };
    if (T == 1) launch(std::integral_constant<int, 1>{});
    else if (T == 2) launch(std::integral_constant<int, 2>{});
    else if (T <= 4) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, 8>{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
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
      TORCH_CHECK(tiles <= 65535, "seft: csr_spmm_t: more than 8.4 M input features for the CUDA-core kernel (",
                  in, ")");
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
        sum_splits_kernel<A, V><<<blocks_for(T * in), kBlock, 0, stream>>>(partial.const_data_ptr<A>(),
                                                                            dx.data_ptr<V>(), T * in, splits);
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

}  // namespace seft::cuda
