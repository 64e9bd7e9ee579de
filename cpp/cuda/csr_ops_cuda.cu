// CUDA implementations of the seft ops: same schemas, argument checks and semantics as the
// CPU ops in cpp/cpu/csr_ops_cpu.cpp. These are simple, correct kernels; tuning comes later.
//
// Validation. The shape / dtype / device checks are the shared host checks (check_csr with
// check_offsets = false, check_dense). crow, col and slots live on the device, so they are
// checked there: one thread per row checks crow[0] == 0, crow[out] == nnz, non-decreasing
// offsets and sorted, unique, in-range columns; one thread per slot checks slots. Each
// failure atomicMin's its row / slot index into a 2-entry int64 flag, and the host reads the
// flag back: ONE device -> host sync (16 bytes) per op call. Only when a flag is set are crow,
// col and slots copied to the host, where the CPU checks rerun to throw the very message the
// CPU op would. (The sync also makes these ops unusable inside CUDA graph capture for now.)
//
// Kernels (fp32 accumulation; fp64 for fp64 values):
//   csr_spmm    one warp per (token, row): lanes stride over the row's non-zeros, then a
//               fixed-order shuffle reduction.
//   csr_spmm_t  deterministic, no atomics: each call builds the transpose (CSC) with torch ops
//               (a stable sort of col keeps every column's non-zeros in ascending row order),
//               then runs the csr_spmm kernel on it. The result is bitwise reproducible run
//               to run; the sort costs O(nnz log nnz) per call.
//   csr_sddmm   one warp per output slot (non-zero): row found by binary search in crow,
//               lanes stride over tokens, fixed-order shuffle reduction.
// Profiling: every op call is an NVTX range named after the op (seft::csr_spmm, ...), always
// on (a no-op costing nanoseconds unless a profiler such as nsys is attached).
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/checks.h"
#include "cuda/check_cuda.h"
#include "cuda/nvtx_range.h"
#include "dtype_dispatch.h"

namespace seft::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;  // 8 warps
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

template <typename V> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {  // fixed order: the same bits every run
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

inline int blocks_for(int64_t threads) {
  return static_cast<int>(std::min<int64_t>((threads + kBlock - 1) / kBlock, kMaxBlocks));
}

// ---------------------------------------------------------------- validation
constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();

template <typename I>
__global__ void check_csr_kernel(const int32_t* crow, const I* col, int64_t out, int64_t nnz, int64_t in,
                                 unsigned long long* bad_row) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t rows = out > 0 ? out : 1;  // out == 0: thread 0 still checks crow[0] == nnz == 0
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < rows; o += stride) {
    bool bad = false;
    if (out == 0) {
      bad = crow[0] != 0 || nnz != 0;
    } else {
      const int64_t lo = crow[o], hi = crow[o + 1];
      bad = (o == 0 && lo != 0) || (o == out - 1 && hi != nnz) || lo > hi || lo < 0 || hi > nnz;
      if (!bad) {
        int64_t prev = -1;
        for (int64_t p = lo; p < hi; ++p) {
          const int64_t c = col[p];
          bad |= (c <= prev) | (c >= in);
          prev = c;
        }
      }
    }
    if (bad) atomicMin(bad_row, static_cast<unsigned long long>(o));
  }
}

__global__ void check_slots_kernel(const int64_t* slots, int64_t n, int64_t nnz, unsigned long long* bad_slot) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t s = slots[i];
    if (s < 0 || s >= nnz || (i > 0 && s <= slots[i - 1])) atomicMin(bad_slot, static_cast<unsigned long long>(i));
  }
}

}  // namespace

// crow / col (and slots when defined) are contiguous and on the current device.
void check_on_device(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in,
                     const at::Tensor& slots) {
  const int64_t out = crow.numel() - 1, nnz = col.numel();
  at::Tensor flag = at::full({2}, kNoError, crow.options().dtype(at::kLong));
  auto* f = reinterpret_cast<unsigned long long*>(flag.data_ptr<int64_t>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = std::max<int64_t>(out, 1);
  if (col.scalar_type() == at::kShort) {
    check_csr_kernel<int16_t><<<blocks_for(rows), kBlock, 0, stream>>>(
        crow.data_ptr<int32_t>(), col.data_ptr<int16_t>(), out, nnz, in, f);
  } else {
    check_csr_kernel<int32_t><<<blocks_for(rows), kBlock, 0, stream>>>(
        crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), out, nnz, in, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (slots.defined() && slots.numel() > 0) {
    check_slots_kernel<<<blocks_for(slots.numel()), kBlock, 0, stream>>>(slots.data_ptr<int64_t>(),
                                                                        slots.numel(), nnz, f + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor h = flag.cpu();  // the one sync
  const int64_t* hf = h.data_ptr<int64_t>();
  if (hf[0] == kNoError && hf[1] == kNoError) return;
  // Error path: rerun the CPU checks on host copies for the CPU op's exact message.
  const at::Device cpu(at::kCPU);
  const at::Tensor crow_h = crow.cpu(), col_h = col.cpu();
  if (hf[0] != kNoError) {
    check_csr(op, crow_h, col_h, nullptr, cpu, /*check_offsets=*/true);
    check_cols_cpu(op, crow_h, col_h, in);
    TORCH_CHECK(false, op, ": invalid CSR structure near row ", hf[0]);
  }
  check_slots_cpu(op, slots.cpu(), nnz);
  TORCH_CHECK(false, op, ": invalid slots near slots[", hf[1], "]");
}

namespace {

// ---------------------------------------------------------------- csr_spmm
// y[t, o] = sum_{p in [ptr[o], ptr[o+1])} val[p] * x[t, idx[p]] (+ bias[o]); x (T, ldx), y (T, rows).
template <typename A, typename V, typename I>
__global__ void csr_rows_kernel(const int32_t* __restrict__ ptr, const I* __restrict__ idx,
                                const V* __restrict__ val, const V* __restrict__ x, const V* __restrict__ bias,
                                V* __restrict__ y, int64_t T, int64_t rows, int64_t ldx) {
  const int lane = threadIdx.x % kWarp;
  const int64_t nwarps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  const int64_t items = T * rows;
  for (int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; w < items; w += nwarps) {
    const int64_t t = w / rows, o = w % rows;  // adjacent warps: adjacent rows, same token
    const V* xt = x + t * ldx;
    A s = A(0);
    for (int64_t p = int64_t(ptr[o]) + lane; p < ptr[o + 1]; p += kWarp)
      s += static_cast<A>(val[p]) * static_cast<A>(xt[idx[p]]);
    s = warp_sum(s);
    if (lane == 0) {
      if (bias) s += static_cast<A>(bias[o]);
      y[w] = static_cast<V>(s);
    }
  }
}

// x (T, ldx) contiguous; returns (T, rows) in x's dtype. ptr int32 [rows + 1].
at::Tensor rows_spmm(const at::Tensor& x, const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& val,
                     const at::Tensor& bias, int64_t rows) {
  const int64_t T = x.size(0), ldx = x.size(1);
  at::Tensor y = at::empty({T, rows}, x.options());
  if (T == 0 || rows == 0) return y;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(val.scalar_type(), idx.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    using A = typename Acc<V>::type;
    csr_rows_kernel<A, V, I><<<blocks_for(T * rows * kWarp), kBlock, 0, stream>>>(
        ptr.data_ptr<int32_t>(), idx.data_ptr<I>(), val.data_ptr<V>(), x.data_ptr<V>(),
        bias.defined() ? bias.data_ptr<V>() : nullptr, y.data_ptr<V>(), T, rows, ldx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// ---------------------------------------------------------------- csr_sddmm
// g[s] = sum_t dy[t, row(p)] * x[t, col(p)], p = slots ? slots[s] : s.
template <typename A, typename V, typename I>
__global__ void sddmm_kernel(const int32_t* __restrict__ crow, const I* __restrict__ col,
                             const int64_t* __restrict__ slots, const V* __restrict__ dy, const V* __restrict__ x,
                             A* __restrict__ g, int64_t n, int64_t T, int64_t out, int64_t in) {
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
    const int64_t o = lo, c = col[p];
    A acc = A(0);
    for (int64_t t = lane; t < T; t += kWarp)
      acc += static_cast<A>(dy[t * out + o]) * static_cast<A>(x[t * in + c]);
    acc = warp_sum(acc);
    if (lane == 0) g[s] = acc;
  }
}

// ---------------------------------------------------------------- op wrappers
at::Tensor csr_spmm_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  const char* op = "csr_spmm";
  const NvtxRange range("seft::csr_spmm");
  check_spmm_args(op, x, crow, col, values, bias, /*check_offsets=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = x.size(-1), out = crow.numel() - 1;
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  check_on_device(op, crow_c, col_c, in, at::Tensor());
  at::Tensor b;
  if (bias && bias->defined()) b = bias->contiguous();
  const at::Tensor x2 = as_2d(x);
  at::Tensor y = rows_spmm(x2, crow_c, col_c, values.contiguous(), b, out);
  return y.view(with_last(x.sizes(), out));
}

at::Tensor csr_spmm_t_cuda(const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features) {
  const char* op = "csr_spmm_t";
  const NvtxRange range("seft::csr_spmm_t");
  check_spmm_t_args(op, grad_out, crow, col, values, in_features, /*check_offsets=*/false);
  const int64_t out = crow.numel() - 1;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  check_on_device(op, crow_c, col_c, in_features, at::Tensor());
  const at::Tensor dy = as_2d(grad_out);
  const int64_t nnz = col_c.numel();
  const auto iopt = crow_c.options();  // int32 on the device
  // Transpose: a stable sort by column keeps each column's non-zeros in ascending row order.
  const auto sorted = at::sort(col_c.to(at::kInt), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& scol = std::get<0>(sorted);
  const at::Tensor& perm = std::get<1>(sorted);
  const at::Tensor cptr = at::searchsorted(scol, at::arange(in_features + 1, iopt), /*out_int32=*/true);
  // row of non-zero p: the last o with crow[o] <= p
  const at::Tensor row_of =
      at::searchsorted(crow_c, at::arange(nnz, iopt), /*out_int32=*/true, /*right=*/true).sub_(1);
  const at::Tensor crow_t = row_of.index_select(0, perm).contiguous();
  const at::Tensor val_t = values.contiguous().index_select(0, perm).contiguous();
  at::Tensor dx = rows_spmm(dy, cptr, crow_t, val_t, at::Tensor(), in_features);
  return dx.view(with_last(grad_out.sizes(), in_features));
}

at::Tensor csr_sddmm_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                          const at::Tensor& col, const std::optional<at::Tensor>& slots) {
  const char* op = "csr_sddmm";
  const NvtxRange range("seft::csr_sddmm");
  check_sddmm_args(op, grad_out, x, crow, col, slots, /*check_offsets=*/false);
  const int64_t in = x.size(-1), out = crow.numel() - 1;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  at::Tensor s;
  if (slots && slots->defined()) s = slots->contiguous();
  check_on_device(op, crow_c, col_c, in, s);
  const at::Tensor dy = as_2d(grad_out);
  const at::Tensor x2 = as_2d(x);
  const int64_t T = dy.size(0);
  const int64_t n = s.defined() ? s.numel() : col_c.numel();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (T == 0 || n == 0) return at::zeros({n}, x.options().dtype(acc_dtype));
  at::Tensor g = at::empty({n}, x.options().dtype(acc_dtype));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), col_c.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    using A = typename Acc<V>::type;
    sddmm_kernel<A, V, I><<<blocks_for(n * kWarp), kBlock, 0, stream>>>(
        crow_c.data_ptr<int32_t>(), col_c.data_ptr<I>(), s.defined() ? s.data_ptr<int64_t>() : nullptr,
        dy.data_ptr<V>(), x2.data_ptr<V>(), g.data_ptr<A>(), n, T, out, in);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm_cuda);
  m.impl("csr_spmm_t", &csr_spmm_t_cuda);
  m.impl("csr_sddmm", &csr_sddmm_cuda);
}

}  // namespace seft::cuda
