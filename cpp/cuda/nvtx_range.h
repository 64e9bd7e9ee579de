// An NVTX range for the scope of one op call: `nsys profile` shows the op by name. Header-only
// NVTX 3 (ships with the CUDA toolkit); a push / pop costs nanoseconds without a profiler.
#pragma once
#include <nvtx3/nvToolsExt.h>

namespace seft::cuda {

struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace seft::cuda
