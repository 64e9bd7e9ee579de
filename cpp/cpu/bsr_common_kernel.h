// Shared pieces of the BSR CPU kernels (per-ISA; included by kernels.h through the
// bsr_<op>_kernel.h files). Tokens are packed in blocks of kBsrTB: a dense operand
// (T, n) becomes [ceil(T / TB)][np][TB] (np = n rounded up to the block), zero-padded in
// both the tokens and the features, so the kernels never branch on padding.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/kernel_common.h"

namespace seft::cpu::SEFT_ISA {
namespace {

constexpr int kBsrTB = 8;

// Below about this many multiply-adds a call runs on one thread: waking the pool costs more
// (milliseconds when the cores are busy). The split never changes a result (fixed orders).
constexpr int64_t kBsrSerialWork = int64_t(1) << 18;

// at::parallel_for's grain for n items of `work` multiply-adds in all: n (one thread) when small.
inline int64_t bsr_grain(int64_t n, int64_t work, int64_t min_grain = 1) {
  return work < kBsrSerialWork ? std::max<int64_t>(n, 1) : min_grain;
}

// dst[(b * np + j) * TB + i] = src[(b * TB + i) * n + j] (0 outside T x n).
template <typename A, typename V>
void bsr_pack(const V* src, int64_t T, int64_t n, int64_t np, A* dst) {
  constexpr int TB = kBsrTB;
  const int64_t nb = (T + TB - 1) / TB;
  at::parallel_for(0, nb, bsr_grain(nb, nb * np * TB), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      A* d = dst + b * np * TB;
      std::fill(d, d + np * TB, A(0));
      for (int64_t i = 0; i < TB && b * TB + i < T; ++i) {
        const V* s = src + (b * TB + i) * n;
        for (int64_t j = 0; j < n; ++j) d[j * TB + i] = static_cast<A>(s[j]);
      }
    }
  });
}

// Calls f(integral_constant<R>, integral_constant<C>) with the compile-time block shape for
// the shapes that have micro-kernels (4x4, 8x8, 16x16), or (0, 0): the run-time shape.
template <typename F>
void with_block(int64_t r, int64_t c, F&& f) {
  if (r == 4 && c == 4) return f(std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{});
  if (r == 8 && c == 8) return f(std::integral_constant<int, 8>{}, std::integral_constant<int, 8>{});
  if (r == 16 && c == 16) return f(std::integral_constant<int, 16>{}, std::integral_constant<int, 16>{});
  f(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
}

}  // namespace
}  // namespace seft::cpu::SEFT_ISA
