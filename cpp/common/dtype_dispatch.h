// Calls f(value-type tag, index-type tag) for the supported value dtypes (float, double,
// BFloat16, Half) and column-index dtypes (int16, int32); each tag's ::type is the C++ type.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace seft {

template <typename F>
void dispatch_types(at::ScalarType v, at::ScalarType idx, F&& f) {
  auto with_index = [&](auto vtag) {
    if (idx == at::kShort) f(vtag, std::common_type<int16_t>{});
    else f(vtag, std::common_type<int32_t>{});
  };
  switch (v) {
    case at::kFloat: with_index(std::common_type<float>{}); break;
    case at::kDouble: with_index(std::common_type<double>{}); break;
    case at::kBFloat16: with_index(std::common_type<c10::BFloat16>{}); break;
    case at::kHalf: with_index(std::common_type<c10::Half>{}); break;
    default: TORCH_CHECK(false, "seft: unsupported value dtype ", v);
  }
}

}  // namespace seft
