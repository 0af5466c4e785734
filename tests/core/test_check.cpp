// check.hpp / error.hpp: message format and exception types of the shared argument checks.
#include <peft/core/check.hpp>

#include <cmath>
#include <limits>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("errors derive from peft::Error and std::runtime_error", "[errors]") {
  CHECK_THROWS_AS(throw ShapeError("x"), Error);
  CHECK_THROWS_AS(throw ConfigError("x"), std::runtime_error);
  CHECK_THROWS_AS(throw IoError("x"), Error);
  CHECK_THROWS_AS(throw NumericError("x"), Error);
  CHECK(describe("Linear", "") == "Linear");
  CHECK(describe("Linear", "fc") == "Linear \"fc\"");
  CHECK(shape_str(2, 3) == "[2, 3]");
  CHECK(shape_str(Matrix<float>(4, 5)) == "[4, 5]");
}

TEST_CASE("check helpers name the object, the expected and the actual value", "[errors]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  CHECK_NOTHROW(check::input_features("Linear", "fc", 6, 6));
  PEFT_REQUIRE_THROWS_WITH(check::input_features("LoRALinear", "q", 5, 6), ShapeError,
                           "LoRALinear \"q\": input has 5 features, expected 6");
  CHECK_NOTHROW(check::shape("K", "n", "bias", 1, 4, 1, 4));
  PEFT_REQUIRE_THROWS_WITH(check::shape("K", "n", "bias", 1, 3, 1, 4), ShapeError,
                           "K \"n\": bias has shape [1, 3], expected [1, 4]");
  CHECK_NOTHROW(check::positive("K", "n", "alpha", 1e-9));
  PEFT_REQUIRE_THROWS_WITH(check::positive("K", "n", "alpha", 0.0), ConfigError, "alpha must be finite and > 0");
  PEFT_REQUIRE_THROWS_WITH(check::positive("K", "n", "alpha", nan), ConfigError, "got nan");
  PEFT_REQUIRE_THROWS_WITH(check::positive("K", "", "alpha", inf), ConfigError, "K: alpha");
  CHECK_NOTHROW(check::non_negative("K", "n", "wd", 0.0));
  PEFT_REQUIRE_THROWS_WITH(check::non_negative("K", "n", "wd", -1.0), ConfigError, ">= 0, got -1");
  PEFT_REQUIRE_THROWS_WITH(check::non_negative("K", "n", "wd", nan), ConfigError, "wd must be finite");
  CHECK_NOTHROW(check::unit_interval_open("K", "n", "p", 0.0));
  CHECK_NOTHROW(check::unit_interval_open("K", "n", "p", 0.999));
  PEFT_REQUIRE_THROWS_WITH(check::unit_interval_open("K", "n", "p", 1.0), ConfigError, "p must be in [0, 1), got 1");
  PEFT_REQUIRE_THROWS_WITH(check::unit_interval_open("K", "n", "p", -0.1), ConfigError, "got -0.1");
  PEFT_REQUIRE_THROWS_WITH(check::unit_interval_open("K", "n", "p", nan), ConfigError, "[0, 1)");
}

TEMPLATE_TEST_CASE("all_finite finds any NaN or Inf, and never overflows on large finite values", "[errors]", float,
                   double) {
  using T = TestType;
  Matrix<T> m = Matrix<T>::Constant(7, 9, std::numeric_limits<T>::max());  // a plain sum would overflow
  CHECK(all_finite(m));
  CHECK(all_finite(Matrix<T>(0, 3)));
  for (const T bad :
       {std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity(), std::numeric_limits<T>::quiet_NaN()})
    for (Index i : {Index(0), Index(31), Index(62)}) {
      Matrix<T> b = m;
      b.data()[i] = bad;
      CHECK_FALSE(all_finite(b));
      CHECK_FALSE(all_finite(b.row(i / 9)));  // expressions and blocks too
    }
  CHECK(all_finite(m.block(1, 1, 3, 3) * T(0.5)));
}
