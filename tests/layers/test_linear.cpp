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
}
