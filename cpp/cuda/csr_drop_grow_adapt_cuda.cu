// csr_drop_grow_adapt_ on CUDA: the decision runs on the host. The layer's arrays go to the
// host, the CPU kernel (cpp/cpu/csr_drop_grow_adapt_cpu.cpp) checks, decides and rewrites
// them, and they come back in place: one round trip per layer per evolution step, and its
// rules stay in one place. Results land on the input's device; each call is an NVTX range
// (seft::csr_drop_grow_adapt_).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>

#include "cuda/cpu_fallback.h"
#include "cuda/nvtx_range.h"

namespace seft::cuda {
namespace {

using DgaSig = std::tuple<at::Tensor, at::Tensor>(at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                                  c10::string_view, int64_t, int64_t, bool);

std::tuple<at::Tensor, at::Tensor> csr_drop_grow_adapt_cuda(at::Tensor& crow, at::Tensor& col, at::Tensor& theta,
                                                            at::Tensor& delta_slots, at::Tensor& delta,
                                                            const at::Tensor& tracked, const at::Tensor& gsum,
                                                            int64_t num_drop, int64_t in_features,
                                                            c10::string_view budget, int64_t nm_n, int64_t nm_m,
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
                                     in_features, budget, nm_n, nm_m, grow_inactive);
  crow.copy_(crow_h);
  col.copy_(col_h);
  theta.copy_(theta_h);
  delta_slots.copy_(slots_h);
  delta.copy_(delta_h);
  return {remap.to(dev), counts.to(dev)};
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("csr_drop_grow_adapt_", &csr_drop_grow_adapt_cuda); }

}  // namespace seft::cuda
