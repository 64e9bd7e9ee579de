// Argument checks shared by every op and device. Messages name the op and the argument.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace seft {

// crow / col / values: dims, dtypes, lengths, devices. values may be undefined (sddmm).
// With check_offsets, also crow[0] == 0, non-decreasing, crow[out] == nnz (reads crow on the host).
void check_csr(const char* op, const at::Tensor& crow, const at::Tensor& col,
               const at::Tensor* values, const at::Device& device, bool check_offsets);

// Dense operand: floating, on `device`, at least 1-D, last dim == size, dtype == dtype.
void check_dense(const char* op, const char* name, const at::Tensor& t, int64_t size,
                 at::ScalarType dtype, const at::Device& device);

// Column indices: sorted, unique within each row, in [0, in). Throws naming the first bad row.
void check_cols_cpu(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in);

// slots: int64, 1-D, strictly increasing, in [0, nnz).
void check_slots_cpu(const char* op, const at::Tensor& slots, int64_t nnz);

bool is_supported_value_dtype(at::ScalarType t);

}  // namespace seft
