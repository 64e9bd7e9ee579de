// CUDA implementations of the seft ops: same schemas, argument checks and semantics as the
// CPU ops in cpp/cpu/csr_ops_cpu.cpp. The kernels are in csr_tc_kernels.cu (tensor cores) and
// csr_few_kernels.cu (CUDA cores); this file checks, chooses a path and launches.
//
// Paths (cuda_path() can force one; see cpp/common/cuda_path.h):
//   bf16 / fp16 with >= kTensorCoreMinTokens tokens: the tensor-core kernels;
//   otherwise (few tokens, or fp32 / fp64): the CUDA-core kernels.
// csr_spmm_t and the tensor-core csr_sddmm walk W by column tiles through the column-tile
// index (common/csr_tile_index.h), built once per pattern and cached with its check: no
// transposed copy of W, ever.
//
// Validation. The shape / dtype / device checks are the shared host checks (check_csr with
// check_offsets = false, check_dense), every call, no device access. crow, col and slots live
// on the device, so they are checked there: one thread per row checks crow[0] == 0,
// crow[out] == nnz, non-decreasing offsets and sorted, unique, in-range columns; one thread per
// slot checks slots; a failure atomicMin's its row / slot index into a 2-entry flag that the
// host reads back (a 16-byte sync). On failure, crow, col and slots are copied to the host and
// the CPU checks rerun to throw the very message the CPU op would. The result is remembered
// per tensor version (common/structure_cache.h): a training step, whose pattern only changes
// at an evolution step, reads nothing back and never synchronises.
//
// Profiling: every op call is an NVTX range named after the op (seft::csr_spmm, ...), always
// on (a no-op costing nanoseconds unless a profiler such as nsys is attached).
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/index_select.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <optional>

#include "common/csr_tile_index.h"
#include "common/cuda_path.h"
#include "common/structure_cache.h"
#include "common/checks.h"
#include "cuda/check_cuda.h"
#include "cuda/kernels_cuda.h"
#include "cuda/nvtx_range.h"

namespace seft::cuda {

namespace {


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
                     const at::Tensor& slots, const std::function<void()>& before_sync) {
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
  if (before_sync) before_sync();
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

// The pattern's check, once per version (common/structure_cache.h), and its column-tile
// index, built before the check's one sync so that it is complete on any stream (an index
// recorded by _csr_adopt_pattern is queued after the uploads on the controller's stream: a
// call on another stream must order itself after them anyway). Keyed on the tensors as
// passed (crow_c / col_c are their contiguous versions).
at::Tensor checked_tile_ptr(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_c,
                            const at::Tensor& col_c, int64_t in) {
  at::Tensor tp = checked_structure(crow, col, in, [&] {
    at::Tensor built;
    check_on_device(op, crow_c, col_c, in, at::Tensor(),
                    [&] { built = build_tile_ptr(crow_c, col_c, in, kColTile); });
    return built;
  });
  // used on another stream than it was allocated on: the allocator must not reuse it early
  c10::cuda::CUDACachingAllocator::recordStream(tp.storage().data_ptr(), at::cuda::getCurrentCUDAStream());
  return tp;
}

namespace {

bool use_tensor_cores(at::ScalarType dtype, int64_t tokens) {
  switch (cuda_path()) {
    case CudaPath::kTensorCore: return tc_supported(dtype);
    case CudaPath::kCudaCore: return false;
    default: return tc_supported(dtype) && tokens >= kTensorCoreMinTokens;
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
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), val = values.contiguous();
  checked_tile_ptr(op, crow, col, crow_c, col_c, in);
  at::Tensor b;
  if (bias && bias->defined()) b = bias->contiguous();
  const at::Tensor x2 = as_2d(x);
  at::Tensor y = use_tensor_cores(val.scalar_type(), x2.size(0)) ? tc_spmm(x2, crow_c, col_c, val, b, out)
                                                                  : rows_spmm(x2, crow_c, col_c, val, b, out);
  return y.view(with_last(x.sizes(), out));
}

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

at::Tensor csr_tile_ptr_cuda(const at::Tensor& crow, const at::Tensor& col, int64_t in_features, int64_t tile) {
  const char* op = "csr_tile_ptr";
  check_tile_ptr_args(op, crow, col, in_features, tile, crow.device());
  const c10::cuda::CUDAGuard guard(crow.device());
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const at::Tensor cached = checked_tile_ptr(op, crow, col, crow_c, col_c, in_features);
  return tile == kColTile ? cached.clone() : build_tile_ptr(crow_c, col_c, in_features, tile);
}

void csr_adopt_pattern_cuda(const at::Tensor& crow, const at::Tensor& col, int64_t in_features,
                            const at::Tensor& crow_host, const at::Tensor& col_host,
                            const std::optional<at::Tensor>& slots, const std::optional<at::Tensor>& slots_host) {
  const char* op = "_csr_adopt_pattern";
  check_adopt_args(op, crow, col, in_features, crow_host, col_host, slots, slots_host);
  if (slots && slots->defined()) remember_slots(*slots, col.numel());
  const c10::cuda::CUDAGuard guard(crow.device());
  // queued after the caller's uploads on this stream: the index is built from the new pattern
  remember_structure(crow, col, in_features, build_tile_ptr(crow.contiguous(), col.contiguous(), in_features,
                                                            kColTile));
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm_cuda);
  m.impl("csr_spmm_t", &csr_spmm_t_cuda);
  m.impl("csr_sddmm", &csr_sddmm_cuda);
  m.impl("csr_tile_ptr", &csr_tile_ptr_cuda);
  m.impl("_csr_adopt_pattern", &csr_adopt_pattern_cuda);
}

}  // namespace seft::cuda
