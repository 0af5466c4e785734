#include <peft/layers/dropout.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

TEMPLATE_TEST_CASE("Dropout is inverted, masks in training and is the identity in eval", "[dropout]", float, double) {
  using T = TestType;
  Rng rng(21);
  const Matrix<T> x = test::random_matrix<T>(200, 50, rng).array() + T(3);  // strictly positive entries
  Dropout<T> drop(0.25, 7, "drop");
  typename Dropout<T>::Cache cache;
  const Matrix<T> y = drop.forward(x, cache);
  Index zeros = 0;
  for (Index i = 0; i < x.rows(); ++i)
    for (Index j = 0; j < x.cols(); ++j) {
      if (y(i, j) == T(0)) {
        ++zeros;
      } else {
        CHECK(std::abs(static_cast<double>(y(i, j) - x(i, j) / T(0.75))) <
              1e-5 * std::abs(static_cast<double>(x(i, j))));
      }
    }
  const double rate = static_cast<double>(zeros) / static_cast<double>(x.size());
  CHECK(rate > 0.22);
  CHECK(rate < 0.28);

  // Backward uses the cached mask: dx = dy ⊙ m.
  const Matrix<T> dy = test::random_matrix<T>(200, 50, rng);
  Matrix<T> dx;
  drop.backward(cache, dy, &dx);
  CHECK(test::rel_diff(dx, Matrix<T>(dy.array() * cache.keep.array())) < Tolerances<T>::rel);

  // Two forwards with two caches draw different masks; each backward uses its own.
  typename Dropout<T>::Cache cache2;
  drop.forward(x, cache2);
  CHECK((cache2.keep.array() != cache.keep.array()).any());
  Matrix<T> dx2;
  drop.backward(cache2, dy, &dx2);
  CHECK(test::rel_diff(dx2, Matrix<T>(dy.array() * cache2.keep.array())) < Tolerances<T>::rel);

  // Same seed → same mask.
  Dropout<T> again(0.25, 7);
  typename Dropout<T>::Cache c3;
  again.forward(x, c3);
  CHECK(c3.keep == cache.keep);

  drop.eval();
  CHECK_FALSE(drop.active());
  typename Dropout<T>::Cache ce;
  CHECK(drop.forward(x, ce) == x);
  drop.backward(ce, dy, &dx);
  CHECK(dx == dy);

  Dropout<T> none(0.0);
  typename Dropout<T>::Cache cn;
  CHECK(none.forward(x, cn) == x);
  CHECK(cn.keep.size() == 0);
}

TEST_CASE("Dropout backward matches finite differences with the mask held fixed", "[dropout][gradcheck]") {
  // A layer seeded the same way draws the same mask, so the loss is a fixed linear map of x.
  Rng rng(22);
  Matrix<double> x = test::random_matrix<double>(6, 5, rng);
  const Matrix<double> g = test::random_matrix<double>(6, 5, rng);
  auto loss = [&] {
    Dropout<double> d(0.4, 99);
    typename Dropout<double>::Cache c;
    return test::dot(g, d.forward(x, c));
  };
  Dropout<double> d(0.4, 99);
  typename Dropout<double>::Cache c;
  d.forward(x, c);
  CHECK((c.keep.array() == 0.0).any());  // some entries are dropped
  Matrix<double> dx;
  d.backward(c, g, &dx);
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
}

TEST_CASE("Dropout rejects bad probabilities and gradients", "[dropout][errors]") {
  PEFT_REQUIRE_THROWS_WITH(Dropout<double>(1.0, 1, "enc.drop"), ConfigError,
                           "Dropout \"enc.drop\": p must be in [0, 1)");
  PEFT_REQUIRE_THROWS_WITH(Dropout<double>(-0.1), ConfigError, "got -0.1");
  Dropout<double> d(0.5, 1, "d");
  Dropout<double>::Cache c;
  d.forward(Matrix<double>::Ones(2, 3), c);
  Matrix<double> dx;
  PEFT_REQUIRE_THROWS_WITH(d.backward(c, Matrix<double>::Ones(3, 3), &dx), ShapeError,
                           "Dropout \"d\": output gradient has shape [3, 3], expected [2, 3]");
}
