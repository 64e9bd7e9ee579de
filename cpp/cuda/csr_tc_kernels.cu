// Tensor-core paths for many tokens (bf16 / fp16, fp32 accumulation): "load sparse, compute
// dense per tile" (the Flash-LLM / SpInfer idea on plain CSR). A thread block owns a 128 x 128
// tile of the output; for each 32-deep slice of the reduction it expands the CSR non-zeros
// that fall into the slice into a dense tile in shared memory, loads the dense operand's
// slice, and runs 16x16x16 WMMA (HMMA) products on them. The next slice's global loads are
// issued into registers before the current slice's products (one shared buffer, two barriers
// per slice). W is never dense in device memory; the shared tile is 128 x 32.
//
//   tc_spmm      y (T, out) = x W^T (+ b):  C[o][t] = sum_k W[o][k] x[t][k]; W rows advance by
//                per-row cursors (columns are sorted), so each non-zero is read once per
//                token tile.
//   tc_spmm_t    dx (T, in) = dy W:        C[i][t] = sum_o W[o][i] dy[t][o]; the block's 128
//                input columns are one column tile, whose non-zeros in each row are located
//                by the column-tile index (common/csr_tile_index.h): no transposed copy.
//   tc_sddmm     g[p] = sum_t dy[t][row p] x[t][col p]: a dense 128 x 128 tile of dY^T X per
//                block, then the tile's non-zeros are gathered from shared memory.
// Results are deterministic (fixed summation order). Offsets (crow, the tile index) are clamped
// to [0, nnz] and column indices bounds-checked, so even a pattern changed behind the checks'
// back cannot make a kernel read or write out of bounds. Unlike the CUDA-core path, a dense
// tile multiplies W's structural zeros too: an Inf / NaN in x (dy) gives NaN in every output
// of its token that the block computes, as F.linear with a masked dense W would.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/csr_tile_index.h"
#include "cuda/kernels_cuda.h"

namespace seft::cuda {
namespace {

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

// ------------------------------------------------------------------ sparse operand slices
// tc_spmm: the W tile rows [o0, o0 + 128) x columns [k0, k0 + 32), stored A[r][k] (row-major
// A for WMMA). Warp w owns rows 16w .. 16w + 15. Each row has at most 32 non-zeros in a
// 32-column slice, so one 32-lane load per row covers it; the row's cursor then moves past
// the lanes that fell into the slice (a prefix, since columns are sorted).
template <typename T, typename I>
struct RowCursorSlice {
  static constexpr int kRows = kBM / 8;
  static constexpr int kLd = kBK + kPad;
  int32_t cur[kRows], end[kRows];  // nnz < 2^31; positions are formed in int64
  int32_t c[kRows];  // column within the slice, or -1
  T v[kRows];

  __device__ void init(const int32_t* crow, int64_t out, int64_t nnz, int64_t o0) {
    const int w = threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t o = o0 + w * kRows + i;
      cur[i] = o < out ? static_cast<int32_t>(clamp_offset(crow[o], 0, nnz)) : 0;
      end[i] = o < out ? static_cast<int32_t>(clamp_offset(crow[o + 1], cur[i], nnz)) : 0;
    }
  }
  __device__ void fetch(const I* col, const T* val, int64_t k0, int64_t in) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t p = int64_t(cur[i]) + lane;
      const int64_t cc = p < end[i] ? static_cast<int64_t>(col[p]) : INT64_MAX;
      const bool in_slice = cc >= k0 && cc < k0 + kBK && cc < in;
      c[i] = in_slice ? static_cast<int32_t>(cc - k0) : -1;
      v[i] = in_slice ? val[p] : zero16<T>();
      // advance past this slice's entries (and past bad ones below k0, so none can stall)
      const unsigned taken = __ballot_sync(0xffffffffu, p < end[i] && cc < k0 + kBK);
      cur[i] += __popc(taken);
    }
  }
  __device__ void store(T* s) const {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i) s[(w * kRows + i) * kLd + lane] = zero16<T>();
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (c[i] >= 0) s[(w * kRows + i) * kLd + c[i]] = v[i];
  }
};

// tc_spmm_t: W rows [o0, o0 + 32) x columns [i0, i0 + 128) (one column tile), stored
// A[k][m] = W[o0 + k][i0 + m] (column-major A for WMMA). Warp w owns rows 4w .. 4w + 3; a
// row has at most 128 non-zeros in the tile: 4 loads of 32 lanes.
template <typename T, typename I>
struct ColTileSlice {
  static constexpr int kRows = kBK / 8, kChunks = kBM / 32;
  static constexpr int kLd = kBM + kPad;
  int32_t c[kRows][kChunks];
  T v[kRows][kChunks];

  __device__ void fetch(const int32_t* tp, int64_t width, int64_t tile, const I* col, const T* val, int64_t out,
                        int64_t nnz, int64_t o0, int64_t i0, int64_t in) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t o = o0 + w * kRows + i;
      const int64_t lo = o < out ? clamp_offset(tp[o * width + tile], 0, nnz) : 0;
      const int64_t hi = o < out ? clamp_offset(tp[o * width + tile + 1], lo, nnz) : 0;
#pragma unroll
      for (int q = 0; q < kChunks; ++q) {
        const int64_t p = lo + q * 32 + lane;
        const int64_t cc = p < hi ? static_cast<int64_t>(col[p]) : -1;
        const bool ok = cc >= i0 && cc < i0 + kBM && cc < in;
        c[i][q] = ok ? static_cast<int32_t>(cc - i0) : -1;
        v[i][q] = ok ? val[p] : zero16<T>();
      }
    }
  }
  __device__ void store(T* s) const {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int q = 0; q < kChunks; ++q) s[(w * kRows + i) * kLd + q * 32 + lane] = zero16<T>();
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int q = 0; q < kChunks; ++q)
        if (c[i][q] >= 0) s[(w * kRows + i) * kLd + c[i][q]] = v[i][q];
  }
};

// ------------------------------------------------------------------ shared pieces
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

struct Warp {
  int id, lane, m, n;  // m: 32-row band (0..3), n: 64-column band (0..1)
  __device__ Warp() : id(threadIdx.x / 32), lane(threadIdx.x % 32), m(id / 2), n(id % 2) {}
};

// acc[i][j] += A(32 x 16 band) * B(16 x 64 band), for both 16-deep halves of a 32-deep slice.
// A(m, k) at a[m * a_rs + k * a_cs], B(k, n) at b[k * b_rs + n * b_cs] (one of each stride is 1).
template <typename T, typename LayA, typename LayB>
__device__ __forceinline__ void mma_slice(FragC (&acc)[2][4], const T* a, int lda, const T* b, int ldb,
                                          const Warp& w) {
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

// ------------------------------------------------------------------ kernels
// grid (ceil(T / 128), ceil(out / 128)).
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) tc_spmm_kernel(const T* __restrict__ x, const int32_t* __restrict__ crow,
                                                           const I* __restrict__ col, const T* __restrict__ val,
                                                           const T* __restrict__ bias, T* __restrict__ y, int64_t T_,
                                                           int64_t in, int64_t out, int64_t nnz, bool vec) {
  // raw bytes: __nv_bfloat16 / __half are classes
  __shared__ __align__(128) unsigned char sa_raw[kBM * RowCursorSlice<T, I>::kLd * sizeof(T)];
  __shared__ __align__(128) unsigned char sb_raw[kBN * TokenSlice<T>::kLd * sizeof(T)];
  __shared__ __align__(128) float scratch[8][256];
  T* sa = reinterpret_cast<T*>(sa_raw);
  T* sb = reinterpret_cast<T*>(sb_raw);
  const Warp w;
  const int64_t t0 = int64_t(blockIdx.x) * kBN, o0 = int64_t(blockIdx.y) * kBM;
  RowCursorSlice<T, I> a;
  TokenSlice<T> b;
  a.init(crow, out, nnz, o0);
  FragC acc[2][4];
  zero(acc);
  slice_loop(
      (in + kBK - 1) / kBK,
      [&](int64_t s) {
        a.fetch(col, val, s * kBK, in);
        b.fetch(x, T_, in, in, t0, s * kBK, vec);
      },
      [&] {
        a.store(sa);
        b.store(sb);
      },
      [&] {
        mma_slice<T, wmma::row_major, wmma::col_major>(acc, sa, RowCursorSlice<T, I>::kLd, sb, TokenSlice<T>::kLd,
                                                        w);
      });
  store_transposed(acc, scratch[w.id], y, bias, out, T_, o0, t0, w);
}

// grid (ceil(T / 128), ceil(in / 128)).
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) tc_spmm_t_kernel(const T* __restrict__ dy,
                                                             const int32_t* __restrict__ tile_ptr, int64_t width,
                                                             const I* __restrict__ col, const T* __restrict__ val,
                                                             T* __restrict__ dx, int64_t T_, int64_t in, int64_t out,
                                                             int64_t nnz, bool vec) {
  __shared__ __align__(128) unsigned char sa_raw[kBK * ColTileSlice<T, I>::kLd * sizeof(T)];
  __shared__ __align__(128) unsigned char sb_raw[kBN * TokenSlice<T>::kLd * sizeof(T)];
  __shared__ __align__(128) float scratch[8][256];
  T* sa = reinterpret_cast<T*>(sa_raw);
  T* sb = reinterpret_cast<T*>(sb_raw);
  const Warp w;
  const int64_t t0 = int64_t(blockIdx.x) * kBN, tile = blockIdx.y, i0 = tile * kBM;
  ColTileSlice<T, I> a;
  TokenSlice<T> b;
  FragC acc[2][4];
  zero(acc);
  slice_loop(
      (out + kBK - 1) / kBK,
      [&](int64_t s) {
        a.fetch(tile_ptr, width, tile, col, val, out, nnz, s * kBK, i0, in);
        b.fetch(dy, T_, out, out, t0, s * kBK, vec);
      },
      [&] {
        a.store(sa);
        b.store(sb);
      },
      [&] {
        mma_slice<T, wmma::col_major, wmma::col_major>(acc, sa, ColTileSlice<T, I>::kLd, sb, TokenSlice<T>::kLd,
                                                        w);
      });
  store_transposed(acc, scratch[w.id], dx, static_cast<const T*>(nullptr), in, T_, i0, t0, w);
}

constexpr int kCLd = kBN + 4;  // fp32 C tile of tc_sddmm
constexpr size_t kSddmmSmem = std::max<size_t>(size_t(kBM) * kCLd * sizeof(float),
                                               2 * size_t(kBK) * (kBM + kPad) * 2);

// grid (ceil(in / 128), ceil(out / 128)); dynamic shared memory kSddmmSmem.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) tc_sddmm_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                            const int32_t* __restrict__ tile_ptr, int64_t width,
                                                            const I* __restrict__ col, float* __restrict__ g,
                                                            int64_t T_, int64_t in, int64_t out, int64_t nnz,
                                                            bool vec_dy, bool vec_x) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);         // A[k][m] = dy[t0 + k][o0 + m]
  T* sb = sa + kBK * RowSlice<T>::kLd;        // B[k][n] = x[t0 + k][i0 + n]
  float* sc = reinterpret_cast<float*>(smem);  // after the loop: C[m][n]
  const Warp w;
  const int64_t tile = blockIdx.x, i0 = tile * kBN, o0 = int64_t(blockIdx.y) * kBM;
  {  // a tile without non-zeros has nothing to compute (block-uniform exit)
    const int64_t o = o0 + threadIdx.x;
    const bool any = threadIdx.x < kBM && o < out && tile_ptr[o * width + tile] < tile_ptr[o * width + tile + 1];
    if (!__syncthreads_or(any)) return;
  }
  RowSlice<T> a, b;
  FragC acc[2][4];
  zero(acc);
  slice_loop(
      (T_ + kBK - 1) / kBK,
      [&](int64_t s) {
        a.fetch(dy, T_, out, out, s * kBK, o0, vec_dy);
        b.fetch(x, T_, in, in, s * kBK, i0, vec_x);
      },
      [&] {
        a.store(sa);
        b.store(sb);
      },
      [&] { mma_slice<T, wmma::col_major, wmma::row_major>(acc, sa, RowSlice<T>::kLd, sb, RowSlice<T>::kLd, w); });
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      wmma::store_matrix_sync(sc + (w.m * 32 + i * 16) * kCLd + w.n * 64 + j * 16, acc[i][j], kCLd,
                              wmma::mem_row_major);
  __syncthreads();
  // gather: warp w takes rows 16w .. 16w + 15 of the tile
  for (int r = w.id * 16; r < w.id * 16 + 16; ++r) {
    const int64_t o = o0 + r;
    if (o >= out) break;
    const int64_t lo = clamp_offset(tile_ptr[o * width + tile], 0, nnz);
    const int64_t hi = clamp_offset(tile_ptr[o * width + tile + 1], lo, nnz);
    for (int64_t p = lo + w.lane; p < hi; p += 32) {
      const int64_t c = static_cast<int64_t>(col[p]) - i0;
      if (c >= 0 && c < kBN && c + i0 < in) g[p] = sc[r * kCLd + c];
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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
dim3 grid2(int64_t token_tiles, int64_t w_tiles) {
  TORCH_CHECK(w_tiles <= 65535, "seft: more than 8.4 M features for the tensor-core kernels (", w_tiles * kBM, ")");
  return dim3(static_cast<unsigned>(token_tiles), static_cast<unsigned>(w_tiles));
}

}  // namespace

bool tc_supported(at::ScalarType v) { return v == at::kBFloat16 || v == at::kHalf; }

at::Tensor tc_spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                   const at::Tensor& bias, int64_t out) {
  const int64_t T_ = x.size(0), in = x.size(1);
  at::Tensor y = at::empty({T_, out}, x.options());
  if (T_ == 0 || out == 0) return y;
  const bool vec = in % 8 == 0 && aligned16(x.const_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_tc(val.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using T = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    tc_spmm_kernel<T, I><<<grid2((T_ + kBN - 1) / kBN, (out + kBM - 1) / kBM), kThreads, 0, stream>>>(
        static_cast<const T*>(x.const_data_ptr()), crow.const_data_ptr<int32_t>(), col.const_data_ptr<I>(),
        static_cast<const T*>(val.const_data_ptr()),
        bias.defined() ? static_cast<const T*>(bias.const_data_ptr()) : nullptr, static_cast<T*>(y.data_ptr()), T_, in,
        out, col.numel(), vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor tc_spmm_t(const at::Tensor& dy, const at::Tensor& tile_ptr, const at::Tensor& col, const at::Tensor& val,
                     int64_t in) {
  const int64_t T_ = dy.size(0), out = dy.size(1);
  at::Tensor dx = at::empty({T_, in}, dy.options());
  if (T_ == 0 || in == 0) return dx;
  if (out == 0) return dx.zero_();
  const bool vec = out % 8 == 0 && aligned16(dy.const_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_tc(val.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using T = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    tc_spmm_t_kernel<T, I><<<grid2((T_ + kBN - 1) / kBN, (in + kBM - 1) / kBM), kThreads, 0, stream>>>(
        static_cast<const T*>(dy.const_data_ptr()), tile_ptr.const_data_ptr<int32_t>(), tile_ptr.size(1),
        col.const_data_ptr<I>(), static_cast<const T*>(val.const_data_ptr()), static_cast<T*>(dx.data_ptr()), T_, in,
        out, col.numel(), vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

at::Tensor tc_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& tile_ptr, const at::Tensor& col) {
  const int64_t T_ = dy.size(0), out = dy.size(1), in = x.size(1), nnz = col.numel();
  at::Tensor g = at::empty({nnz}, x.options().dtype(at::kFloat));
  if (nnz == 0) return g;
  if (T_ == 0) return g.zero_();
  const bool vec_dy = out % 8 == 0 && aligned16(dy.const_data_ptr());
  const bool vec_x = in % 8 == 0 && aligned16(x.const_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_tc(x.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using T = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    auto kernel = tc_sddmm_kernel<T, I>;
    // > 48 KB of dynamic shared memory must be allowed per function (and device): cheap to repeat
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kSddmmSmem)));
    TORCH_CHECK((out + kBM - 1) / kBM <= 65535, "seft: csr_sddmm: too many rows for the tensor-core kernel");
    kernel<<<dim3(static_cast<unsigned>((in + kBN - 1) / kBN), static_cast<unsigned>((out + kBM - 1) / kBM)),
             kThreads, kSddmmSmem, stream>>>(
        static_cast<const T*>(dy.const_data_ptr()), static_cast<const T*>(x.const_data_ptr()),
        tile_ptr.const_data_ptr<int32_t>(), tile_ptr.size(1), col.const_data_ptr<I>(), g.data_ptr<float>(), T_, in,
        out, nnz, vec_dy, vec_x);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g;
}

}  // namespace seft::cuda
