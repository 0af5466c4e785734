#include <peft/loss/mse.hpp>
#include <peft/train/gradient_check.hpp>

#include <limits>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

TEMPLATE_TEST_CASE("mse matches torch's mean over all elements", "[loss][mse]", float, double) {
  using T = TestType;
  Matrix<T> pred(3, 2), target(3, 2);
  pred << 0.5, -1.0, 2.0, 0.0, 1.5, 3.0;
  target << 1.0, -1.5, 0.0, 0.25, 1.0, 1.0;
  Matrix<T> dpred;
  // torch 1.13 F.mse_loss (reduction="mean"), from benchmarks/peer/optim_reference.py
  CHECK(static_cast<double>(mse<T>(pred, target, &dpred)) == Approx(1.46875).epsilon(Tolerances<T>::rel));
  Matrix<T> expected(3, 2);
  expected << -0.16666666666666666, 0.16666666666666666, 0.6666666666666666, -0.08333333333333333, 0.16666666666666666,
      0.6666666666666666;
  CHECK(test::rel_diff(dpred, expected) < Tolerances<T>::rel);
}

TEST_CASE("mse gradient matches finite differences", "[loss][mse][gradcheck]") {
  Rng rng(21);
  Matrix<double> pred = test::random_matrix<double>(4, 3, rng);
  const Matrix<double> target = test::random_matrix<double>(4, 3, rng);
  Matrix<double> dpred;
  mse<double>(pred, target, &dpred);
  auto loss = [&] { return mse<double>(pred, target, nullptr); };
  CHECK(relative_error(dpred, numerical_gradient(pred, loss)) < Tolerances<double>::grad);
}

TEST_CASE("mse of empty inputs is 0", "[loss][mse]") {
  Matrix<double> d;
  CHECK(mse<double>(Matrix<double>(0, 3), Matrix<double>(0, 3), &d) == 0.0);
  CHECK(d.rows() == 0);
  CHECK(d.cols() == 3);
}

TEST_CASE("mse rejects bad input with named errors", "[loss][mse][errors]") {
  PEFT_REQUIRE_THROWS_WITH(mse<float>(Matrix<float>::Zero(2, 3), Matrix<float>::Zero(3, 2), nullptr), ShapeError,
                           "prediction has shape [2, 3], target has shape [3, 2]");
  Matrix<float> bad = Matrix<float>::Zero(2, 2);
  bad(1, 0) = std::numeric_limits<float>::infinity();
  PEFT_REQUIRE_THROWS_WITH(mse<float>(bad, Matrix<float>::Zero(2, 2), nullptr), NumericError, "prediction row 1");
  PEFT_REQUIRE_THROWS_WITH(mse<float>(Matrix<float>::Zero(2, 2), bad, nullptr), NumericError, "target row 1");
}
