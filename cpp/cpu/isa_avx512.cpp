// CPU kernels for x86-64 with AVX-512 (F, VL, BW, DQ) + FMA + F16C: the same kernels on
// 64-byte vectors (compiled with those flags, chosen at run time).
#define SEFT_ISA avx512
#define SEFT_ISA_NAME "avx512"
#define SEFT_VEC_BYTES 64
#include "cpu/kernels.h"
