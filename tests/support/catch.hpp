#pragma once
// One include for Catch2 v2 (Debian 12) and v3 (Debian 13): v3 moved Approx into namespace Catch.
#ifdef PEFT_CATCH2_V3
#include <catch2/catch_all.hpp>
using Catch::Approx;
#else
#include <catch2/catch.hpp>
#endif
