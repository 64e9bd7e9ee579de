// csr_tile_ptr on the CPU: the column-tile index from the same index math the CUDA kernels use
// (common/csr_tile_index.h), so CPU tests check that math against a reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/csr_tile_index.h"

namespace seft::cpu {
namespace {

template <typename I>
void fill(const int32_t* crow, const I* col, int32_t* tp, int64_t out, int64_t width, int64_t tile) {
  at::parallel_for(0, out, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; ++o)
      for (int64_t j = 0; j < width; ++j) tp[o * width + j] = tile_ptr_entry(crow, col, o, j, tile);
  });
}

at::Tensor csr_tile_ptr_cpu(const at::Tensor& crow, const at::Tensor& col, int64_t in_features, int64_t tile) {
  const char* op = "csr_tile_ptr";
  check_tile_ptr_args(op, crow, col, in_features, tile, crow.device());
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  check_cols_cpu(op, crow_c, col_c, in_features);
  const int64_t out = crow_c.numel() - 1, width = tile_ptr_width(in_features, tile);
  at::Tensor tp = at::empty({out, width}, crow_c.options());
  if (col_c.scalar_type() == at::kShort) {
    fill(crow_c.data_ptr<int32_t>(), col_c.data_ptr<int16_t>(), tp.data_ptr<int32_t>(), out, width, tile);
  } else {
    fill(crow_c.data_ptr<int32_t>(), col_c.data_ptr<int32_t>(), tp.data_ptr<int32_t>(), out, width, tile);
  }
  return tp;
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("csr_tile_ptr", &csr_tile_ptr_cpu); }

}  // namespace seft::cpu
