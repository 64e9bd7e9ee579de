// Argument checks of the BSR ops (bsr_spmm, bsr_spmm_t, bsr_sddmm). Messages name the op and
// the argument. A BSR weight W of shape (out, in) in blocks of r x c is (crow, col, values):
//   crow   int32 [ceil(out / r) + 1], crow[0] == 0, non-decreasing, crow[-1] == nblocks
//   col    int16 or int32 [nblocks], block columns sorted and unique per block row, in [0, ceil(in / c))
//   values float32 / float64 / bfloat16 / float16 [nblocks, r, c]
// Rows / columns of the last block row / column beyond out / in are padding.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace seft {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// crow / col (and values when given) against the block shape and out: dims, dtypes, lengths,
// devices; with check_offsets the offsets too (host memory).
void check_bsr(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor* values, int64_t r,
               int64_t c, int64_t out, const at::Device& device, bool check_offsets);

// Block columns: in [0, nbc), sorted and unique within each block row. Throws naming the first bad block row.
void check_bsr_cols_cpu(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t nbc);

void check_bsr_spmm_args(const char* op, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, int64_t out_features, const std::optional<at::Tensor>& bias,
                         bool check_offsets);
void check_bsr_spmm_t_args(const char* op, const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features, bool check_offsets);
void check_bsr_sddmm_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                          const at::Tensor& col, int64_t r, int64_t c, const std::optional<at::Tensor>& slots,
                          bool check_offsets);

}  // namespace seft
