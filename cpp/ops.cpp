// The one schema block of the `seft` operator namespace. Kernels register per device in
// cpp/cpu/*.cpp (TORCH_LIBRARY_IMPL(seft, CPU)) and cpp/cuda/*.cu (TORCH_LIBRARY_IMPL(seft, CUDA)).
//
// A CSR weight W of shape (out, in) is (crow, col, values):
//   crow   int32 [out + 1], crow[0] == 0, non-decreasing, crow[out] == nnz
//   col    int16 (in <= 32768) or int32 [nnz], sorted and unique within each row, in [0, in)
//   values float32 / float64 / bfloat16 / float16 [nnz]
#include <torch/library.h>

#include "cpu/isa.h"

TORCH_LIBRARY(seft, m) {
  // Y = X W^T (+ bias), X of shape (..., in) -> Y (..., out). in = x.size(-1).
  m.def("csr_spmm(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias=None) -> Tensor");
  // dX = dY W, dY of shape (..., out) -> dX (..., in_features). Deterministic.
  m.def("csr_spmm_t(Tensor grad_out, Tensor crow, Tensor col, Tensor values, int in_features) -> Tensor");
  // g[s] = sum_t dY[t, row(p)] * X[t, col(p)] with p = slots[s] (every non-zero when slots is
  // None). slots: int64, strictly increasing, in [0, nnz). Result in the accumulation dtype:
  // float64 for float64 inputs, float32 otherwise.
  m.def("csr_sddmm(Tensor grad_out, Tensor x, Tensor crow, Tensor col, Tensor? slots=None) -> Tensor");
  // Which CPU kernel set runs ("avx2" or "base"); pass "avx2", "base" or "auto" to choose.
  m.def("cpu_isa(str choose=\"\") -> str", &seft::cpu::cpu_isa);
}
