// The tensor-core tile machinery shared by tc_spmm (csr_spmm_cuda.cu), tc_spmm_t
// (csr_spmm_t_cuda.cu) and tc_sddmm (csr_sddmm_cuda.cu): bf16 / fp16, fp32 accumulation.
// "Load sparse, compute dense per tile" (the Flash-LLM / SpInfer idea on plain CSR): a thread
// block owns a 128 x 128 tile of the output; for each 32-deep slice of the reduction it expands
// the CSR non-zeros that fall into the slice into a dense tile in shared memory, loads the
// dense operand's slice, and runs 16x16x16 WMMA (HMMA) products on them. The next slice's
// global loads are issued into registers before the current slice's products (one shared
// buffer, two barriers per slice). W is never dense in device memory; the shared tile is
// 128 x 32. Each op's sparse operand slice lives with its kernel.
// Results are deterministic (fixed summation order). Offsets (crow, the tile index) are clamped
// to [0, nnz] and column indices bounds-checked, so even a pattern changed behind the checks'
// back cannot make a kernel read or write out of bounds. Unlike the CUDA-core path, a dense
// tile multiplies W's structural zeros too: an Inf / NaN in x (dy) gives NaN in every output
// of its token that the block computes, as F.linear with a masked dense W would.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/csr_tile_index.h"

namespace seft::cuda {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // 8 warps: 4 (M) x 2 (N), each 32 x 64 of the 128 x 128 tile
constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kPad = 8;  // keeps WMMA's 32-byte alignment and staggers banks

static_assert(kColTile == kBM, "tc_spmm_t and tc_sddmm use one column tile per block");

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half(v); }
template <typename T> __device__ __forceinline__ T zero16() { return from_f<T>(0.f); }

// 8 consecutive 16-bit values of row `r` starting at column `c` of a (rows, cols) row-major
// matrix with leading dimension ld; out-of-range entries read as 0. vec: 16-byte loads allowed.
template <typename T>
__device__ __forceinline__ uint4 load8(const T* base, int64_t rows, int64_t cols, int64_t ld, int64_t r, int64_t c,
                                       bool vec) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if (r >= rows || c >= cols) return v;
  const T* p = base + r * ld + c;
  if (vec && c + 8 <= cols) return *reinterpret_cast<const uint4*>(p);
  T* e = reinterpret_cast<T*>(&v);
  for (int i = 0; i < 8 && c + i < cols; ++i) e[i] = p[i];
  return v;
}

// ------------------------------------------------------------------ dense operand slices
// A dense R x C slice of a row-major matrix D (rows, cols; leading dimension ld) at (r0, c0),
// stored S[r][c] with leading dimension C + kPad; out-of-range entries are 0. R * C / 8 = 512
// 16-byte chunks, 2 per thread, staged in registers between fetch and store.
//   TokenSlice: tc_spmm / tc_spmm_t's token-major operand, S[n][k] = D[t0 + n][k0 + k] (128 x 32);
//   RowSlice:   tc_sddmm's reduction-major operands, S[k][m] = D[t0 + k][m0 + m] (32 x 128).
template <typename T, int R, int C>
struct DenseSlice {
  static constexpr int kLd = C + kPad, kPerRow = C / 8;
  static_assert(R * kPerRow == 2 * kThreads, "two chunks per thread");
  uint4 reg[2];

  __device__ void fetch(const T* d, int64_t rows, int64_t cols, int64_t ld, int64_t r0, int64_t c0, bool vec) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int q = threadIdx.x + j * kThreads;
      reg[j] = load8(d, rows, cols, ld, r0 + q / kPerRow, c0 + (q % kPerRow) * 8, vec);
    }
  }
  __device__ void store(T* s) const {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int q = threadIdx.x + j * kThreads;
      *reinterpret_cast<uint4*>(s + (q / kPerRow) * kLd + (q % kPerRow) * 8) = reg[j];
    }
  }
};
template <typename T> using TokenSlice = DenseSlice<T, kBN, kBK>;
template <typename T> using RowSlice = DenseSlice<T, kBK, kBM>;

// ------------------------------------------------------------------ shared pieces
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

struct Warp {
  int id, lane, m, n;  // m: 32-row band (0..3), n: 64-column band (0..1)
  __device__ Warp() : id(threadIdx.x / 32), lane(threadIdx.x % 32), m(id / 2), n(id % 2) {}
};

// acc[i][j] += A(32 x 16 band) * B(16 x 64 band), for both 16-deep halves of a 32-deep slice.
// A(m, k) at a[m * a_rs + k * a_cs], B(k, n) at b[k * b_rs + n * b_cs] (one of each stride is 1).
template <typename T, typename LayA, typename LayB>
__device__ __forceinline__ void mma_slice(FragC (&acc)[2][4], const T* a, int lda, const T* b, int ldb, const Warp& w) {
  constexpr bool a_row = std::is_same<LayA, wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LayB, wmma::row_major>::value;
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayA> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayB> fb[4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = w.m * 32 + i * 16;
      wmma::load_matrix_sync(fa[i], a + (a_row ? m * lda + kk : kk * lda + m), lda);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = w.n * 64 + j * 16;
      wmma::load_matrix_sync(fb[j], b + (b_row ? kk * ldb + n : n * ldb + kk), ldb);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
}

// C[m][n] (the block's 128 x 128 tile at (m0, n0)) -> y[(n0 + n) * ldy + m0 + m] (+ bias[m0 + m]),
// i.e. y (N, M) row-major; through a 16 x 16 fp32 scratch per warp.
template <typename T>
__device__ void store_transposed(FragC (&acc)[2][4], float* scratch, T* y, const T* bias, int64_t M, int64_t N,
                                 int64_t m0, int64_t n0, const Warp& w) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_col_major);  // (r, c) at c * 16 + r
      __syncwarp();
      const int64_t mb = m0 + w.m * 32 + i * 16, nb = n0 + w.n * 64 + j * 16;
#pragma unroll
      for (int e = w.lane; e < 256; e += 32) {
        const int r = e % 16, c = e / 16;  // 16 consecutive m per store: 32-byte segments
        const int64_t m = mb + r, n = nb + c;
        if (m < M && n < N) {
          float s = scratch[e];  // consecutive lanes, consecutive words: no bank conflicts
          if (bias) s += to_f(bias[m]);
          y[n * M + m] = from_f<T>(s);
        }
      }
      __syncwarp();
    }
}

__device__ __forceinline__ void zero(FragC (&acc)[2][4]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);
}

// The slice loop of every kernel here, on one shared buffer: fetch(s) loads slice s into
// registers, store() writes them to shared memory, mma() multiplies what shared memory holds.
// The next slice's loads are in flight during the current slice's products.
template <typename Fetch, typename Store, typename Mma>
__device__ __forceinline__ void slice_loop(int64_t slices, Fetch&& fetch, Store&& store, Mma&& mma) {
  if (slices > 0) {
    fetch(0);
    store();
  }
  __syncthreads();
  for (int64_t s = 0; s < slices; ++s) {
    const bool more = s + 1 < slices;
    if (more) fetch(s + 1);
    mma();
    __syncthreads();
    if (more) store();
    __syncthreads();
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename F>
void dispatch_tc(at::ScalarType v, at::ScalarType idx, F&& f) {
  auto with_index = [&](auto vtag) {
    if (idx == at::kShort) f(vtag, std::common_type<int16_t>{});
    else f(vtag, std::common_type<int32_t>{});
  };
  if (v == at::kBFloat16) with_index(std::common_type<__nv_bfloat16>{});
  else if (v == at::kHalf) with_index(std::common_type<__half>{});
  else TORCH_CHECK(false, "seft: the tensor-core kernels take bfloat16 or float16, got ", v);
}

// (token tiles, tiles of W's rows or columns): the second is bounded by 65535 (8.4 M features).
inline dim3 grid2(int64_t token_tiles, int64_t w_tiles) {
  TORCH_CHECK(w_tiles <= 65535, "seft: more than 8.4 M features for the tensor-core kernels (", w_tiles * kBM, ")");
  return dim3(static_cast<unsigned>(token_tiles), static_cast<unsigned>(w_tiles));
}

}  // namespace seft::cuda
