// Initializers: bounds and moments as torch.nn.init defines them.
#include <peft/core/init.hpp>

#include <cmath>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {
template <class T>
double mean_of(const Matrix<T>& m) {
  return static_cast<double>(m.template cast<double>().mean());
}
template <class T>
double var_of(const Matrix<T>& m) {
  const double mu = mean_of(m);
  return (m.template cast<double>().array() - mu).square().mean();
}
}  // namespace

TEMPLATE_TEST_CASE("kaiming_uniform(a=sqrt 5) is U(+-1/sqrt(fan_in)) like torch", "[init]", float, double) {
  Rng rng(1);
  Matrix<TestType> w(200, 64);  // fan_in = 64 -> bound 1/8
  init::kaiming_uniform<TestType>(w, rng);
  const double bound = 1.0 / std::sqrt(64.0);
  CHECK(w.cwiseAbs().maxCoeff() <= bound);
  CHECK(w.cwiseAbs().maxCoeff() > 0.99 * bound);  // the bound is reached, not just respected
  // U(−b, b) has variance b²/3.
  CHECK(std::abs(var_of(w) - bound * bound / 3) < 0.05 * bound * bound / 3);
  CHECK(std::abs(mean_of(w)) < 6 * bound / std::sqrt(3.0 * static_cast<double>(w.size())));

  // a = 0 (ReLU gain √2): bound = √2·√(3/fan_in) = √(6/fan_in).
  init::kaiming_uniform<TestType>(w, rng, 0.0);
  const double bound0 = std::sqrt(6.0 / 64.0);
  CHECK(w.cwiseAbs().maxCoeff() <= bound0 * (1 + Tolerances<TestType>::rel));
  CHECK(w.cwiseAbs().maxCoeff() > 0.99 * bound0);

  Matrix<TestType> empty(3, 0);
  PEFT_REQUIRE_THROWS_WITH(init::kaiming_uniform<TestType>(empty, rng), ShapeError, "fan_in 0");
}

TEMPLATE_TEST_CASE("xavier bounds and std follow torch", "[init]", float, double) {
  Rng rng(2);
  Matrix<TestType> w(96, 32);  // fan_in 32, fan_out 96
  init::xavier_uniform<TestType>(w, rng, 2.0);
  const double bound = 2.0 * std::sqrt(6.0 / (32 + 96));
  CHECK(w.cwiseAbs().maxCoeff() <= bound * (1 + Tolerances<TestType>::rel));
  CHECK(w.cwiseAbs().maxCoeff() > 0.99 * bound);
  CHECK(std::abs(var_of(w) - bound * bound / 3) < 0.06 * bound * bound / 3);

  init::xavier_normal<TestType>(w, rng);
  const double sd = std::sqrt(2.0 / (32 + 96));
  CHECK(std::abs(std::sqrt(var_of(w)) - sd) < 0.05 * sd);
  CHECK(std::abs(mean_of(w)) < 6 * sd / std::sqrt(static_cast<double>(w.size())));
}

TEMPLATE_TEST_CASE("normal, truncated_normal, zeros and constant", "[init]", float, double) {
  Rng rng(3);
  Matrix<TestType> w(100, 100);
  init::normal<TestType>(w, rng, 1.0, 0.5);
  CHECK(std::abs(mean_of(w) - 1.0) < 6 * 0.5 / 100);
  CHECK(std::abs(std::sqrt(var_of(w)) - 0.5) < 0.02);

  init::truncated_normal<TestType>(w, rng, -1.0, 0.25);
  CHECK((w.array() + TestType(1)).abs().maxCoeff() <= TestType(2 * 0.25 + 1e-6));
  CHECK(std::abs(mean_of(w) + 1.0) < 6 * 0.25 / 100);
  // N(0,1) truncated to ±2 has variance 1 − 4φ(2)/(Φ(2) − Φ(−2)) ≈ 0.7737.
  CHECK(std::abs(var_of(w) / (0.25 * 0.25) - 0.7737) < 0.03);

  init::zeros<TestType>(w);
  CHECK(w.cwiseAbs().maxCoeff() == TestType(0));
  init::constant<TestType>(w, TestType(2.5));
  CHECK(w.minCoeff() == TestType(2.5));
  CHECK(w.maxCoeff() == TestType(2.5));

  PEFT_REQUIRE_THROWS_WITH(init::normal<TestType>(w, rng, 0.0, -1.0), ConfigError, "stddev must be finite and >= 0");
  PEFT_REQUIRE_THROWS_WITH(init::normal<TestType>(w, rng, 0.0, std::nan("")), ConfigError, "got nan");
  PEFT_REQUIRE_THROWS_WITH(init::truncated_normal<TestType>(w, rng, 0.0, -1.0), ConfigError, "stddev");
  PEFT_REQUIRE_THROWS_WITH(init::uniform<TestType>(w, rng, 1.0, 0.0), ConfigError, "lo <= hi");
}

TEST_CASE("initializers are reproducible for a seed", "[init]") {
  Rng r1(9), r2(9);
  Matrix<double> a(4, 5), b(4, 5);
  init::kaiming_uniform<double>(a, r1);
  init::kaiming_uniform<double>(b, r2);
  CHECK(a == b);
}
