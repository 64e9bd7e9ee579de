#include "common/checks.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <limits>

namespace seft {

bool is_supported_value_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_csr(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor* values,
               const at::Device& device, bool check_offsets) {
  TORCH_CHECK(crow.defined() && col.defined(), op, ": crow and col must be tensors");
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1, op, ": crow must be 1-D with out + 1 >= 1 entries, got shape ",
              crow.sizes());
  TORCH_CHECK(crow.scalar_type() == at::kInt, op, ": crow must be int32, got ", crow.scalar_type());
  TORCH_CHECK(col.dim() == 1, op, ": col must be 1-D, got shape ", col.sizes());
  TORCH_CHECK(col.scalar_type() == at::kShort || col.scalar_type() == at::kInt, op,
              ": col must be int16 or int32, got ", col.scalar_type());
  TORCH_CHECK(col.numel() < std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 2 non-zeros per weight, got ",
              col.numel());
  TORCH_CHECK(crow.device() == device, op, ": crow is on ", crow.device(), " but the input is on ", device);
  TORCH_CHECK(col.device() == device, op, ": col is on ", col.device(), " but the input is on ", device);
  if (values) {
    TORCH_CHECK(values->dim() == 1, op, ": values must be 1-D, got shape ", values->sizes());
    TORCH_CHECK(values->numel() == col.numel(), op, ": values has ", values->numel(), " entries but col has ",
                col.numel());
    TORCH_CHECK(is_supported_value_dtype(values->scalar_type()), op,
                ": values must be float32, float64, bfloat16 or float16, got ", values->scalar_type());
    TORCH_CHECK(values->device() == device, op, ": values is on ", values->device(), " but the input is on ", device);
  }
  if (!check_offsets) return;
  const at::Tensor c = crow.contiguous();
  const int32_t* r = c.data_ptr<int32_t>();
  const int64_t out = c.numel() - 1;
  TORCH_CHECK(r[0] == 0, op, ": crow[0] must be 0, got ", r[0]);
  TORCH_CHECK(r[out] == col.numel(), op, ": crow[-1] = ", r[out], " must equal nnz = ", col.numel());
  for (int64_t i = 0; i < out; ++i) {
    TORCH_CHECK(r[i] <= r[i + 1], op, ": crow must be non-decreasing, but crow[", i, "] = ", r[i], " > crow[", i + 1,
                "] = ", r[i + 1]);
  }
}

void check_dense(const char* op, const char* name, const at::Tensor& t, int64_t size, at::ScalarType dtype,
                 const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least 1 dimension");
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the weight is on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
              " but the weight values have dtype ", dtype);
  TORCH_CHECK(t.size(-1) == size, op, ": ", name, " must have last dimension ", size, ", got shape ", t.sizes());
}

template <typename I>
static void check_cols_typed(const char* op, const int32_t* crow, const I* col, int64_t out, int64_t in) {
  std::atomic<int64_t> first_bad{out};
  at::parallel_for(0, out, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; ++o) {
      int64_t prev = -1;
      bool bad = false;
      for (int32_t p = crow[o]; p < crow[o + 1]; ++p) {
        const int64_t c = col[p];
        bad |= (c <= prev) | (c >= in);
        prev = c;
      }
      if (bad) {
        int64_t cur = first_bad.load();
        while (o < cur && !first_bad.compare_exchange_weak(cur, o)) {}
        return;
      }
    }
  });
  const int64_t o = first_bad.load();
  if (o == out) return;
  int64_t prev = -1;
  for (int32_t p = crow[o]; p < crow[o + 1]; ++p) {
    const int64_t c = col[p];
    TORCH_CHECK(c >= 0 && c < in, op, ": col index ", c, " in row ", o, " is out of range [0, ", in, ")");
    TORCH_CHECK(c > prev, op, ": col indices of row ", o, " must be sorted and unique, but ", prev, " is followed by ",
                c);
    prev = c;
  }
}

void check_cols_cpu(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in) {
  const int64_t out = crow.numel() - 1;
  if (col.scalar_type() == at::kShort) {
    check_cols_typed(op, crow.data_ptr<int32_t>(), col.data_ptr<int16_t>(), out, in);
  } else {
    check_cols_typed(op, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), out, in);
  }
}

void check_slots_cpu(const char* op, const at::Tensor& slots, int64_t nnz) {
  TORCH_CHECK(slots.dim() == 1, op, ": slots must be 1-D, got shape ", slots.sizes());
  TORCH_CHECK(slots.scalar_type() == at::kLong, op, ": slots must be int64, got ", slots.scalar_type());
  const int64_t* s = slots.data_ptr<int64_t>();
  int64_t prev = -1;
  for (int64_t i = 0; i < slots.numel(); ++i) {
    TORCH_CHECK(s[i] >= 0 && s[i] < nnz, op, ": slots[", i, "] = ", s[i], " is out of range [0, ", nnz, ")");
    TORCH_CHECK(s[i] > prev, op, ": slots must be strictly increasing, but slots[", i, "] = ", s[i], " follows ", prev);
    prev = s[i];
  }
}

void check_spmm_args(const char* op, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                     const at::Tensor& values, const std::optional<at::Tensor>& bias, bool check_offsets) {
  TORCH_CHECK(x.defined() && x.dim() >= 1, op, ": x must have at least 1 dimension");
  check_csr(op, crow, col, &values, x.device(), check_offsets);
  check_dense(op, "x", x, x.size(-1), values.scalar_type(), values.device());
  if (bias && bias->defined()) {
    const int64_t out = crow.numel() - 1;
    TORCH_CHECK(bias->dim() == 1, op, ": bias must be 1-D of size out = ", out, ", got shape ", bias->sizes());
    check_dense(op, "bias", *bias, out, values.scalar_type(), values.device());
  }
}

void check_spmm_t_args(const char* op, const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
                       const at::Tensor& values, int64_t in_features, bool check_offsets) {
  TORCH_CHECK(grad_out.defined(), op, ": grad_out must be a tensor");
  check_csr(op, crow, col, &values, grad_out.device(), check_offsets);
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  check_dense(op, "grad_out", grad_out, crow.numel() - 1, values.scalar_type(), values.device());
}

void check_tile_ptr_args(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in_features,
                         int64_t tile, const at::Device& device) {
  check_csr(op, crow, col, nullptr, device, device.is_cpu());
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  TORCH_CHECK(tile >= 1 && tile <= (int64_t(1) << 30), op, ": tile must be in [1, 2^30], got ", tile);
}

void check_adopt_args(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t in_features,
                      const at::Tensor& crow_host, const at::Tensor& col_host, const std::optional<at::Tensor>& slots,
                      const std::optional<at::Tensor>& slots_host) {
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  TORCH_CHECK(crow_host.defined() && col_host.defined() && crow_host.device().is_cpu() && col_host.device().is_cpu(),
              op, ": crow_host and col_host must be CPU tensors");
  check_csr(op, crow_host, col_host, nullptr, crow_host.device(), /*check_offsets=*/true);
  check_cols_cpu(op, crow_host.contiguous(), col_host.contiguous(), in_features);
  check_csr(op, crow, col, nullptr, crow.device(), /*check_offsets=*/crow.device().is_cpu());
  TORCH_CHECK(crow.numel() == crow_host.numel() && col.numel() == col_host.numel() &&
                  col.scalar_type() == col_host.scalar_type(),
              op, ": crow_host / col_host must match crow / col in size and dtype, got ", crow_host.sizes(), " / ",
              col_host.sizes(), " ", col_host.scalar_type(), " for ", crow.sizes(), " / ", col.sizes(), " ",
              col.scalar_type());
  const bool has_slots = slots && slots->defined(), has_host = slots_host && slots_host->defined();
  TORCH_CHECK(has_slots == has_host, op, ": give both slots and slots_host, or neither");
  if (!has_slots) return;
  TORCH_CHECK(slots_host->device().is_cpu(), op, ": slots_host must be a CPU tensor");
  check_slots_cpu(op, slots_host->contiguous(), col_host.numel());
  TORCH_CHECK(slots->dim() == 1 && slots->scalar_type() == at::kLong && slots->numel() == slots_host->numel() &&
                  slots->device() == crow.device(),
              op, ": slots must be int64 [", slots_host->numel(), "] on ", crow.device(), ", like slots_host");
}

void check_sddmm_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                      const at::Tensor& col, const std::optional<at::Tensor>& slots, bool check_offsets) {
  TORCH_CHECK(x.defined() && x.dim() >= 1, op, ": x must have at least 1 dimension");
  check_csr(op, crow, col, nullptr, x.device(), check_offsets);
  TORCH_CHECK(is_supported_value_dtype(x.scalar_type()), op, ": x must be float32, float64, bfloat16 or float16, got ",
              x.scalar_type());
  check_dense(op, "grad_out", grad_out, crow.numel() - 1, x.scalar_type(), x.device());
  TORCH_CHECK(grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1), op, ": grad_out ",
              grad_out.sizes(), " and x ", x.sizes(), " must have the same leading dimensions");
  if (slots && slots->defined()) {
    TORCH_CHECK(slots->device() == x.device(), op, ": slots is on ", slots->device(), " but x is on ", x.device());
    TORCH_CHECK(slots->dim() == 1, op, ": slots must be 1-D, got shape ", slots->sizes());
    TORCH_CHECK(slots->scalar_type() == at::kLong, op, ": slots must be int64, got ", slots->scalar_type());
  }
}

at::Tensor as_2d(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, t.size(-1)}).contiguous();
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> s(sizes.begin(), sizes.end());
  s.back() = last;
  return s;
}

}  // namespace seft
