// Argument checks shared by every op and device. Messages name the op and the argument.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace seft {

// crow / col / values: dims, dtypes, lengths, devices. values may be undefined (sddmm).
// With check_offsets, also crow[0] == 0, non-decreasing, crow[out] == nnz (reads crow on the host).
void check_csr(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor* values,
               const at::Device& device, bool check_offsets);

// Dense operand: floating, on `device`, at least 1-D, last dim == size, dtype == dtype.
void check_dense(const char* op, const char* name, const at::Tensor& t, int64_t size, at::ScalarType dtype,
                 const at::Device& device);

// Column indices: sorted, unique within each row, in [0, in). Throws naming the first bad row.
void check_cols_cpu(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in);

// slots: int64, 1-D, strictly increasing, in [0, nnz).
void check_slots_cpu(const char* op, const at::Tensor& slots, int64_t nnz);

bool is_supported_value_dtype(at::ScalarType t);

// Every argument of one op, by its metadata (shapes, dtypes, devices); crow's offsets too
// with check_offsets (host memory only). Shared by the CPU and CUDA wrappers; the column
// indices and slot values are checked by each device's own code.
void check_spmm_args(const char* op, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                     const at::Tensor& values, const std::optional<at::Tensor>& bias, bool check_offsets);
void check_spmm_t_args(const char* op, const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                       const at::Tensor& values, int64_t in_features, bool check_offsets);
void check_sddmm_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                      const at::Tensor& col, const std::optional<at::Tensor>& slots, bool check_offsets);

void check_tile_ptr_args(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in_features,
                         int64_t tile, const at::Device& device);

// _csr_adopt_pattern: the host copies checked in full (offsets, columns against in_features),
// and matching crow / col in size and dtype.
void check_adopt_args(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in_features,
                      const at::Tensor& crow_host, const at::Tensor& col_host, const std::optional<at::Tensor>& slots,
                      const std::optional<at::Tensor>& slots_host);

// (..., n) -> (rows, n) contiguous; unlike reshape(-1, n) it also works for n == 0.
at::Tensor as_2d(const at::Tensor& t);
// sizes with the last entry replaced.
std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last);

}  // namespace seft
