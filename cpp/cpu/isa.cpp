// The CPU kernel set in use: chosen at load time (the best this CPU runs, or SEFT_CPU_ISA=base),
// switched by the cpu_isa op; the op wrappers (csr_*_cpu.cpp) call through active_isa().
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>

namespace seft::cpu {

namespace {

bool cpu_has_avx2() {
#if defined(SEFT_HAVE_AVX2) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(SEFT_HAVE_AVX512) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

const IsaKernels* best_isa() {
#if defined(SEFT_HAVE_AVX512)
  if (cpu_has_avx512()) return &avx512::kernels;
#endif
#if defined(SEFT_HAVE_AVX2)
  if (cpu_has_avx2()) return &avx2::kernels;
#endif
  return &base::kernels;
}

const IsaKernels* initial_isa() {
  const char* env = std::getenv("SEFT_CPU_ISA");
  if (env && std::string(env) == "base") return &base::kernels;
  return best_isa();
}

std::atomic<const IsaKernels*>& isa_slot() {
  static std::atomic<const IsaKernels*> slot{initial_isa()};
  return slot;
}

}  // namespace

const IsaKernels& active_isa() { return *isa_slot().load(); }

std::string cpu_isa(std::string choose) {
  if (choose == "base") {
    isa_slot().store(&base::kernels);
  } else if (choose == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "cpu_isa: this build or this CPU has no AVX2 + FMA + F16C kernels");
#if defined(SEFT_HAVE_AVX2)
    isa_slot().store(&avx2::kernels);
#endif
  } else if (choose == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "cpu_isa: this build or this CPU has no AVX-512 (F, VL, BW, DQ) + FMA + F16C kernels");
#if defined(SEFT_HAVE_AVX512)
    isa_slot().store(&avx512::kernels);
#endif
  } else if (choose == "auto") {
    isa_slot().store(best_isa());
  } else {
    TORCH_CHECK(choose.empty(), "cpu_isa: expected '', 'auto', 'base', 'avx2' or 'avx512', got '", choose, "'");
  }
  return active_isa().name;
}

}  // namespace seft::cpu
