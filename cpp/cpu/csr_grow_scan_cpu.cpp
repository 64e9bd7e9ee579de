// csr_grow_scan: the first step of an evolution window. From one layer's X and dY it
// streams the dense gradient G = dY^T X through tiles of rows (one tile alive at a time,
// freed at once) and keeps a bounded set of tracked positions outside the delta:
//   grow candidates  the num_grow largest |G| among positions outside the delta (base-only
//                    active ones always, inactive ones when grow_inactive);
//   prune candidates base-only positions with the smallest sensitivity |theta * G|:
//                    layer budget: the num_prune smallest of the layer;
//                    row budget:  the ceil(num_prune / out) smallest of each row;
//                    nm budget:   for each inactive grow candidate, the smallest of its group
//                                 (its swap partner).
// With sketch > 0, G is estimated from CountSketches of the tokens (sketch rows instead of
// T: the GEMM costs sketch / T of the exact one) and g is that estimate; the caller gets
// exact values at the tracked positions from csr_sddmm.
// The window's later steps accumulate G at these positions with csr_sddmm; the decision
// (csr_drop_grow_adapt_) sees only them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/evolve_common.h"
#include "common/dtype_dispatch.h"

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

struct ThreadState {
  GrowPool grow;
  PrunePool prune;             // layer budget
  std::vector<Cand> row_prune;  // row budget
  std::vector<Cand> row_buf;
  std::vector<Cand> partners;   // nm budget, per group of the current row
  std::vector<float> abs_buf;   // |G| of the current row (float G); -1 at active positions
  std::vector<double> abs_buf64;  // the same for double G
  bool nonfinite = false;
};

// One row at a time: the active positions (base-only ones are grow and prune candidates,
// delta ones are skipped) from the CSR row, then the inactive ones in one pass over |G|
// that compares against the grow pool's current threshold (almost always false).
template <typename A, typename V, typename I>
void scan_rows(const A* G, int64_t r0, int64_t r1, int64_t in, const int32_t* crow, const I* col, const V* theta,
               const int64_t* dslots, int64_t k, const Units& units, bool grow_inactive, int64_t row_cap,
               ThreadState& ts) {
  const bool nm = units.budget == Budget::nm && grow_inactive;
  std::vector<A>& a = [&]() -> std::vector<A>& {
    if constexpr (std::is_same_v<A, double>) return ts.abs_buf64;
    else return ts.abs_buf;
  }();
  a.resize(in);
  for (int64_t r = r0; r < r1; ++r) {
    const A* g = G + (r - r0) * in;
    const int64_t p0 = crow[r], p1 = crow[r + 1];
    bool bad = false;  // NaN or Inf
    A* ap = a.data();
    for (int64_t c = 0; c < in; ++c) {
      ap[c] = std::abs(g[c]);
      bad |= !(ap[c] <= std::numeric_limits<A>::max());
    }
    if (bad) {
      ts.nonfinite = true;
      return;
    }
    if (nm) ts.partners.assign(in / units.m, Cand{0, -1, 0, -1, 0});
    ts.row_buf.clear();
    int64_t d = std::lower_bound(dslots, dslots + k, p0) - dslots;  // first delta slot of the row
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t c = col[q];
      a[c] = A(-1);
      if (d < k && dslots[d] == q) {
        ++d;
        continue;
      }
      const double gv = g[c];
      const int64_t pos = r * in + c;
      const double sens = std::abs(static_cast<double>(theta[q]) * gv);
      if (ts.grow.template may_enter<true>(std::abs(gv))) ts.grow.push({std::abs(gv), pos, gv, -1, 0});
      if (units.budget == Budget::layer) {
        if (ts.prune.template may_enter<false>(sens)) ts.prune.push({sens, pos, gv, -1, 0});
      } else if (units.budget == Budget::row && row_cap > 0) {
        ts.row_buf.push_back({sens, pos, gv, -1, 0});
      }
      if (nm) {
        const Cand s{sens, pos, gv, -1, 0};
        Cand& best = ts.partners[c / units.m];
        if (best.pos < 0 || Lower()(s, best)) best = s;
      }
    }
    if (grow_inactive) {
      // -1 marks active positions. The A-typed bar is at most the exact one (scores are
      // A values), so the pre-filter never drops an entry push() would take.
      A thr = ts.grow.has_worst ? static_cast<A>(ts.grow.worst.score) : A(-0.5);
      for (int64_t c = 0; c < in; ++c) {
        if (a[c] < thr) continue;
        Cand cand{static_cast<double>(a[c]), r * in + c, static_cast<double>(g[c]), -1, 0};
        if (nm) {
          const Cand& p = ts.partners[c / units.m];
          cand.partner = p.pos;
          cand.partner_g = p.g;
        }
        ts.grow.push(cand);
        if (ts.grow.has_worst) thr = static_cast<A>(ts.grow.worst.score);
      }
    }
    if (!ts.row_buf.empty()) {
      const int64_t keep = std::min<int64_t>(row_cap, ts.row_buf.size());
      std::nth_element(ts.row_buf.begin(), ts.row_buf.begin() + (keep - 1), ts.row_buf.end(), Lower());
      ts.row_prune.insert(ts.row_prune.end(), ts.row_buf.begin(), ts.row_buf.begin() + keep);
    }
  }
}

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

// Scores on a grid sample (rows x cols, both sorted; Gs = G there): |G| of grow-eligible
// positions, |theta * G| of base-only ones.
template <typename A, typename V, typename I>
void sample_scores(const A* Gs, const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                   const int32_t* crow, const I* col, const V* theta, const int64_t* dslots, int64_t k,
                   bool grow_inactive, std::vector<double>& grow, std::vector<double>& prune) {
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

std::tuple<at::Tensor, at::Tensor, int64_t, bool> csr_grow_scan_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow_in, const at::Tensor& col_in,
    const at::Tensor& theta_in, const at::Tensor& delta_slots_in, int64_t num_grow, int64_t num_prune,
    c10::string_view budget, int64_t nm_n, int64_t nm_m, bool grow_inactive, int64_t sketch, int64_t seed) {
  const char* op = "csr_grow_scan";
  check_sddmm_args(op, grad_out, x, crow_in, col_in, std::nullopt, /*check_offsets=*/false);
  const int64_t in = x.size(-1), out = crow_in.numel() - 1;
  check_evolve_args(op, crow_in, col_in, theta_in, delta_slots_in, in);
  TORCH_CHECK(sketch >= 0, op, ": sketch must be >= 0 (0: the exact gradient), got ", sketch);
  TORCH_CHECK(num_grow >= 0 && num_prune >= 0, op, ": num_grow and num_prune must be >= 0, got ", num_grow,
              " and ", num_prune);
  const Units units{parse_budget(op, std::string(budget), nm_n, nm_m, in), in, nm_m};
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous(), theta = theta_in.contiguous();
  const at::Tensor dslots = delta_slots_in.contiguous();
  const int64_t k = dslots.numel();
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t esize = acc == at::kDouble ? 8 : 4;

  // dY^T rows are the tile's output rows; X stays (T, in). Both in the accumulation dtype,
  // and with a sketch, (sketch, .) CountSketches of the tokens instead.
  at::Tensor X = as_2d(x).to(acc).contiguous();
  at::Tensor dY = as_2d(grad_out).to(acc).contiguous();
  const int64_t T = X.size(0);
  const bool sketched = sketch > 0 && sketch < T;
  if (sketched) {
    if (acc == at::kDouble) {
      X = count_sketch<double>(X, sketch, seed);
      dY = count_sketch<double>(dY, sketch, seed);
    } else {
      X = count_sketch<float>(X, sketch, seed);
      dY = count_sketch<float>(dY, sketch, seed);
    }
  }
  const at::Tensor dyT = dY.t().contiguous();
  const int64_t Ts = X.size(0);
  const int64_t tile_rows = std::max<int64_t>(1, std::min<int64_t>(out, kTileBytes / std::max<int64_t>(1, in * esize)));
  const int64_t row_cap = (units.budget == Budget::row && out > 0) ? (num_prune + out - 1) / out : 0;

  // Bars from a grid sample of positions: the pools then take only entries that clear them (about
  // kBarMargin times what they keep) instead of thinning a stream of everything. The result is the
  // exact selection whenever at least `cap` entries cleared the bar; else the scan reruns
  // without bars (the sample was unlucky).
  const int64_t prune_cap = units.budget == Budget::layer ? num_prune : 0;
  const int64_t nnz = col.numel();
  const int64_t eligible = (grow_inactive ? out * in : nnz) - k;
  double grow_bar = -1, prune_bar = -1;
  int64_t sample_bytes = 0;
  // The sample is a grid of rows x cols sized so that ~kSampleHits sampled entries clear
  // the rarer bar (a bar then sits within a few percent of its target); no sample (and no
  // bars) when that would not be much smaller than the matrix.
  const double rarest = std::min(num_grow > 0 ? double(num_grow) / std::max<int64_t>(1, eligible) : 1.0,
                                 prune_cap > 0 ? double(prune_cap) / std::max<int64_t>(1, nnz - k) : 1.0);
  const double want_entries = std::max(16384.0, kSampleHits / std::max(rarest, 1e-12));
  const bool sample = (num_grow > 0 || prune_cap > 0) && want_entries * 4 <= double(out) * double(in);
  const int64_t s_rows =
      sample ? std::min<int64_t>(out, std::max<int64_t>(1, std::llround(std::sqrt(want_entries * out / in)))) : 0;
  const int64_t s_cols = sample ? std::min<int64_t>(in, static_cast<int64_t>(std::ceil(want_entries / s_rows))) : 0;
  bool finite = true;
  dispatch_types(theta.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    if (!sample) return;
    const std::vector<int64_t> rows = stratified(s_rows, out, seed * 2 + 1);
    const std::vector<int64_t> cols = stratified(s_cols, in, seed * 2 + 2);
    const at::Tensor Gs = at::mm(dyT.index_select(0, at::tensor(rows, at::kLong)),
                                 X.index_select(1, at::tensor(cols, at::kLong))).contiguous();
    std::vector<double> sg, sp;
    if (acc == at::kDouble)
      sample_scores<double, V, I>(Gs.data_ptr<double>(), rows, cols, crow.data_ptr<int32_t>(), col.data_ptr<I>(),
                                  theta.data_ptr<V>(), dslots.data_ptr<int64_t>(), k, grow_inactive, sg, sp);
    else
      sample_scores<float, V, I>(Gs.data_ptr<float>(), rows, cols, crow.data_ptr<int32_t>(), col.data_ptr<I>(),
                                 theta.data_ptr<V>(), dslots.data_ptr<int64_t>(), k, grow_inactive, sg, sp);
    sample_bytes = Gs.numel() * esize + static_cast<int64_t>((sg.capacity() + sp.capacity()) * sizeof(double)) +
                   (s_rows + s_cols) * 8;
    for (double v : sg) finite = finite && std::isfinite(v);
    if (!finite) return;
    const double share_g = kBarMargin * num_grow / std::max<int64_t>(1, eligible);
    if (num_grow > 0 && share_g < 0.5 && !sg.empty()) grow_bar = sample_bar(sg, share_g, true);
    const double share_p = kBarMargin * prune_cap / std::max<int64_t>(1, nnz - k);
    if (prune_cap > 0 && share_p < 0.5 && !sp.empty()) prune_bar = sample_bar(sp, share_p, false);
  });

  const int nthreads = at::get_num_threads();
  std::vector<ThreadState> states;
  for (int attempt = (grow_bar >= 0 || prune_bar >= 0) ? 0 : 1; attempt < 2 && finite; ++attempt) {
    states.clear();
    for (int t = 0; t < nthreads; ++t) {
      states.push_back(ThreadState{GrowPool(num_grow, Higher()), PrunePool(prune_cap, Lower()), {}, {}, {}, {}, {}});
      constexpr int64_t kLast = std::numeric_limits<int64_t>::max();  // ranks after every position
      if (attempt == 0 && grow_bar >= 0) states.back().grow.set_bar(Cand{grow_bar, kLast, 0, -1, 0});
      if (attempt == 0 && prune_bar >= 0) states.back().prune.set_bar(Cand{prune_bar, kLast, 0, -1, 0});
    }
    dispatch_types(theta.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
      using V = typename decltype(vt)::type;
      using I = typename decltype(it)::type;
      for (int64_t r0 = 0; r0 < out && finite; r0 += tile_rows) {
        const int64_t r1 = std::min(out, r0 + tile_rows);
        const at::Tensor G = at::mm(dyT.narrow(0, r0, r1 - r0), X);  // (rows, in), freed each iteration
        at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t b) {
          ThreadState& ts = states[at::get_thread_num()];
          if (acc == at::kDouble) {
            scan_rows<double, V, I>(G.data_ptr<double>() + (a - r0) * in, a, b, in, crow.data_ptr<int32_t>(),
                                    col.data_ptr<I>(), theta.data_ptr<V>(), dslots.data_ptr<int64_t>(), k, units,
                                    grow_inactive, row_cap, ts);
          } else {
            scan_rows<float, V, I>(G.data_ptr<float>() + (a - r0) * in, a, b, in, crow.data_ptr<int32_t>(),
                                   col.data_ptr<I>(), theta.data_ptr<V>(), dslots.data_ptr<int64_t>(), k, units,
                                   grow_inactive, row_cap, ts);
          }
        });
        for (const ThreadState& ts : states) finite = finite && !ts.nonfinite;
      }
    });
    int64_t grow_in = 0, prune_in = 0;
    for (const ThreadState& ts : states) {
      grow_in += ts.grow.accepted;
      prune_in += ts.prune.accepted;
    }
    const bool exact = (grow_bar < 0 || grow_in >= num_grow) && (prune_bar < 0 || prune_in >= prune_cap);
    if (attempt == 0 && exact) break;
  }

  // Merge the threads' pools: one selection over their union; the total order makes the
  // result independent of the split.
  std::vector<Cand> grow_all, prune_all;
  std::vector<std::pair<int64_t, double>> tracked;
  int64_t pool_bytes = 0;
  for (auto& ts : states) {
    pool_bytes += ts.grow.bytes() + ts.prune.bytes() +
                  static_cast<int64_t>((ts.row_prune.capacity() + ts.row_buf.capacity() + ts.partners.capacity()) *
                                       sizeof(Cand) + ts.abs_buf.capacity() * sizeof(float) + ts.abs_buf64.capacity() * sizeof(double));
    grow_all.insert(grow_all.end(), ts.grow.items.begin(), ts.grow.items.end());
    prune_all.insert(prune_all.end(), ts.prune.items.begin(), ts.prune.items.end());
    for (const Cand& c : ts.row_prune) tracked.emplace_back(c.pos, c.g);
  }
  pool_bytes += static_cast<int64_t>((grow_all.capacity() + prune_all.capacity()) * sizeof(Cand));
  auto keep_first = [](std::vector<Cand>& v, int64_t cap, auto before) {
    if (static_cast<int64_t>(v.size()) > cap) {
      std::nth_element(v.begin(), v.begin() + (cap - 1), v.end(), before);
      v.resize(cap);
    }
  };
  keep_first(grow_all, num_grow, Higher());
  keep_first(prune_all, prune_cap, Lower());
  for (const Cand& c : grow_all) {
    tracked.emplace_back(c.pos, c.g);
    if (c.partner >= 0) tracked.emplace_back(c.partner, c.partner_g);
  }
  for (const Cand& c : prune_all) tracked.emplace_back(c.pos, c.g);
  radix_sort_by_key(tracked, out * in);
  tracked.erase(std::unique(tracked.begin(), tracked.end(),
                            [](const auto& a, const auto& b) { return a.first == b.first; }),
                tracked.end());

  const int64_t n = finite ? static_cast<int64_t>(tracked.size()) : 0;
  at::Tensor pos = at::empty({n}, at::kLong);
  at::Tensor gval = at::empty({n}, x.options().dtype(acc));
  for (int64_t i = 0; i < n; ++i) {
    pos.data_ptr<int64_t>()[i] = tracked[i].first;
    if (acc == at::kDouble) gval.data_ptr<double>()[i] = tracked[i].second;
    else gval.data_ptr<float>()[i] = static_cast<float>(tracked[i].second);
  }
  // Bytes this op held at its peak (an upper bound: summed as if all alive at once): the fp
  // copies of dY (and its transpose) and X, the sketches, the sample, one tile of G, the pools.
  const int64_t x_copy = x.scalar_type() == acc && x.is_contiguous() ? 0 : T * in * esize;
  const int64_t dy_copy = grad_out.scalar_type() == acc && grad_out.is_contiguous() ? 0 : T * out * esize;
  const int64_t workspace = x_copy + dy_copy + (sketched ? Ts * (in + 2 * out) * esize : T * out * esize) +
                            tile_rows * in * esize + pool_bytes + sample_bytes +
                            n * (8 + esize) +
                            static_cast<int64_t>(tracked.capacity() * sizeof(tracked[0]));
  return {pos, gval, workspace, finite};
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("csr_grow_scan", &csr_grow_scan_cpu); }

}  // namespace seft::cpu::evolve
