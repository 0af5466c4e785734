# API reference from the headers' comments: `cmake --build <dir> --target peft_docs` writes
# <dir>/docs/html/index.html. Doxygen comes from Debian (`scripts/bootstrap.sh --docs`); without it
# the target is not defined and nothing else changes. Not part of `all`, the tests or CI.
find_package(Doxygen QUIET)
if(NOT DOXYGEN_FOUND)
  return()
endif()

set(DOXYGEN_PROJECT_NAME "peft-cpp")
set(DOXYGEN_PROJECT_NUMBER "${PROJECT_VERSION}")
set(DOXYGEN_PROJECT_BRIEF "Header-only parameter-efficient fine-tuning on Eigen")
set(DOXYGEN_OUTPUT_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}/docs")
set(DOXYGEN_USE_MDFILE_AS_MAINPAGE "${CMAKE_CURRENT_SOURCE_DIR}/README.md")
set(DOXYGEN_FILE_PATTERNS "*.hpp" "*.md")
set(DOXYGEN_EXTRACT_ALL YES)            # every public name, documented with /// or not
set(DOXYGEN_EXTRACT_STATIC YES)
set(DOXYGEN_EXCLUDE_SYMBOLS "detail" "*::detail::*")
set(DOXYGEN_EXCLUDE_PATTERNS "*/detail/*")
set(DOXYGEN_STRIP_FROM_PATH "${CMAKE_CURRENT_SOURCE_DIR}/include")
set(DOXYGEN_STRIP_FROM_INC_PATH "${CMAKE_CURRENT_SOURCE_DIR}/include")
set(DOXYGEN_FULL_PATH_NAMES YES)
set(DOXYGEN_GENERATE_TREEVIEW YES)
set(DOXYGEN_GENERATE_LATEX NO)
set(DOXYGEN_HAVE_DOT NO)
set(DOXYGEN_WARN_IF_UNDOCUMENTED NO)    # /// comments sit on most names; the rest are self-evident
set(DOXYGEN_QUIET YES)
set(DOXYGEN_WARN_LOGFILE "${CMAKE_CURRENT_BINARY_DIR}/docs/warnings.log")  # `<adapter>` placeholders in comments read as HTML tags
set(DOXYGEN_INPUT_ENCODING "UTF-8")
set(DOXYGEN_MARKDOWN_SUPPORT YES)

doxygen_add_docs(peft_docs
  "${CMAKE_CURRENT_SOURCE_DIR}/include/peft"
  "${CMAKE_CURRENT_SOURCE_DIR}/README.md"
  "${CMAKE_CURRENT_SOURCE_DIR}/docs/CONTRIBUTING.md"
  "${CMAKE_CURRENT_SOURCE_DIR}/CHANGELOG.md"
  COMMENT "API reference (Doxygen) -> ${CMAKE_CURRENT_BINARY_DIR}/docs/html/index.html")
