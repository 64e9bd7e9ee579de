// csr_grow_scan on CUDA. An evolution step may synchronise once; this does:
//   layer / row budget: the exact tiled scan from ATen ops on the device (common/
//                       csr_grow_scan_tiled.h: one cuBLAS GEMM per row tile of G, topk / sort
//                       selections; `sketch` is not used: the exact GEMM is cheap here).
//   nm budget:          dY, X and the pattern go to the host and the CPU kernel runs.
// Results land on the input's device. Each call is an NVTX range (seft::csr_grow_scan).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "common/csr_grow_scan_tiled.h"
#include "common/structure_cache.h"
#include "cuda/check_cuda.h"
#include "cuda/cpu_fallback.h"
#include "cuda/nvtx_range.h"

namespace seft::cuda {
namespace {

constexpr int64_t kTileBytes = int64_t(256) << 20;  // G's tile: large enough to keep cuBLAS busy

// Shape / dtype / device checks of the pattern, theta and slots, on the device.
void check_pattern(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& theta,
                   const at::Tensor& slots, int64_t in, const at::Device& device) {
  TORCH_CHECK(theta.defined(), op, ": theta must be a tensor");
  check_csr(op, crow, col, &theta, device, /*check_offsets=*/false);
  TORCH_CHECK(slots.defined() && slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.device() == device, op,
              ": delta_slots must be a 1-D int64 tensor on ", device);
  TORCH_CHECK(in >= 0, op, ": in_features must be >= 0, got ", in);
  // through the structure cache: the layer's own pattern and slots are usually checked already
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), slots_c = slots.contiguous();
  checked_tile_ptr(op, crow, col, crow_c, col_c, in);
  checked_slots(slots, col.numel(), [&] { check_on_device(op, crow_c, col_c, in, slots_c); });
}

using ScanSig = std::tuple<at::Tensor, at::Tensor, int64_t, bool>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&, int64_t,
                                                                  int64_t, c10::string_view, int64_t, int64_t, bool,
                                                                  int64_t, int64_t);

std::tuple<at::Tensor, at::Tensor, int64_t, bool> csr_grow_scan_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
    const at::Tensor& theta, const at::Tensor& delta_slots, int64_t num_grow, int64_t num_prune,
    c10::string_view budget, int64_t nm_n, int64_t nm_m, bool grow_inactive, int64_t sketch, int64_t seed) {
  const char* op = "csr_grow_scan";
  const NvtxRange range("seft::csr_grow_scan");
  check_sddmm_args(op, grad_out, x, crow, col, std::nullopt, /*check_offsets=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  check_pattern(op, crow, col, theta, delta_slots, x.size(-1), x.device());
  TORCH_CHECK(num_grow >= 0 && num_prune >= 0, op, ": num_grow and num_prune must be >= 0, got ", num_grow, " and ",
              num_prune);
  TORCH_CHECK(sketch >= 0, op, ": sketch must be >= 0 (0: the exact gradient), got ", sketch);
  if (budget == "layer" || budget == "row") {
    return tiled::grow_scan(grad_out, x, crow, col, theta, delta_slots, num_grow, num_prune, budget == "row",
                            grow_inactive, kTileBytes);
  }
  // nm (or a bad budget, which the CPU kernel rejects with its message): on the host.
  static const auto cpu_op = find_op<ScanSig>("seft::csr_grow_scan");
  auto [pos, g, bytes, finite] =
      cpu_op.call(grad_out.cpu(), x.cpu(), crow.cpu(), col.cpu(), theta.cpu(), delta_slots.cpu(), num_grow, num_prune,
                  budget, nm_n, nm_m, grow_inactive, 0, seed);
  return {pos.to(x.device()), g.to(x.device()), bytes, finite};
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("csr_grow_scan", &csr_grow_scan_cuda); }

}  // namespace seft::cuda
