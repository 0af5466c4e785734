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

# Optional OpenMP (found in PeftComponents.cmake): peft_openmp carries the compute back-end settings
# (OpenMP, and BLAS below) into the examples, the tool and the benchmarks of this build.
add_library(peft_openmp INTERFACE)
if(PEFT_OPENMP_FOUND)
  target_link_libraries(peft_openmp INTERFACE OpenMP::OpenMP_CXX)
endif()

# Optional BLAS for Eigen's large products (EIGEN_USE_BLAS: GEMM and GEMV go to sgemm_/dgemm_).
# With Debian's OpenBLAS (libopenblas0-openmp + libblas-dev) the 512 x 1024 x 1024 GEMM runs about
# 25 % faster than Eigen's own kernel on the CPUs we measured, i.e. as fast as PyTorch's. Applied
# to every target of this build (the tests link peft_blas alone: one binary must not mix the two
# code paths, and the tests' EIGEN_RUNTIME_NO_MALLOC checks must not meet OpenMP's allocations);
# consumers enable it the same way in their own build (see README).
option(PEFT_USE_BLAS "Route Eigen's matrix products to the system BLAS (EIGEN_USE_BLAS)" OFF)
add_library(peft_blas INTERFACE)
if(PEFT_USE_BLAS)
  find_package(BLAS REQUIRED)
  target_compile_definitions(peft_blas INTERFACE EIGEN_USE_BLAS)
  target_link_libraries(peft_blas INTERFACE BLAS::BLAS)
endif()
target_link_libraries(peft_openmp INTERFACE peft_blas)

# Optimisation of what ctest runs, in Release (tests/CMakeLists.txt says why): -Og for the test
# TUs, the instantiations, the tool's commands and the examples' test copies (the studies too: at
# -O1 their copies cost 12 CPU-s more to compile and run finetune_study's --quick 3 s faster). The
# examples' and the tool's -O3 builds are what users run; ctest runs these copies of them (a test
# build compiles no -O3 target).
set(PEFT_TEST_OG $<$<CONFIG:Release>:-Og>)
