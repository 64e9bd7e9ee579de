// csr_spmm on the CPU (per-ISA; see kernel_common.h).
#pragma once
#include "cpu/kernel_common.h"

namespace seft::cpu::SEFT_ISA {
namespace {

// ---------------------------------------------------------------- csr_spmm: Y = X W^T + b
// Each output row keeps TB token accumulators in registers; every non-zero adds
// w * XT[col] (TB contiguous values). With few tokens, N non-zeros are kept in flight in
// separate partial sums so that the FMA units stay busy.
template <typename A, typename V, typename I, int TB>
void spmm_rows(const Panels& P, const I* col, const V* val, const A* xt, const V* bias, int64_t r0, int64_t r1,
               int64_t nt, V* y, int64_t ldy) {
  using Vec = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  constexpr int NV = TB / W;
  constexpr int N = NV >= 8 ? 1 : 8 / NV;
  Vec part[kRowGroup][NV];  // partial sums of the group's rows between panels
  A stage[TB][kRowGroup];   // the group's outputs, token-major: y is written a row of tokens at a time
  for (int64_t g0 = r0; g0 < r1; g0 += kRowGroup) {
    const int64_t g1 = std::min(r1, g0 + kRowGroup);
    for (int64_t q = 0; q < P.n; ++q) {
      const bool first = q == 0, last = q + 1 == P.n;
      for (int64_t o = g0; o < g1; ++o) {
        Vec acc[N][NV];
#pragma GCC unroll 64
        for (int k = 0; k < N * NV; ++k) acc[k / NV][k % NV] = Vec{};
        if (!first) {
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[0][v] = part[o - g0][v];
        }
        int32_t p = P.row(o)[q];
        const int32_t pe = P.row(o)[q + 1];
        for (; p + N <= pe; p += N) {
#pragma GCC unroll 8
          for (int k = 0; k < N; ++k) {
            const A w = static_cast<A>(val[p + k]);
            const Vec* x = reinterpret_cast<const Vec*>(xt + int64_t(col[p + k]) * TB);
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v) acc[k][v] += w * x[v];
          }
        }
        for (; p < pe; ++p) {
          const A w = static_cast<A>(val[p]);
          const Vec* x = reinterpret_cast<const Vec*>(xt + int64_t(col[p]) * TB);
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[0][v] += w * x[v];
        }
#pragma GCC unroll 8
        for (int k = 1; k < N; ++k)
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[0][v] += acc[k][v];
        if (!last) {
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) part[o - g0][v] = acc[0][v];
          continue;
        }
        A res[TB];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) *reinterpret_cast<Vec*>(res + v * W) = acc[0][v];
        const A b = bias ? static_cast<A>(bias[o]) : A(0);
        for (int64_t i = 0; i < nt; ++i) stage[i][o - g0] = res[i] + b;
      }
    }
    // Token-major writes: a token's outputs of the group are contiguous in y (writes down a
    // column, at a stride of `out` values, fall into a few cache sets for some `out`, e.g. 1536).
    for (int64_t i = 0; i < nt; ++i)
      for (int64_t o = g0; o < g1; ++o) y[i * ldy + o] = static_cast<V>(stage[i][o - g0]);
  }
}

// A single token: a gather-dot per row (x is the packed (in x 1) vector).
template <typename A, typename V, typename I>
void spmv_rows(const int32_t* crow, const I* col, const V* val, const A* x, const V* bias, int64_t r0, int64_t r1,
               V* y) {
  for (int64_t o = r0; o < r1; ++o) {
    A s[4] = {0, 0, 0, 0};
    int32_t p = crow[o];
    const int32_t pe = crow[o + 1];
    for (; p + 4 <= pe; p += 4)
      for (int k = 0; k < 4; ++k) s[k] += static_cast<A>(val[p + k]) * x[col[p + k]];
    for (; p < pe; ++p) s[0] += static_cast<A>(val[p]) * x[col[p]];
    const A b = bias ? static_cast<A>(bias[o]) : A(0);
    y[o] = static_cast<V>(((s[0] + s[1]) + (s[2] + s[3])) + b);
  }
}

template <typename A, typename V, typename I>
at::Tensor spmm_typed(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const std::optional<at::Tensor>& bias) {
  const int64_t T = x.size(0), in = x.size(1), out = crow.numel() - 1;
  at::Tensor y = at::empty({T, out}, x.options());
  const int64_t TB = token_block<A>(T);
  const Panels P = build_panels<I>("csr_spmm", crow, col, in, panel_width<A>(TB, in));
  if (T == 0 || out == 0) return y;
  if (in == 0) return bias && bias->defined() ? y.copy_(bias->unsqueeze(0).expand({T, out})) : y.zero_();
  const int32_t* cr = crow.data_ptr<int32_t>();
  const I* cl = col.data_ptr<I>();
  const V* vl = values.data_ptr<V>();
  const V* bs = bias && bias->defined() ? bias->data_ptr<V>() : nullptr;
  const V* xp = x.data_ptr<V>();
  V* yp = y.data_ptr<V>();
  const auto parts = balanced_rows(cr, out, num_parts(out));
  with_tb(TB, [&](auto tbc) {
    constexpr int TBc = decltype(tbc)::value;
    // Every token block packed first, then one parallel region: a region per token block waits
    // for its slowest thread each time (costly when the cores are shared). Each output is still
    // computed by one call, so the result does not depend on the split.
    const int64_t nblocks = (T + TBc - 1) / TBc;
    avec<A> xt(size_t(nblocks * in * TBc));
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bl = b0; bl < b1; ++bl)
        pack_t<A, V>(xp, in, bl * TBc, std::min<int64_t>(TBc, T - bl * TBc), TBc, xt.data() + bl * in * TBc);
    });
    // Work items (token block, row part), token-block-major: a thread takes a run of them, so
    // its token block stays in cache while it walks the rows.
    const int64_t nparts = int64_t(parts.size()) - 1;
    at::parallel_for(0, nblocks * nparts, 1, [&](int64_t b, int64_t e) {
      for (int64_t item = b; item < e; ++item) {
        const int64_t bl = item / nparts, k = item % nparts;
        const int64_t t0 = bl * TBc, nt = std::min<int64_t>(TBc, T - t0);
        const A* xb = xt.data() + bl * in * TBc;
        if constexpr (TBc < VecOf<A>::W) {
          spmv_rows<A, V, I>(cr, cl, vl, xb, bs, parts[k], parts[k + 1], yp + t0 * out);
        } else {
          spmm_rows<A, V, I, TBc>(P, cl, vl, xb, bs, parts[k], parts[k + 1], nt, yp + t0 * out, out);
        }
      }
    });
  });
  return y;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
