// Device-side validation of a CSR pattern (and slots) with one 16-byte device -> host sync;
// on failure it reruns the CPU checks on host copies for the CPU op's exact message
// (check_cuda.cu). Shared by the CUDA ops.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>

namespace seft::cuda {

// On a failed pattern check: checks the host copies of crow / col and throws the CPU op's message.
using HostPatternCheck = std::function<void(const at::Tensor& crow_h, const at::Tensor& col_h)>;

// crow / col (and slots when defined) contiguous and on the current device. before_sync, when
// given, launches more work on the current stream after the check kernels; it is complete
// when this returns (the one sync waits for it too). host_check: the error path's host checks
// (default: the CSR checks). A BSR pattern is checked as the CSR pattern of its blocks (crow
// over block rows, col the block columns, in the number of block columns).
void check_on_device(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in, const at::Tensor& slots,
                     const std::function<void()>& before_sync = {}, const HostPatternCheck& host_check = {});

// The pattern's check through the structure cache (common/structure_cache.h): on the first
// call with (crow, col, in) at their current versions, check_on_device plus the column-tile
// index built before its sync; later calls neither check nor sync. Returns the index (tile
// 128). crow_c / col_c: contiguous versions of crow / col (the cache keys on the originals).
at::Tensor checked_tile_ptr(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_c,
                            const at::Tensor& col_c, int64_t in);

}  // namespace seft::cuda
