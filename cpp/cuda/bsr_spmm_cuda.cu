// bsr_spmm on CUDA: Y = X W^T (+ bias), W in r x c blocks. Same schema, checks and semantics
// as the CPU op (cpp/cpu/bsr_spmm_cpu.cpp); the pattern is checked on the device once per
// version (cuda/bsr_common.cuh). Paths:
//   simt_bsr_spmm  (CUDA cores: every dtype and block shape): one thread per (output row, group
//                  of up to 8 tokens); it walks the row's blocks in storage order, each block's
//                  row of c weights read once for the group. Threads of one block row read the
//                  same x entries (broadcast), adjacent rows adjacent weights.
//   tc_bsr_spmm    (tensor cores: bf16 / fp16, r and c multiples of 16, from 64 tokens): a thread
//                  block owns a band of MB rows of one block row and 128 tokens; K is the block
//                  row's blocks, c columns each, gathered 32 at a time (cuda/bsr_common.cuh).
// Every call is an NVTX range (seft::bsr_spmm).
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

#include "common/bsr_checks.h"
#include "common/checks.h"
#include "common/dtype_dispatch.h"
#include "cuda/bsr_common.cuh"
#include "cuda/common_cuda.h"
#include "cuda/few_common.cuh"
#include "cuda/nvtx_range.h"
#include "cuda/tc_tile.cuh"

namespace seft::cuda {
namespace {

// ------------------------------------------------------------------ simt_bsr_spmm
// Items (token group, output row), rows fastest; grid-stride.
template <typename A, typename V, typename I, int G>
__global__ void simt_bsr_spmm_kernel(const int32_t* __restrict__ crow, const I* __restrict__ col,
                                     const V* __restrict__ val, const V* __restrict__ x, const V* __restrict__ bias,
                                     V* __restrict__ y, int64_t T, int64_t out, int64_t in, int64_t r, int64_t c,
                                     int64_t nb) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, nbc = (in + c - 1) / c;
  const int64_t items = (T + G - 1) / G * out;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < items; e += stride) {
    const int64_t t0 = e / out * G, o = e % out, br = o / r, i = o % r;
    const int nt = static_cast<int>(std::min<int64_t>(G, T - t0));
    A acc[G];
#pragma unroll
    for (int t = 0; t < G; ++t) acc[t] = A(0);
    const int64_t lo = clamp_offset(crow[br], 0, nb), hi = clamp_offset(crow[br + 1], lo, nb);
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t bc = static_cast<int64_t>(col[p]);
      if (bc < 0 || bc >= nbc) continue;
      const V* w = val + (p * r + i) * c;
      const V* xb = x + t0 * in + bc * c;
      const int64_t jn = std::min<int64_t>(c, in - bc * c);  // the padding columns multiply nothing
      for (int64_t j = 0; j < jn; ++j) {
        const A wij = static_cast<A>(w[j]);
#pragma unroll
        for (int t = 0; t < G; ++t)
          if (t < nt) acc[t] += wij * static_cast<A>(xb[t * in + j]);
      }
    }
    const A b = bias ? static_cast<A>(bias[o]) : A(0);
#pragma unroll
    for (int t = 0; t < G; ++t)
      if (t < nt) y[(t0 + t) * out + o] = static_cast<V>(acc[t] + b);
  }
}

at::Tensor simt_bsr_spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                         const at::Tensor& bias, int64_t out, at::Tensor y) {
  const int64_t T = x.size(0), in = x.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(val.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    using A = typename Acc<V>::type;
    const V* b = bias.defined() ? bias.const_data_ptr<V>() : nullptr;
    auto launch = [&](auto g) {
      constexpr int G = decltype(g)::value;
      simt_bsr_spmm_kernel<A, V, I, G><<<blocks_for((T + G - 1) / G * out), kBlock, 0, stream>>>(
          crow.const_data_ptr<int32_t>(), col.const_data_ptr<I>(), val.const_data_ptr<V>(), x.const_data_ptr<V>(), b,
          y.data_ptr<V>(), T, out, in, val.size(1), val.size(2), col.numel());
    };
    if (T == 1) launch(std::integral_constant<int, 1>{});
    else if (T == 2) launch(std::integral_constant<int, 2>{});
    else if (T <= 4) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, 8>{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// ------------------------------------------------------------------ tc_bsr_spmm
struct SpmmShape { int64_t T, in, out, r, c, nb, nbc, bands; };

// grid (block rows x bands, token tiles); C[m][n] = y[t0 + n][br * r + band * MB + m].
template <typename T, typename I, int RB>
__global__ void __launch_bounds__(kThreads) tc_bsr_spmm_kernel(const T* __restrict__ x,
                                                               const int32_t* __restrict__ crow,
                                                               const I* __restrict__ col, const T* __restrict__ val,
                                                               const T* __restrict__ bias, T* __restrict__ y,
                                                               SpmmShape s, bool vec_x, bool vec_w) {
  constexpr int MB = 16 * RB;
  using TileA = GatherTile<T, MB, kBsrK>;     // A[m][k]: W rows
  using TileB = GatherTile<T, kBsrN, kBsrK>;  // B^T[n][k]: x rows
  __shared__ __align__(128) unsigned char sa_raw[MB * TileA::kLd * sizeof(T)];
  __shared__ __align__(128) unsigned char sb_raw[kBsrN * TileB::kLd * sizeof(T)];
  __shared__ __align__(128) float scratch[kThreads / 32][256];
  T* sa = reinterpret_cast<T*>(sa_raw);
  T* sb = reinterpret_cast<T*>(sb_raw);
  const int64_t br = blockIdx.x / s.bands, m0 = (blockIdx.x % s.bands) * MB;
  const int64_t lo = clamp_offset(crow[br], 0, s.nb), hi = clamp_offset(crow[br + 1], lo, s.nb);
  const int64_t K = (hi - lo) * s.c, tiles = (s.T + kBsrN - 1) / kBsrN;
  TileA a;
  TileB b;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t t0 = tile * kBsrN;
    FragC acc[RB];
    zero_band(acc);
    slice_loop((K + kBsrK - 1) / kBsrK,
               [&](int64_t sl) {
                 a.fetch([&](int m, int k8) {
                   const int64_t k = sl * kBsrK + k8, p = lo + k / s.c;
                   if (k >= K) return make_uint4(0, 0, 0, 0);
                   return load8(val + p * s.r * s.c, s.r, s.c, s.c, m0 + m, k % s.c, vec_w);
                 });
                 b.fetch([&](int n, int k8) {
                   const int64_t k = sl * kBsrK + k8, p = lo + k / s.c;
                   const int64_t bc = k < K ? static_cast<int64_t>(col[p]) : -1;
                   if (bc < 0 || bc >= s.nbc) return make_uint4(0, 0, 0, 0);
                   return load8(x, s.T, s.in, s.in, t0 + n, bc * s.c + k % s.c, vec_x);
                 });
               },
               [&] {
                 a.store(sa);
                 b.store(sb);
               },
               [&] { band_mma<T, RB, wmma::row_major, wmma::col_major>(acc, sa, TileA::kLd, sb, TileB::kLd); });
    emit_band<true>(acc, scratch[threadIdx.x / 32], [&](int m, int n, float v) {
      const int64_t o = br * s.r + m0 + m, t = t0 + n;
      if (o < s.out && t < s.T) y[t * s.out + o] = from_f<T>(bias ? v + to_f(bias[o]) : v);
    });
  }
}

at::Tensor tc_bsr_spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                       const at::Tensor& bias, int64_t out, at::Tensor y) {
  const int64_t r = val.size(1), c = val.size(2), nbr = crow.numel() - 1;
  SpmmShape s{x.size(0), x.size(1), out, r, c, col.numel(), (x.size(1) + c - 1) / c, 0};
  const bool vec_x = s.in % 8 == 0 && aligned16(x.const_data_ptr()), vec_w = aligned16(val.const_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_tc(val.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using T = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    with_band(r, [&](auto rb) {
      constexpr int RB = decltype(rb)::value;
      s.bands = r / (16 * RB);
      tc_bsr_spmm_kernel<T, I, RB><<<bsr_grid(nbr * s.bands, (s.T + kBsrN - 1) / kBsrN), kThreads, 0, stream>>>(
          static_cast<const T*>(x.const_data_ptr()), crow.const_data_ptr<int32_t>(), col.const_data_ptr<I>(),
          static_cast<const T*>(val.const_data_ptr()),
          bias.defined() ? static_cast<const T*>(bias.const_data_ptr()) : nullptr, static_cast<T*>(y.data_ptr()), s,
          vec_x, vec_w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

// ------------------------------------------------------------------ the op
at::Tensor bsr_spmm_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                         int64_t out_features, const std::optional<at::Tensor>& bias) {
  const char* op = "bsr_spmm";
  const NvtxRange range("seft::bsr_spmm");
  check_bsr_spmm_args(op, x, crow, col, values, out_features, bias, /*check_offsets=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t r = values.size(1), c = values.size(2), in = x.size(-1);
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), val = values.contiguous();
  checked_bsr_index(op, crow, col, crow_c, col_c, r, c, out_features, ceil_div(in, c));
  at::Tensor b;
  if (bias && bias->defined()) b = bias->contiguous();
  const at::Tensor x2 = as_2d(x);
  at::Tensor y = at::empty({x2.size(0), out_features}, x2.options());
  if (y.numel() > 0) {
    if (bsr_tensor_cores(val.scalar_type(), r, c, x2.size(0))) tc_bsr_spmm(x2, crow_c, col_c, val, b, out_features, y);
    else simt_bsr_spmm(x2, crow_c, col_c, val, b, out_features, y);
  }
  return y.view(with_last(x.sizes(), out_features));
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("bsr_spmm", &bsr_spmm_cuda); }

}  // namespace seft::cuda
