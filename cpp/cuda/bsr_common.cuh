// Shared by the BSR CUDA ops (bsr_spmm_cuda.cu, bsr_spmm_t_cuda.cu, bsr_sddmm_cuda.cu): the
// pattern check and block index (bsr_index_cuda.cu), the path choice, and the tensor-core
// gather machinery.
//
// Tensor cores (bf16 / fp16, r and c multiples of 16): every BSR op is a product C = A B whose
// reduction (K) or output (N) dimension runs over a gathered list of blocks: bsr_spmm's K is
// the blocks of a block row, each contributing its c columns; bsr_spmm_t's K is the blocks of a
// block column (through the block index), each contributing its r rows; bsr_sddmm's N is the
// blocks (or slots) of a block row, each contributing its c columns. A thread block (8 warps)
// owns an MB x 128 tile of C (MB = 16, 32 or 64 rows of one block row / column, a band), walks
// K in 32-deep slices gathered into shared memory in 8-element (16-byte) chunks (r, c multiples
// of 16: a chunk never straddles two blocks), and multiplies them with 16x16x16 WMMA (fp32
// accumulators); warp w owns C's columns [16 w, 16 w + 16). The slice loop is tc_tile.cuh's.
// Summation orders are fixed (deterministic). Offsets, block columns, block ids and slots are
// clamped or bounds-checked, so a pattern changed behind the checks' back cannot make a kernel
// read or write out of bounds; entries beyond T, out or in read as zero.
#pragma once
#include <ATen/core/Tensor.h>

#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/csr_tile_index.h"
#include "cuda/common_cuda.h"
#include "cuda/tc_tile.cuh"

namespace seft::cuda {

// ------------------------------------------------------------------ host: check, index, path
// The BSR pattern's check through the structure cache (once per version of crow / col; the
// error path throws the CPU op's message) and its block index, built before the check's one
// sync: int32 [nbc + 1 + 2 * nblocks] =
//   cptr   [nbc + 1]  the blocks of block column k are cblk[cptr[k] .. cptr[k + 1])
//   cblk   [nblocks]  block ids ordered by block column, then block row (a stable sort of col)
//   brow   [nblocks]  the block row of every block
// r, c, out: the block shape and rows (for the error path's messages); nbc = ceil(in / c).
at::Tensor checked_bsr_index(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_c,
                             const at::Tensor& col_c, int64_t r, int64_t c, int64_t out, int64_t nbc);

// slots against nblocks, once per version (and the pattern again on a miss).
void checked_bsr_slots(const char* op, const at::Tensor& slots, const at::Tensor& slots_c, const at::Tensor& crow_c,
                       const at::Tensor& col_c, int64_t r, int64_t c, int64_t out, int64_t nbc);

// Tensor cores for bf16 / fp16 blocks whose sides are multiples of 16, from kTensorCoreMinTokens
// tokens (or when cuda_path forces them); every other call runs on CUDA cores.
inline bool bsr_tensor_cores(at::ScalarType dtype, int64_t r, int64_t c, int64_t tokens) {
  return r % 16 == 0 && c % 16 == 0 && use_tensor_cores(dtype, tokens);
}

// Fragments per warp (band height / 16) for a side of n (a multiple of 16): 4, 2 or 1.
inline int bsr_band_frags(int64_t n) { return n % 64 == 0 ? 4 : (n % 32 == 0 ? 2 : 1); }

// Calls f(integral_constant<RB>) for RB = bsr_band_frags(n).
template <typename F>
void with_band(int64_t n, F&& f) {
  switch (bsr_band_frags(n)) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

// Grid (units, tiles): units on x (up to 2^31 - 1), tiles on y, at most 65535: kernels loop over
// y by gridDim.y.
inline dim3 bsr_grid(int64_t units, int64_t tiles) {
  TORCH_CHECK(units < (int64_t(1) << 31), "seft: too many block rows / columns for one launch (", units, ")");
  return dim3(static_cast<unsigned>(units),
              static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(tiles, 1), 65535)));
}

// ------------------------------------------------------------------ device: gathered tiles
constexpr int kBsrN = 128;  // C's columns per thread block: 8 warps x 16
constexpr int kBsrK = 32;   // slice depth

// A ROWS x COLS tile in shared memory, row-major with leading dimension COLS + kPad, filled in
// 8-element chunks: fetch(chunk) stages chunk(row, col0) (8 values at (row, col0 .. col0 + 7))
// in registers, store() writes them.
template <typename T, int ROWS, int COLS>
struct GatherTile {
  static constexpr int kLd = COLS + kPad, kPerRow = COLS / 8, kChunks = ROWS * kPerRow;
  static constexpr int kPer = (kChunks + kThreads - 1) / kThreads;
  static_assert(COLS % 8 == 0, "8-element chunks");
  uint4 reg[kPer];

  template <typename Chunk>
  __device__ __forceinline__ void fetch(Chunk&& chunk) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int q = threadIdx.x + j * kThreads;
      if (q < kChunks) reg[j] = chunk(q / kPerRow, (q % kPerRow) * 8);
    }
  }
  __device__ __forceinline__ void store(T* s) const {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int q = threadIdx.x + j * kThreads;
      if (q < kChunks) *reinterpret_cast<uint4*>(s + (q / kPerRow) * kLd + (q % kPerRow) * 8) = reg[j];
    }
  }
};

// acc[i] += A(rows 16 i .. 16 i + 15, 32-deep slice) * B(slice, columns 16 warp .. 16 warp + 15).
// A(m, k) at a[m * lda + k] (row_major) or a[k * lda + m] (col_major); B(k, n) at b[k * ldb + n]
// (row_major) or b[n * ldb + k] (col_major).
template <typename T, int RB, typename LayA, typename LayB>
__device__ __forceinline__ void band_mma(FragC (&acc)[RB], const T* a, int lda, const T* b, int ldb) {
  constexpr bool a_row = std::is_same<LayA, wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LayB, wmma::row_major>::value;
  const int n = (threadIdx.x / 32) * 16;
#pragma unroll
  for (int kk = 0; kk < kBsrK; kk += 16) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayB> fb;
    wmma::load_matrix_sync(fb, b + (b_row ? kk * ldb + n : n * ldb + kk), ldb);
#pragma unroll
    for (int i = 0; i < RB; ++i) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayA> fa;
      wmma::load_matrix_sync(fa, a + (a_row ? i * 16 * lda + kk : kk * lda + i * 16), lda);
      wmma::mma_sync(acc[i], fa, fb, acc[i]);
    }
  }
}

template <int RB>
__device__ __forceinline__ void zero_band(FragC (&acc)[RB]) {
#pragma unroll
  for (int i = 0; i < RB; ++i) wmma::fill_fragment(acc[i], 0.f);
}

// Hands every entry of the warp's accumulators to emit(m, n, value) (m: row of the band, n:
// column of the 128-wide tile), through a 16 x 16 fp32 scratch per warp. m_fast: consecutive
// lanes take consecutive m (outputs contiguous along m), else consecutive n.
template <bool m_fast, int RB, typename Emit>
__device__ __forceinline__ void emit_band(FragC (&acc)[RB], float* scratch, Emit&& emit) {
  const int lane = threadIdx.x % 32, n0 = (threadIdx.x / 32) * 16;
#pragma unroll
  for (int i = 0; i < RB; ++i) {
    wmma::store_matrix_sync(scratch, acc[i], 16, m_fast ? wmma::mem_col_major : wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int a = e % 16, b = e / 16;  // e = b * 16 + a
      if (m_fast) emit(i * 16 + a, n0 + b, scratch[e]);
      else emit(i * 16 + b, n0 + a, scratch[e]);
    }
    __syncwarp();
  }
}

// First s in [lo, hi) with v[s] >= key (hi when none), v sorted.
template <typename V>
__device__ __forceinline__ int64_t lower_bound_dev(const V* v, int64_t lo, int64_t hi, int64_t key) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(v[mid]) < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

}  // namespace seft::cuda
