// Which CUDA kernels the ops use: chosen by dtype and token count (auto), or forced, so that
// tests can run both paths on identical inputs. Process-wide; set through the op
// torch.ops.seft.cuda_path("auto" | "tensor_core" | "cuda_core"), which returns the setting;
// it starts from the environment variable SEFT_CUDA_PATH (same names; anything else: auto).
#pragma once
#include <string>

namespace seft {

enum class CudaPath { kAuto, kTensorCore, kCudaCore };

CudaPath cuda_path();
// "" reads the setting; returns its name.
std::string cuda_path_op(std::string choose);

}  // namespace seft
