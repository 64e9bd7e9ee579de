// csr_spmm on the CPU (per-ISA; see kernel_common.h).
#pragma once
#include "common/structure_cache.h"
#include "cpu/kernel_common.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

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
        for (int64_t i = 0; i < nt; ++i) y[i * ldy + o] = static_cast<V>(res[i] + b);
      }
    }
  }
}

// A single token: a gather-dot per row (x is the packed (in x 1) vector). The pattern was
// checked once per version (structure_cache.h), not at this call: a column changed behind the
// version counter since is clamped into range while the row is summed and reported in ``bad``
// (the op then raises), so it is never read out of bounds.
template <typename A, typename V, typename I>
A spmv_row_tail(const I* col, const V* val, const A* x, int32_t p, int32_t pe, int64_t in, bool& bad) {
  A s[4] = {0, 0, 0, 0};
  bool oob = false;
  for (; p < pe; ++p) {
    const int64_t c = int64_t(col[p]);
    const bool ok = uint64_t(c) < uint64_t(in);
    oob |= !ok;
    s[p & 3] += static_cast<A>(val[p]) * x[ok ? c : 0];
  }
  bad |= oob;
  return (s[0] + s[1]) + (s[2] + s[3]);
}

#if defined(__AVX2__)
inline __m256i load8_col(const int16_t* c) { return _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)c)); }
inline __m256i load8_col(const int32_t* c) { return _mm256_loadu_si256((const __m256i*)c); }
inline __m256 load8_val(const float* v) { return _mm256_loadu_ps(v); }
inline __m256 load8_val(const c10::BFloat16* v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)v)), 16));
}
inline __m256 load8_val(const c10::Half* v) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)v)); }

// fp32 accumulation: 16 non-zeros per step in two gathers (columns clamped to [0, in)).
template <typename V, typename I>
float spmv_row(const I* col, const V* val, const float* x, int32_t p, int32_t pe, int64_t in, bool& bad) {
  const __m256i hi = _mm256_set1_epi32(int32_t(in - 1));
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256i clamped = _mm256_setzero_si256();
  for (; p + 16 <= pe; p += 16) {
    const __m256i r0 = load8_col(col + p), r1 = load8_col(col + p + 8);
    const __m256i c0 = _mm256_min_epu32(r0, hi), c1 = _mm256_min_epu32(r1, hi);
    clamped = _mm256_or_si256(clamped, _mm256_or_si256(_mm256_xor_si256(r0, c0), _mm256_xor_si256(r1, c1)));
    a0 = _mm256_fmadd_ps(load8_val(val + p), _mm256_i32gather_ps(x, c0, 4), a0);
    a1 = _mm256_fmadd_ps(load8_val(val + p + 8), _mm256_i32gather_ps(x, c1, 4), a1);
  }
  bad |= !_mm256_testz_si256(clamped, clamped);
  const float s = hsum((v8f)_mm256_add_ps(a0, a1));
  return s + spmv_row_tail<float, V, I>(col, val, x, p, pe, in, bad);
}
#endif

template <typename A, typename V, typename I>
void spmv_rows(const int32_t* crow, const I* col, const V* val, const A* x, const V* bias, int64_t r0, int64_t r1,
               int64_t in, std::atomic<bool>& any_bad, V* y) {
  bool bad = false;
  for (int64_t o = r0; o < r1; ++o) {
    const int32_t p = crow[o], pe = crow[o + 1];  // checked at this call (check_spmm_args)
    A s;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<A, float>)
      s = spmv_row<V, I>(col, val, x, p, pe, in, bad);
    else
#endif
      s = spmv_row_tail<A, V, I>(col, val, x, p, pe, in, bad);
    const A b = bias ? static_cast<A>(bias[o]) : A(0);
    y[o] = static_cast<V>(s + b);
  }
  if (bad) any_bad.store(true);
}

template <typename A, typename V, typename I>
at::Tensor spmm_typed(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const std::optional<at::Tensor>& bias) {
  const int64_t T = x.size(0), in = x.size(1), out = crow.numel() - 1;
  at::Tensor y = at::empty({T, out}, x.options());
  const int64_t TB = token_block(T);
  Panels P;  // one token needs no panels: its pattern is checked once per version instead of at every call
  if (TB >= VecOf<A>::W)
    P = build_panels<I>("csr_spmm", crow, col, in, panel_width<A>(TB, in));
  else
    checked_structure(crow, col, in, [&] {
      check_cols_cpu("csr_spmm", crow, col, in);
      return at::Tensor();
    });
  if (T == 0 || out == 0) return y;
  if (in == 0) return bias && bias->defined() ? y.copy_(bias->unsqueeze(0).expand({T, out})) : y.zero_();
  avec<A> xt(size_t(in * TB));
  const int32_t* cr = crow.data_ptr<int32_t>();
  const I* cl = col.data_ptr<I>();
  const V* vl = values.data_ptr<V>();
  const V* bs = bias && bias->defined() ? bias->data_ptr<V>() : nullptr;
  const V* xp = x.data_ptr<V>();
  V* yp = y.data_ptr<V>();
  const auto parts = balanced_rows(cr, out, num_parts(out));
  std::atomic<bool> bad_col{false};
  with_tb(TB, [&](auto tbc) {
    constexpr int TBc = decltype(tbc)::value;
    for (int64_t t0 = 0; t0 < T; t0 += TBc) {
      const int64_t nt = std::min<int64_t>(TBc, T - t0);
      pack_t<A, V>(xp, in, t0, nt, TBc, xt.data());
      at::parallel_for(0, int64_t(parts.size()) - 1, 1, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          if constexpr (TBc < VecOf<A>::W) {
            spmv_rows<A, V, I>(cr, cl, vl, xt.data(), bs, parts[k], parts[k + 1], in, bad_col, yp + t0 * out);
          } else {
            spmm_rows<A, V, I, TBc>(P, cl, vl, xt.data(), bs, parts[k], parts[k + 1], nt, yp + t0 * out, out);
          }
        }
      });
    }
  });
  if (bad_col.load()) check_cols_cpu("csr_spmm", crow, col, in);  // changed since its check: raises with the details
  TORCH_CHECK(!bad_col.load(), "csr_spmm: invalid col indices");
  return y;
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
