// csr_spmm on CUDA: Y = X W^T (+ bias). Same schema, checks and semantics as the CPU op
// (cpp/cpu/csr_spmm_cpu.cpp). The wrapper checks (the shared host checks; the pattern on the
// device, once per version: cuda/check_cuda.h), chooses a path (cuda/common_cuda.h) and launches:
//   rows_spmm  (CUDA cores, every dtype; few tokens, fp32 / fp64): one warp per (row, group of
//              up to 8 tokens): lanes stride over the row's non-zeros with 4-8 loads of col and
//              of values in flight per lane, each (col, value) read once and applied to the
//              group's tokens, then a fixed-order shuffle reduction per token.
//   tc_spmm    (tensor cores, bf16 / fp16 from 64 tokens; cuda/tc_tile.cuh): C[o][t] =
//              sum_k W[o][k] x[t][k]; W rows advance by per-row cursors (columns are sorted), so
//              each non-zero is read once per token tile.
// Every call is an NVTX range (seft::csr_spmm).
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

// ------------------------------------------------------------------ rows_spmm
template <typename A, typename V, typename I, int G>
__global__ void rows_spmm_kernel(const int32_t* __restrict__ crow, const I* __restrict__ col, const V* __restrict__ val,
                                 const V* __restrict__ x, const V* __restrict__ bias, V* __restrict__ y, int64_t T,
                                 int64_t rows, int64_t in, int64_t nnz) {
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

// ------------------------------------------------------------------ sparse operand slices
// tc_spmm: the W tile rows [o0, o0 + 128) x columns [k0, k0 + 32), stored A[r][k] (row-major
// A for WMMA). Warp w owns rows 16w .. 16w + 15. Each row has at most 32 non-zeros in a
// 32-column slice, so one 32-lane load per row covers it; the row's cursor then moves past
// the lanes that fell into the slice (a prefix, since columns are sorted).
template <typename T, typename I>
struct RowCursorSlice {
  static constexpr int kRows = kBM / 8;
  static constexpr int kLd = kBK + kPad;
  int32_t cur[kRows], end[kRows];  // nnz < 2^31; positions are formed in int64
  int32_t c[kRows];  // column within the slice, or -1
  T v[kRows];

  __device__ void init(const int32_t* crow, int64_t out, int64_t nnz, int64_t o0) {
    const int w = threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t o = o0 + w * kRows + i;
      cur[i] = o < out ? static_cast<int32_t>(clamp_offset(crow[o], 0, nnz)) : 0;
      end[i] = o < out ? static_cast<int32_t>(clamp_offset(crow[o + 1], cur[i], nnz)) : 0;
    }
  }
  __device__ void fetch(const I* col, const T* val, int64_t k0, int64_t in) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t p = int64_t(cur[i]) + lane;
      const int64_t cc = p < end[i] ? static_cast<int64_t>(col[p]) : INT64_MAX;
      const bool in_slice = cc >= k0 && cc < k0 + kBK && cc < in;
      c[i] = in_slice ? static_cast<int32_t>(cc - k0) : -1;
      v[i] = in_slice ? val[p] : zero16<T>();
      // advance past this slice's entries (and past bad ones below k0, so none can stall)
      const unsigned taken = __ballot_sync(0xffffffffu, p < end[i] && cc < k0 + kBK);
      cur[i] += __popc(taken);
    }
  }
  __device__ void store(T* s) const {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i) s[(w * kRows + i) * kLd + lane] = zero16<T>();
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (c[i] >= 0) s[(w * kRows + i) * kLd + c[i]] = v[i];
  }
};

// ------------------------------------------------------------------ tc_spmm
// grid (ceil(T / 128), ceil(out / 128)).
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) tc_spmm_kernel(const T* __restrict__ x, const int32_t* __restrict__ crow,
                                                           const I* __restrict__ col, const T* __restrict__ val,
                                                           const T* __restrict__ bias, T* __restrict__ y, int64_t T_,
                                                           int64_t in, int64_t out, int64_t nnz, bool vec) {
  // raw bytes: __nv_bfloat16 / __half are classes
  __shared__ __align__(128) unsigned char sa_raw[kBM * RowCursorSlice<T, I>::kLd * sizeof(T)];
  __shared__ __align__(128) unsigned char sb_raw[kBN * TokenSlice<T>::kLd * sizeof(T)];
  __shared__ __align__(128) float scratch[8][256];
  T* sa = reinterpret_cast<T*>(sa_raw);
  T* sb = reinterpret_cast<T*>(sb_raw);
  const Warp w;
  const int64_t t0 = int64_t(blockIdx.x) * kBN, o0 = int64_t(blockIdx.y) * kBM;
  RowCursorSlice<T, I> a;
  TokenSlice<T> b;
  a.init(crow, out, nnz, o0);
  FragC acc[2][4];
  zero(acc);
  slice_loop((in + kBK - 1) / kBK,
             [&](int64_t s) {
               a.fetch(col, val, s * kBK, in);
               b.fetch(x, T_, in, in, t0, s * kBK, vec);
             },
             [&] {
               a.store(sa);
               b.store(sb);
             },
             [&] {
               mma_slice<T, wmma::row_major, wmma::col_major>(acc, sa, RowCursorSlice<T, I>::kLd, sb,
                                                              TokenSlice<T>::kLd, w);
             });
  store_transposed(acc, scratch[w.id], y, bias, out, T_, o0, t0, w);
}

at::Tensor tc_spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                   const at::Tensor& bias, int64_t out) {
  const int64_t T_ = x.size(0), in = x.size(1);
  at::Tensor y = at::empty({T_, out}, x.options());
  if (T_ == 0 || out == 0) return y;
  const bool vec = in % 8 == 0 && aligned16(x.const_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_tc(val.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using T = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    tc_spmm_kernel<T, I><<<grid2((T_ + kBN - 1) / kBN, (out + kBM - 1) / kBM), kThreads, 0, stream>>>(
        static_cast<const T*>(x.const_data_ptr()), crow.const_data_ptr<int32_t>(), col.const_data_ptr<I>(),
        static_cast<const T*>(val.const_data_ptr()),
        bias.defined() ? static_cast<const T*>(bias.const_data_ptr()) : nullptr, static_cast<T*>(y.data_ptr()), T_, in,
        out, col.numel(), vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// ------------------------------------------------------------------ the op
at::Tensor csr_spmm_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                         const std::optional<at::Tensor>& bias) {
  const char* op = "csr_spmm";
  const NvtxRange range("seft::csr_spmm");
  check_spmm_args(op, x, crow, col, values, bias, /*check_offsets=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = x.size(-1), out = crow.numel() - 1;
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), val = values.contiguous();
  checked_tile_ptr(op, crow, col, crow_c, col_c, in);
  at::Tensor b;
  if (bias && bias->defined()) b = bias->contiguous();
  const at::Tensor x2 = as_2d(x);
  at::Tensor y = use_tensor_cores(val.scalar_type(), x2.size(0)) ? tc_spmm(x2, crow_c, col_c, val, b, out)
                                                                 : rows_spmm(x2, crow_c, col_c, val, b, out);
  return y.view(with_last(x.sizes(), out));
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("csr_spmm", &csr_spmm_cuda); }

}  // namespace seft::cuda
