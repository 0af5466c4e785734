# Install rules, the CMake package and the pkg-config files. After `cmake --install`, consumers write
#   find_package(peft CONFIG REQUIRED [COMPONENTS io idx])
#   target_link_libraries(app PRIVATE peft::peft)   # or peft::io, peft::idx (PeftComponents.cmake)
# or `pkg-config --cflags peft` (peft-io, peft-idx). The `peft` tool (tools/) installs itself into
# the component peft_tool and adds peft::cli to the package.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(PEFT_INSTALL_CMAKEDIR ${CMAKE_INSTALL_DATADIR}/cmake/peft)

install(TARGETS peft EXPORT peftTargets COMPONENT peft_library)
install(TARGETS peft_io EXPORT peftIoTargets COMPONENT peft_library)
install(TARGETS peft_idx EXPORT peftIdxTargets COMPONENT peft_library)
install(DIRECTORY include/peft DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT peft_library)
foreach(_set IN ITEMS peftTargets peftIoTargets peftIdxTargets)
  install(EXPORT ${_set} NAMESPACE peft:: DESTINATION ${PEFT_INSTALL_CMAKEDIR} COMPONENT peft_library)
endforeach()

configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/peftConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/peftConfig.cmake
  INSTALL_DESTINATION ${PEFT_INSTALL_CMAKEDIR})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/peftConfigVersion.cmake
  COMPATIBILITY SameMajorVersion ARCH_INDEPENDENT)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/peftConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/peftConfigVersion.cmake
  DESTINATION ${PEFT_INSTALL_CMAKEDIR} COMPONENT peft_library)
install(FILES LICENSE README.md DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/peft COMPONENT peft_library)

# pkg-config: peft.pc (Requires: eigen3), peft-io.pc (+ nlohmann_json), peft-idx.pc (+ zlib), in
# <libdir>/pkgconfig. Relocatable: the prefix is found from the file's own place (${pcfiledir}), so
# `cmake --install --prefix <anywhere>` works. C++17 is the consumer's to ask for (-std=c++17).
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
  set(PEFT_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(PEFT_PC_LIBDIR "${CMAKE_INSTALL_LIBDIR}")
else()
  file(RELATIVE_PATH _up "/_prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/_prefix")
  string(REGEX REPLACE "/$" "" _up "${_up}")
  set(PEFT_PC_PREFIX "\${pcfiledir}/${_up}")
  set(PEFT_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
endif()
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(PEFT_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(PEFT_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
# OpenMP as peft::peft carries it (PeftComponents.cmake): the compiler's flag, for both steps.
set(PEFT_PC_OPENMP "")
if(PEFT_OPENMP_FOUND)
  string(REPLACE ";" " " PEFT_PC_OPENMP "${OpenMP_CXX_FLAGS}")
endif()
set(_pc_files)
foreach(_pc IN ITEMS peft peft-io peft-idx)
  if(_pc STREQUAL "peft")
    set(PEFT_PC_NAME "peft")
    set(PEFT_PC_DESCRIPTION "${PROJECT_DESCRIPTION}")
    set(PEFT_PC_REQUIRES "eigen3 >= 3.4")
    string(STRIP "-I\${includedir} ${PEFT_PC_OPENMP}" _cflags)
    set(PEFT_PC_FLAGS "Cflags: ${_cflags}")
    if(PEFT_PC_OPENMP)
      string(APPEND PEFT_PC_FLAGS "\nLibs: ${PEFT_PC_OPENMP}")
    endif()
  elseif(_pc STREQUAL "peft-io")
    set(PEFT_PC_NAME "peft-io")
    set(PEFT_PC_DESCRIPTION "peft's file formats (peft/io: safetensors, PEFT adapter directories)")
    set(PEFT_PC_REQUIRES "peft = ${PROJECT_VERSION}, nlohmann_json >= 3")
    set(PEFT_PC_FLAGS "")
  else()
    set(PEFT_PC_NAME "peft-idx")
    set(PEFT_PC_DESCRIPTION "peft's IDX dataset reader (peft/io/idx.hpp)")
    set(PEFT_PC_REQUIRES "peft = ${PROJECT_VERSION}, zlib")
    set(PEFT_PC_FLAGS "")
  endif()
  configure_file(${CMAKE_CURRENT_LIST_DIR}/peft.pc.in ${CMAKE_CURRENT_BINARY_DIR}/pkgconfig/${_pc}.pc @ONLY)
  list(APPEND _pc_files ${CMAKE_CURRENT_BINARY_DIR}/pkgconfig/${_pc}.pc)
endforeach()
install(FILES ${_pc_files} DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig COMPONENT peft_library)
