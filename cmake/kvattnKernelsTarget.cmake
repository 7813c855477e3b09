# kvattn::kernels: kvattn with its kernel table compiled once, from `source` (src/kernels.cpp),
# rather than in every translation unit that runs attention (KVATTN_SEPARATE_KERNELS; 90-140 s each
# at -O3). The table's 6 parts (one per head dim) are objects of their own, so that a parallel
# build compiles them side by side. Built only when something links it. Called by kvattn's
# CMakeLists.txt and, for find_package, by the installed kvattnConfig.cmake (then in the consumer's
# build, with its flags). An optional second argument names a target whose usage requirements the
# parts also take (kvattn's own build: its warning flags).
function(kvattn_add_kernels_target source)
  add_library(kvattn_kernels STATIC EXCLUDE_FROM_ALL)
  add_library(kvattn::kernels ALIAS kvattn_kernels)
  target_link_libraries(kvattn_kernels PUBLIC kvattn::kvattn)
  target_compile_definitions(kvattn_kernels PUBLIC KVATTN_SEPARATE_KERNELS)
  set_target_properties(kvattn_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON LINKER_LANGUAGE CXX)
  foreach(part 0 1 2 3 4 5)  # KVATTN_KERNEL_TABLE_PARTS in include/kvattn/kernels/dispatch.hpp
    set(part_target kvattn_kernels_part${part})
    add_library(${part_target} OBJECT EXCLUDE_FROM_ALL ${source})
    target_link_libraries(${part_target} PRIVATE kvattn::kvattn ${ARGN})
    target_compile_definitions(${part_target} PRIVATE KVATTN_SEPARATE_KERNELS KVATTN_KERNELS_PART=${part})
    set_target_properties(${part_target} PROPERTIES POSITION_INDEPENDENT_CODE ON)  # shared libraries may link it
    target_sources(kvattn_kernels PRIVATE $<TARGET_OBJECTS:${part_target}>)
  endforeach()
endfunction()
