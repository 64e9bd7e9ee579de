#include "common/bsr_checks.h"

#include <c10/util/Exception.h>

#include <limits>

#include "common/checks.h"

namespace seft {

void check_bsr(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor* values, int64_t r,
               int64_t c, int64_t out, const at::Device& device, bool check_offsets) {
  TORCH_CHECK(r >= 1 && c >= 1, op, ": the block shape must be at least 1 x 1, got ", r, " x ", c);
  TORCH_CHECK(out >= 0, op, ": out_features must be >= 0, got ", out);
  TORCH_CHECK(crow.defined() && col.defined(), op, ": crow and col must be tensors");
  TORCH_CHECK(crow.dim() == 1, op, ": crow must be 1-D, got shape ", crow.sizes());
  TORCH_CHECK(crow.scalar_type() == at::kInt, op, ": crow must be int32, got ", crow.scalar_type());
  TORCH_CHECK(crow.numel() == ceil_div(out, r) + 1, op, ": crow must have ceil(out / r) + 1 = ", ceil_div(out, r) + 1,
              " entries (out = ", out, ", r = ", r, "), got ", crow.numel());
  TORCH_CHECK(col.dim() == 1, op, ": col must be 1-D, got shape ", col.sizes());
  TORCH_CHECK(col.scalar_type() == at::kShort || col.scalar_type() == at::kInt, op,
              ": col must be int16 or int32, got ", col.scalar_type());
  TORCH_CHECK(col.numel() < std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 2 blocks per weight, got ",
              col.numel());
  TORCH_CHECK(crow.device() == device, op, ": crow is on ", crow.device(), " but the input is on ", device);
  TORCH_CHECK(col.device() == device, op, ": col is on ", col.device(), " but the input is on ", device);
  if (values) {
    TORCH_CHECK(values->dim() == 3, op, ": values must be 3-D [nblocks, r, c], got shape ", values->sizes());
    TORCH_CHECK(values->size(0) == col.numel(), op, ": values has ", values->size(0), " blocks but col has ",
                col.numel());
    TORCH_CHECK(is_supported_value_dtype(values->scalar_type()), op,
                ": values must be float32, float64, bfloat16 or float16, got ", values->scalar_type());
    TORCH_CHECK(values->device() == device, op, ": values is on ", values->device(), " but the input is on ", device);
  }
  if (!check_offsets) return;
  const at::Tensor cr = crow.contiguous();
  const int32_t* p = cr.data_ptr<int32_t>();
  const int64_t nbr = cr.numel() - 1;
  TORCH_CHECK(p[0] == 0, op, ": crow[0] must be 0, got ", p[0]);
  TORCH_CHECK(p[nbr] == col.numel(), op, ": crow[-1] = ", p[nbr], " must equal the number of blocks ", col.numel());
  for (int64_t i = 0; i < nbr; ++i) {
    TORCH_CHECK(p[i] <= p[i + 1], op, ": crow must be non-decreasing, but crow[", i, "] = ", p[i], " > crow[", i + 1,
                "] = ", p[i + 1]);
  }
}

template <typename I>
static void check_bsr_cols_typed(const char* op, const int32_t* crow, const I* col, int64_t nbr, int64_t nbc) {
  for (int64_t b = 0; b < nbr; ++b) {
    int64_t prev = -1;
    for (int32_t p = crow[b]; p < crow[b + 1]; ++p) {
      const int64_t k = col[p];
      TORCH_CHECK(k >= 0 && k < nbc, op, ": col (block column) ", k, " in block row ", b, " is out of range [0, ", nbc,
                  ")");
      TORCH_CHECK(k > prev, op, ": block columns of block row ", b, " must be sorted and unique, but ", prev,
                  " is followed by ", k);
      prev = k;
    }
  }
}

void check_bsr_cols_cpu(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t nbc) {
  const int64_t nbr = crow.numel() - 1;
  if (col.scalar_type() == at::kShort) {
    check_bsr_cols_typed(op, crow.data_ptr<int32_t>(), col.data_ptr<int16_t>(), nbr, nbc);
  } else {
    check_bsr_cols_typed(op, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), nbr, nbc);
  }
}

void check_bsr_spmm_args(const char* op, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, int64_t out_features, const std::optional<at::Tensor>& bias,
                         bool check_offsets) {
  TORCH_CHECK(x.defined() && x.dim() >= 1, op, ": x must have at least 1 dimension");
  TORCH_CHECK(values.defined() && values.dim() == 3, op, ": values must be 3-D [nblocks, r, c], got shape ",
              values.defined() ? values.sizes() : at::IntArrayRef{});
  check_bsr(op, crow, col, &values, values.size(1), values.size(2), out_features, x.device(), check_offsets);
  check_dense(op, "x", x, x.size(-1), values.scalar_type(), values.device());
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1, op, ": bias must be 1-D of size out_features = ", out_features, ", got shape ",
                bias->sizes());
    check_dense(op, "bias", *bias, out_features, values.scalar_type(), values.device());
  }
}

void check_bsr_spmm_t_args(const char* op, const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features, bool check_offsets) {
  TORCH_CHECK(grad_out.defined() && grad_out.dim() >= 1, op, ": grad_out must have at least 1 dimension");
  TORCH_CHECK(values.defined() && values.dim() == 3, op, ": values must be 3-D [nblocks, r, c], got shape ",
              values.defined() ? values.sizes() : at::IntArrayRef{});
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  check_bsr(op, crow, col, &values, values.size(1), values.size(2), grad_out.size(-1), grad_out.device(),
            check_offsets);
  check_dense(op, "grad_out", grad_out, grad_out.size(-1), values.scalar_type(), values.device());
}

void check_bsr_sddmm_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                          const at::Tensor& col, int64_t r, int64_t c, const std::optional<at::Tensor>& slots,
                          bool check_offsets) {
  TORCH_CHECK(grad_out.defined() && grad_out.dim() >= 1, op, ": grad_out must have at least 1 dimension");
  TORCH_CHECK(x.defined() && x.dim() >= 1, op, ": x must have at least 1 dimension");
  TORCH_CHECK(is_supported_value_dtype(x.scalar_type()), op, ": x must be float32, float64, bfloat16 or float16, got ",
              x.scalar_type());
  check_bsr(op, crow, col, nullptr, r, c, grad_out.size(-1), x.device(), check_offsets);
  check_dense(op, "grad_out", grad_out, grad_out.size(-1), x.scalar_type(), x.device());
  TORCH_CHECK(
      grad_out.numel() / std::max<int64_t>(grad_out.size(-1), 1) == x.numel() / std::max<int64_t>(x.size(-1), 1) &&
          grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
      op, ": grad_out ", grad_out.sizes(), " and x ", x.sizes(), " must have the same leading dimensions");
  if (slots && slots->defined()) {
    TORCH_CHECK(slots->device() == x.device(), op, ": slots is on ", slots->device(), " but the input is on ",
                x.device());
    TORCH_CHECK(slots->dim() == 1, op, ": slots must be 1-D, got shape ", slots->sizes());
    TORCH_CHECK(slots->scalar_type() == at::kLong, op, ": slots must be int64, got ", slots->scalar_type());
  }
}

}  // namespace seft
