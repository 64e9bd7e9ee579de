// csr_grow_scan from ATen ops only, on any device: the exact scan (no sketch), for the
// layer and row budgets. The CUDA build runs it as csr_grow_scan's CUDA kernel
// (cpp/cuda/csr_grow_scan_cuda.cu: one GEMM per row tile on cuBLAS, selections with topk /
// sort); the CPU registers it as csr_grow_scan_tiled so that tests compare it with the CPU
// kernel on identical inputs.
//
// Same selection as the CPU kernel: grow candidates are the num_grow largest |G| outside the
// delta (inactive positions only when grow_inactive); prune candidates the base-only positions
// of smallest |theta * G| (num_prune in the layer, or ceil(num_prune / out) per row). Ties
// may resolve differently from the CPU kernel's (score, position) order.
#include "common/csr_grow_scan_tiled.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"

namespace seft::tiled {
namespace {

// Keeps the `cap` best of (score, pos, g) after appending a tile's candidates.
struct Pool {
  at::Tensor score, pos, g;
  void add(const at::Tensor& s, const at::Tensor& p, const at::Tensor& gv, int64_t cap, bool largest) {
    if (cap <= 0 || s.numel() == 0) return;
    at::Tensor S = score.defined() ? at::cat({score, s}) : s;
    at::Tensor P = pos.defined() ? at::cat({pos, p}) : p;
    at::Tensor Gv = g.defined() ? at::cat({g, gv}) : gv;
    if (S.numel() > cap) {
      at::Tensor idx = std::get<1>(at::topk(S, cap, 0, largest, /*sorted=*/false));
      S = S.index_select(0, idx);
      P = P.index_select(0, idx);
      Gv = Gv.index_select(0, idx);
    }
    score = S;
    pos = P;
    g = Gv;
  }
  int64_t bytes() const { return score.defined() ? score.numel() * 24 : 0; }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, int64_t, bool> grow_scan(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& crow, const at::Tensor& col,
                                                            const at::Tensor& theta, const at::Tensor& delta_slots,
                                                            int64_t num_grow, int64_t num_prune, bool row_budget,
                                                            bool grow_inactive, int64_t tile_bytes) {
  const int64_t in = x.size(-1), out = crow.numel() - 1, nnz = col.numel();
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t esize = acc == at::kDouble ? 8 : 4;
  const auto opts = x.options();
  const auto lopts = opts.dtype(at::kLong);
  const at::Tensor X = as_2d(x).to(acc).contiguous();
  const at::Tensor dyT = as_2d(grad_out).to(acc).t().contiguous();  // (out, T)
  const at::Tensor crow_h = crow.to(at::kCPU, at::kLong).contiguous();  // small: out + 1 offsets
  const int64_t* ch = crow_h.data_ptr<int64_t>();
  at::Tensor is_delta = at::zeros({nnz}, opts.dtype(at::kBool));
  if (delta_slots.numel()) is_delta.index_fill_(0, delta_slots, true);
  const at::Tensor theta_acc = theta.to(acc);
  const int64_t tile_rows = std::max<int64_t>(1, std::min<int64_t>(out, tile_bytes / std::max<int64_t>(1, in * esize)));
  const int64_t row_cap = (row_budget && out > 0) ? (num_prune + out - 1) / out : 0;
  const int64_t prune_cap = row_budget ? 0 : num_prune;

  Pool grow, prune;
  std::vector<at::Tensor> row_pos, row_g;  // row budget: each tile's kept prune candidates
  at::Tensor nonfinite = at::zeros({}, opts.dtype(at::kBool));
  int64_t peak = 0;
  for (int64_t r0 = 0; r0 < out; r0 += tile_rows) {
    const int64_t r1 = std::min(out, r0 + tile_rows), R = r1 - r0;
    const at::Tensor G = at::mm(dyT.narrow(0, r0, R), X);  // (R, in): the only dense tile alive
    nonfinite.logical_or_(G.isfinite().logical_not().any());
    const int64_t q0 = ch[r0], q1 = ch[r1];
    const at::Tensor counts = crow.narrow(0, r0 + 1, R).to(at::kLong) - crow.narrow(0, r0, R).to(at::kLong);
    const at::Tensor rows = at::repeat_interleave(at::arange(r0, r1, lopts), counts, /*dim=*/0, q1 - q0);
    const at::Tensor cols = col.narrow(0, q0, q1 - q0).to(at::kLong);
    const at::Tensor lin = (rows - r0) * in + cols;  // active entries within the tile
    const at::Tensor base_only = is_delta.narrow(0, q0, q1 - q0).logical_not();
    const at::Tensor flat = G.reshape(-1);
    const at::Tensor gA = flat.index_select(0, lin);
    // Grow: |G| where eligible, -1 elsewhere.
    if (num_grow > 0) {
      at::Tensor score;
      if (grow_inactive) {
        score = flat.abs();
        score.index_put_({lin.masked_select(base_only.logical_not())}, at::scalar_tensor(-1.0, score.options()));
      } else {
        score = at::full({R * in}, -1.0, flat.options());
        score.index_put_({lin}, gA.abs().masked_fill(base_only.logical_not(), -1.0));
      }
      const int64_t take = std::min<int64_t>(num_grow, score.numel());
      auto [s, i] = at::topk(score, take, 0, /*largest=*/true, /*sorted=*/false);
      const at::Tensor ok = s.ge(0);
      s = s.masked_select(ok);
      i = i.masked_select(ok);
      grow.add(s, i + r0 * in, flat.index_select(0, i), num_grow, true);
    }
    // Prune: base-only active entries by |theta * G|.
    if (num_prune > 0) {
      const at::Tensor sel = base_only.nonzero().squeeze(1);
      const at::Tensor g_b = gA.index_select(0, sel);
      const at::Tensor sens = (theta_acc.narrow(0, q0, q1 - q0).index_select(0, sel) * g_b).abs();
      const at::Tensor pos_b = lin.index_select(0, sel) + r0 * in;
      if (!row_budget) {
        prune.add(sens, pos_b, g_b, prune_cap, false);
      } else if (sel.numel()) {
        // Per row the row_cap smallest: order by sensitivity, then stably by row; rank within row.
        const at::Tensor rows_b = rows.index_select(0, sel);
        at::Tensor order = sens.argsort();
        order = order.index_select(0, rows_b.index_select(0, order).argsort(/*stable=*/true));
        const at::Tensor rs = rows_b.index_select(0, order);
        const at::Tensor start = at::searchsorted(rs, rs, /*out_int32=*/false, /*right=*/false);
        const at::Tensor keep = (at::arange(rs.numel(), lopts) - start).lt(row_cap);
        const at::Tensor idx = order.masked_select(keep);
        row_pos.push_back(pos_b.index_select(0, idx));
        row_g.push_back(g_b.index_select(0, idx));
      }
    }
    peak = std::max<int64_t>(peak, R * in * (esize + 8) + (q1 - q0) * 48 + grow.bytes() + prune.bytes());
  }
  if (nonfinite.item<bool>()) {
    return {at::empty({0}, lopts), at::empty({0}, opts.dtype(acc)), peak, false};
  }
  std::vector<at::Tensor> ps(row_pos), gs(row_g);
  for (const Pool* p : {&grow, &prune}) {
    if (p->pos.defined()) {
      ps.push_back(p->pos);
      gs.push_back(p->g);
    }
  }
  if (ps.empty()) return {at::empty({0}, lopts), at::empty({0}, opts.dtype(acc)), peak, true};
  // A position can be both a grow and a prune candidate (with the same g): one entry each.
  const at::Tensor Gv = at::cat(gs);
  auto [pos, inverse, unused] = at::_unique2(at::cat(ps), /*sorted=*/true, /*return_inverse=*/true);
  const at::Tensor g = at::empty({pos.numel()}, Gv.options()).index_put_({inverse}, Gv);
  const int64_t copies = (x.scalar_type() == acc ? 0 : X.numel() * esize) + dyT.numel() * esize + nnz * 2;
  return {pos, g, peak + copies + pos.numel() * (8 + esize), true};
}

}  // namespace seft::tiled

// ---------------------------------------------------------------- the CPU registration (tests)
#include "common/evolve_common.h"

namespace seft::tiled {
namespace {

std::tuple<at::Tensor, at::Tensor, int64_t, bool> csr_grow_scan_tiled_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
    const at::Tensor& theta, const at::Tensor& delta_slots, int64_t num_grow, int64_t num_prune,
    c10::string_view budget, bool grow_inactive, int64_t tile_bytes) {
  const char* op = "csr_grow_scan_tiled";
  check_sddmm_args(op, grad_out, x, crow, col, std::nullopt, /*check_offsets=*/false);
  cpu::evolve::check_evolve_args(op, crow, col, theta, delta_slots, x.size(-1));
  TORCH_CHECK(budget == "layer" || budget == "row", op, ": budget must be 'layer' or 'row', got '", budget, "'");
  TORCH_CHECK(num_grow >= 0 && num_prune >= 0, op, ": num_grow and num_prune must be >= 0");
  TORCH_CHECK(tile_bytes > 0, op, ": tile_bytes must be > 0, got ", tile_bytes);
  return grow_scan(grad_out, x, crow, col, theta, delta_slots, num_grow, num_prune, budget == "row", grow_inactive,
                   tile_bytes);
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("csr_grow_scan_tiled", &csr_grow_scan_tiled_cpu); }

}  // namespace seft::tiled
