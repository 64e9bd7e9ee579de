// csr_grow_scan: the first step of an evolution window. From one layer's X and dY it
// streams the dense gradient G = dY^T X through tiles of rows (one tile alive at a time,
// freed at once) and keeps a bounded set of tracked positions outside the delta:
//   grow candidates  the num_grow largest |G| among positions outside the delta (base-only
//                    active ones always, inactive ones when grow_inactive);
//   prune candidates base-only positions with the smallest sensitivity |theta * G|:
//                    layer budget: the num_prune smallest of the layer;
//                    row budget:   the ceil(num_prune / out) smallest of each row;
//                    nm budget:    for each inactive grow candidate, the smallest of its group
//                                  (its swap partner).
// With sketch > 0, G is estimated from CountSketches of the tokens (sketch rows instead of
// T: the GEMM costs sketch / T of the exact one) and g is that estimate; the caller gets
// exact values at the tracked positions from csr_sddmm.
// The window's later steps accumulate G at these positions with csr_sddmm; the decision
// (csr_drop_grow_adapt_) sees only them.
//
// The phases below, in order: prepare_scan (operands, sketches), sample_bars (bars from a
// grid sample), scan_tiles (the pools, per thread), merge_pools (one selection over the
// threads' pools), workspace_bytes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/dtype_dispatch.h"
#include "common/evolve_common.h"

namespace seft::cpu::evolve {
namespace {

constexpr int64_t kTileBytes = 1 << 20;  // one tile of G
constexpr double kBarMargin = 1.3;       // sampled bars let through ~1.3x the entries a pool keeps
constexpr double kSampleHits = 400;      // sample size: ~400 sampled entries expected above a bar

struct Cand {
  double score;
  int64_t pos;
  double g;
  int64_t partner;  // nm budget: the swap partner of an inactive candidate, else -1
  double partner_g;
};
struct Higher {
  bool operator()(const Cand& a, const Cand& b) const { return higher({a.score, a.pos}, {b.score, b.pos}); }
};
struct Lower {
  bool operator()(const Cand& a, const Cand& b) const { return lower({a.score, a.pos}, {b.score, b.pos}); }
};
using GrowPool = TopPool<Cand, Higher>;
using PrunePool = TopPool<Cand, Lower>;

// ---------------------------------------------------------------- the scan's inputs
struct ScanInput {
  at::Tensor crow, col, theta, dslots;  // contiguous
  at::Tensor X, dyT;  // (Ts, in) and (out, Ts) in the accumulation dtype: the tokens or their sketches
  Units units;
  int64_t in, out, k, nnz;
  int64_t T, Ts;  // tokens, and rows of X (Ts < T with a sketch)
  at::ScalarType acc;
  int64_t esize;  // bytes of an accumulation value
  bool sketched, grow_inactive;
  int64_t num_grow, num_prune;
  int64_t prune_cap;  // layer budget: the one prune pool's size (else 0)
  int64_t row_cap;    // row budget: prune candidates kept per row (else 0)
  int64_t tile_rows;  // rows of G per tile
  int64_t copy_bytes;  // the fp copies of x and grad_out, when they were needed

  int64_t eligible() const { return (grow_inactive ? out * in : nnz) - k; }  // grow candidates
};

// CountSketch over tokens: row t of src is added, with sign +-1, to row h(t) of an
// (r, n) matrix. E[sketch(dY)^T sketch(X)] = dY^T X; the same seed gives the same sketch.
inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename A>
at::Tensor count_sketch(const at::Tensor& src, int64_t r, int64_t seed) {
  const int64_t T = src.size(0), n = src.size(1);
  at::Tensor dst = at::zeros({r, n}, src.options());
  std::vector<int64_t> bucket(T);
  std::vector<A> sign(T);
  for (int64_t t = 0; t < T; ++t) {
    const uint64_t h = splitmix64(static_cast<uint64_t>(seed) * 0x100000001B3ull + static_cast<uint64_t>(t));
    bucket[t] = static_cast<int64_t>(h % static_cast<uint64_t>(r));
    sign[t] = (h >> 63) ? A(-1) : A(1);
  }
  const A* s = src.data_ptr<A>();
  A* d = dst.data_ptr<A>();
  at::parallel_for(0, n, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t t = 0; t < T; ++t) {
      const A* sr = s + t * n;
      A* dr = d + bucket[t] * n;
      const A sg = sign[t];
      for (int64_t c = c0; c < c1; ++c) dr[c] += sg * sr[c];
    }
  });
  return dst;
}

at::Tensor sketch_tokens(const at::Tensor& t, at::ScalarType acc, int64_t rows, int64_t seed) {
  return acc == at::kDouble ? count_sketch<double>(t, rows, seed) : count_sketch<float>(t, rows, seed);
}

// dY^T rows are the tile's output rows; X stays (T, in). Both in the accumulation dtype,
// and with a sketch, (sketch, .) CountSketches of the tokens instead.
ScanInput prepare_scan(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                       const at::Tensor& theta, const at::Tensor& delta_slots, int64_t num_grow, int64_t num_prune,
                       const Units& units, bool grow_inactive, int64_t sketch, int64_t seed) {
  ScanInput s{crow.contiguous(), col.contiguous(), theta.contiguous(), delta_slots.contiguous(), {}, {}, units};
  s.in = x.size(-1);
  s.out = crow.numel() - 1;
  s.k = s.dslots.numel();
  s.nnz = s.col.numel();
  s.acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  s.esize = s.acc == at::kDouble ? 8 : 4;
  s.grow_inactive = grow_inactive;
  s.num_grow = num_grow;
  s.num_prune = num_prune;
  at::Tensor X = as_2d(x).to(s.acc).contiguous();
  at::Tensor dY = as_2d(grad_out).to(s.acc).contiguous();
  s.T = X.size(0);
  s.sketched = sketch > 0 && sketch < s.T;
  if (s.sketched) {
    X = sketch_tokens(X, s.acc, sketch, seed);
    dY = sketch_tokens(dY, s.acc, sketch, seed);
  }
  s.X = X;
  s.dyT = dY.t().contiguous();
  s.Ts = X.size(0);
  s.tile_rows = std::max<int64_t>(1, std::min<int64_t>(s.out, kTileBytes / std::max<int64_t>(1, s.in * s.esize)));
  s.row_cap = (units.budget == Budget::row && s.out > 0) ? (num_prune + s.out - 1) / s.out : 0;
  s.prune_cap = units.budget == Budget::layer ? num_prune : 0;
  const int64_t x_copy = x.scalar_type() == s.acc && x.is_contiguous() ? 0 : s.T * s.in * s.esize;
  const int64_t dy_copy = grad_out.scalar_type() == s.acc && grad_out.is_contiguous() ? 0 : s.T * s.out * s.esize;
  s.copy_bytes = x_copy + dy_copy;
  return s;
}

// ---------------------------------------------------------------- sample bars
// Bars from a grid sample of positions: the pools then take only entries that clear them (about
// kBarMargin times what they keep) instead of thinning a stream of everything. The result is the
// exact selection whenever at least `cap` entries cleared the bar; else the scan reruns
// without bars (the sample was unlucky).
struct Bars {
  double grow = -1, prune = -1;  // -1: no bar
  int64_t sample_bytes = 0;
  bool finite = true;  // the sample's G had no NaN or Inf
  bool any() const { return grow >= 0 || prune >= 0; }
};

// The sample is a grid of rows x cols sized so that ~kSampleHits sampled entries clear
// the rarer bar (a bar then sits within a few percent of its target); no sample (and no
// bars) when that would not be much smaller than the matrix.
struct SampleGrid {
  bool on;
  int64_t rows, cols;
};

SampleGrid plan_sample(const ScanInput& s) {
  const int64_t eligible = s.eligible();
  const double rarest = std::min(s.num_grow > 0 ? double(s.num_grow) / std::max<int64_t>(1, eligible) : 1.0,
                                 s.prune_cap > 0 ? double(s.prune_cap) / std::max<int64_t>(1, s.nnz - s.k) : 1.0);
  const double want_entries = std::max(16384.0, kSampleHits / std::max(rarest, 1e-12));
  const bool on = (s.num_grow > 0 || s.prune_cap > 0) && want_entries * 4 <= double(s.out) * double(s.in);
  const int64_t rows =
      on ? std::min<int64_t>(s.out, std::max<int64_t>(1, std::llround(std::sqrt(want_entries * s.out / s.in)))) : 0;
  const int64_t cols = on ? std::min<int64_t>(s.in, static_cast<int64_t>(std::ceil(want_entries / rows))) : 0;
  return {on, rows, cols};
}

// Scores on a grid sample (rows x cols, both sorted; Gs = G there): |G| of grow-eligible
// positions, |theta * G| of base-only ones.
template <typename A, typename V, typename I>
void sample_scores(const A* Gs, const std::vector<int64_t>& rows, const std::vector<int64_t>& cols, const int32_t* crow,
                   const I* col, const V* theta, const int64_t* dslots, int64_t k, bool grow_inactive,
                   std::vector<double>& grow, std::vector<double>& prune) {
  const int64_t nc = cols.size();
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t r = rows[i];
    int64_t q = crow[r];
    const int64_t qe = crow[r + 1];
    int64_t d = std::lower_bound(dslots, dslots + k, q) - dslots;
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t c = cols[j];
      const double g = Gs[i * nc + j];
      while (q < qe && int64_t(col[q]) < c) ++q;
      if (q < qe && int64_t(col[q]) == c) {
        while (d < k && dslots[d] < q) ++d;
        if (d < k && dslots[d] == q) continue;
        grow.push_back(std::abs(g));
        prune.push_back(std::abs(static_cast<double>(theta[q]) * g));
      } else if (grow_inactive) {
        grow.push_back(std::abs(g));
      }
    }
  }
}

// n sorted indices in [0, size), one uniformly at random in each of n equal strata.
std::vector<int64_t> stratified(int64_t n, int64_t size, uint64_t seed) {
  std::vector<int64_t> v(n);
  const double stride = static_cast<double>(size) / n;
  for (int64_t i = 0; i < n; ++i) {
    const double u = static_cast<double>(splitmix64(seed ^ uint64_t(i)) >> 11) * (1.0 / 9007199254740992.0);
    v[i] = std::min<int64_t>(size - 1, static_cast<int64_t>((i + u) * stride));
  }
  return v;
}

// The score that about `share` of the sample reaches (from the top, or from the bottom).
double sample_bar(std::vector<double>& v, double share, bool from_top) {
  const int64_t idx = std::min<int64_t>(v.size() - 1, static_cast<int64_t>(share * v.size()));
  if (from_top) std::nth_element(v.begin(), v.begin() + idx, v.end(), std::greater<double>());
  else std::nth_element(v.begin(), v.begin() + idx, v.end());
  return v[idx];
}

template <typename V, typename I>
Bars sample_bars_typed(const ScanInput& s, const SampleGrid& grid, int64_t seed) {
  Bars bars;
  const std::vector<int64_t> rows = stratified(grid.rows, s.out, seed * 2 + 1);
  const std::vector<int64_t> cols = stratified(grid.cols, s.in, seed * 2 + 2);
  const at::Tensor Gs =
      at::mm(s.dyT.index_select(0, at::tensor(rows, at::kLong)), s.X.index_select(1, at::tensor(cols, at::kLong)))
          .contiguous();
  std::vector<double> sg, sp;
  const int32_t* crow = s.crow.data_ptr<int32_t>();
  const I* col = s.col.data_ptr<I>();
  const V* theta = s.theta.data_ptr<V>();
  const int64_t* dslots = s.dslots.data_ptr<int64_t>();
  if (s.acc == at::kDouble)
    sample_scores<double, V, I>(Gs.data_ptr<double>(), rows, cols, crow, col, theta, dslots, s.k, s.grow_inactive, sg,
                                sp);
  else
    sample_scores<float, V, I>(Gs.data_ptr<float>(), rows, cols, crow, col, theta, dslots, s.k, s.grow_inactive, sg,
                               sp);
  bars.sample_bytes = Gs.numel() * s.esize + static_cast<int64_t>((sg.capacity() + sp.capacity()) * sizeof(double)) +
                      (grid.rows + grid.cols) * 8;
  for (double v : sg) bars.finite = bars.finite && std::isfinite(v);
  if (!bars.finite) return bars;
  const double share_g = kBarMargin * s.num_grow / std::max<int64_t>(1, s.eligible());
  if (s.num_grow > 0 && share_g < 0.5 && !sg.empty()) bars.grow = sample_bar(sg, share_g, true);
  const double share_p = kBarMargin * s.prune_cap / std::max<int64_t>(1, s.nnz - s.k);
  if (s.prune_cap > 0 && share_p < 0.5 && !sp.empty()) bars.prune = sample_bar(sp, share_p, false);
  return bars;
}

Bars sample_bars(const ScanInput& s, int64_t seed) {
  const SampleGrid grid = plan_sample(s);
  if (!grid.on) return Bars{};
  Bars bars;
  dispatch_types(s.theta.scalar_type(), s.col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    bars = sample_bars_typed<V, I>(s, grid, seed);
  });
  return bars;
}

// ---------------------------------------------------------------- scan tiles
struct ThreadState {
  GrowPool grow;
  PrunePool prune;                // layer budget
  std::vector<Cand> row_prune;    // row budget
  std::vector<Cand> row_buf;
  std::vector<Cand> partners;     // nm budget, per group of the current row
  std::vector<float> abs_buf;     // |G| of the current row (float G); -1 at active positions
  std::vector<double> abs_buf64;  // the same for double G
  bool nonfinite = false;
};

// Typed views of the pattern, for the row scan.
template <typename V, typename I>
struct PatternView {
  const int32_t* crow;
  const I* col;
  const V* theta;
  const int64_t* dslots;
  explicit PatternView(const ScanInput& s)
      : crow(s.crow.data_ptr<int32_t>()),
        col(s.col.data_ptr<I>()),
        theta(s.theta.data_ptr<V>()),
        dslots(s.dslots.data_ptr<int64_t>()) {}
};

// |G| of row g into a (false on NaN or Inf).
template <typename A>
bool abs_row(const A* g, int64_t in, A* a) {
  bool bad = false;
  for (int64_t c = 0; c < in; ++c) {
    a[c] = std::abs(g[c]);
    bad |= !(a[c] <= std::numeric_limits<A>::max());
  }
  return !bad;
}

// Row r's active positions: base-only ones are grow and prune candidates (and, nm, the
// group's swap partner), delta ones are skipped; a[c] = -1 marks them all.
template <typename A, typename V, typename I>
void scan_active(const A* g, int64_t r, const PatternView<V, I>& p, const ScanInput& s, bool nm, A* a,
                 ThreadState& ts) {
  const Units& units = s.units;
  const int64_t p0 = p.crow[r], p1 = p.crow[r + 1];
  int64_t d = std::lower_bound(p.dslots, p.dslots + s.k, p0) - p.dslots;  // first delta slot of the row
  for (int64_t q = p0; q < p1; ++q) {
    const int64_t c = p.col[q];
    a[c] = A(-1);
    if (d < s.k && p.dslots[d] == q) {
      ++d;
      continue;
    }
    const double gv = g[c];
    const int64_t pos = r * s.in + c;
    const double sens = std::abs(static_cast<double>(p.theta[q]) * gv);
    if (ts.grow.template may_enter<true>(std::abs(gv))) ts.grow.push({std::abs(gv), pos, gv, -1, 0});
    if (units.budget == Budget::layer) {
      if (ts.prune.template may_enter<false>(sens)) ts.prune.push({sens, pos, gv, -1, 0});
    } else if (units.budget == Budget::row && s.row_cap > 0) {
      ts.row_buf.push_back({sens, pos, gv, -1, 0});
    }
    if (nm) {
      const Cand cand{sens, pos, gv, -1, 0};
      Cand& best = ts.partners[c / units.m];
      if (best.pos < 0 || Lower()(cand, best)) best = cand;
    }
  }
}

// Row r's inactive positions, in one pass over |G| that compares against the grow pool's
// current threshold (almost always false). The A-typed bar is at most the exact one (scores
// are A values), so the pre-filter never drops an entry push() would take.
template <typename A>
void scan_inactive(const A* g, int64_t r, const A* a, const ScanInput& s, bool nm, ThreadState& ts) {
  A thr = ts.grow.has_worst ? static_cast<A>(ts.grow.worst.score) : A(-0.5);
  for (int64_t c = 0; c < s.in; ++c) {
    if (a[c] < thr) continue;
    Cand cand{static_cast<double>(a[c]), r * s.in + c, static_cast<double>(g[c]), -1, 0};
    if (nm) {
      const Cand& p = ts.partners[c / s.units.m];
      cand.partner = p.pos;
      cand.partner_g = p.g;
    }
    ts.grow.push(cand);
    if (ts.grow.has_worst) thr = static_cast<A>(ts.grow.worst.score);
  }
}

// Row budget: the row's row_cap least sensitive base-only positions.
void keep_row_prune(const ScanInput& s, ThreadState& ts) {
  if (ts.row_buf.empty()) return;
  const int64_t keep = std::min<int64_t>(s.row_cap, ts.row_buf.size());
  std::nth_element(ts.row_buf.begin(), ts.row_buf.begin() + (keep - 1), ts.row_buf.end(), Lower());
  ts.row_prune.insert(ts.row_prune.end(), ts.row_buf.begin(), ts.row_buf.begin() + keep);
}

// Rows [r0, r1) of G (G: row r0's values first), one at a time.
template <typename A, typename V, typename I>
void scan_rows(const A* G, int64_t r0, int64_t r1, const ScanInput& s, ThreadState& ts) {
  const PatternView<V, I> p(s);
  const bool nm = s.units.budget == Budget::nm && s.grow_inactive;
  std::vector<A>& a = [&]() -> std::vector<A>& {
    if constexpr (std::is_same_v<A, double>) return ts.abs_buf64;
    else return ts.abs_buf;
  }();
  a.resize(s.in);
  for (int64_t r = r0; r < r1; ++r) {
    const A* g = G + (r - r0) * s.in;
    if (!abs_row(g, s.in, a.data())) {
      ts.nonfinite = true;
      return;
    }
    if (nm) ts.partners.assign(s.in / s.units.m, Cand{0, -1, 0, -1, 0});
    ts.row_buf.clear();
    scan_active(g, r, p, s, nm, a.data(), ts);
    if (s.grow_inactive) scan_inactive(g, r, a.data(), s, nm, ts);
    keep_row_prune(s, ts);
  }
}

// One pass over G's row tiles into the threads' pools; false if G had NaN or Inf.
bool scan_pass(const ScanInput& s, std::vector<ThreadState>& states) {
  bool finite = true;
  dispatch_types(s.theta.scalar_type(), s.col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    for (int64_t r0 = 0; r0 < s.out && finite; r0 += s.tile_rows) {
      const int64_t r1 = std::min(s.out, r0 + s.tile_rows);
      const at::Tensor G = at::mm(s.dyT.narrow(0, r0, r1 - r0), s.X);  // (rows, in), freed each iteration
      at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t b) {
        ThreadState& ts = states[at::get_thread_num()];
        if (s.acc == at::kDouble) scan_rows<double, V, I>(G.data_ptr<double>() + (a - r0) * s.in, a, b, s, ts);
        else scan_rows<float, V, I>(G.data_ptr<float>() + (a - r0) * s.in, a, b, s, ts);
      });
      for (const ThreadState& ts : states) finite = finite && !ts.nonfinite;
    }
  });
  return finite;
}

// One state per thread; with_bars: the pools start at the sampled bars.
std::vector<ThreadState> fresh_states(const ScanInput& s, const Bars& bars, bool with_bars) {
  std::vector<ThreadState> states;
  const int nthreads = at::get_num_threads();
  for (int t = 0; t < nthreads; ++t) {
    states.push_back(ThreadState{GrowPool(s.num_grow, Higher()), PrunePool(s.prune_cap, Lower()), {}, {}, {}, {}, {}});
    constexpr int64_t kLast = std::numeric_limits<int64_t>::max();  // ranks after every position
    if (with_bars && bars.grow >= 0) states.back().grow.set_bar(Cand{bars.grow, kLast, 0, -1, 0});
    if (with_bars && bars.prune >= 0) states.back().prune.set_bar(Cand{bars.prune, kLast, 0, -1, 0});
  }
  return states;
}

// Whether the pass with bars saw as many entries above them as the pools keep.
bool bars_held(const ScanInput& s, const Bars& bars, const std::vector<ThreadState>& states) {
  int64_t grow_in = 0, prune_in = 0;
  for (const ThreadState& ts : states) {
    grow_in += ts.grow.accepted;
    prune_in += ts.prune.accepted;
  }
  return (bars.grow < 0 || grow_in >= s.num_grow) && (bars.prune < 0 || prune_in >= s.prune_cap);
}

// With bars, a pass that they held is the exact selection; else one pass without bars.
std::vector<ThreadState> scan_tiles(const ScanInput& s, const Bars& bars, bool& finite) {
  std::vector<ThreadState> states;
  for (int attempt = bars.any() ? 0 : 1; attempt < 2 && finite; ++attempt) {
    states = fresh_states(s, bars, attempt == 0);
    finite = scan_pass(s, states);
    if (attempt == 0 && bars_held(s, bars, states)) break;
  }
  return states;
}

// ---------------------------------------------------------------- merge candidate pools
struct Merged {
  std::vector<std::pair<int64_t, double>> tracked;  // (position, g), sorted, unique
  int64_t pool_bytes = 0;
};

int64_t state_bytes(const ThreadState& ts) {
  return ts.grow.bytes() + ts.prune.bytes() +
         static_cast<int64_t>((ts.row_prune.capacity() + ts.row_buf.capacity() + ts.partners.capacity()) *
                                  sizeof(Cand) +
                              ts.abs_buf.capacity() * sizeof(float) + ts.abs_buf64.capacity() * sizeof(double));
}

// One selection over the union of the threads' pools; the total order makes the result
// independent of the split.
Merged merge_pools(const std::vector<ThreadState>& states, const ScanInput& s) {
  Merged m;
  std::vector<Cand> grow_all, prune_all;
  for (const ThreadState& ts : states) {
    m.pool_bytes += state_bytes(ts);
    grow_all.insert(grow_all.end(), ts.grow.items.begin(), ts.grow.items.end());
    prune_all.insert(prune_all.end(), ts.prune.items.begin(), ts.prune.items.end());
    for (const Cand& c : ts.row_prune) m.tracked.emplace_back(c.pos, c.g);
  }
  m.pool_bytes += static_cast<int64_t>((grow_all.capacity() + prune_all.capacity()) * sizeof(Cand));
  auto keep_first = [](std::vector<Cand>& v, int64_t cap, auto before) {
    if (static_cast<int64_t>(v.size()) > cap) {
      std::nth_element(v.begin(), v.begin() + (cap - 1), v.end(), before);
      v.resize(cap);
    }
  };
  keep_first(grow_all, s.num_grow, Higher());
  keep_first(prune_all, s.prune_cap, Lower());
  for (const Cand& c : grow_all) {
    m.tracked.emplace_back(c.pos, c.g);
    if (c.partner >= 0) m.tracked.emplace_back(c.partner, c.partner_g);
  }
  for (const Cand& c : prune_all) m.tracked.emplace_back(c.pos, c.g);
  radix_sort_by_key(m.tracked, s.out * s.in);
  m.tracked.erase(
      std::unique(m.tracked.begin(), m.tracked.end(), [](const auto& a, const auto& b) { return a.first == b.first; }),
      m.tracked.end());
  return m;
}

// ---------------------------------------------------------------- workspace bytes
// Bytes the op held at its peak (an upper bound: summed as if all alive at once): the fp
// copies of dY (and its transpose) and X, the sketches, the sample, one tile of G, the pools,
// the result (n entries).
int64_t workspace_bytes(const ScanInput& s, const Bars& bars, const Merged& m, int64_t n) {
  const int64_t operands = s.sketched ? s.Ts * (s.in + 2 * s.out) * s.esize : s.T * s.out * s.esize;
  return s.copy_bytes + operands + s.tile_rows * s.in * s.esize + m.pool_bytes + bars.sample_bytes + n * (8 + s.esize) +
         static_cast<int64_t>(m.tracked.capacity() * sizeof(m.tracked[0]));
}

std::tuple<at::Tensor, at::Tensor, int64_t, bool> csr_grow_scan_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
    const at::Tensor& theta, const at::Tensor& delta_slots, int64_t num_grow, int64_t num_prune,
    c10::string_view budget, int64_t nm_n, int64_t nm_m, bool grow_inactive, int64_t sketch, int64_t seed) {
  const char* op = "csr_grow_scan";
  check_sddmm_args(op, grad_out, x, crow, col, std::nullopt, /*check_offsets=*/false);
  const int64_t in = x.size(-1);
  check_evolve_args(op, crow, col, theta, delta_slots, in);
  TORCH_CHECK(sketch >= 0, op, ": sketch must be >= 0 (0: the exact gradient), got ", sketch);
  TORCH_CHECK(num_grow >= 0 && num_prune >= 0, op, ": num_grow and num_prune must be >= 0, got ", num_grow, " and ",
              num_prune);
  const Units units{parse_budget(op, std::string(budget), nm_n, nm_m, in), in, nm_m};
  const ScanInput s =
      prepare_scan(grad_out, x, crow, col, theta, delta_slots, num_grow, num_prune, units, grow_inactive, sketch, seed);
  const Bars bars = sample_bars(s, seed);
  bool finite = bars.finite;
  const std::vector<ThreadState> states = scan_tiles(s, bars, finite);
  const Merged m = merge_pools(states, s);
  const int64_t n = finite ? static_cast<int64_t>(m.tracked.size()) : 0;
  at::Tensor pos = at::empty({n}, at::kLong);
  at::Tensor gval = at::empty({n}, x.options().dtype(s.acc));
  for (int64_t i = 0; i < n; ++i) {
    pos.data_ptr<int64_t>()[i] = m.tracked[i].first;
    if (s.acc == at::kDouble) gval.data_ptr<double>()[i] = m.tracked[i].second;
    else gval.data_ptr<float>()[i] = static_cast<float>(m.tracked[i].second);
  }
  return {pos, gval, workspace_bytes(s, bars, m, n), finite};
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("csr_grow_scan", &csr_grow_scan_cpu); }

}  // namespace seft::cpu::evolve
