#include <peft/core/parameters.hpp>
#include <peft/layers/layer_norm.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

TEMPLATE_TEST_CASE("LayerNorm normalises each row with biased variance (torch semantics)", "[layer_norm]", float,
                   double) {
  using T = TestType;
  Rng rng(51);
  LayerNorm<T> ln(6, 1e-5, true, "ln");
  ln.weight.value = test::random_matrix<T>(1, 6, rng);
  ln.bias.value = test::random_matrix<T>(1, 6, rng);
  const Matrix<T> x = test::random_matrix<T>(4, 6, rng, 3.0).array() + T(2);
  typename LayerNorm<T>::Cache cache;
  const Matrix<T> y = ln.forward(x, cache);
  for (Index i = 0; i < 4; ++i) {
    const double mu = x.row(i).template cast<double>().mean();
    const double var = (x.row(i).template cast<double>().array() - mu).square().mean();
    for (Index j = 0; j < 6; ++j) {
      const double expected =
          (static_cast<double>(x(i, j)) - mu) / std::sqrt(var + 1e-5) * static_cast<double>(ln.weight.value(0, j)) +
          static_cast<double>(ln.bias.value(0, j));
      CHECK(std::abs(static_cast<double>(y(i, j)) - expected) < 100 * Tolerances<T>::rel);
    }
  }
  // Init: γ = 1, β = 0; without affine no parameters.
  LayerNorm<T> fresh(6);
  CHECK(fresh.weight.value.isOnes(0));
  CHECK(fresh.bias.value.isZero(0));
  LayerNorm<T> plain(6, 1e-6, false);
  CHECK(named_parameters(plain).empty());
  typename LayerNorm<T>::Cache pc;
  const Matrix<T> yp = plain.forward(x, pc);
  CHECK(test::rel_diff(yp, cache.xhat) < 1e-3);  // same x̂ up to eps
}

TEST_CASE("LayerNorm backward matches finite differences", "[layer_norm][gradcheck]") {
  Rng rng(52);
  for (bool affine : {true, false}) {
    LayerNorm<double> ln(5, 1e-5, affine, "ln");
    if (affine) {
      ln.weight.value = test::random_matrix<double>(1, 5, rng);
      ln.bias.value = test::random_matrix<double>(1, 5, rng);
    }
    Matrix<double> x = test::random_matrix<double>(3, 5, rng, 2.0);
    const Matrix<double> g = test::random_matrix<double>(3, 5, rng);
    auto loss = [&] {
      typename LayerNorm<double>::Cache c;
      return test::dot(g, ln.forward(x, c));
    };
    typename LayerNorm<double>::Cache cache;
    ln.forward(x, cache);
    Matrix<double> dx;
    ln.backward(cache, g, &dx);
    CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
    if (affine) {
      CHECK(relative_error(ln.weight.grad, numerical_gradient(ln.weight.value, loss)) < Tolerances<double>::grad);
      CHECK(relative_error(ln.bias.grad, numerical_gradient(ln.bias.value, loss)) < Tolerances<double>::grad);
      CHECK(named_parameters(ln).size() == 2);
    }
  }
}

TEST_CASE("LayerNorm errors are named", "[layer_norm][errors]") {
  PEFT_REQUIRE_THROWS_WITH(LayerNorm<double>(0, 1e-5, true, "ln"), ShapeError,
                           "LayerNorm \"ln\": dim must be > 0, got 0");
  PEFT_REQUIRE_THROWS_WITH(LayerNorm<double>(4, 0.0, true, "ln"), ConfigError,
                           "LayerNorm \"ln\": eps must be finite and > 0");
  LayerNorm<double> ln(4, 1e-5, true, "enc.ln");
  typename LayerNorm<double>::Cache c;
  PEFT_REQUIRE_THROWS_WITH(ln.forward(Matrix<double>::Zero(2, 3), c), ShapeError,
                           "LayerNorm \"enc.ln\": input has 3 features, expected 4");
  ln.forward(Matrix<double>::Ones(2, 4), c);
  Matrix<double> dx;
  PEFT_REQUIRE_THROWS_WITH(ln.backward(c, Matrix<double>::Zero(3, 4), &dx), ShapeError, "expected [2, 4]");
}
