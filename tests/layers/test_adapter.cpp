#include <peft/core/parameters.hpp>
#include <peft/layers/adapter.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {
AdapterOptions opts(Index b, AdapterInit init, Activation act = Activation::GELU, double s = 1.0) {
  AdapterOptions o;
  o.bottleneck = b;
  o.init = init;
  o.activation = act;
  o.scaling = s;
  return o;
}
}  // namespace

TEMPLATE_TEST_CASE("Adapter forward is x + s*(f(x Wd^T + bd) Wu^T + bu)", "[adapter]", float, double) {
  using T = TestType;
  Rng rng(11);
  for (bool residual : {true, false}) {
    Adapter<T> ad(6, opts(3, AdapterInit::Bert, Activation::GELU, 0.7), rng, residual, "adp");
    ad.up.bias.value = test::random_matrix<T>(1, 6, rng, 0.1);
    ad.down.bias.value = test::random_matrix<T>(1, 3, rng, 0.1);
    const Matrix<T> x = test::random_matrix<T>(5, 6, rng);
    typename Adapter<T>::Cache cache;
    const Matrix<T> y = ad.forward(x, cache);
    Matrix<T> h = x * ad.down.weight.value.transpose();
    h.rowwise() += ad.down.bias.value.row(0);
    Matrix<T> a(h.rows(), h.cols());
    for (Index i = 0; i < h.rows(); ++i)
      for (Index j = 0; j < h.cols(); ++j) a(i, j) = activation_value<T>(Activation::GELU, h(i, j));
    Matrix<T> z = a * ad.up.weight.value.transpose();
    z.rowwise() += ad.up.bias.value.row(0);
    const Matrix<T> expected = residual ? Matrix<T>(x + T(0.7) * z) : Matrix<T>(T(0.7) * z);
    CHECK(test::rel_diff(y, expected) < Tolerances<T>::rel);
  }
}

TEMPLATE_TEST_CASE("Zero-init adapter is exactly the identity (sequential) / exactly zero (parallel)", "[adapter]",
                   float, double) {
  using T = TestType;
  Rng rng(12);
  const Matrix<T> x = test::random_matrix<T>(7, 8, rng);
  Adapter<T> seq(8, opts(2, AdapterInit::Zero, Activation::ReLU, 3.0), rng, true);
  Adapter<T> par(8, opts(2, AdapterInit::Zero, Activation::ReLU, 3.0), rng, false);
  typename Adapter<T>::Cache c1, c2;
  CHECK(seq.forward(x, c1) == x);
  CHECK(par.forward(x, c2) == Matrix<T>::Zero(7, 8));
  CHECK(seq.down.weight.value.cwiseAbs().maxCoeff() > T(0));  // down keeps nn.Linear's init
}

TEST_CASE("Adapter inits: bert N(0, 0.02), houlsby truncated N(0, 0.01) within 2 std", "[adapter]") {
  Rng rng(13);
  Adapter<double> bert(64, opts(32, AdapterInit::Bert), rng);
  Adapter<double> houlsby(64, opts(32, AdapterInit::Houlsby), rng);
  const auto& wb = bert.down.weight.value;
  const double mean = wb.mean();
  const double sd = std::sqrt((wb.array() - mean).square().mean());
  CHECK(std::abs(mean) < 0.003);
  CHECK(std::abs(sd - 0.02) < 0.002);
  // N(0, 0.01²) truncated to ±2σ has std 0.01·√(1 − 4φ(2)/(Φ(2) − Φ(−2))) = 0.008796 (a uniform
  // on ±0.02 would give 0.01155).
  const auto& wh = houlsby.down.weight.value;
  const double hmean = wh.mean();
  const double hsd = std::sqrt((wh.array() - hmean).square().mean());
  CHECK(std::abs(hmean) < 0.001);
  CHECK(std::abs(hsd - 0.008796) < 0.0006);
  CHECK(houlsby.down.weight.value.cwiseAbs().maxCoeff() <= 0.02);
  CHECK(houlsby.up.weight.value.cwiseAbs().maxCoeff() <= 0.02);
  CHECK(houlsby.up.weight.value.cwiseAbs().maxCoeff() > 0.0);
  CHECK(bert.down.bias.value.isZero(0.0));
  CHECK(houlsby.up.bias.value.isZero(0.0));
}

TEST_CASE("Adapter backward matches finite differences (sequential and parallel)", "[adapter][gradcheck]") {
  for (bool residual : {true, false}) {
    for (Activation act : {Activation::GELU, Activation::Tanh, Activation::SiLU}) {
      Rng rng(14);
      Adapter<double> ad(5, opts(3, AdapterInit::Bert, act, 1.3), rng, residual, "a");
      ad.up.weight.value = test::random_matrix<double>(5, 3, rng, 0.5);  // non-trivial up-projection
      ad.down.bias.value = test::random_matrix<double>(1, 3, rng, 0.3);
      Matrix<double> x = test::random_matrix<double>(4, 5, rng);
      const Matrix<double> g = test::random_matrix<double>(4, 5, rng);
      auto loss = [&] {
        typename Adapter<double>::Cache c;
        return test::dot(g, ad.forward(x, c));
      };
      typename Adapter<double>::Cache cache;
      ad.forward(x, cache);
      Matrix<double> dx;
      ad.backward(cache, g, &dx);
      CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
      for (auto& np : named_parameters(ad)) {
        INFO(np.name);
        CHECK(relative_error(np.param->grad, numerical_gradient(np.param->value, loss)) < Tolerances<double>::grad);
      }
    }
  }
}

TEST_CASE("Adapter: two forwards with two caches, then two backwards", "[adapter]") {
  Rng rng(15);
  Adapter<double> ad(4, opts(2, AdapterInit::Bert, Activation::GELU), rng);
  const Matrix<double> x1 = test::random_matrix<double>(3, 4, rng), x2 = test::random_matrix<double>(2, 4, rng);
  const Matrix<double> g1 = test::random_matrix<double>(3, 4, rng), g2 = test::random_matrix<double>(2, 4, rng);
  typename Adapter<double>::Cache c1, c2;
  ad.forward(x1, c1);
  ad.forward(x2, c2);
  Matrix<double> d1, d2;
  ad.backward(c1, g1, &d1);
  ad.backward(c2, g2, &d2);
  const Matrix<double> both = ad.down.weight.grad;
  ad.zero_grad();
  typename Adapter<double>::Cache c;
  Matrix<double> d;
  ad.forward(x1, c);
  ad.backward(c, g1, &d);
  CHECK(test::rel_diff(d, d1) < 1e-14);
  ad.forward(x2, c);
  ad.backward(c, g2, &d);
  CHECK(test::rel_diff(d, d2) < 1e-14);
  CHECK(test::rel_diff(ad.down.weight.grad, both) < 1e-14);
}

TEST_CASE("Adapter parameter count is 2 d b + b + d; bottleneck from reduction factor", "[adapter]") {
  Rng rng(16);
  AdapterOptions o;
  o.reduction_factor = 16;
  Adapter<float> ad(256, o, rng, true, "layers.0.adapter_ffn");
  CHECK(ad.bottleneck() == 16);
  CHECK(count_parameters(ad).total == 2 * 256 * 16 + 16 + 256);
  const auto names = named_parameters(ad);
  REQUIRE(names.size() == 4);
  CHECK(names[0].name == "adapter_down.weight");
  CHECK(names[3].name == "adapter_up.bias");
  CHECK(ad.down.name() == "layers.0.adapter_ffn.adapter_down");
  o.bottleneck = 7;
  CHECK(Adapter<float>(256, o, rng).bottleneck() == 7);
}

TEST_CASE("Adapter rejects bad configs and shapes with named errors", "[adapter][errors]") {
  Rng rng(17);
  AdapterOptions o;
  o.reduction_factor = 100;
  PEFT_REQUIRE_THROWS_WITH(Adapter<float>(64, o, rng, true, "ad"), ConfigError, "leaves no bottleneck for d=64");
  o.reduction_factor = -1;
  PEFT_REQUIRE_THROWS_WITH(Adapter<float>(64, o, rng, true, "ad"), ConfigError,
                           "reduction_factor must be finite and > 0");
  o.bottleneck = -3;
  PEFT_REQUIRE_THROWS_WITH(Adapter<float>(64, o, rng, true, "ad"), ConfigError, "bottleneck must be > 0");
  o.bottleneck = 4;
  o.scaling = 0;
  PEFT_REQUIRE_THROWS_WITH(Adapter<float>(64, o, rng, true, "ad"), ConfigError,
                           "scaling must be finite and > 0, got 0");
  o.scaling = 1;
  PEFT_REQUIRE_THROWS_WITH(Adapter<float>(0, o, rng, true, "ad"), ConfigError, "Adapter \"ad\": dim must be > 0");
  Adapter<float> ad(8, o, rng, true, "ad");
  typename Adapter<float>::Cache cache;
  PEFT_REQUIRE_THROWS_WITH(ad.forward(Matrix<float>::Zero(2, 7), cache), ShapeError,
                           "Adapter \"ad\": input has 7 features, expected 8");
  ad.forward(Matrix<float>::Zero(2, 8), cache);
  PEFT_REQUIRE_THROWS_WITH(ad.backward(cache, Matrix<float>::Zero(3, 8), nullptr), ShapeError, "expected [2, 8]");
}
