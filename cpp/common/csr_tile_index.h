// The column-tile index of a CSR pattern, shared by the CPU and CUDA code: for row o and
// column tile j (columns [j * tile, (j + 1) * tile)), tile_ptr[o][j] is the first non-zero
// p of row o with col[p] >= j * tile, for j = 0 .. ceil(in / tile); so row o's non-zeros in
// tile j are [tile_ptr[o][j], tile_ptr[o][j + 1]) and the last column is crow[o + 1].
// The CUDA kernels that walk W by column tiles (csr_spmm_t, csr_sddmm) use it instead of a
// transposed copy of W: out * (ceil(in / tile) + 1) int32, i.e. 4 / tile bytes per weight
// entry (0.03 bytes at tile 128, against 4 bytes per non-zero for bf16 values + int16 col).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SEFT_HD __host__ __device__ __forceinline__
#else
#define SEFT_HD inline
#endif

namespace seft {

constexpr int64_t kColTile = 128;  // the tile width every CUDA kernel uses

// First p in [lo, hi) with col[p] >= c (hi when none), for sorted col[lo, hi).
template <typename I>
SEFT_HD int32_t lower_bound_col(const I* col, int32_t lo, int32_t hi, int64_t c) {
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(col[mid]) < c) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// An offset read from crow or the tile index, forced into [lo, nnz] (kernels stay in bounds
// even on a pattern changed behind the checks' back).
SEFT_HD int64_t clamp_offset(int64_t v, int64_t lo, int64_t nnz) { return v < lo ? lo : (v > nnz ? nnz : v); }

// Number of tile boundaries per row: ceil(in / tile) + 1.
SEFT_HD int64_t tile_ptr_width(int64_t in, int64_t tile) { return (in + tile - 1) / tile + 1; }

// tile_ptr[o * width + j] for one (o, j).
template <typename I>
SEFT_HD int32_t tile_ptr_entry(const int32_t* crow, const I* col, int64_t o, int64_t j, int64_t tile) {
  return lower_bound_col(col, crow[o], crow[o + 1], j * tile);
}

}  // namespace seft
