// csr_drop_grow_adapt_: one evolution step of one layer, in place on its buffers.
//
// The delta is k slots (delta_slots: int64, strictly increasing indices into the CSR
// arrays; delta: the slot values). The layer's pattern holds exactly its budget and keeps
// it: the arrays never change size. The decision is a pure function of its inputs (the
// window's reduced statistics: tracked positions and their summed gradient).
//
//  1. drop:  the num_drop slots with the smallest |delta| (ties: lower position). A dropped
//            slot whose theta is 0 (a re-activated position) leaves a vacancy: the position
//            turns inactive, its budget unit is one short.
//  2. fill:  each vacancy is filled by the best tracked inactive position of the same unit
//            (largest |gsum|); with none, the dropped slot is kept ("undropped").
//  3. grow:  the other dropped slots are replaced by the tracked positions outside the delta
//            with the largest |gsum|. A base-only active position just gains a delta. An
//            inactive one (grow_inactive) is re-activated only if its unit still has a tracked
//            base-only position to give up (a swap); otherwise it is passed over. Slots left
//            without a candidate are undropped.
//  4. adapt: the swapped-out base-only positions, per unit the ones with the smallest
//            sensitivity |theta * gsum|, are pruned: their values are gone.
// Every budget unit (layer, row or N:M group) ends with exactly the non-zeros it had.
// Returns (remap, counts): remap[new slot] = old slot or -1 (grown, value 0); counts =
// [dropped, grown, reactivated, pruned, undropped].
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <numeric>
#include <unordered_map>
#include <tuple>

#include "common/checks.h"
#include "common/evolve_common.h"
#include "common/nm_check.h"
#include "common/dtype_dispatch.h"

namespace seft::cpu::evolve {
namespace {

enum Status : uint8_t { kFree = 0, kGrown = 1, kPruned = 2 };

struct Tracked {
  int64_t pos, unit, nz;  // nz: index into the CSR arrays, -1 when inactive
  double g, sens;
  uint8_t status;
};

template <typename V, typename I>
std::tuple<at::Tensor, at::Tensor> dga_typed(at::Tensor& crow_t, at::Tensor& col_t, at::Tensor& theta_t,
                                             at::Tensor& dslots_t, at::Tensor& delta_t, const at::Tensor& tracked_t,
                                             const at::Tensor& gsum_t, int64_t num_drop, const Units& units,
                                             bool grow_inactive) {
  const int64_t in = units.in;
  const at::Tensor crow_c = crow_t.contiguous(), col_c = col_t.contiguous(), theta_c = theta_t.contiguous();
  const int32_t* crow = crow_c.data_ptr<int32_t>();
  const I* col = col_c.data_ptr<I>();
  const V* theta = theta_c.data_ptr<V>();
  const int64_t out = crow_c.numel() - 1, K = col_c.numel();
  const at::Tensor ds_c = dslots_t.contiguous();
  const int64_t* ds = ds_c.data_ptr<int64_t>();
  const int64_t k = ds_c.numel();
  const at::Tensor delta64 = delta_t.to(at::kDouble).contiguous();
  const double* delta = delta64.data_ptr<double>();
  const at::Tensor tr_c = tracked_t.contiguous(), g64 = gsum_t.to(at::kDouble).contiguous();

  // Slot positions: the slots are sorted, so one walk over the rows.
  std::vector<int64_t> slot_pos(k);
  for (int64_t s = 0, r = 0; s < k; ++s) {
    while (crow[r + 1] <= ds[s]) ++r;
    slot_pos[s] = r * in + int64_t(col[ds[s]]);
  }
  // 1. drop: the num_drop smallest |delta| (a selection, not a sort).
  std::vector<int64_t> order(k);
  std::iota(order.begin(), order.end(), 0);
  auto by_small_delta = [&](int64_t a, int64_t b) {
    return lower({std::abs(delta[a]), slot_pos[a]}, {std::abs(delta[b]), slot_pos[b]});
  };
  if (num_drop > 0 && num_drop < k)
    std::nth_element(order.begin(), order.begin() + (num_drop - 1), order.end(), by_small_delta);
  std::vector<uint8_t> dropped(k, 0);
  std::vector<int64_t> vacated, others;  // dropped slots, by kind
  for (int64_t i = 0; i < num_drop; ++i) {
    const int64_t s = order[i];
    dropped[s] = 1;
    (static_cast<double>(theta[ds[s]]) == 0.0 ? vacated : others).push_back(s);
  }

  // Tracked positions outside the delta: tracked, rows, columns and slots are all sorted,
  // so one merge walk finds each one's CSR index (or -1) and whether it is a delta slot.
  std::vector<Tracked> tr;
  tr.reserve(tr_c.numel());
  {
    const int64_t* tp = tr_c.data_ptr<int64_t>();
    const double* gp = g64.data_ptr<double>();
    int64_t r = -1, q = 0, qe = 0, d = 0;
    for (int64_t i = 0; i < tr_c.numel(); ++i) {
      const int64_t pos = tp[i], rr = pos / in, c = pos - rr * in;
      if (rr != r) {
        r = rr;
        q = crow[r];
        qe = crow[r + 1];
      }
      q = std::lower_bound(col + q, col + qe, static_cast<I>(c)) - col;
      const int64_t nz = (q < qe && int64_t(col[q]) == c) ? q : -1;
      if (nz >= 0) {
        while (d < k && ds[d] < nz) ++d;
        if (d < k && ds[d] == nz) continue;
      }
      const double g = gp[i];
      tr.push_back({pos, units.of(rr, c), nz, g, nz >= 0 ? std::abs(static_cast<double>(theta[nz]) * g) : 0.0, kFree});
    }
  }
  const int64_t ntr = tr.size();
  auto by_grow = [&](int64_t a, int64_t b) {
    return higher({std::abs(tr[a].g), tr[a].pos}, {std::abs(tr[b].g), tr[b].pos});
  };
  // Per budget unit: its base-only positions (prune queue, rising sensitivity) and its
  // inactive ones (vacancy fill, falling |g|). tr is in position order, so both lists come
  // out grouped by ascending unit; each group is sorted only when and as far as needed.
  struct Key {  // a compact sort key: sorting these beats sorting indices into tr
    double score;
    int64_t pos, idx;
  };
  auto key_lower = [](const Key& a, const Key& b) { return lower({a.score, a.pos}, {b.score, b.pos}); };
  auto key_higher = [](const Key& a, const Key& b) { return higher({a.score, a.pos}, {b.score, b.pos}); };
  std::vector<Key> prune_list;
  std::vector<int64_t> inact_list;
  for (int64_t i = 0; i < ntr; ++i) {
    if (tr[i].nz >= 0) prune_list.push_back({tr[i].sens, tr[i].pos, i});
    else inact_list.push_back(i);
  }
  struct Range {
    int64_t begin, end, next, sorted;
  };
  auto group = [&](int64_t n, auto tr_index) {
    std::unordered_map<int64_t, Range> m;
    for (int64_t i = 0; i < n;) {
      const int64_t u = tr[tr_index(i)].unit;
      int64_t j = i;
      while (j < n && tr[tr_index(j)].unit == u) ++j;
      m.emplace(u, Range{i, j, i, i});
      i = j;
    }
    return m;
  };
  std::unordered_map<int64_t, Range> prune_q =
      group(prune_list.size(), [&](int64_t i) { return prune_list[i].idx; });
  const int64_t prune_chunk = std::max<int64_t>(64, num_drop + num_drop / 4);
  auto pop_prunable = [&](int64_t unit) -> int64_t {  // the free base-only position of least sensitivity
    auto f = prune_q.find(unit);
    if (f == prune_q.end()) return -1;
    Range& q = f->second;
    while (q.next < q.end) {
      if (q.next == q.sorted) {
        q.sorted = std::min(q.end, q.next + prune_chunk);
        auto b = prune_list.begin();
        if (q.sorted < q.end) std::nth_element(b + q.next, b + q.sorted - 1, b + q.end, key_lower);
        std::sort(b + q.next, b + q.sorted, key_lower);
      }
      const int64_t i = prune_list[q.next++].idx;
      if (tr[i].status == kFree) return i;
    }
    return -1;
  };

  int64_t grown = 0, reactivated = 0, pruned = 0, undropped = 0;
  // 2. fill vacancies within their unit; keep the largest dropped values when short.
  std::sort(vacated.begin(), vacated.end(), [&](int64_t a, int64_t b) {
    const int64_t ua = units.of(slot_pos[a]), ub = units.of(slot_pos[b]);
    if (ua != ub) return ua < ub;
    return higher({std::abs(delta[a]), slot_pos[a]}, {std::abs(delta[b]), slot_pos[b]});
  });
  std::unordered_map<int64_t, Range> inact_q;
  if (!vacated.empty()) inact_q = group(inact_list.size(), [&](int64_t i) { return inact_list[i]; });
  for (size_t v0 = 0; v0 < vacated.size();) {
    const int64_t u = units.of(slot_pos[vacated[v0]]);
    size_t v1 = v0;
    while (v1 < vacated.size() && units.of(slot_pos[vacated[v1]]) == u) ++v1;
    const int64_t need = v1 - v0;
    int64_t filled = 0;
    if (grow_inactive && inact_q.count(u)) {
      const Range& q = inact_q.at(u);
      const int64_t take = std::min<int64_t>(need, q.end - q.begin);
      std::partial_sort(inact_list.begin() + q.begin, inact_list.begin() + q.begin + take,
                        inact_list.begin() + q.end, by_grow);
      for (int64_t j = 0; j < take; ++j) tr[inact_list[q.begin + j]].status = kGrown;
      filled = take;
    }
    for (int64_t j = 0; j < need - filled; ++j) dropped[vacated[v0 + j]] = 0;  // the largest |delta| stay
    grown += filled;
    reactivated += filled;
    undropped += need - filled;
    v0 = v1;
  }

  // 3. grow, with swaps for inactive positions; 4. the swapped-out positions are pruned.
  std::vector<Key> cand;
  for (int64_t i = 0; i < ntr; ++i)
    if (tr[i].status == kFree && (tr[i].nz >= 0 || grow_inactive)) cand.push_back({std::abs(tr[i].g), tr[i].pos, i});
  const int64_t want = others.size();
  int64_t got = 0;
  // Candidates in falling |g|, sorted lazily in chunks: usually only the first ~want are needed.
  const size_t chunk = std::max<size_t>(64, static_cast<size_t>(want + want / 4));
  size_t sorted_to = 0;
  for (size_t ci = 0; ci < cand.size() && got < want; ++ci) {
    if (ci == sorted_to) {
      sorted_to = std::min(cand.size(), ci + chunk);
      if (sorted_to < cand.size()) std::nth_element(cand.begin() + ci, cand.begin() + sorted_to - 1, cand.end(), key_higher);
      std::sort(cand.begin() + ci, cand.begin() + sorted_to, key_higher);
    }
    Tracked& t = tr[cand[ci].idx];
    if (t.status != kFree) continue;
    if (t.nz >= 0) {
      t.status = kGrown;
    } else {
      const int64_t give = pop_prunable(t.unit);
      if (give < 0) continue;  // no base weight of this unit to give up: not a valid swap
      tr[give].status = kPruned;
      t.status = kGrown;
      ++reactivated;
      ++pruned;
    }
    ++got;
  }
  grown += got;
  if (want > got) {  // keep the largest dropped values
    std::partial_sort(others.begin(), others.begin() + (want - got), others.end(), [&](int64_t a, int64_t b) {
      return higher({std::abs(delta[a]), slot_pos[a]}, {std::abs(delta[b]), slot_pos[b]});
    });
  }
  for (int64_t j = 0; j < want - got; ++j) dropped[others[j]] = 0;
  undropped += want - got;

  // Apply. New delta entries in position order: kept slots (slot order is position order)
  // merged with grown positions (tr is in position order).
  struct Entry {
    int64_t pos, old_slot, old_nz;  // old_slot -1: grown; old_nz -1: newly active
  };
  std::vector<Entry> kept, grown_e, new_delta(k);
  std::vector<int64_t> removed, added;  // CSR indices leaving / positions entering the pattern
  int64_t n_dropped = 0;
  for (int64_t s = 0; s < k; ++s) {
    if (!dropped[s]) {
      kept.push_back({slot_pos[s], s, ds[s]});
    } else {
      ++n_dropped;
      if (static_cast<double>(theta[ds[s]]) == 0.0) removed.push_back(ds[s]);
    }
  }
  for (const Tracked& t : tr) {
    if (t.status == kGrown) {
      grown_e.push_back({t.pos, -1, t.nz});
      if (t.nz < 0) added.push_back(t.pos);
    } else if (t.status == kPruned) {
      removed.push_back(t.nz);
    }
  }
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(kept.size() + grown_e.size()) == k,
                        "csr_drop_grow_adapt_: delta size changed");
  std::merge(kept.begin(), kept.end(), grown_e.begin(), grown_e.end(), new_delta.begin(),
             [](const Entry& a, const Entry& b) { return a.pos < b.pos; });
  std::sort(removed.begin(), removed.end());

  // The new arrays: spans of old entries copied whole between removals and insertions.
  // shifts: (first old index of a span, new index - old index) for mapping old slots.
  std::vector<int32_t> ncrow(out + 1, 0);
  std::vector<I> ncol(K);
  std::vector<V> ntheta(K);
  std::vector<std::pair<int64_t, int64_t>> shifts;
  std::vector<int64_t> added_at(added.size());
  int64_t w = 0, a = 0, rp = 0;
  const int64_t na = added.size(), nr = removed.size();
  auto copy_span = [&](int64_t q0, int64_t q1) {
    if (q1 <= q0) return;
    TORCH_INTERNAL_ASSERT(w + (q1 - q0) <= K, "csr_drop_grow_adapt_: budget overflow");
    shifts.emplace_back(q0, w - q0);
    std::copy(col + q0, col + q1, ncol.begin() + w);
    std::copy(theta + q0, theta + q1, ntheta.begin() + w);
    w += q1 - q0;
  };
  for (int64_t r = 0; r < out; ++r) {
    int64_t q = crow[r];
    const int64_t qe = crow[r + 1];
    while (true) {
      const int64_t q_rm = (rp < nr && removed[rp] < qe) ? removed[rp] : qe;
      int64_t q_add = qe;
      if (a < na && added[a] / in == r) {
        q_add = std::lower_bound(col + q, col + qe, static_cast<I>(added[a] % in)) - col;
      } else if (q_rm == qe) {
        break;
      }
      const int64_t next = std::min(q_rm, q_add);
      copy_span(q, next);
      q = next;
      if (a < na && added[a] / in == r && q_add <= q_rm) {
        TORCH_INTERNAL_ASSERT(w < K, "csr_drop_grow_adapt_: budget overflow");
        ncol[w] = static_cast<I>(added[a] % in);
        ntheta[w] = V(0);
        added_at[a++] = w++;
      } else if (q_rm < qe) {
        ++q;
        ++rp;
      }
    }
    copy_span(q, qe);
    ncrow[r + 1] = static_cast<int32_t>(w);
  }
  TORCH_INTERNAL_ASSERT(w == K && rp == nr && a == na, "csr_drop_grow_adapt_: budget not kept (", w, " of ", K,
                        " non-zeros)");
  if (units.budget != Budget::layer) {
    for (int64_t r = 0; r <= out; ++r)
      TORCH_INTERNAL_ASSERT(ncrow[r] == crow[r], "csr_drop_grow_adapt_: a row budget changed");
  }
  // New slot indices: old entries through the span shifts (old indices rise with position),
  // newly active ones where they were inserted.
  std::vector<int64_t> nslots(k);
  for (int64_t s = 0, sp = 0, ap = 0; s < k; ++s) {
    const Entry& e = new_delta[s];
    if (e.old_nz >= 0) {
      while (sp + 1 < static_cast<int64_t>(shifts.size()) && shifts[sp + 1].first <= e.old_nz) ++sp;
      nslots[s] = e.old_nz + shifts[sp].second;
    } else {
      while (added[ap] != e.pos) ++ap;
      nslots[s] = added_at[ap];
    }
  }

  at::Tensor remap = at::empty({k}, at::kLong);
  at::Tensor nvals = at::zeros({k}, at::kDouble);
  int64_t* rm = remap.data_ptr<int64_t>();
  double* nv = nvals.data_ptr<double>();
  for (int64_t s = 0; s < k; ++s) {
    const int64_t o = new_delta[s].old_slot;
    rm[s] = o;
    if (o >= 0) nv[s] = delta[o];
  }
  auto cpu_long = at::TensorOptions().dtype(at::kLong);
  crow_t.copy_(at::from_blob(ncrow.data(), {out + 1}, at::TensorOptions().dtype(at::kInt)));
  col_t.copy_(at::from_blob(ncol.data(), {K}, col_t.options()));
  theta_t.copy_(at::from_blob(ntheta.data(), {K}, theta_t.options()));
  dslots_t.copy_(at::from_blob(nslots.data(), {k}, cpu_long));
  delta_t.copy_(nvals);
  at::Tensor counts = at::tensor({n_dropped, grown, reactivated, pruned, undropped}, cpu_long);
  return {remap, counts};
}

std::tuple<at::Tensor, at::Tensor> csr_drop_grow_adapt_cpu(at::Tensor& crow, at::Tensor& col, at::Tensor& theta,
                                                           at::Tensor& delta_slots, at::Tensor& delta,
                                                           const at::Tensor& tracked, const at::Tensor& gsum,
                                                           int64_t num_drop, int64_t in_features,
                                                           c10::string_view budget, int64_t nm_n, int64_t nm_m,
                                                           bool grow_inactive) {
  const char* op = "csr_drop_grow_adapt_";
  check_evolve_args(op, crow, col, theta, delta_slots, in_features);
  const int64_t out = crow.numel() - 1, k = delta_slots.numel();
  const Units units{parse_budget(op, std::string(budget), nm_n, nm_m, in_features), in_features, nm_m};
  TORCH_CHECK(delta.defined() && delta.dim() == 1 && delta.numel() == k, op,
              ": delta must be 1-D with one value per slot (", k, "), got shape ",
              delta.defined() ? delta.sizes() : at::IntArrayRef{});
  TORCH_CHECK(delta.scalar_type() == at::kFloat || delta.scalar_type() == at::kDouble, op,
              ": delta must be float32 or float64, got ", delta.scalar_type());
  TORCH_CHECK(delta.device().is_cpu(), op, ": delta is on ", delta.device(), ", expected the CPU");
  TORCH_CHECK(at::isfinite(delta).all().item<bool>(), op, ": delta contains NaN or Inf");
  TORCH_CHECK(num_drop >= 0 && num_drop <= k, op, ": num_drop must be in [0, k = ", k, "], got ", num_drop);
  TORCH_CHECK(tracked.defined() && tracked.dim() == 1 && tracked.scalar_type() == at::kLong &&
                  tracked.device().is_cpu(),
              op, ": tracked must be a 1-D int64 CPU tensor");
  TORCH_CHECK(gsum.defined() && gsum.dim() == 1 && gsum.numel() == tracked.numel() && gsum.is_floating_point() &&
                  gsum.device().is_cpu(),
              op, ": gsum must be a 1-D floating CPU tensor with one value per tracked position (",
              tracked.numel(), ")");
  TORCH_CHECK(at::isfinite(gsum).all().item<bool>(), op, ": gsum contains NaN or Inf");
  {
    const at::Tensor t = tracked.contiguous();
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      TORCH_CHECK(p[i] >= 0 && p[i] < out * in_features, op, ": tracked[", i, "] = ", p[i],
                  " is out of range [0, out * in = ", out * in_features, ")");
      TORCH_CHECK(i == 0 || p[i] > p[i - 1], op, ": tracked positions must be strictly increasing, but tracked[",
                  i, "] = ", p[i], " follows ", p[i - 1]);
    }
  }
  if (units.budget == Budget::nm) check_nm_pattern("csr_drop_grow_adapt_: ", crow, col, in_features, nm_n, nm_m);
  std::tuple<at::Tensor, at::Tensor> res;
  dispatch_types(theta.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    res = dga_typed<V, I>(crow, col, theta, delta_slots, delta, tracked, gsum, num_drop, units, grow_inactive);
  });
  return res;
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("csr_drop_grow_adapt_", &csr_drop_grow_adapt_cpu); }

}  // namespace seft::cpu::evolve
