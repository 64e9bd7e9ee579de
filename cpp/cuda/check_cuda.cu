// Device-side validation of a CSR pattern (and slots), shared by the CUDA ops. The shape /
// dtype / device checks are the shared host checks (common/checks.h: check_csr with
// check_offsets = false, check_dense), every call, no device access. crow, col and slots live
// on the device, so they are checked there: one thread per row checks crow[0] == 0,
// crow[out] == nnz, non-decreasing offsets and sorted, unique, in-range columns; one thread per
// slot checks slots; a failure atomicMin's its row / slot index into a 2-entry flag that the
// host reads back (a 16-byte sync). On failure, crow, col and slots are copied to the host and
// the CPU checks rerun to throw the very message the CPU op would. The result is remembered
// per tensor version (common/structure_cache.h): a training step, whose pattern only changes
// at an evolution step, reads nothing back and never synchronises.
#include "cuda/check_cuda.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <limits>

#include "common/checks.h"
#include "common/csr_tile_index.h"
#include "common/structure_cache.h"
#include "cuda/common_cuda.h"

namespace seft::cuda {
namespace {

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
void check_on_device(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in, const at::Tensor& slots,
                     const std::function<void()>& before_sync, const HostPatternCheck& host_check) {
  const int64_t out = crow.numel() - 1, nnz = col.numel();
  at::Tensor flag = at::full({2}, kNoError, crow.options().dtype(at::kLong));
  auto* f = reinterpret_cast<unsigned long long*>(flag.data_ptr<int64_t>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = std::max<int64_t>(out, 1);
  if (col.scalar_type() == at::kShort) {
    check_csr_kernel<int16_t>
        <<<blocks_for(rows), kBlock, 0, stream>>>(crow.data_ptr<int32_t>(), col.data_ptr<int16_t>(), out, nnz, in, f);
  } else {
    check_csr_kernel<int32_t>
        <<<blocks_for(rows), kBlock, 0, stream>>>(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), out, nnz, in, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (slots.defined() && slots.numel() > 0) {
    check_slots_kernel<<<blocks_for(slots.numel()), kBlock, 0, stream>>>(slots.data_ptr<int64_t>(), slots.numel(), nnz,
                                                                         f + 1);
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
    if (host_check) {
      host_check(crow_h, col_h);
    } else {
      check_csr(op, crow_h, col_h, nullptr, cpu, /*check_offsets=*/true);
      check_cols_cpu(op, crow_h, col_h, in);
    }
    TORCH_CHECK(false, op, ": invalid sparse structure near row ", hf[0]);
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
    check_on_device(op, crow_c, col_c, in, at::Tensor(), [&] { built = build_tile_ptr(crow_c, col_c, in, kColTile); });
    return built;
  });
  // used on another stream than it was allocated on: the allocator must not reuse it early
  c10::cuda::CUDACachingAllocator::recordStream(tp.storage().data_ptr(), at::cuda::getCurrentCUDAStream());
  return tp;
}

}  // namespace seft::cuda
