# Settings for peft's own tests, benchmarks and examples (never imposed on consumers).

option(PEFT_SANITIZE "Set by the asan preset; skips tests that are pointless under sanitizers" OFF)

# Warnings as errors, only on our own translation units.
add_library(peft_warnings INTERFACE)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(peft_warnings INTERFACE -Wall -Wextra -Wpedantic -Werror)
endif()
if(PEFT_SANITIZE AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  # GCC 12 with -fsanitize reports false maybe-uninitialized warnings inside <regex> (which Catch2 includes) and Eigen.
  target_compile_options(peft_warnings INTERFACE -Wno-maybe-uninitialized)
endif()

# Optional OpenMP: Eigen's GEMM parallelizes over it (thread count from OMP_NUM_THREADS or
# Eigen::setNbThreads). The core itself starts no threads.
add_library(peft_openmp INTERFACE)
if(PEFT_USE_OPENMP)
  find_package(OpenMP QUIET)
  if(OpenMP_CXX_FOUND)
    target_link_libraries(peft_openmp INTERFACE OpenMP::OpenMP_CXX)
  endif()
endif()
