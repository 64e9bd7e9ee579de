// N:M sparsity of a CSR pattern: in every row, every group of M consecutive inputs holds
// exactly N non-zeros. The one check of it (the csr_check_nm op, SEFTLinear's N:M budget and
// csr_drop_grow_adapt_ use it). Failures raise c10::ValueError (Python ValueError).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace seft {

// 1 <= n <= m and m dividing in (messages start with `prefix`).
void check_nm_args(const char* prefix, int64_t in, int64_t n, int64_t m);

// crow / col: a checked CSR pattern (offsets, columns in [0, in)) on the CPU. Raises
// "<prefix>the base is not N:M: row R, group G has C non-zeros" for the first bad group.
void check_nm_pattern(const char* prefix, const at::Tensor& crow, const at::Tensor& col, int64_t in, int64_t n,
                      int64_t m);

}  // namespace seft
