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
//            sensitivity |theta * gsum|, are pruned: their values are gone. (Each swap takes
//            its unit's least sensitive free one at once, so grow and adapt interleave.)
// Every budget unit (layer, row or N:M group) ends with exactly the non-zeros it had.
// Returns (remap, counts): remap[new slot] = old slot or -1 (grown, value 0); counts =
// [dropped, grown, reactivated, pruned, undropped].
//
// The phases below, in order: read_layer, select_drops, index_tracked, fill_vacancies,
// grow_with_swaps (with PruneQueues: adapt), keep_largest_dropped, collect_changes,
// rebuild_csr, remap_slots, write_back.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <numeric>
#include <tuple>
#include <unordered_map>

#include "common/checks.h"
#include "common/dtype_dispatch.h"
#include "common/evolve_common.h"
#include "common/nm_check.h"

namespace seft::cpu::evolve {
namespace {

// ---------------------------------------------------------------- the layer as read
template <typename V, typename I>
struct Layer {
  at::Tensor crow_c, col_c, theta_c, ds_c, delta64;  // own the data the pointers see
  const int32_t* crow;
  const I* col;
  const V* theta;
  const int64_t* ds;    // delta slots
  const double* delta;  // delta values, as double
  int64_t in, out, K, k;
  std::vector<int64_t> slot_pos;  // the position of each slot

  Scored slot_score(int64_t s) const { return {std::abs(delta[s]), slot_pos[s]}; }
  bool base_is_zero(int64_t s) const { return static_cast<double>(theta[ds[s]]) == 0.0; }
};

template <typename V, typename I>
Layer<V, I> read_layer(const at::Tensor& crow_t, const at::Tensor& col_t, const at::Tensor& theta_t,
                       const at::Tensor& dslots_t, const at::Tensor& delta_t, int64_t in) {
  Layer<V, I> L;
  L.crow_c = crow_t.contiguous();
  L.col_c = col_t.contiguous();
  L.theta_c = theta_t.contiguous();
  L.ds_c = dslots_t.contiguous();
  L.delta64 = delta_t.to(at::kDouble).contiguous();
  L.crow = L.crow_c.template data_ptr<int32_t>();
  L.col = L.col_c.template data_ptr<I>();
  L.theta = L.theta_c.template data_ptr<V>();
  L.ds = L.ds_c.template data_ptr<int64_t>();
  L.delta = L.delta64.template data_ptr<double>();
  L.in = in;
  L.out = L.crow_c.numel() - 1;
  L.K = L.col_c.numel();
  L.k = L.ds_c.numel();
  // Slot positions: the slots are sorted, so one walk over the rows.
  L.slot_pos.resize(L.k);
  for (int64_t s = 0, r = 0; s < L.k; ++s) {
    while (L.crow[r + 1] <= L.ds[s]) ++r;
    L.slot_pos[s] = r * in + int64_t(L.col[L.ds[s]]);
  }
  return L;
}

struct Counts { int64_t dropped = 0, grown = 0, reactivated = 0, pruned = 0, undropped = 0; };

// ---------------------------------------------------------------- 1. drop
struct Drops {
  std::vector<uint8_t> dropped;  // per slot
  std::vector<int64_t> vacated;  // dropped slots whose theta is 0: their unit is one short
  std::vector<int64_t> others;   // the other dropped slots
};

// The num_drop smallest |delta| (a selection, not a sort).
template <typename V, typename I>
Drops select_drops(const Layer<V, I>& L, int64_t num_drop) {
  std::vector<int64_t> order(L.k);
  std::iota(order.begin(), order.end(), 0);
  auto by_small_delta = [&](int64_t a, int64_t b) { return lower(L.slot_score(a), L.slot_score(b)); };
  if (num_drop > 0 && num_drop < L.k)
    std::nth_element(order.begin(), order.begin() + (num_drop - 1), order.end(), by_small_delta);
  Drops d;
  d.dropped.assign(L.k, 0);
  for (int64_t i = 0; i < num_drop; ++i) {
    const int64_t s = order[i];
    d.dropped[s] = 1;
    (L.base_is_zero(s) ? d.vacated : d.others).push_back(s);
  }
  return d;
}

// ---------------------------------------------------------------- tracked positions
enum Status : uint8_t { kFree = 0, kGrown = 1, kPruned = 2 };

struct Tracked {
  int64_t pos, unit, nz;  // nz: index into the CSR arrays, -1 when inactive
  double g, sens;
  uint8_t status;
};

// The tracked positions outside the delta, in position order. Tracked, rows, columns and
// slots are all sorted, so one merge walk finds each one's CSR index (or -1) and whether it
// is a delta slot.
template <typename V, typename I>
std::vector<Tracked> index_tracked(const Layer<V, I>& L, const at::Tensor& tracked_t, const at::Tensor& gsum_t,
                                   const Units& units) {
  const at::Tensor tr_c = tracked_t.contiguous(), g64 = gsum_t.to(at::kDouble).contiguous();
  const int64_t* tp = tr_c.data_ptr<int64_t>();
  const double* gp = g64.data_ptr<double>();
  std::vector<Tracked> tr;
  tr.reserve(tr_c.numel());
  int64_t r = -1, q = 0, qe = 0, d = 0;
  for (int64_t i = 0; i < tr_c.numel(); ++i) {
    const int64_t pos = tp[i], rr = pos / L.in, c = pos - rr * L.in;
    if (rr != r) {
      r = rr;
      q = L.crow[r];
      qe = L.crow[r + 1];
    }
    q = std::lower_bound(L.col + q, L.col + qe, static_cast<I>(c)) - L.col;
    const int64_t nz = (q < qe && int64_t(L.col[q]) == c) ? q : -1;
    if (nz >= 0) {
      while (d < L.k && L.ds[d] < nz) ++d;
      if (d < L.k && L.ds[d] == nz) continue;
    }
    const double g = gp[i];
    const double sens = nz >= 0 ? std::abs(static_cast<double>(L.theta[nz]) * g) : 0.0;
    tr.push_back({pos, units.of(rr, c), nz, g, sens, kFree});
  }
  return tr;
}

// Grow order: larger |g| first (ties: lower position).
bool grows_before(const Tracked& a, const Tracked& b) { return higher({std::abs(a.g), a.pos}, {std::abs(b.g), b.pos}); }

// A compact sort key: sorting these beats sorting indices into the tracked list.
struct Key {
  double score;
  int64_t pos, idx;
};
bool key_lower(const Key& a, const Key& b) { return lower({a.score, a.pos}, {b.score, b.pos}); }
bool key_higher(const Key& a, const Key& b) { return higher({a.score, a.pos}, {b.score, b.pos}); }

// A unit's run [begin, end) of a list grouped by unit; next: the next entry to take;
// [next, sorted) is sorted already.
struct Range { int64_t begin, end, next, sorted; };
using UnitRanges = std::unordered_map<int64_t, Range>;

// The runs of equal unit in a list of n entries grouped by ascending unit (the tracked
// positions are in position order, so any sublist of them is). tr_index(i): entry i's index
// into tr.
template <typename TrIndex>
UnitRanges group_by_unit(const std::vector<Tracked>& tr, int64_t n, TrIndex tr_index) {
  UnitRanges m;
  for (int64_t i = 0; i < n;) {
    const int64_t u = tr[tr_index(i)].unit;
    int64_t j = i;
    while (j < n && tr[tr_index(j)].unit == u) ++j;
    m.emplace(u, Range{i, j, i, i});
    i = j;
  }
  return m;
}

// ---------------------------------------------------------------- 4. adapt: the prune queues
// Per budget unit, its tracked base-only positions in rising sensitivity |theta * gsum|;
// each unit's run is sorted only when and as far as it is popped.
class PruneQueues {
 public:
  PruneQueues(std::vector<Tracked>& tr, int64_t num_drop)
      : tr_(tr), chunk_(std::max<int64_t>(64, num_drop + num_drop / 4)) {
    for (int64_t i = 0; i < static_cast<int64_t>(tr.size()); ++i)
      if (tr[i].nz >= 0) list_.push_back({tr[i].sens, tr[i].pos, i});
    ranges_ = group_by_unit(tr_, list_.size(), [&](int64_t i) { return list_[i].idx; });
  }

  // The unit's free base-only position of least sensitivity (index into tr), or -1.
  int64_t pop(int64_t unit) {
    auto f = ranges_.find(unit);
    if (f == ranges_.end()) return -1;
    Range& q = f->second;
    while (q.next < q.end) {
      if (q.next == q.sorted) sort_next_chunk(q);
      const int64_t i = list_[q.next++].idx;
      if (tr_[i].status == kFree) return i;
    }
    return -1;
  }

 private:
  void sort_next_chunk(Range& q) {
    q.sorted = std::min(q.end, q.next + chunk_);
    auto b = list_.begin();
    if (q.sorted < q.end) std::nth_element(b + q.next, b + q.sorted - 1, b + q.end, key_lower);
    std::sort(b + q.next, b + q.sorted, key_lower);
  }

  std::vector<Tracked>& tr_;
  std::vector<Key> list_;
  UnitRanges ranges_;
  int64_t chunk_;
};

// ---------------------------------------------------------------- 2. fill vacancies
// Each vacancy takes the best tracked inactive position of its own unit; when the unit has
// too few, its dropped slots with the largest |delta| stay.
template <typename V, typename I>
void fill_vacancies(const Layer<V, I>& L, const Units& units, bool grow_inactive, Drops& drops,
                    std::vector<Tracked>& tr, Counts& counts) {
  std::vector<int64_t>& vac = drops.vacated;
  auto unit_of = [&](int64_t s) { return units.of(L.slot_pos[s]); };
  std::sort(vac.begin(), vac.end(), [&](int64_t a, int64_t b) {
    const int64_t ua = unit_of(a), ub = unit_of(b);
    if (ua != ub) return ua < ub;
    return higher(L.slot_score(a), L.slot_score(b));
  });
  if (vac.empty()) return;
  std::vector<int64_t> inactive;  // indices into tr
  for (int64_t i = 0; i < static_cast<int64_t>(tr.size()); ++i)
    if (tr[i].nz < 0) inactive.push_back(i);
  const UnitRanges ranges = group_by_unit(tr, inactive.size(), [&](int64_t i) { return inactive[i]; });
  auto by_grow = [&](int64_t a, int64_t b) { return grows_before(tr[a], tr[b]); };
  for (size_t v0 = 0; v0 < vac.size();) {
    const int64_t u = unit_of(vac[v0]);
    size_t v1 = v0;
    while (v1 < vac.size() && unit_of(vac[v1]) == u) ++v1;
    const int64_t need = v1 - v0;
    int64_t filled = 0;
    if (grow_inactive && ranges.count(u)) {
      const Range& q = ranges.at(u);
      const int64_t take = std::min<int64_t>(need, q.end - q.begin);
      std::partial_sort(inactive.begin() + q.begin, inactive.begin() + q.begin + take, inactive.begin() + q.end,
                        by_grow);
      for (int64_t j = 0; j < take; ++j) tr[inactive[q.begin + j]].status = kGrown;
      filled = take;
    }
    for (int64_t j = 0; j < need - filled; ++j) drops.dropped[vac[v0 + j]] = 0;  // the largest |delta| stay
    counts.grown += filled;
    counts.reactivated += filled;
    counts.undropped += need - filled;
    v0 = v1;
  }
}

// ---------------------------------------------------------------- 3. grow (and 4. adapt)
// Up to `want` free tracked positions in falling |g|: a base-only one gains a delta; an
// inactive one (grow_inactive) only by swapping out its unit's least sensitive free base-only
// position, which is pruned. Returns the number grown.
int64_t grow_with_swaps(std::vector<Tracked>& tr, PruneQueues& prune, int64_t want, bool grow_inactive,
                        Counts& counts) {
  std::vector<Key> cand;
  for (int64_t i = 0; i < static_cast<int64_t>(tr.size()); ++i)
    if (tr[i].status == kFree && (tr[i].nz >= 0 || grow_inactive)) cand.push_back({std::abs(tr[i].g), tr[i].pos, i});
  int64_t got = 0;
  // Candidates in falling |g|, sorted lazily in chunks: usually only the first ~want are needed.
  const size_t chunk = std::max<size_t>(64, static_cast<size_t>(want + want / 4));
  size_t sorted_to = 0;
  for (size_t ci = 0; ci < cand.size() && got < want; ++ci) {
    if (ci == sorted_to) {
      sorted_to = std::min(cand.size(), ci + chunk);
      if (sorted_to < cand.size())
        std::nth_element(cand.begin() + ci, cand.begin() + sorted_to - 1, cand.end(), key_higher);
      std::sort(cand.begin() + ci, cand.begin() + sorted_to, key_higher);
    }
    Tracked& t = tr[cand[ci].idx];
    if (t.status != kFree) continue;
    if (t.nz < 0) {
      const int64_t give = prune.pop(t.unit);
      if (give < 0) continue;  // no base weight of this unit to give up: not a valid swap
      tr[give].status = kPruned;
      ++counts.reactivated;
      ++counts.pruned;
    }
    t.status = kGrown;
    ++got;
  }
  counts.grown += got;
  return got;
}

// The dropped slots that found no replacement: the `keep` with the largest |delta| stay.
template <typename V, typename I>
void keep_largest_dropped(const Layer<V, I>& L, std::vector<int64_t>& others, int64_t keep, Drops& drops,
                          Counts& counts) {
  if (keep > 0) {
    std::partial_sort(others.begin(), others.begin() + keep, others.end(),
                      [&](int64_t a, int64_t b) { return higher(L.slot_score(a), L.slot_score(b)); });
  }
  for (int64_t j = 0; j < keep; ++j) drops.dropped[others[j]] = 0;
  counts.undropped += keep;
}

// ---------------------------------------------------------------- apply
struct Entry {
  int64_t pos, old_slot, old_nz;  // old_slot -1: grown; old_nz -1: newly active
};

struct Changes {
  std::vector<Entry> new_delta;  // the k new delta entries, in position order
  std::vector<int64_t> removed;  // CSR indices leaving the pattern, sorted
  std::vector<int64_t> added;    // positions entering it, sorted
};

// New delta entries in position order: kept slots (slot order is position order) merged with
// grown positions (tr is in position order).
template <typename V, typename I>
Changes collect_changes(const Layer<V, I>& L, const std::vector<uint8_t>& dropped, const std::vector<Tracked>& tr,
                        Counts& counts) {
  Changes ch;
  std::vector<Entry> kept, grown;
  for (int64_t s = 0; s < L.k; ++s) {
    if (!dropped[s]) {
      kept.push_back({L.slot_pos[s], s, L.ds[s]});
    } else {
      ++counts.dropped;
      if (L.base_is_zero(s)) ch.removed.push_back(L.ds[s]);
    }
  }
  for (const Tracked& t : tr) {
    if (t.status == kGrown) {
      grown.push_back({t.pos, -1, t.nz});
      if (t.nz < 0) ch.added.push_back(t.pos);
    } else if (t.status == kPruned) {
      ch.removed.push_back(t.nz);
    }
  }
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(kept.size() + grown.size()) == L.k,
                        "csr_drop_grow_adapt_: delta size changed");
  ch.new_delta.resize(L.k);
  std::merge(kept.begin(), kept.end(), grown.begin(), grown.end(), ch.new_delta.begin(),
             [](const Entry& a, const Entry& b) { return a.pos < b.pos; });
  std::sort(ch.removed.begin(), ch.removed.end());
  return ch;
}

// The new CSR arrays, written as spans of old entries copied whole between removals and
// insertions. shifts: (first old index of a span, new index - old index), to map old slots.
template <typename V, typename I>
struct CsrBuilder {
  const Layer<V, I>& L;
  const Changes& ch;
  std::vector<int32_t> crow;
  std::vector<I> col;
  std::vector<V> theta;
  std::vector<std::pair<int64_t, int64_t>> shifts;
  std::vector<int64_t> added_at;  // the new CSR index of each added position
  int64_t w = 0, a = 0, rp = 0;   // written entries, added positions and removals consumed

  CsrBuilder(const Layer<V, I>& layer, const Changes& changes)
      : L(layer), ch(changes), crow(layer.out + 1, 0), col(layer.K), theta(layer.K), added_at(changes.added.size()) {}

  void copy_span(int64_t q0, int64_t q1) {
    if (q1 <= q0) return;
    TORCH_INTERNAL_ASSERT(w + (q1 - q0) <= L.K, "csr_drop_grow_adapt_: budget overflow");
    shifts.emplace_back(q0, w - q0);
    std::copy(L.col + q0, L.col + q1, col.begin() + w);
    std::copy(L.theta + q0, L.theta + q1, theta.begin() + w);
    w += q1 - q0;
  }
  bool adds_in_row(int64_t r) const { return a < static_cast<int64_t>(ch.added.size()) && ch.added[a] / L.in == r; }
  void insert_added() {
    TORCH_INTERNAL_ASSERT(w < L.K, "csr_drop_grow_adapt_: budget overflow");
    col[w] = static_cast<I>(ch.added[a] % L.in);
    theta[w] = V(0);
    added_at[a++] = w++;
  }
  void build_row(int64_t r) {
    const int64_t nr = ch.removed.size();
    int64_t q = L.crow[r];
    const int64_t qe = L.crow[r + 1];
    while (true) {
      const int64_t q_rm = (rp < nr && ch.removed[rp] < qe) ? ch.removed[rp] : qe;
      int64_t q_add = qe;
      if (adds_in_row(r)) {
        q_add = std::lower_bound(L.col + q, L.col + qe, static_cast<I>(ch.added[a] % L.in)) - L.col;
      } else if (q_rm == qe) {
        break;
      }
      const int64_t next = std::min(q_rm, q_add);
      copy_span(q, next);
      q = next;
      if (adds_in_row(r) && q_add <= q_rm) {
        insert_added();
      } else if (q_rm < qe) {
        ++q;
        ++rp;
      }
    }
    copy_span(q, qe);
    crow[r + 1] = static_cast<int32_t>(w);
  }
};

template <typename V, typename I>
CsrBuilder<V, I> rebuild_csr(const Layer<V, I>& L, const Changes& ch, const Units& units) {
  CsrBuilder<V, I> b(L, ch);
  for (int64_t r = 0; r < L.out; ++r) b.build_row(r);
  TORCH_INTERNAL_ASSERT(
      b.w == L.K && b.rp == static_cast<int64_t>(ch.removed.size()) && b.a == static_cast<int64_t>(ch.added.size()),
      "csr_drop_grow_adapt_: budget not kept (", b.w, " of ", L.K, " non-zeros)");
  if (units.budget != Budget::layer) {
    for (int64_t r = 0; r <= L.out; ++r)
      TORCH_INTERNAL_ASSERT(b.crow[r] == L.crow[r], "csr_drop_grow_adapt_: a row budget changed");
  }
  return b;
}

// New slot indices: old entries through the span shifts (old indices rise with position),
// newly active ones where they were inserted.
template <typename V, typename I>
std::vector<int64_t> remap_slots(const Changes& ch, const CsrBuilder<V, I>& b) {
  const int64_t k = ch.new_delta.size();
  std::vector<int64_t> nslots(k);
  for (int64_t s = 0, sp = 0, ap = 0; s < k; ++s) {
    const Entry& e = ch.new_delta[s];
    if (e.old_nz >= 0) {
      while (sp + 1 < static_cast<int64_t>(b.shifts.size()) && b.shifts[sp + 1].first <= e.old_nz) ++sp;
      nslots[s] = e.old_nz + b.shifts[sp].second;
    } else {
      while (ch.added[ap] != e.pos) ++ap;
      nslots[s] = b.added_at[ap];
    }
  }
  return nslots;
}

// Writes the new arrays into the caller's tensors; returns (remap, counts).
template <typename V, typename I>
std::tuple<at::Tensor, at::Tensor> write_back(const Layer<V, I>& L, const Changes& ch, CsrBuilder<V, I>& b,
                                              std::vector<int64_t>& nslots, const Counts& c, at::Tensor& crow_t,
                                              at::Tensor& col_t, at::Tensor& theta_t, at::Tensor& dslots_t,
                                              at::Tensor& delta_t) {
  const int64_t k = L.k;
  at::Tensor remap = at::empty({k}, at::kLong);
  at::Tensor nvals = at::zeros({k}, at::kDouble);
  int64_t* rm = remap.data_ptr<int64_t>();
  double* nv = nvals.data_ptr<double>();
  for (int64_t s = 0; s < k; ++s) {
    const int64_t o = ch.new_delta[s].old_slot;
    rm[s] = o;
    if (o >= 0) nv[s] = L.delta[o];
  }
  auto cpu_long = at::TensorOptions().dtype(at::kLong);
  crow_t.copy_(at::from_blob(b.crow.data(), {L.out + 1}, at::TensorOptions().dtype(at::kInt)));
  col_t.copy_(at::from_blob(b.col.data(), {L.K}, col_t.options()));
  theta_t.copy_(at::from_blob(b.theta.data(), {L.K}, theta_t.options()));
  dslots_t.copy_(at::from_blob(nslots.data(), {k}, cpu_long));
  delta_t.copy_(nvals);
  at::Tensor counts = at::tensor({c.dropped, c.grown, c.reactivated, c.pruned, c.undropped}, cpu_long);
  return {remap, counts};
}

// ---------------------------------------------------------------- the step
template <typename V, typename I>
std::tuple<at::Tensor, at::Tensor> dga_typed(at::Tensor& crow_t, at::Tensor& col_t, at::Tensor& theta_t,
                                             at::Tensor& dslots_t, at::Tensor& delta_t, const at::Tensor& tracked_t,
                                             const at::Tensor& gsum_t, int64_t num_drop, const Units& units,
                                             bool grow_inactive) {
  const Layer<V, I> L = read_layer<V, I>(crow_t, col_t, theta_t, dslots_t, delta_t, units.in);
  Counts counts;
  Drops drops = select_drops(L, num_drop);
  std::vector<Tracked> tr = index_tracked(L, tracked_t, gsum_t, units);
  PruneQueues prune(tr, num_drop);
  fill_vacancies(L, units, grow_inactive, drops, tr, counts);
  const int64_t want = drops.others.size();
  const int64_t got = grow_with_swaps(tr, prune, want, grow_inactive, counts);
  keep_largest_dropped(L, drops.others, want - got, drops, counts);
  const Changes ch = collect_changes(L, drops.dropped, tr, counts);
  CsrBuilder<V, I> csr = rebuild_csr(L, ch, units);
  std::vector<int64_t> nslots = remap_slots(ch, csr);
  return write_back(L, ch, csr, nslots, counts, crow_t, col_t, theta_t, dslots_t, delta_t);
}

// ---------------------------------------------------------------- checks and the op
void check_delta(const char* op, const at::Tensor& delta, int64_t k, int64_t num_drop) {
  TORCH_CHECK(delta.defined() && delta.dim() == 1 && delta.numel() == k, op,
              ": delta must be 1-D with one value per slot (", k, "), got shape ",
              delta.defined() ? delta.sizes() : at::IntArrayRef{});
  TORCH_CHECK(delta.scalar_type() == at::kFloat || delta.scalar_type() == at::kDouble, op,
              ": delta must be float32 or float64, got ", delta.scalar_type());
  TORCH_CHECK(delta.device().is_cpu(), op, ": delta is on ", delta.device(), ", expected the CPU");
  TORCH_CHECK(at::isfinite(delta).all().item<bool>(), op, ": delta contains NaN or Inf");
  TORCH_CHECK(num_drop >= 0 && num_drop <= k, op, ": num_drop must be in [0, k = ", k, "], got ", num_drop);
}

// tracked: 1-D int64, strictly increasing, in [0, out * in); gsum: finite, one per position.
void check_tracked(const char* op, const at::Tensor& tracked, const at::Tensor& gsum, int64_t out, int64_t in) {
  TORCH_CHECK(
      tracked.defined() && tracked.dim() == 1 && tracked.scalar_type() == at::kLong && tracked.device().is_cpu(), op,
      ": tracked must be a 1-D int64 CPU tensor");
  TORCH_CHECK(gsum.defined() && gsum.dim() == 1 && gsum.numel() == tracked.numel() && gsum.is_floating_point() &&
                  gsum.device().is_cpu(),
              op, ": gsum must be a 1-D floating CPU tensor with one value per tracked position (", tracked.numel(),
              ")");
  TORCH_CHECK(at::isfinite(gsum).all().item<bool>(), op, ": gsum contains NaN or Inf");
  const at::Tensor t = tracked.contiguous();
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < out * in, op, ": tracked[", i, "] = ", p[i],
                " is out of range [0, out * in = ", out * in, ")");
    TORCH_CHECK(i == 0 || p[i] > p[i - 1], op, ": tracked positions must be strictly increasing, but tracked[", i,
                "] = ", p[i], " follows ", p[i - 1]);
  }
}

std::tuple<at::Tensor, at::Tensor> csr_drop_grow_adapt_cpu(at::Tensor& crow, at::Tensor& col, at::Tensor& theta,
                                                           at::Tensor& delta_slots, at::Tensor& delta,
                                                           const at::Tensor& tracked, const at::Tensor& gsum,
                                                           int64_t num_drop, int64_t in_features,
                                                           c10::string_view budget, int64_t nm_n, int64_t nm_m,
                                                           bool grow_inactive) {
  const char* op = "csr_drop_grow_adapt_";
  check_evolve_args(op, crow, col, theta, delta_slots, in_features);
  const Units units{parse_budget(op, std::string(budget), nm_n, nm_m, in_features), in_features, nm_m};
  check_delta(op, delta, delta_slots.numel(), num_drop);
  check_tracked(op, tracked, gsum, crow.numel() - 1, in_features);
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
