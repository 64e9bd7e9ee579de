// The device-generic csr_grow_scan (ATen ops only; exact, layer and row budgets).
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace seft::tiled {

// Arguments already checked. Returns (tracked, g, workspace_bytes, finite) on x's device.
// tile_bytes bounds the one dense tile of G alive at a time.
std::tuple<at::Tensor, at::Tensor, int64_t, bool> grow_scan(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& crow, const at::Tensor& col,
                                                            const at::Tensor& theta, const at::Tensor& delta_slots,
                                                            int64_t num_grow, int64_t num_prune, bool row_budget,
                                                            bool grow_inactive, int64_t tile_bytes);

}  // namespace seft::tiled
