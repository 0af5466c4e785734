#include <peft/loss/bradley_terry.hpp>
#include <peft/train/gradient_check.hpp>

#include <limits>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

TEMPLATE_TEST_CASE("bradley_terry matches torch -logsigmoid, also for huge margins", "[loss][bradley_terry]", float,
                   double) {
  using T = TestType;
  Matrix<T> chosen(4, 1), rejected(4, 1);
  chosen << 1.0, -0.5, 30.0, -40.0;  // margins 1, -1, 50, -85: the last two overflow a naive exp
  rejected << 0.0, 0.5, -20.0, 45.0;
  Matrix<T> dc, dr;
  // torch 1.13 -F.logsigmoid(chosen - rejected).mean(), from benchmarks/peer/optim_reference.py
  CHECK(static_cast<double>(bradley_terry<T>(chosen, rejected, &dc, &dr)) ==
        Approx(21.65663084375911).epsilon(Tolerances<T>::rel));
  Matrix<T> expected(4, 1);
  expected << -0.06723535534249878, -0.18276464465750122, -4.8218746199097946e-23, -0.25;
  CHECK(test::rel_diff(dc, expected) < Tolerances<T>::rel);
  CHECK(test::rel_diff(dr, Matrix<T>(-expected)) < Tolerances<T>::rel);
}

TEST_CASE("bradley_terry gradients match finite differences", "[loss][bradley_terry][gradcheck]") {
  Rng rng(31);
  Matrix<double> chosen = test::random_matrix<double>(5, 1, rng, 2.0);
  Matrix<double> rejected = test::random_matrix<double>(5, 1, rng, 2.0);
  Matrix<double> dc, dr;
  bradley_terry<double>(chosen, rejected, &dc, &dr);
  auto loss = [&] { return bradley_terry<double>(chosen, rejected, nullptr, nullptr); };
  CHECK(relative_error(dc, numerical_gradient(chosen, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(dr, numerical_gradient(rejected, loss)) < Tolerances<double>::grad);
  // Equal rewards: −log σ(0) = log 2.
  CHECK(bradley_terry<double>(chosen, chosen, nullptr, nullptr) == Approx(std::log(2.0)).epsilon(1e-14));
}

TEST_CASE("bradley_terry rejects bad input with named errors", "[loss][bradley_terry][errors]") {
  PEFT_REQUIRE_THROWS_WITH(
      bradley_terry<double>(Matrix<double>::Zero(3, 1), Matrix<double>::Zero(2, 1), nullptr, nullptr), ShapeError,
      "chosen rewards have shape [3, 1], rejected rewards have shape [2, 1]");
  Matrix<double> bad = Matrix<double>::Zero(3, 1);
  bad(2, 0) = std::numeric_limits<double>::quiet_NaN();
  PEFT_REQUIRE_THROWS_WITH(bradley_terry<double>(Matrix<double>::Zero(3, 1), bad, nullptr, nullptr), NumericError,
                           "rejected row 2");
}
