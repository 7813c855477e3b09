// kvattn::kernels: the one translation unit that compiles the kernel table, for programs built
// with KVATTN_SEPARATE_KERNELS (see simd_table_kernel in include/kvattn/kernels/dispatch.hpp).
#define KVATTN_DEFINE_KERNELS
#include "kvattn/kernels/dispatch.hpp"
