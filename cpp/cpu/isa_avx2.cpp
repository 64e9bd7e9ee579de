// CPU kernels for x86-64 with AVX2 + FMA + F16C (compiled with those flags, chosen at run time).
#define SEFT_ISA avx2
#define SEFT_ISA_NAME "avx2"
#include "cpu/kernels.h"
