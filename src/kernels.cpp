// kvattn::kernels: the kernel table compiled once, for programs built with KVATTN_SEPARATE_KERNELS
// (include/kvattn/kernels/dispatch.hpp then declares its parts, so no other file compiles them).
// CMake compiles this file once per part (one head dim each), KVATTN_KERNELS_PART naming it, so
// that a parallel build shares the table out; without it the file compiles every part.
#include "kvattn/kernels/dispatch.hpp"

#define KVATTN_DEFINE_TABLE_PART(part) \
  template kvattn::kernels::detail::TileFn kvattn::kernels::detail::table_part<part>(kvattn::kv_dtype, kvattn::isa, bool, int);
#if defined(KVATTN_KERNELS_PART)
KVATTN_DEFINE_TABLE_PART(KVATTN_KERNELS_PART)
#else
KVATTN_KERNEL_TABLE_PARTS(KVATTN_DEFINE_TABLE_PART)
#endif
