// Catch2's main, compiled once and shared by every test executable.
#ifdef PEFT_CATCH2_V3
// Catch2 v3 provides main through Catch2::Catch2WithMain; this TU only anchors the library.
#include <catch2/catch_test_macros.hpp>
#else
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
