// Portable CPU kernels (whatever the compiler targets by default).
#define SEFT_ISA base
#define SEFT_ISA_NAME "base"
#include "cpu/kernels.h"
