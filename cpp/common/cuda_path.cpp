#include "common/cuda_path.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>

namespace seft {
namespace {
// The start value: SEFT_CUDA_PATH from the environment when it names a path, else auto.
CudaPath from_env() {
  const char* v = std::getenv("SEFT_CUDA_PATH");
  const std::string s = v ? v : "";
  return s == "tensor_core" ? CudaPath::kTensorCore : s == "cuda_core" ? CudaPath::kCudaCore : CudaPath::kAuto;
}
std::atomic<CudaPath> g_path{from_env()};
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
