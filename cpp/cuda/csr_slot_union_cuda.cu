// csr_slot_union on CUDA, once per evolution window: the arrays make a host round trip and the
// CPU kernel (cpp/cpu/csr_slot_union_cpu.cpp) merges them; the merged pattern is checked on
// the host and handed to the structure cache with its column-tile index, so the window's
// csr_sddmm calls need no device check (and no sync). Each call is an NVTX range
// (seft::csr_slot_union).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>

#include "common/checks.h"
#include "common/csr_tile_index.h"
#include "common/structure_cache.h"
#include "cuda/common_cuda.h"
#include "cuda/cpu_fallback.h"
#include "cuda/nvtx_range.h"

namespace seft::cuda {
namespace {

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

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("csr_slot_union", &csr_slot_union_cuda); }

}  // namespace seft::cuda
