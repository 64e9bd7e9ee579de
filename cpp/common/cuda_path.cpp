#include "common/cuda_path.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace seft {
namespace {
std::atomic<CudaPath> g_path{CudaPath::kAuto};
const char* name_of(CudaPath p) {
  return p == CudaPath::kTensorCore ? "tensor_core" : p == CudaPath::kCudaCore ? "cuda_core" : "auto";
}
}  // namespace

CudaPath cuda_path() { return g_path.load(); }

std::string cuda_path_op(std::string choose) {
  if (choose == "auto") g_path.store(CudaPath::kAuto);
  else if (choose == "tensor_core") g_path.store(CudaPath::kTensorCore);
  else if (choose == "cuda_core") g_path.store(CudaPath::kCudaCore);
  else TORCH_CHECK(choose.empty(), "cuda_path: expected '', 'auto', 'tensor_core' or 'cuda_core', got '", choose, "'");
  return name_of(g_path.load());
}

}  // namespace seft
