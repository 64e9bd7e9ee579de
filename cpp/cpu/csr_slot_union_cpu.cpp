// csr_slot_union: the CSR pattern of the delta's positions (slots into a CSR weight) and
// a sorted list of other positions, merged; and where each of the two lands in it. An
// evolution window runs one csr_sddmm over this pattern per backward pass: the delta's
// gradient and the tracked positions' statistics in one call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "common/evolve_common.h"

namespace seft::cpu::evolve {
namespace {

template <typename I>
void merge_typed(const int32_t* crow, const I* col, const int64_t* slots, int64_t k, const int64_t* pos, int64_t n,
                 int64_t out, int64_t in, int32_t* ucrow, I* ucol, int64_t* at_slots, int64_t* at_pos) {
  int64_t s = 0, p = 0, w = 0, r = 0, sr = 0;  // sr: the row of slots[s]; r: rows of ucrow done
  ucrow[0] = 0;
  while (s < k || p < n) {
    int64_t spos = INT64_MAX;
    if (s < k) {
      while (crow[sr + 1] <= slots[s]) ++sr;
      spos = sr * in + int64_t(col[slots[s]]);
    }
    const int64_t ppos = p < n ? pos[p] : INT64_MAX;
    TORCH_CHECK(spos != ppos, "csr_slot_union: position ", ppos, " is both a slot's and a listed one");
    const int64_t next = std::min(spos, ppos);
    while (r < next / in) ucrow[++r] = static_cast<int32_t>(w);
    ucol[w] = static_cast<I>(next % in);
    if (spos < ppos) at_slots[s++] = w++;
    else at_pos[p++] = w++;
  }
  while (r < out) ucrow[++r] = static_cast<int32_t>(w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csr_slot_union_cpu(const at::Tensor& crow_in,
                                                                              const at::Tensor& col_in,
                                                                              const at::Tensor& slots_in,
                                                                              const at::Tensor& pos_in,
                                                                              int64_t in_features) {
  const char* op = "csr_slot_union";
  TORCH_CHECK(crow_in.device().is_cpu(), op, ": this op runs on the CPU, crow is on ", crow_in.device());
  check_csr(op, crow_in, col_in, nullptr, crow_in.device(), /*check_offsets=*/true);
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  check_slots_cpu(op, slots_in.contiguous(), col_in.numel());
  const int64_t out = crow_in.numel() - 1;
  TORCH_CHECK(pos_in.defined() && pos_in.dim() == 1 && pos_in.scalar_type() == at::kLong && pos_in.device().is_cpu(),
              op, ": positions must be a 1-D int64 CPU tensor");
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous(), slots = slots_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  const int64_t k = slots.numel(), n = pos.numel();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(pp[i] >= 0 && pp[i] < out * in_features, op, ": positions[", i, "] = ", pp[i],
                " is out of range [0, out * in = ", out * in_features, ")");
    TORCH_CHECK(i == 0 || pp[i] > pp[i - 1], op, ": positions must be strictly increasing, but positions[", i,
                "] = ", pp[i], " follows ", pp[i - 1]);
  }
  at::Tensor ucrow = at::empty({out + 1}, crow.options());
  at::Tensor ucol = at::empty({k + n}, col.options());
  at::Tensor at_slots = at::empty({k}, pos.options());
  at::Tensor at_pos = at::empty({n}, pos.options());
  if (col.scalar_type() == at::kShort) {
    merge_typed<int16_t>(crow.data_ptr<int32_t>(), col.data_ptr<int16_t>(), slots.data_ptr<int64_t>(), k, pp, n, out,
                         in_features, ucrow.data_ptr<int32_t>(), ucol.data_ptr<int16_t>(), at_slots.data_ptr<int64_t>(),
                         at_pos.data_ptr<int64_t>());
  } else {
    merge_typed<int32_t>(crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), slots.data_ptr<int64_t>(), k, pp, n, out,
                         in_features, ucrow.data_ptr<int32_t>(), ucol.data_ptr<int32_t>(), at_slots.data_ptr<int64_t>(),
                         at_pos.data_ptr<int64_t>());
  }
  return {ucrow, ucol, at_slots, at_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("csr_slot_union", &csr_slot_union_cpu); }

}  // namespace seft::cpu::evolve
