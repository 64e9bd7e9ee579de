// The evolution ops for CUDA tensors. An evolution step may synchronise once; these do:
//   csr_grow_scan        layer / row scope: the exact tiled scan from ATen ops on the device
//                        (cpp/tiled: one cuBLAS GEMM per row tile of G, topk / sort
//                        selections; `sketch` is not used: the exact GEMM is cheap here).
//                        nm scope: dY, X and the pattern go to the host and the CPU kernel runs.
//   csr_drop_grow_adapt_ the decision: the layer's arrays go to the host, the CPU kernel
//                        decides and rewrites them, and they come back in place (one round
//                        trip per layer per evolution step; its rules stay in one place).
//   csr_slot_union       once per window: the same host round trip; the merged pattern is
//                        checked on the host and handed to the structure cache.
// Results land on the input's device. Each call is an NVTX range (seft::<op>).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>

#include "common/csr_tile_index.h"
#include "common/structure_cache.h"
#include "common/checks.h"
#include "cuda/check_cuda.h"
#include "cuda/kernels_cuda.h"
#include "cuda/nvtx_range.h"
#include "common/csr_grow_scan_tiled.h"

namespace seft::cuda {
namespace {

constexpr int64_t kTileBytes = int64_t(256) << 20;  // G's tile: large enough to keep cuBLAS busy

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Shape / dtype / device checks of the pattern, theta and slots, on the device.
void check_pattern(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& theta,
                   const at::Tensor& slots, int64_t in, const at::Device& device) {
  TORCH_CHECK(theta.defined(), op, ": theta must be a tensor");
  check_csr(op, crow, col, &theta, device, /*check_offsets=*/false);
  TORCH_CHECK(slots.defined() && slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.device() == device,
              op, ": delta_slots must be a 1-D int64 tensor on ", device);
  TORCH_CHECK(in >= 0, op, ": in_features must be >= 0, got ", in);
  // through the structure cache: the layer's own pattern and slots are usually checked already
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), slots_c = slots.contiguous();
  checked_tile_ptr(op, crow, col, crow_c, col_c, in);
  checked_slots(slots, col.numel(), [&] { check_on_device(op, crow_c, col_c, in, slots_c); });
}

using ScanSig = std::tuple<at::Tensor, at::Tensor, int64_t, bool>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t, int64_t, c10::string_view, int64_t, int64_t, bool, int64_t, int64_t);

std::tuple<at::Tensor, at::Tensor, int64_t, bool> csr_grow_scan_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
    const at::Tensor& theta, const at::Tensor& delta_slots, int64_t num_grow, int64_t num_prune,
    c10::string_view scope, int64_t nm_n, int64_t nm_m, bool grow_inactive, int64_t sketch, int64_t seed) {
  const char* op = "csr_grow_scan";
  const NvtxRange range("seft::csr_grow_scan");
  check_sddmm_args(op, grad_out, x, crow, col, std::nullopt, /*check_offsets=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  check_pattern(op, crow, col, theta, delta_slots, x.size(-1), x.device());
  TORCH_CHECK(num_grow >= 0 && num_prune >= 0, op, ": num_grow and num_prune must be >= 0, got ", num_grow, " and ",
              num_prune);
  TORCH_CHECK(sketch >= 0, op, ": sketch must be >= 0 (0: the exact gradient), got ", sketch);
  if (scope == "layer" || scope == "row") {
    return tiled::grow_scan(grad_out, x, crow, col, theta, delta_slots, num_grow, num_prune, scope == "row",
                            grow_inactive, kTileBytes);
  }
  // nm (or a bad scope, which the CPU kernel rejects with its message): on the host.
  static const auto cpu_op = find_op<ScanSig>("seft::csr_grow_scan");
  auto [pos, g, bytes, finite] = cpu_op.call(grad_out.cpu(), x.cpu(), crow.cpu(), col.cpu(), theta.cpu(),
                                             delta_slots.cpu(), num_grow, num_prune, scope, nm_n, nm_m,
                                             grow_inactive, 0, seed);
  return {pos.to(x.device()), g.to(x.device()), bytes, finite};
}

using DgaSig = std::tuple<at::Tensor, at::Tensor>(at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                                  c10::string_view, int64_t, int64_t, bool);

std::tuple<at::Tensor, at::Tensor> csr_drop_grow_adapt_cuda(at::Tensor& crow, at::Tensor& col, at::Tensor& theta,
                                                            at::Tensor& delta_slots, at::Tensor& delta,
                                                            const at::Tensor& tracked, const at::Tensor& gsum,
                                                            int64_t num_drop, int64_t in_features,
                                                            c10::string_view scope, int64_t nm_n, int64_t nm_m,
                                                            bool grow_inactive) {
  const char* op = "csr_drop_grow_adapt_";
  const NvtxRange range("seft::csr_drop_grow_adapt_");
  const at::Device dev = theta.device();
  TORCH_CHECK(dev.is_cuda(), op, ": theta must be on a CUDA device, got ", dev);
  using Args = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : Args{&crow, &col, &delta_slots, &delta, &tracked, &gsum})
    TORCH_CHECK(t->defined() && t->device() == dev, op, ": every argument must be on ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  // Host copies; the CPU kernel checks everything and decides on them.
  at::Tensor crow_h = crow.cpu(), col_h = col.cpu(), theta_h = theta.cpu(), slots_h = delta_slots.cpu();
  at::Tensor delta_h = delta.cpu();
  static const auto cpu_op = find_op<DgaSig>("seft::csr_drop_grow_adapt_");
  auto [remap, counts] = cpu_op.call(crow_h, col_h, theta_h, slots_h, delta_h, tracked.cpu(), gsum.cpu(), num_drop,
                                     in_features, scope, nm_n, nm_m, grow_inactive);
  crow.copy_(crow_h);
  col.copy_(col_h);
  theta.copy_(theta_h);
  delta_slots.copy_(slots_h);
  delta.copy_(delta_h);
  return {remap.to(dev), counts.to(dev)};
}

using UnionSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                            const at::Tensor&, const at::Tensor&,
                                                                            int64_t);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csr_slot_union_cuda(const at::Tensor& crow,
                                                                               const at::Tensor& col,
                                                                               const at::Tensor& slots,
                                                                               const at::Tensor& positions,
                                                                               int64_t in_features) {
  const char* op = "csr_slot_union";
  const NvtxRange range("seft::csr_slot_union");
  const at::Device dev = crow.device();
  using Args = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : Args{&col, &slots, &positions})
    TORCH_CHECK(t->defined() && t->device() == dev, op, ": every argument must be on ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  static const auto cpu_op = find_op<UnionSig>("seft::csr_slot_union");
  auto [c, k, a, b] = cpu_op.call(crow.cpu(), col.cpu(), slots.cpu(), positions.cpu(), in_features);
  // The merged pattern, checked here on the host, goes to the structure cache with its tile
  // index: the window's csr_sddmm calls then need no device check (and no sync).
  check_csr(op, c, k, nullptr, c.device(), /*check_offsets=*/true);
  check_cols_cpu(op, c, k, in_features);
  at::Tensor c_dev = c.to(dev), k_dev = k.to(dev);
  remember_structure(c_dev, k_dev, in_features, build_tile_ptr(c_dev, k_dev, in_features, kColTile));
  return {c_dev, k_dev, a.to(dev), b.to(dev)};
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) {
  m.impl("csr_grow_scan", &csr_grow_scan_cuda);
  m.impl("csr_drop_grow_adapt_", &csr_drop_grow_adapt_cuda);
  m.impl("csr_slot_union", &csr_slot_union_cuda);
}

}  // namespace seft::cuda
