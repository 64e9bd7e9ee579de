// bsr_sddmm on CUDA: the gradient of r x c blocks, g[s][i][j] = sum_t dY[t, br * r + i]
// X[t, bc * c + j] for block p = slots[s] (every block without slots), in the accumulation
// dtype (fp32; fp64 for fp64); entries in the padding are 0. Same schema, checks and semantics
// as the CPU op (cpp/cpu/bsr_sddmm_cpu.cpp); the pattern and the slots are checked on the device
// once per version (cuda/bsr_common.cuh). Paths:
//   warp_bsr_sddmm  (CUDA cores: every dtype and block shape): one warp per output entry, lanes
//                   stride over the tokens, then a fixed-order shuffle sum.
//   tc_bsr_sddmm    (tensor cores: bf16 / fp16, r and c multiples of 16, from 64 tokens): a thread
//                   block owns a band of MB rows of one block row and 128 columns of its blocks
//                   (or of its slots, a contiguous range of the sorted slots), gathered c columns
//                   a block; K is the tokens, 32 at a time (cuda/bsr_common.cuh).
// Every call is an NVTX range (seft::bsr_sddmm).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
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

struct SddmmShape { int64_t T, in, out, r, c, nb, nbr, nbc, n, bands; };

// ------------------------------------------------------------------ warp_bsr_sddmm
// One warp per entry e of g (n x r x c); brow: the block row of every block (the block index).
template <typename A, typename V, typename I>
__global__ void warp_bsr_sddmm_kernel(const int32_t* __restrict__ brow, const I* __restrict__ col,
                                      const int64_t* __restrict__ slots, const V* __restrict__ dy,
                                      const V* __restrict__ x, A* __restrict__ g, SddmmShape s) {
  const int lane = threadIdx.x % kWarp;
  const int64_t nwarps = int64_t(gridDim.x) * (blockDim.x / kWarp), entries = s.n * s.r * s.c;
  for (int64_t e = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; e < entries; e += nwarps) {
    const int64_t sl = e / (s.r * s.c), i = e / s.c % s.r, j = e % s.c;
    const int64_t p = slots ? slots[sl] : sl;
    const bool ok = p >= 0 && p < s.nb;
    const int64_t o = ok ? int64_t(brow[p]) * s.r + i : -1, k = ok ? static_cast<int64_t>(col[p]) * s.c + j : -1;
    A acc = A(0);
    if (o >= 0 && o < s.out && k >= 0 && k < s.in)
      for (int64_t t = lane; t < s.T; t += kWarp)
        acc += static_cast<A>(dy[t * s.out + o]) * static_cast<A>(x[t * s.in + k]);
    acc = warp_sum(acc);
    if (lane == 0) g[e] = acc;
  }
}

void warp_bsr_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& index, const at::Tensor& col,
                    const at::Tensor& slots, const SddmmShape& s, at::Tensor& g) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int32_t* brow = index.const_data_ptr<int32_t>() + s.nbc + 1 + s.nb;
  dispatch_types(x.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    using A = typename Acc<V>::type;
    warp_bsr_sddmm_kernel<A, V, I><<<blocks_for(s.n * s.r * s.c * kWarp), kBlock, 0, stream>>>(
        brow, col.const_data_ptr<I>(), slots.defined() ? slots.const_data_ptr<int64_t>() : nullptr,
        dy.const_data_ptr<V>(), x.const_data_ptr<V>(), g.data_ptr<A>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ------------------------------------------------------------------ tc_bsr_sddmm
// grid (block rows x bands, 128-column chunks of the row's gathered blocks);
// C[m][n] = g[s][band * MB + m][j] for gathered column u * c + j = chunk * 128 + n, s = s0 + u.
template <typename T, typename I, int RB>
__global__ void __launch_bounds__(kThreads) tc_bsr_sddmm_kernel(
    const int32_t* __restrict__ crow, const I* __restrict__ col, const int64_t* __restrict__ slots,
    const T* __restrict__ dy, const T* __restrict__ x, float* __restrict__ g, SddmmShape s, bool vec_dy, bool vec_x) {
  constexpr int MB = 16 * RB;
  using TileA = GatherTile<T, kBsrK, MB>;     // A^T[k][m]: dy rows, the band's outputs
  using TileB = GatherTile<T, kBsrK, kBsrN>;  // B[k][n]: x rows, the gathered columns
  __shared__ __align__(128) unsigned char sa_raw[kBsrK * TileA::kLd * sizeof(T)];
  __shared__ __align__(128) unsigned char sb_raw[kBsrK * TileB::kLd * sizeof(T)];
  __shared__ __align__(128) float scratch[kThreads / 32][256];
  T* sa = reinterpret_cast<T*>(sa_raw);
  T* sb = reinterpret_cast<T*>(sb_raw);
  const int64_t br = blockIdx.x / s.bands, m0 = (blockIdx.x % s.bands) * MB;
  const int64_t lo = clamp_offset(crow[br], 0, s.nb), hi = clamp_offset(crow[br + 1], lo, s.nb);
  // this block row's outputs: g[s0 .. s1) (slots is sorted: its entries in [lo, hi) are a range)
  const int64_t s0 = slots ? lower_bound_dev(slots, 0, s.n, lo) : lo;
  const int64_t s1 = slots ? std::max(s0, lower_bound_dev(slots, 0, s.n, hi)) : hi;
  const int64_t cols = (s1 - s0) * s.c, o0 = br * s.r + m0;
  TileA a;
  TileB b;
  for (int64_t chunk = blockIdx.y; chunk * kBsrN < cols; chunk += gridDim.y) {
    const int64_t n0 = chunk * kBsrN;
    FragC acc[RB];
    zero_band(acc);
    slice_loop((s.T + kBsrK - 1) / kBsrK,
               [&](int64_t sl) {
                 a.fetch([&](int k, int m8) { return load8(dy, s.T, s.out, s.out, sl * kBsrK + k, o0 + m8, vec_dy); });
                 b.fetch([&](int k, int n8) {
                   const int64_t u = n0 + n8, so = s0 + u / s.c;
                   const int64_t p = u < cols ? (slots ? slots[so] : so) : -1;
                   const int64_t bc = p >= 0 && p < s.nb ? static_cast<int64_t>(col[p]) : -1;
                   if (bc < 0 || bc >= s.nbc) return make_uint4(0, 0, 0, 0);
                   return load8(x, s.T, s.in, s.in, sl * kBsrK + k, bc * s.c + u % s.c, vec_x);
                 });
               },
               [&] {
                 a.store(sa);
                 b.store(sb);
               },
               [&] { band_mma<T, RB, wmma::col_major, wmma::row_major>(acc, sa, TileA::kLd, sb, TileB::kLd); });
    emit_band<false>(acc, scratch[threadIdx.x / 32], [&](int m, int n, float v) {
      const int64_t u = n0 + n;
      if (u < cols) g[((s0 + u / s.c) * s.r + m0 + m) * s.c + u % s.c] = v;
    });
  }
}

void tc_bsr_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                  const at::Tensor& slots, SddmmShape s, at::Tensor& g) {
  const bool vec_dy = s.out % 8 == 0 && aligned16(dy.const_data_ptr());
  const bool vec_x = s.in % 8 == 0 && aligned16(x.const_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_tc(x.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using T = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    with_band(s.r, [&](auto rb) {
      constexpr int RB = decltype(rb)::value;
      s.bands = s.r / (16 * RB);
      // a block row holds at most nbc blocks: nbc * c gathered columns
      tc_bsr_sddmm_kernel<T, I, RB><<<bsr_grid(s.nbr * s.bands, ceil_div(s.nbc * s.c, kBsrN)), kThreads, 0, stream>>>(
          crow.const_data_ptr<int32_t>(), col.const_data_ptr<I>(),
          slots.defined() ? slots.const_data_ptr<int64_t>() : nullptr, static_cast<const T*>(dy.const_data_ptr()),
          static_cast<const T*>(x.const_data_ptr()), g.data_ptr<float>(), s, vec_dy, vec_x);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ------------------------------------------------------------------ the op
at::Tensor bsr_sddmm_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                          const at::Tensor& col, int64_t r, int64_t c, const std::optional<at::Tensor>& slots) {
  const char* op = "bsr_sddmm";
  const NvtxRange range("seft::bsr_sddmm");
  check_bsr_sddmm_args(op, grad_out, x, crow, col, r, c, slots, /*check_offsets=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = x.size(-1), out = grad_out.size(-1), nbc = ceil_div(in, c), nb = col.numel();
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const at::Tensor index = checked_bsr_index(op, crow, col, crow_c, col_c, r, c, out, nbc);
  at::Tensor sl;
  if (slots && slots->defined()) {
    sl = slots->contiguous();
    checked_bsr_slots(op, *slots, sl, crow_c, col_c, r, c, out, nbc);
  }
  const at::Tensor dy = as_2d(grad_out), x2 = as_2d(x);
  const SddmmShape s{dy.size(0), in, out, r, c, nb, crow.numel() - 1, nbc, sl.defined() ? sl.numel() : nb, 1};
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (s.T == 0 || s.n == 0) return at::zeros({s.n, r, c}, x.options().dtype(acc_dtype));
  at::Tensor g = at::empty({s.n, r, c}, x.options().dtype(acc_dtype));
  if (bsr_tensor_cores(x.scalar_type(), r, c, s.T)) tc_bsr_sddmm(dy, x2, crow_c, col_c, sl, s, g);
  else warp_bsr_sddmm(dy, x2, index, col_c, sl, s, g);
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("bsr_sddmm", &bsr_sddmm_cuda); }

}  // namespace seft::cuda
