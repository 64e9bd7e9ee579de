// csr_sddmm on the CPU (per-ISA; see kernel_common.h).
#pragma once
#include <atomic>
#include "cpu/kernel_common.h"

namespace seft::cpu::SEFT_ISA {
namespace {

// ---------------------------------------------------------------- csr_sddmm
// Per non-zero: one vector accumulator over the token block (sequential FMAs), then the
// lane sum; the same order on every path (rows, slots, batched by four).
// (A, not the vector type, is the template parameter: GCC drops a typedef's reduced
// alignment when the typedef itself is a template argument.)
template <typename A, int NV>
inline typename VecOf<A>::type dot_vec(const typename VecOf<A>::type* a, const typename VecOf<A>::type* b) {
  typename VecOf<A>::type s = a[0] * b[0];
#pragma GCC unroll 16
  for (int v = 1; v < NV; ++v) s += a[v] * b[v];
  return s;
}

template <typename A, int TB>
inline A dot_tb(const A* a, const A* b) {
  using Vec = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  if constexpr (TB < W) {
    A s = 0;
    for (int i = 0; i < TB; ++i) s += a[i] * b[i];
    return s;
  } else {
    return hsum(dot_vec<A, TB / W>(reinterpret_cast<const Vec*>(a), reinterpret_cast<const Vec*>(b)));
  }
}

template <typename A, typename I, int TB>
void sddmm_rows(const Panels& P, const I* col, const A* dyt, const A* xt, int64_t r0, int64_t r1, A* g) {
  using Vec = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  for (int64_t g0 = r0; g0 < r1; g0 += kRowGroup) {
    const int64_t g1 = std::min(r1, g0 + kRowGroup);
    for (int64_t q = 0; q < P.n; ++q) {
      for (int64_t o = g0; o < g1; ++o) {
        int32_t p = P.row(o)[q];
        const int32_t pe = P.row(o)[q + 1];
        if (p == pe) continue;
        if constexpr (TB < W) {
          for (; p < pe; ++p) g[p] += dot_tb<A, TB>(dyt + o * TB, xt + int64_t(col[p]) * TB);
        } else {
          constexpr int NV = TB / W;
          Vec dy[NV];  // the row's token block stays in registers across its non-zeros
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) dy[v] = reinterpret_cast<const Vec*>(dyt + o * TB)[v];
          auto xv = [&](int32_t pp) { return reinterpret_cast<const Vec*>(xt + int64_t(col[pp]) * TB); };
          for (; p + 4 <= pe; p += 4)
            add_hsum4(g + p, dot_vec<A, NV>(dy, xv(p)), dot_vec<A, NV>(dy, xv(p + 1)), dot_vec<A, NV>(dy, xv(p + 2)),
                      dot_vec<A, NV>(dy, xv(p + 3)));
          for (; p < pe; ++p) g[p] += hsum(dot_vec<A, NV>(dy, xv(p)));
        }
      }
    }
  }
}

// Returns false (leaving the rest of the range untouched) at a slot outside [0, nnz) or out of
// order: slots changed behind the check's back (its result is cached per tensor version) must
// not make the walk read out of bounds. crow is checked on every call.
template <typename A, typename I, int TB>
bool sddmm_slots(const int32_t* crow, int64_t out, const I* col, const int64_t* slots, const A* dyt, const A* xt,
                 int64_t s0, int64_t s1, A* g) {
  if (s0 >= s1) return true;
  const int64_t nnz = crow[out];
  // row of the first slot: the last o with crow[o] <= p (empty rows skipped)
  auto below = [](int64_t v, int32_t c) { return v < int64_t(c); };
  if (slots[s0] < 0 || slots[s0] >= nnz) return false;
  int64_t o = int64_t(std::upper_bound(crow, crow + out + 1, slots[s0], below) - crow) - 1;
  for (int64_t s = s0, prev = -1; s < s1; prev = slots[s++]) {
    const int64_t p = slots[s];
    if (p <= prev || p >= nnz) return false;
    while (crow[o + 1] <= p) ++o;
    g[s] += dot_tb<A, TB>(dyt + o * TB, xt + int64_t(col[p]) * TB);
  }
  return true;
}

// Tokens per chunk of packed token blocks (the packed dY and X of a chunk: 4 KiB per feature).
constexpr int64_t kSddmmChunkTokens = 1024;

template <typename A, typename V, typename I>
at::Tensor sddmm_typed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                       const at::Tensor& slots) {
  const int64_t T = dy.size(0), out = dy.size(1), in = x.size(1);
  const bool all = !slots.defined();
  const int64_t n = all ? col.numel() : slots.numel();
  const auto acc_dtype = std::is_same<A, double>::value ? at::kDouble : at::kFloat;
  at::Tensor g = at::zeros({n}, dy.options().dtype(acc_dtype));
  const int64_t TB = token_block<A>(T);
  const Panels P = build_panels<I>("csr_sddmm", crow, col, in, all ? panel_width<A>(TB, in) : std::max<int64_t>(in, 1));
  if (T == 0 || n == 0) return g;
  const int32_t* cr = crow.data_ptr<int32_t>();
  const I* cl = col.data_ptr<I>();
  const int64_t* sl = all ? nullptr : slots.data_ptr<int64_t>();
  A* gp = g.data_ptr<A>();
  const auto parts = all ? balanced_rows(cr, out, num_parts(out)) : std::vector<int64_t>{};
  std::atomic<bool> stale{false};
  with_tb(TB, [&](auto tbc) {
    constexpr int TBc = decltype(tbc)::value;
    // Token blocks in chunks: a chunk's blocks are packed in one parallel region and computed
    // in one more (a region per token block waits for its slowest thread each time, costly
    // when the cores are shared). Every output adds its token blocks in order, as before.
    const int64_t nblocks = (T + TBc - 1) / TBc, chunk = std::max<int64_t>(1, kSddmmChunkTokens / TBc);
    const V* dyp = dy.data_ptr<V>();
    const V* xp = x.data_ptr<V>();
    avec<A> dyt(size_t(std::min(nblocks, chunk) * out * TBc)), xt(size_t(std::min(nblocks, chunk) * in * TBc));
    for (int64_t c0 = 0; c0 < nblocks; c0 += chunk) {
      const int64_t nb = std::min(chunk, nblocks - c0);
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t t0 = (c0 + b) * TBc, nt = std::min<int64_t>(TBc, T - t0);
          pack_t<A, V>(dyp, out, t0, nt, TBc, dyt.data() + b * out * TBc);
          pack_t<A, V>(xp, in, t0, nt, TBc, xt.data() + b * in * TBc);
        }
      });
      if (all) {
        at::parallel_for(0, int64_t(parts.size()) - 1, 1, [&](int64_t b, int64_t e) {
          for (int64_t k = b; k < e; ++k)
            for (int64_t bl = 0; bl < nb; ++bl)
              sddmm_rows<A, I, TBc>(P, cl, dyt.data() + bl * out * TBc, xt.data() + bl * in * TBc, parts[k],
                                    parts[k + 1], gp);
        });
      } else {
        at::parallel_for(0, n, 2048, [&](int64_t s0, int64_t s1) {
          for (int64_t bl = 0; bl < nb; ++bl)
            if (!sddmm_slots<A, I, TBc>(cr, out, cl, sl, dyt.data() + bl * out * TBc, xt.data() + bl * in * TBc, s0,
                                        s1, gp)) {
              stale = true;
              return;
            }
        });
      }
    }
  });
  TORCH_CHECK(!stale, "csr_sddmm: slots must be strictly increasing indices in [0, nnz = ", col.numel(),
              "); they were changed in place after they were checked (e.g. through .data)");
  return g;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
