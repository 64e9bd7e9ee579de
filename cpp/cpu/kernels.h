// The CPU kernel table of one instruction set: isa_<name>.cpp defines SEFT_ISA (the
// namespace) and SEFT_ISA_NAME and includes this file with its own -m flags.
#pragma once
#include "common/dtype_dispatch.h"
#include "cpu/bsr_sddmm_kernel.h"
#include "cpu/bsr_spmm_kernel.h"
#include "cpu/bsr_spmm_t_kernel.h"
#include "cpu/csr_sddmm_kernel.h"
#include "cpu/csr_spmm_kernel.h"
#include "cpu/csr_spmm_t_kernel.h"

namespace seft::cpu::SEFT_ISA {
namespace {

// ---------------------------------------------------------------- entry points (dtype dispatch)
at::Tensor spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                const std::optional<at::Tensor>& bias) {
  at::Tensor y;
  dispatch_types(values.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    y = spmm_typed<typename Acc<V>::type, V, I>(x, crow, col, values, bias);
  });
  return y;
}

at::Tensor spmm_t(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                  int64_t in) {
  at::Tensor dx;
  dispatch_types(values.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    dx = spmm_t_typed<typename Acc<V>::type, V, I>(dy, crow, col, values, in);
  });
  return dx;
}

at::Tensor sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                 const at::Tensor& slots) {
  at::Tensor g;
  dispatch_types(x.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    g = sddmm_typed<typename Acc<V>::type, V, I>(dy, x, crow, col, slots);
  });
  return g;
}

at::Tensor bsr_spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                    int64_t out, const std::optional<at::Tensor>& bias) {
  at::Tensor y;
  dispatch_types(values.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    y = bsr_spmm_typed<typename Acc<V>::type, V, I>(x, crow, col, values, out, bias);
  });
  return y;
}

at::Tensor bsr_spmm_t(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      int64_t in) {
  at::Tensor dx;
  dispatch_types(values.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    dx = bsr_spmm_t_typed<typename Acc<V>::type, V, I>(dy, crow, col, values, in);
  });
  return dx;
}

at::Tensor bsr_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                     int64_t r, int64_t c, const at::Tensor& slots) {
  at::Tensor g;
  dispatch_types(x.scalar_type(), col.scalar_type(), [&](auto vt, auto it) {
    using V = typename decltype(vt)::type;
    using I = typename decltype(it)::type;
    g = bsr_sddmm_typed<typename Acc<V>::type, V, I>(dy, x, crow, col, r, c, slots);
  });
  return g;
}

}  // namespace

const IsaKernels kernels{SEFT_ISA_NAME, &spmm, &spmm_t, &sddmm, &bsr_spmm, &bsr_spmm_t, &bsr_sddmm};

}  // namespace seft::cpu::SEFT_ISA
