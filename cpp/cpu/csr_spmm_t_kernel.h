// csr_spmm_t on the CPU (per-ISA; see kernel_common.h).
#pragma once
#include "cpu/kernel_common.h"

namespace seft::cpu::SEFT_ISA {
namespace {

// ---------------------------------------------------------------- csr_spmm_t: dX = dY W
// Parallel over the column panels: each panel's dX block (CP x TB accumulators, in L1) is
// owned by one thread and summed over rows in ascending order, so the result is bitwise the
// same whatever the thread count. No transposed index: the panel starts say where each
// row's sorted columns enter the panel.
template <typename A, typename V, typename I, int TB>
void spmm_t_panel(const Panels& P, int64_t q, const I* col, const V* val, const A* dyt, int64_t out, A* buf) {
  using Vec = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  constexpr int NV = TB < W ? 1 : TB / W;
  const int64_t j0 = q * P.cp;
  for (int64_t o = 0; o < out; ++o) {
    int32_t p = P.row(o)[q];
    const int32_t pe = P.row(o)[q + 1];
    if (p == pe) continue;
    if constexpr (TB < W) {
      const A dy = dyt[o];
      for (; p < pe; ++p) buf[int64_t(col[p]) - j0] += static_cast<A>(val[p]) * dy;
    } else {
      Vec dy[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) dy[v] = reinterpret_cast<const Vec*>(dyt + o * TB)[v];
      for (; p < pe; ++p) {
        const A w = static_cast<A>(val[p]);
        Vec* d = reinterpret_cast<Vec*>(buf + (int64_t(col[p]) - j0) * TB);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) d[v] += w * dy[v];
      }
    }
  }
}

// Many tokens: inside a panel, the non-zeros of each group of kColGroupRows rows are first
// listed by column (once per call; ascending rows within a column), so each column sums
// its group's contributions in registers and touches the dX block once per group instead
// of once per non-zero. Workspace: 5 bytes per non-zero of the panel, freed with it.
constexpr int64_t kColGroupRows = 64;

template <typename A, typename V, typename I, int TB>
void spmm_t_panel_bycol(const Panels& P, int64_t q, int64_t w, const I* col, const V* val, const A* dyt_all,
                        int64_t out, int64_t T, int64_t in, V* dxp) {
  using Vec = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  constexpr int NV = TB / W;
  const int64_t j0 = q * P.cp;
  const int64_t ngroups = (out + kColGroupRows - 1) / kColGroupRows;
  std::vector<int32_t> coff(size_t(ngroups * (w + 1) + 1), 0);
  for (int64_t o = 0; o < out; ++o) {
    int32_t* cg = coff.data() + (o / kColGroupRows) * (w + 1) + 1;
    for (int32_t p = P.row(o)[q]; p < P.row(o)[q + 1]; ++p) ++cg[int64_t(col[p]) - j0];
  }
  for (size_t i = 1; i < coff.size(); ++i) coff[i] += coff[i - 1];
  std::vector<int32_t> pos(coff.begin(), coff.end() - 1), ep(size_t(coff.back()));
  std::vector<uint8_t> er(size_t(coff.back()));
  for (int64_t o = 0; o < out; ++o) {
    int32_t* pg = pos.data() + (o / kColGroupRows) * (w + 1);
    for (int32_t p = P.row(o)[q]; p < P.row(o)[q + 1]; ++p) {
      const int32_t k = pg[int64_t(col[p]) - j0]++;
      ep[k] = p;
      er[k] = uint8_t(o % kColGroupRows);
    }
  }
  avec<A> buf(size_t(w * TB));
  for (int64_t t0 = 0; t0 < T; t0 += TB) {
    const A* dyt = dyt_all + (t0 / TB) * out * TB;
    std::fill(buf.begin(), buf.end(), A(0));
    for (int64_t g = 0; g < ngroups; ++g) {
      const A* dyg = dyt + g * kColGroupRows * TB;
      const int32_t* cg = coff.data() + g * (w + 1);
      for (int64_t c = 0; c < w; ++c) {
        int32_t k = cg[c];
        const int32_t ke = cg[c + 1];
        if (k == ke) continue;
        Vec acc[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[v] = Vec{};
        for (; k < ke; ++k) {
          const A wv = static_cast<A>(val[ep[k]]);
          const Vec* d = reinterpret_cast<const Vec*>(dyg + int64_t(er[k]) * TB);
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[v] += wv * d[v];
        }
        Vec* bc = reinterpret_cast<Vec*>(buf.data() + c * TB);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) bc[v] += acc[v];
      }
    }
    const int64_t nt = std::min<int64_t>(TB, T - t0);
    for (int64_t i = 0; i < nt; ++i) {
      V* drow = dxp + (t0 + i) * in + j0;
      for (int64_t j = 0; j < w; ++j) drow[j] = static_cast<V>(buf[j * TB + i]);
    }
  }
}

template <typename A, typename V, typename I>
at::Tensor spmm_t_typed(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                        int64_t in) {
  const int64_t T = dy.size(0), out = dy.size(1);
  at::Tensor dx = at::empty({T, in}, dy.options());
  const int64_t TB = token_block<A>(T);
  const Panels P = build_panels<I>("csr_spmm_t", crow, col, in, panel_width<A>(TB, in));
  if (T == 0 || in == 0) return dx;
  if (out == 0 || col.numel() == 0) return dx.zero_();
  const I* cl = col.data_ptr<I>();
  const V* vl = values.data_ptr<V>();
  const V* dyp = dy.data_ptr<V>();
  V* dxp = dx.data_ptr<V>();
  with_tb(TB, [&](auto tbc) {
    constexpr int TBc = decltype(tbc)::value;
    const int64_t nblocks = (T + TBc - 1) / TBc;
    if constexpr (TBc >= VecOf<A>::W) {
      if (nblocks >= 2) {  // column-grouped: pack every token block once, then one pass per panel
        avec<A> dyt(size_t(nblocks * out * TBc));
        at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {  // one region, not one per block
          for (int64_t bl = b0; bl < b1; ++bl)
            pack_t<A, V>(dyp, out, bl * TBc, std::min<int64_t>(TBc, T - bl * TBc), TBc, dyt.data() + bl * out * TBc);
        });
        at::parallel_for(0, P.n, 1, [&](int64_t b, int64_t e) {
          for (int64_t q = b; q < e; ++q)
            spmm_t_panel_bycol<A, V, I, TBc>(P, q, std::min(in, (q + 1) * P.cp) - q * P.cp, cl, vl, dyt.data(), out, T,
                                             in, dxp);
        });
        return;
      }
    }
    avec<A> dyt(size_t(out * TBc));
    for (int64_t t0 = 0; t0 < T; t0 += TBc) {
      const int64_t nt = std::min<int64_t>(TBc, T - t0);
      pack_t<A, V>(dyp, out, t0, nt, TBc, dyt.data());
      at::parallel_for(0, P.n, 1, [&](int64_t b, int64_t e) {
        avec<A> buf(static_cast<size_t>(P.cp * TBc));
        for (int64_t q = b; q < e; ++q) {
          const int64_t j0 = q * P.cp, j1 = std::min(in, j0 + P.cp);
          std::fill(buf.begin(), buf.end(), A(0));
          spmm_t_panel<A, V, I, TBc>(P, q, cl, vl, dyt.data(), out, buf.data());
          for (int64_t i = 0; i < nt; ++i) {
            V* drow = dxp + (t0 + i) * in;
            for (int64_t j = j0; j < j1; ++j) drow[j] = static_cast<V>(buf[(j - j0) * TBc + i]);
          }
        }
      });
    }
  });
  return dx;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
