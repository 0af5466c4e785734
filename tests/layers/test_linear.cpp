#include <peft/layers/linear.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

TEMPLATE_TEST_CASE("Linear forward is x W^T + b", "[linear]", float, double) {
  Rng rng(1);
  Linear<TestType> layer(5, 3, rng, true, "fc");
  const Matrix<TestType> x = test::random_matrix<TestType>(4, 5, rng);
  typename Linear<TestType>::Cache cache;
  const Matrix<TestType> y = layer.forward(x, cache);
  Matrix<TestType> expected = x * layer.weight.value.transpose();
  expected.rowwise() += layer.bias.value.row(0);
  CHECK(test::rel_diff(y, expected) < Tolerances<TestType>::rel);
  const double bound = 1.0 / std::sqrt(5.0);
  CHECK(layer.weight.value.cwiseAbs().maxCoeff() <= bound);
  CHECK(layer.bias.value.cwiseAbs().maxCoeff() <= bound);
}

TEST_CASE("Linear backward matches finite differences", "[linear][gradcheck]") {
  Rng rng(2);
  Linear<double> layer(6, 4, rng, true, "fc");
  Matrix<double> x = test::random_matrix<double>(3, 6, rng);
  const Matrix<double> g = test::random_matrix<double>(3, 4, rng);
  typename Linear<double>::Cache cache;
  auto loss = [&] {
    typename Linear<double>::Cache c;
    return test::dot(g, layer.forward(x, c));
  };
  layer.forward(x, cache);
  Matrix<double> dx;
  layer.backward(cache, g, &dx);
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(layer.weight.grad, numerical_gradient(layer.weight.value, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(layer.bias.grad, numerical_gradient(layer.bias.value, loss)) < Tolerances<double>::grad);
}

TEST_CASE("Frozen Linear stores no input and accumulates no gradient", "[linear]") {
  Rng rng(3);
  Linear<double> layer(6, 4, rng, false, "frozen");
  layer.weight.set_trainable(false);
  CHECK(layer.weight.grad.size() == 0);
  const Matrix<double> x = test::random_matrix<double>(3, 6, rng);
  typename Linear<double>::Cache cache;
  layer.forward(x, cache);
  CHECK(cache.x.size() == 0);
  Matrix<double> dx;
  layer.backward(cache, Matrix<double>::Ones(3, 4), &dx);
  CHECK(test::rel_diff(dx, Matrix<double>(Matrix<double>::Ones(3, 4) * layer.weight.value)) < 1e-12);
}

TEST_CASE("Linear rejects bad shapes with named errors", "[linear][errors]") {
  Rng rng(4);
  Linear<float> layer(6, 4, rng, true, "layers.0.fc");
  typename Linear<float>::Cache cache;
  PEFT_REQUIRE_THROWS_WITH(layer.forward(Matrix<float>::Zero(2, 5), cache), ShapeError,
                           "Linear \"layers.0.fc\": input has 5 features, expected 6");
  layer.forward(Matrix<float>::Zero(2, 6), cache);
  PEFT_REQUIRE_THROWS_WITH(layer.backward(cache, Matrix<float>::Zero(2, 3), nullptr), ShapeError, "expected [2, 4]");
  PEFT_REQUIRE_THROWS_WITH(Linear<float>(0, 4, rng), ShapeError, "in=0");
  PEFT_REQUIRE_THROWS_WITH(Linear<float>(-1, 4, rng, true, "neg"), ShapeError,
                           "Linear \"neg\": features must be > 0, got in=-1, out=4");
  PEFT_REQUIRE_THROWS_WITH(Linear<float>(3, -2, rng), ShapeError, "out=-2");
}

TEST_CASE("Linear wraps existing weights and validates them", "[linear][errors]") {
  Matrix<double> w(2, 3);
  w << 1, 2, 3, 4, 5, 6;
  RowVector<double> b(2);
  b << 0.5, -1;
  Linear<double> layer(w, b, "wrapped");
  CHECK(layer.in_features() == 3);
  CHECK(layer.out_features() == 2);
  CHECK(layer.weight.trainable());
  CHECK(layer.bias.trainable());
  CHECK(layer.bias.is_vector());
  typename Linear<double>::Cache cache;
  Matrix<double> x(1, 3);
  x << 1, 0, -1;
  const Matrix<double> y = layer.forward(x, cache);
  CHECK(y(0, 0) == 1 - 3 + 0.5);
  CHECK(y(0, 1) == 4 - 6 - 1);
  Linear<double> no_bias(w, RowVector<double>(), "nb");
  CHECK_FALSE(no_bias.has_bias());
  PEFT_REQUIRE_THROWS_WITH(Linear<double>(w, RowVector<double>::Zero(3), "bad"), ShapeError,
                           "Linear \"bad\": bias has shape [1, 3], expected [1, 2]");
  PEFT_REQUIRE_THROWS_WITH(Linear<double>(Matrix<double>(0, 3), b, "empty"), ShapeError, "weight has shape [0, 3]");
}

TEST_CASE("Linear: a weight unfrozen after a frozen forward is caught, not silently stale", "[linear][errors]") {
  Rng rng(5);
  Linear<double> layer(4, 3, rng, true, "fc");
  const Matrix<double> x = test::random_matrix<double>(2, 4, rng);
  const Matrix<double> g = test::random_matrix<double>(2, 3, rng);
  typename Linear<double>::Cache cache;
  layer.forward(x, cache);  // trainable: keeps x
  layer.weight.set_trainable(false);
  layer.forward(x, cache);  // frozen: drops it
  CHECK(cache.x.size() == 0);
  layer.weight.set_trainable(true);
  PEFT_REQUIRE_THROWS_WITH(layer.backward(cache, g, nullptr), ShapeError, "cached input");
}

TEST_CASE("Linear gradient buffer follows a replaced weight", "[linear]") {
  Rng rng(6);
  Linear<double> layer(4, 3, rng, false, "fc");
  layer.weight.value = test::random_matrix<double>(3, 5, rng);  // e.g. loaded with another shape
  const Matrix<double> x = test::random_matrix<double>(2, 5, rng);
  const Matrix<double> g = test::random_matrix<double>(2, 3, rng);
  typename Linear<double>::Cache cache;
  layer.forward(x, cache);
  layer.backward(cache, g, nullptr);
  CHECK(test::rel_diff(layer.weight.grad, Matrix<double>(g.transpose() * x)) < 1e-14);
}
