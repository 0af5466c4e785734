# What consumers link besides peft::peft, and the compute back-end peft::peft passes on.
#   peft::peft  the headers + Eigen3::Eigen (+ OpenMP::OpenMP_CXX when built with PEFT_USE_OPENMP
#               and OpenMP was found)
#   peft::io    peft::peft + nlohmann_json::nlohmann_json: everything under peft/io/ (safetensors,
#               PEFT adapter directories, checkpoints, merge/combine of files) and the headers that
#               include it (models/peft_config.hpp, quant/bnb_format.hpp), except the IDX reader
#   peft::idx   peft::peft + ZLIB::ZLIB: peft/io/idx.hpp, the MNIST-family dataset reader (gzread);
#               kept apart so that reading adapters never needs zlib
# The same names exist in the build tree (add_subdirectory) and in the installed package
# (find_package(peft COMPONENTS io idx), see peftConfig.cmake.in).

# OpenMP: Eigen's GEMM parallelizes over it (thread count from OMP_NUM_THREADS or
# Eigen::setNbThreads); the core itself starts no threads.
set(PEFT_OPENMP_FOUND OFF)
if(PEFT_USE_OPENMP)
  find_package(OpenMP QUIET)
  if(OpenMP_CXX_FOUND)
    set(PEFT_OPENMP_FOUND ON)
    if(PROJECT_IS_TOP_LEVEL)
      # Our own build keeps peft::peft free of OpenMP: the test binaries' EIGEN_RUNTIME_NO_MALLOC
      # checks must not meet OpenMP's allocations, and each of our targets opts in through
      # peft_openmp (PeftDevelopment.cmake). The installed package passes it on.
      target_link_libraries(peft INTERFACE $<INSTALL_INTERFACE:OpenMP::OpenMP_CXX>)
    else()
      target_link_libraries(peft INTERFACE OpenMP::OpenMP_CXX)
    endif()
  endif()
endif()

# Found here so that the build tree's peft::io / peft::idx resolve; when one is missing, the target
# still exists (its headers are installed) and linking it names the missing dependency.
find_package(nlohmann_json 3 QUIET)
find_package(ZLIB QUIET)

add_library(peft_io INTERFACE)
add_library(peft::io ALIAS peft_io)
set_target_properties(peft_io PROPERTIES EXPORT_NAME io)
target_link_libraries(peft_io INTERFACE peft nlohmann_json::nlohmann_json)

add_library(peft_idx INTERFACE)
add_library(peft::idx ALIAS peft_idx)
set_target_properties(peft_idx PROPERTIES EXPORT_NAME idx)
target_link_libraries(peft_idx INTERFACE peft ZLIB::ZLIB)
