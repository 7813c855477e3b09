# kvattn::kernels: kvattn with its kernel table compiled once, from `source` (src/kernels.cpp),
# rather than in every translation unit that runs attention (KVATTN_SEPARATE_KERNELS; 90-140 s each
# at -O3). Built only when something links it. Called by kvattn's CMakeLists.txt and, for
# find_package, by the installed kvattnConfig.cmake (then in the consumer's build, with its flags).
function(kvattn_add_kernels_target source)
  add_library(kvattn_kernels STATIC EXCLUDE_FROM_ALL ${source})
  add_library(kvattn::kernels ALIAS kvattn_kernels)
  target_link_libraries(kvattn_kernels PUBLIC kvattn::kvattn)
  target_compile_definitions(kvattn_kernels PUBLIC KVATTN_SEPARATE_KERNELS)
  set_target_properties(kvattn_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON)  # shared libraries may link it
endfunction()
