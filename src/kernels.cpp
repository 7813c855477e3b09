// kvattn::kernels: the one translation unit that compiles the kernel table, for programs built
// with KVATTN_SEPARATE_KERNELS (see simd_table_kernel in include/kvattn/kernels/dispatch.hpp).
#define KVATTN_DEFINE_KERNELS
#include "kvattn/kernels/dispatch.hpp"
#if !defined(KVATTN_KERNELS_DEFINED)
#error "kvattn's headers were included before KVATTN_DEFINE_KERNELS: the kernel table was not compiled"
#endif
