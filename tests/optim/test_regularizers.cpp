#include <peft/optim/regularizers.hpp>
#include <peft/train/gradient_check.hpp>

#include "optim_test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;
using test::TwoParams;

namespace {
std::vector<NamedParameter<double>> both(TwoParams<double>& m) { return {{"weight", &m.weight}, {"bias", &m.bias}}; }
}  // namespace

TEST_CASE("L2-SP value and gradient match λ/2‖θ−θ₀‖² and finite differences", "[optim][regularizers][gradcheck]") {
  TwoParams<double> m;
  L2SP<double> reg(both(m), 0.3);
  CHECK(reg.value() == 0.0);  // θ = θ₀ at construction
  Rng rng(41);
  m.weight.value += test::random_matrix<double>(2, 2, rng);
  m.bias.value += test::random_matrix<double>(1, 2, rng);
  const double expected =
      0.15 * ((m.weight.value - reg.anchor(0)).squaredNorm() + (m.bias.value - reg.anchor(1)).squaredNorm());
  CHECK(reg.value() == Approx(expected).epsilon(1e-14));
  m.zero_grad();
  m.weight.grad.setConstant(1.0);  // added to, not overwritten
  CHECK(reg.add_to_gradients() == Approx(expected).epsilon(1e-14));
  auto value = [&] { return reg.value(); };
  const Matrix<double> dw = (m.weight.grad.array() - 1.0).matrix();
  CHECK(relative_error(dw, numerical_gradient(m.weight.value, value)) < Tolerances<double>::grad);
  CHECK(relative_error(m.bias.grad, numerical_gradient(m.bias.value, value)) < Tolerances<double>::grad);
}

TEST_CASE("L2-SP counts a frozen parameter in the value but gives it no gradient", "[optim][regularizers]") {
  TwoParams<double> m;
  L2SP<double> reg(both(m), 2.0);
  m.bias.value.array() += 1.0;  // ‖Δ‖² = 2
  m.bias.set_trainable(false);
  CHECK(reg.add_to_gradients() == Approx(2.0));
  CHECK(m.bias.grad.size() == 0);
  reg.set_lambda(0.0);
  CHECK(reg.value() == 0.0);
}

TEST_CASE("EWC Fisher is the mean of squared gradients; value and gradient match finite differences",
          "[optim][regularizers][gradcheck]") {
  TwoParams<double> m;
  EWC<double> ewc(both(m), 5.0);
  Rng rng(42);
  std::vector<Matrix<double>> gw, gb;
  for (int b = 0; b < 3; ++b) {  // three "source batches": forward/backward, then accumulate()
    gw.push_back(test::random_matrix<double>(2, 2, rng));
    gb.push_back(test::random_matrix<double>(1, 2, rng));
    m.weight.grad = gw.back();
    m.bias.grad = gb.back();
    ewc.accumulate();
  }
  ewc.finalize();
  CHECK(ewc.batches() == 3);
  const Matrix<double> fw = ((gw[0].array().square() + gw[1].array().square() + gw[2].array().square()) / 3.0).matrix();
  CHECK(test::rel_diff(ewc.fisher(0), fw) < 1e-14);
  CHECK(ewc.value() == 0.0);  // θ = θ* still
  m.weight.value += test::random_matrix<double>(2, 2, rng);
  m.bias.value += test::random_matrix<double>(1, 2, rng);
  const double expected = 2.5 * ((fw.array() * (m.weight.value - ewc.anchor(0)).array().square()).sum() +
                                 (ewc.fisher(1).array() * (m.bias.value - ewc.anchor(1)).array().square()).sum());
  CHECK(ewc.value() == Approx(expected).epsilon(1e-14));
  m.zero_grad();
  CHECK(ewc.add_to_gradients() == Approx(expected).epsilon(1e-14));
  auto value = [&] { return ewc.value(); };
  CHECK(relative_error(m.weight.grad, numerical_gradient(m.weight.value, value)) < Tolerances<double>::grad);
  CHECK(relative_error(m.bias.grad, numerical_gradient(m.bias.value, value)) < Tolerances<double>::grad);
}

TEST_CASE("Regularizers reject misuse with named errors", "[optim][regularizers][errors]") {
  TwoParams<double> m;
  PEFT_REQUIRE_THROWS_WITH(L2SP<double>(both(m), -1.0), ConfigError, "L2SP: lambda must be finite and >= 0, got -1");
  PEFT_REQUIRE_THROWS_WITH(EWC<double>(both(m), std::nan("")), ConfigError, "EWC: lambda must be finite");
  PEFT_REQUIRE_THROWS_WITH(L2SP<double>({}, 1.0), ConfigError, "L2SP: got no parameters");
  PEFT_REQUIRE_THROWS_WITH(EWC<double>({{"ghost", nullptr}}, 1.0), ConfigError, "parameter \"ghost\" is null");

  L2SP<double> reg(both(m), 1.0);
  PEFT_REQUIRE_THROWS_WITH(reg.set_lambda(-2.0), ConfigError, "lambda");
  m.weight.grad.resize(1, 1);
  PEFT_REQUIRE_THROWS_WITH(reg.add_to_gradients(), ShapeError,
                           "L2SP: parameter \"weight\" has a gradient of shape [1, 1]");
  m.weight.grad.setZero(2, 2);
  m.bias.value.resize(1, 3);
  PEFT_REQUIRE_THROWS_WITH(reg.value(), ShapeError,
                           "L2SP: parameter \"bias\" has shape [1, 3], its anchor has shape [1, 2]");

  TwoParams<double> m2;
  EWC<double> ewc(both(m2), 1.0);
  PEFT_REQUIRE_THROWS_WITH(ewc.finalize(), ConfigError, "finalize() before any accumulate()");
  PEFT_REQUIRE_THROWS_WITH(ewc.value(), ConfigError, "EWC: value() before finalize()");
  PEFT_REQUIRE_THROWS_WITH(ewc.add_to_gradients(), ConfigError, "add_to_gradients() before finalize()");
  m2.bias.set_trainable(false);
  PEFT_REQUIRE_THROWS_WITH(ewc.accumulate(), ConfigError, "parameter \"bias\" has no gradient (frozen)");
  m2.bias.set_trainable(true);
  m2.bias.grad.resize(2, 1);
  PEFT_REQUIRE_THROWS_WITH(ewc.accumulate(), ShapeError,
                           "EWC: parameter \"bias\" has a gradient of shape [2, 1], expected [1, 2]");
  CHECK(ewc.fisher(0).isZero(0));  // nothing accumulated when one parameter is bad
  m2.bias.grad.setZero(1, 2);
  ewc.accumulate();
  ewc.finalize();
  PEFT_REQUIRE_THROWS_WITH(ewc.accumulate(), ConfigError, "accumulate() after finalize()");
  PEFT_REQUIRE_THROWS_WITH(ewc.finalize(), ConfigError, "finalize() called twice");
}
