#include <peft/loss/accuracy.hpp>

#include <limits>

#include "support/test_utils.hpp"

using namespace peft;

TEMPLATE_TEST_CASE("argmax_rows takes the first maximum and treats NaN as the maximum", "[loss][accuracy]", float,
                   double) {
  using T = TestType;
  Matrix<T> s(4, 3);
  s << 0.1, 0.7, 0.2,    //
      5.0, 5.0, 1.0,     // tie: first index, like torch.argmax
      -1.0, -2.0, -0.5,  //
      1.0, std::numeric_limits<T>::quiet_NaN(), 9.0;
  CHECK(argmax_rows<T>(s) == std::vector<std::int64_t>{1, 0, 2, 1});
  std::vector<std::int64_t> out(10, 7);
  argmax_rows<T>(s, out);
  CHECK(out.size() == 4);
  CHECK(accuracy<T>(s, {1, 1, 2, 0}) == Approx(0.5));
  CHECK(accuracy<T>(s, {1, -100, 2, -100}) == Approx(1.0));
  CHECK(accuracy<T>(s, {-100, -100, -100, -100}) == 0.0);
}

TEST_CASE("accuracy rejects bad input with named errors", "[loss][accuracy][errors]") {
  PEFT_REQUIRE_THROWS_WITH(accuracy<double>(Matrix<double>::Zero(3, 2), {0, 1}), ShapeError,
                           "2 labels for scores of shape [3, 2]");
  PEFT_REQUIRE_THROWS_WITH(argmax_rows<double>(Matrix<double>::Zero(3, 0)), ShapeError, "have no columns");
}
