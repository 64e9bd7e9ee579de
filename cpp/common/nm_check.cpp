// csr_check_nm(crow, col, in_features, n, m): raises ValueError unless the pattern is N:M. One
// implementation for every device: a CUDA pattern is checked on host copies.
#include "common/nm_check.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"

namespace seft {

void check_nm_args(const char* prefix, int64_t in, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(1 <= n && n <= m, prefix, "N:M = ", n, ":", m, " needs 1 <= N <= M");
  TORCH_CHECK_VALUE(in % m == 0, prefix, "N:M = ", n, ":", m, " needs M dividing in_features = ", in);
}

namespace {

template <typename I>
void check_nm_typed(const char* prefix, const int32_t* crow, const I* col, int64_t out, int64_t in, int64_t n,
                    int64_t m) {
  std::vector<int64_t> cnt(in / m);
  for (int64_t o = 0; o < out; ++o) {
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int64_t q = crow[o]; q < crow[o + 1]; ++q) ++cnt[int64_t(col[q]) / m];
    for (size_t g = 0; g < cnt.size(); ++g)
      TORCH_CHECK_VALUE(cnt[g] == n, prefix, "the base is not ", n, ":", m, ": row ", o, ", group ", g, " has ", cnt[g],
                        " non-zeros");
  }
}

}  // namespace

void check_nm_pattern(const char* prefix, const at::Tensor& crow, const at::Tensor& col, int64_t in, int64_t n,
                      int64_t m) {
  check_nm_args(prefix, in, n, m);
  const at::Tensor r = crow.contiguous(), c = col.contiguous();
  const int64_t out = r.numel() - 1;
  if (c.scalar_type() == at::kShort) {
    check_nm_typed(prefix, r.data_ptr<int32_t>(), c.data_ptr<int16_t>(), out, in, n, m);
  } else {
    check_nm_typed(prefix, r.data_ptr<int32_t>(), c.data_ptr<int32_t>(), out, in, n, m);
  }
}

namespace {

void csr_check_nm(const at::Tensor& crow, const at::Tensor& col, int64_t in_features, int64_t n, int64_t m) {
  const char* op = "csr_check_nm";
  check_csr(op, crow, col, nullptr, crow.device(), /*check_offsets=*/false);
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  check_nm_args("", in_features, n, m);
  const at::Tensor crow_h = crow.cpu().contiguous(), col_h = col.cpu().contiguous();
  check_csr(op, crow_h, col_h, nullptr, crow_h.device(), /*check_offsets=*/true);
  check_cols_cpu(op, crow_h, col_h, in_features);
  check_nm_pattern("", crow_h, col_h, in_features, n, m);
}

}  // namespace

TORCH_LIBRARY_IMPL(seft, CPU, m) { m.impl("csr_check_nm", &csr_check_nm); }
#if defined(SEFT_WITH_CUDA)
TORCH_LIBRARY_IMPL(seft, CUDA, m) { m.impl("csr_check_nm", &csr_check_nm); }
#endif

}  // namespace seft
