// The BSR pattern's device check and block index (cuda/bsr_common.cuh). The pattern of blocks
// is checked as a CSR pattern (crow over block rows, col the block columns, in = nbc) by
// cuda/check_cuda.h's kernels, once per version through the structure cache; a failure reruns
// the CPU op's checks (common/bsr_checks.h) on host copies for its exact message. The index is
// built with ATen ops and one kernel on the current stream, without a host sync, before the
// check's one sync.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <cstdint>

#include "common/bsr_checks.h"
#include "common/structure_cache.h"
#include "cuda/bsr_common.cuh"
#include "cuda/check_cuda.h"

namespace seft::cuda {
namespace {

// brow[p] = the block row of block p (offsets clamped to [0, nb]).
__global__ void block_rows_kernel(const int32_t* crow, int64_t nbr, int64_t nb, int32_t* brow) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < nbr; b += stride) {
    const int64_t lo = clamp_offset(crow[b], 0, nb), hi = clamp_offset(crow[b + 1], lo, nb);
    for (int64_t p = lo; p < hi; ++p) brow[p] = static_cast<int32_t>(b);
  }
}

// cptr | cblk | brow (see checked_bsr_index), on the current stream.
at::Tensor build_bsr_index(const at::Tensor& crow, const at::Tensor& col, int64_t nbc) {
  const int64_t nbr = crow.numel() - 1, nb = col.numel();
  const at::Tensor col32 = col.to(at::kInt);
  const auto sorted = at::sort(col32, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor cblk = std::get<1>(sorted).to(at::kInt);
  const at::Tensor keys = at::arange(nbc + 1, col32.options());
  const at::Tensor cptr = at::searchsorted(std::get<0>(sorted), keys, /*out_int32=*/true, /*right=*/false);
  at::Tensor brow = at::empty({nb}, col32.options());
  if (nb > 0) {
    // a stale pattern could leave entries unwritten: start from 0
    brow.zero_();
    block_rows_kernel<<<blocks_for(nbr), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        crow.const_data_ptr<int32_t>(), nbr, nb, brow.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return at::cat({cptr, cblk, brow});
}

HostPatternCheck bsr_host_check(const char* op, int64_t r, int64_t c, int64_t out, int64_t nbc) {
  return [=](const at::Tensor& crow_h, const at::Tensor& col_h) {
    check_bsr(op, crow_h, col_h, nullptr, r, c, out, crow_h.device(), /*check_offsets=*/true);
    check_bsr_cols_cpu(op, crow_h, col_h, nbc);
    TORCH_CHECK(false, op, ": invalid BSR structure");
  };
}

}  // namespace

// Keyed on -1 - nbc: never a CSR key (in >= 0) for the same tensors, whose derived tensor differs.
at::Tensor checked_bsr_index(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_c,
                             const at::Tensor& col_c, int64_t r, int64_t c, int64_t out, int64_t nbc) {
  at::Tensor index = checked_structure(crow, col, -1 - nbc, [&] {
    at::Tensor built;
    check_on_device(
        op, crow_c, col_c, nbc, at::Tensor(), [&] { built = build_bsr_index(crow_c, col_c, nbc); },
        bsr_host_check(op, r, c, out, nbc));
    return built;
  });
  // used on another stream than it was allocated on: the allocator must not reuse it early
  c10::cuda::CUDACachingAllocator::recordStream(index.storage().data_ptr(), at::cuda::getCurrentCUDAStream());
  return index;
}

void checked_bsr_slots(const char* op, const at::Tensor& slots, const at::Tensor& slots_c, const at::Tensor& crow_c,
                       const at::Tensor& col_c, int64_t r, int64_t c, int64_t out, int64_t nbc) {
  checked_slots(slots, col_c.numel(),
                [&] { check_on_device(op, crow_c, col_c, nbc, slots_c, {}, bsr_host_check(op, r, c, out, nbc)); });
}

}  // namespace seft::cuda
