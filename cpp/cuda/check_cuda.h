// Device-side validation of a CSR pattern (and slots) with one 16-byte device -> host sync;
// on failure it reruns the CPU checks on host copies for the CPU op's exact message.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>

namespace seft::cuda {

// crow / col (and slots when defined) contiguous and on the current device. before_sync, when
// given, launches more work on the current stream after the check kernels; it is complete
// when this returns (the one sync waits for it too).
void check_on_device(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in,
                     const at::Tensor& slots, const std::function<void()>& before_sync = {});

}  // namespace seft::cuda
