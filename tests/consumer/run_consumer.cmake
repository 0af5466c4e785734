# Builds and runs tests/consumer against peft, either installed (find_package) or as a subdirectory.
file(REMOVE_RECURSE ${WORK_DIR})
if(MODE STREQUAL "find_package")
  # The library's component only: the `peft` tool (component peft_tool) is not part of the test build.
  execute_process(COMMAND ${CMAKE_COMMAND} --install ${PEFT_BUILD_DIR} --prefix ${WORK_DIR}/prefix
                          --component peft_library
                  RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "cmake --install failed (${rc})")
  endif()
  set(args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix -DPEFT_CONSUMER_MODE=find_package)
else()
  set(args -DPEFT_SOURCE_DIR=${PEFT_SOURCE_DIR} -DPEFT_CONSUMER_MODE=add_subdirectory)
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${PEFT_SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/build ${args}
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the consumer failed (${rc})")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/build RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the consumer failed (${rc})")
endif()
execute_process(COMMAND ${WORK_DIR}/build/consumer RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "the consumer failed (${rc})")
endif()
