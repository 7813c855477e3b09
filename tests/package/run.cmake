# ctest script: install kvattn into WORK_DIR/prefix, then configure, build and run the consumer
# project in this folder against that prefix only (MODE find_package), or with kvattn's source
# tree as its subdirectory (MODE add_subdirectory). Debug: this checks the package, not speed, and
# -O0 compiles the kernels in a quarter of -O3's time.
file(REMOVE_RECURSE ${WORK_DIR})
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}")
  endif()
endfunction()
if(MODE STREQUAL "add_subdirectory")
  run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR}/consumer -B ${WORK_DIR}/consumer-build -G ${GENERATOR}
      -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Debug -DKVATTN_SOURCE=${SOURCE_DIR})
else()
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/kvattn-build -G ${GENERATOR}
      -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix
      -DKVATTN_BUILD_TESTS=OFF -DKVATTN_BUILD_BENCH=OFF -DKVATTN_BUILD_EXAMPLES=OFF)
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/kvattn-build)
  run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR}/consumer -B ${WORK_DIR}/consumer-build -G ${GENERATOR}
      -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Debug -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
endif()
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer-build --parallel 2)
run(${WORK_DIR}/consumer-build/consumer)
run(${WORK_DIR}/consumer-build/consumer_separate)
