// bsr_spmm_t on CUDA: dX = dY W, W in r x c blocks, deterministic, without a transposed copy
// of the values: both kernels walk W by block columns through the block index (cptr / cblk /
// brow, cuda/bsr_common.cuh), built once per pattern with its check and cached with it. Same
// schema, checks and semantics as the CPU op (cpp/cpu/bsr_spmm_t_cpu.cpp). Paths:
//   simt_bsr_spmm_t  (CUDA cores: every dtype and block shape): one thread per (input column,
//                    group of up to 8 tokens); it walks the column's blocks in block-row order,
//                    each block's column of r weights read once for the group. Adjacent threads
//                    read adjacent weights of a block row.
//   tc_bsr_spmm_t    (tensor cores: bf16 / fp16, r and c multiples of 16, from 64 tokens): a
//                    thread block owns a band of MB columns of one block column and 128 tokens;
//                    K is the block column's blocks, r rows each, gathered 32 at a time.
// Every call is an NVTX range (seft::bsr_spmm_t).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

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

struct SpmmTShape { int64_t T, in, out, r, c, nb, nbr, nbc, bands; };

// The block index's parts (see checked_bsr_index).
struct BlockIndex {
  const int32_t* cptr;
  const int32_t* cblk;
  const int32_t* brow;
  explicit BlockIndex(const at::Tensor& index, int64_t nbc, int64_t nb)
      : cptr(index.const_data_ptr<int32_t>()), cblk(cptr + nbc + 1), brow(cblk + nb) {}
};

// ------------------------------------------------------------------ simt_bsr_spmm_t
// Items (token group, input column), columns fastest; grid-stride.
template <typename A, typename V, int G>
__global__ void simt_bsr_spmm_t_kernel(BlockIndex bi, const V* __restrict__ val, const V* __restrict__ dy,
                                       V* __restrict__ dx, SpmmTShape s) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, items = (s.T + G - 1) / G * s.in;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < items; e += stride) {
    const int64_t t0 = e / s.in * G, ii = e % s.in, bc = ii / s.c, j = ii % s.c;
    const int nt = static_cast<int>(std::min<int64_t>(G, s.T - t0));
    A acc[G];
#pragma unroll
    for (int t = 0; t < G; ++t) acc[t] = A(0);
    const int64_t lo = clamp_offset(bi.cptr[bc], 0, s.nb), hi = clamp_offset(bi.cptr[bc + 1], lo, s.nb);
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t p = bi.cblk[q];
      const int64_t br = (p >= 0 && p < s.nb) ? static_cast<int64_t>(bi.brow[p]) : -1;
      if (br < 0 || br >= s.nbr) continue;
      const V* w = val + p * s.r * s.c + j;
      const V* d = dy + t0 * s.out + br * s.r;
      const int64_t rn = std::min<int64_t>(s.r, s.out - br * s.r);  // the padding rows multiply nothing
      for (int64_t i = 0; i < rn; ++i) {
        const A wij = static_cast<A>(w[i * s.c]);
#pragma unroll
        for (int t = 0; t < G; ++t)
          if (t < nt) acc[t] += wij * static_cast<A>(d[t * s.out + i]);
      }
    }
#pragma unroll
    for (int t = 0; t < G; ++t)
      if (t < nt) dx[(t0 + t) * s.in + ii] = static_cast<V>(acc[t]);
  }
}

void simt_bsr_spmm_t(const at::Tensor& dy, const BlockIndex& bi, const at::Tensor& val, const SpmmTShape& s,
                     at::Tensor& dx) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(val.scalar_type(), at::kInt, [&](auto vt, auto) {
    using V = typename decltype(vt)::type;
    using A = typename Acc<V>::type;
    auto launch = [&](auto g) {
      constexpr int G = decltype(g)::value;
      simt_bsr_spmm_t_kernel<A, V, G><<<blocks_for((s.T + G - 1) / G * s.in), kBlock, 0, stream>>>(
          bi, val.const_data_ptr<V>(), dy.const_data_ptr<V>(), dx.data_ptr<V>(), s);
    };
    if (s.T == 1) launch(std::integral_constant<int, 1>{});
    else if (s.T == 2) launch(std::integral_constant<int, 2>{});
    else if (s.T <= 4) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, 8>{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ------------------------------------------------------------------ tc_bsr_spmm_t
// grid (block columns x bands, token tiles); C[m][n] = dx[t0 + n][bc * c + band * MB + m].
template <typename T, int RB>
__global__ void __launch_bounds__(kThreads) tc_bsr_spmm_t_kernel(BlockIndex bi, const T* __restrict__ val,
                                                                 const T* __restrict__ dy, T* __restrict__ dx,
                                                                 SpmmTShape s, bool vec_dy, bool vec_w) {
  constexpr int MB = 16 * RB;
  using TileA = GatherTile<T, kBsrK, MB>;     // A^T[k][m]: rows of the blocks, the band's columns
  using TileB = GatherTile<T, kBsrN, kBsrK>;  // B^T[n][k]: dy rows
  __shared__ __align__(128) unsigned char sa_raw[kBsrK * TileA::kLd * sizeof(T)];
  __shared__ __align__(128) unsigned char sb_raw[kBsrN * TileB::kLd * sizeof(T)];
  __shared__ __align__(128) float scratch[kThreads / 32][256];
  T* sa = reinterpret_cast<T*>(sa_raw);
  T* sb = reinterpret_cast<T*>(sb_raw);
  const int64_t bc = blockIdx.x / s.bands, m0 = (blockIdx.x % s.bands) * MB;
  const int64_t lo = clamp_offset(bi.cptr[bc], 0, s.nb), hi = clamp_offset(bi.cptr[bc + 1], lo, s.nb);
  const int64_t K = (hi - lo) * s.r, tiles = (s.T + kBsrN - 1) / kBsrN;
  // block id and block row of gathered row k (-1: none)
  auto block_of = [&](int64_t k, int64_t& br) -> int64_t {
    const int64_t p = k < K ? static_cast<int64_t>(bi.cblk[lo + k / s.r]) : -1;
    br = (p >= 0 && p < s.nb) ? static_cast<int64_t>(bi.brow[p]) : -1;
    return br >= 0 && br < s.nbr ? p : -1;
  };
  TileA a;
  TileB b;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t t0 = tile * kBsrN;
    FragC acc[RB];
    zero_band(acc);
    slice_loop((K + kBsrK - 1) / kBsrK,
               [&](int64_t sl) {
                 a.fetch([&](int k, int m8) {
                   int64_t br;
                   const int64_t kk = sl * kBsrK + k, p = block_of(kk, br);
                   if (p < 0) return make_uint4(0, 0, 0, 0);
                   return load8(val + p * s.r * s.c, s.r, s.c, s.c, kk % s.r, m0 + m8, vec_w);
                 });
                 b.fetch([&](int n, int k8) {
                   int64_t br;
                   const int64_t kk = sl * kBsrK + k8, p = block_of(kk, br);
                   if (p < 0) return make_uint4(0, 0, 0, 0);
                   return load8(dy, s.T, s.out, s.out, t0 + n, br * s.r + kk % s.r, vec_dy);
                 });
               },
               [&] {
                 a.store(sa);
                 b.store(sb);
               },
               [&] { band_mma<T, RB, wmma::col_major, wmma::col_major>(acc, sa, TileA::kLd, sb, TileB::kLd); });
    emit_band<true>(acc, scratch[threadIdx.x / 32], [&](int m, int n, float v) {
      const int64_t i = bc * s.c + m0 + m, t = t0 + n;
      if (i < s.in && t < s.T) dx[t * s.in + i] = from_f<T>(v);
    });
  }
}

void tc_bsr_spmm_t(const at::Tensor& dy, const BlockIndex& bi, const at::Tensor& val, SpmmTShape s, at::Tensor& dx) {
  const bool vec_dy = s.out % 8 == 0 && aligned16(dy.const_data_ptr()), vec_w = aligned16(val.const_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_tc(val.scalar_type(), at::kInt, [&](auto vt, auto) {
    using T = typename decltype(vt)::type;
    with_band(s.c, [&](auto rb) {
      constexpr int RB = decltype(rb)::value;
      s.bands = s.c / (16 * RB);
      tc_bsr_spmm_t_kernel<T, RB><<<bsr_grid(s.nbc * s.bands, (s.T + kBsrN - 1) / kBsrN), kThreads, 0, stream>>>(
          bi, static_cast<const T*>(val.const_data_ptr()), static_cast<const T*>(dy.const_data_ptr()),
          static_cast<T*>(dx.data_ptr()), s, vec_dy, vec_w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ------------------------------------------------------------------ the op
at::Tensor bsr_spmm_t_cuda(const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features) {
  const char* op = "bsr_spmm_t";
  const NvtxRange range("seft::bsr_spmm_t");
  check_bsr_spmm_t_args(op, grad_out, crow, col, values, in_features, /*check_offsets=*/false);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t r = values.size(1), c = values.size(2), out = grad_out.size(-1), nbc = ceil_div(in_features, c);
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), val = values.contiguous();
  const at::Tensor index = checked_bsr_index(op, crow, col, crow_c, col_c, r, c, out, nbc);
  const at::Tensor dy = as_2d(grad_out);
  at::Tensor dx = at::empty({dy.size(0), in_features}, dy.options());
  if (dx.numel() > 0) {
    const SpmmTShape s{dy.size(0), in_features, out, r, c, col.numel(), crow.numel() - 1, nbc, 1};
    const BlockIndex bi(index, nbc, col.numel());
    if (bsr_tensor_cores(val.scalar_type(), r, c, dy.size(0))) tc_bsr_spmm_t(dy, bi, val, s, dx);
    else simt_bsr_spmm_t(dy, bi, val, s, dx);
  }
  return dx.view(with_last(grad_out.sizes(), in_features));
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("bsr_spmm_t", &bsr_spmm_t_cuda); }

}  // namespace seft::cuda
