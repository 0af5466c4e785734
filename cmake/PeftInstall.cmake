# Install rules and the CMake package: after `cmake --install`, consumers write
#   find_package(peft CONFIG REQUIRED)  +  target_link_libraries(app PRIVATE peft::peft)
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS peft EXPORT peftTargets COMPONENT peft_library)
install(DIRECTORY include/peft DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT peft_library)
install(EXPORT peftTargets NAMESPACE peft:: DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/peft COMPONENT peft_library)

configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/peftConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/peftConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/peft)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/peftConfigVersion.cmake
  COMPATIBILITY SameMajorVersion ARCH_INDEPENDENT)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/peftConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/peftConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/peft COMPONENT peft_library)
install(FILES LICENSE README.md DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/peft COMPONENT peft_library)
