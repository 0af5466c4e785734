#include <peft/train/gradient_check.hpp>
#include <peft/train/multitask.hpp>

#include <cmath>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {
struct MultiTaskFixture {
  Parameter<double> a{1, 2}, b{1, 1, true, true};
  std::vector<NamedParameter<double>> params() { return {{"a", &a}, {"b", &b}}; }
  void set_grad(double x, double y, double z) {
    a.grad << x, y;
    b.grad << z;
  }
};
}  // namespace

TEST_CASE("multitask: weighted sum and the conflict report", "[train][multitask]") {
  MultiTaskFixture f;
  MultiTaskGradients<double> mt(f.params(), 3);
  CHECK(mt.size() == 3);
  f.set_grad(1, 0, 0);
  mt.capture(0);
  f.set_grad(-1, 1, 0);
  mt.capture(1);
  f.set_grad(0, 0, 2);
  mt.capture(2);
  mt.combine_weighted({1.0, 2.0, 0.5});
  CHECK(f.a.grad(0, 0) == Approx(-1.0));
  CHECK(f.a.grad(0, 1) == Approx(2.0));
  CHECK(f.b.grad(0, 0) == Approx(1.0));
  const GradientConflicts c = mt.conflicts();
  CHECK(c.pairs == 3);
  CHECK(c.conflicting == 1);
  CHECK(c.cosine(0, 1) == Approx(-1.0 / std::sqrt(2.0)));
  CHECK(c.cosine(0, 2) == Approx(0.0).margin(1e-15));
  CHECK(c.min_cosine == Approx(-1.0 / std::sqrt(2.0)));
  CHECK(c.norms[2] == Approx(2.0));
  PEFT_REQUIRE_THROWS_WITH(mt.combine_weighted({1.0}), ConfigError, "1 weights for 3 tasks");
  PEFT_REQUIRE_THROWS_WITH(mt.capture(3), ConfigError, "task 3 is outside [0, 3)");
  f.b.set_trainable(false);
  PEFT_REQUIRE_THROWS_WITH(MultiTaskGradients<double>(f.params(), 2), ConfigError, "parameter \"b\" is frozen");
}

TEST_CASE("multitask: PCGrad projects conflicting gradients as Yu et al.'s Algorithm 1", "[train][multitask]") {
  MultiTaskFixture f;
  MultiTaskGradients<double> mt(f.params(), 2);
  f.set_grad(1, 0, 0);
  mt.capture(0);
  f.set_grad(-1, 1, 0);
  mt.capture(1);
  Rng rng(3);
  // g1' = g1 − (−1/2) g2 = (0.5, 0.5);  g2' = g2 − (−1/1) g1 = (0, 1);  sum (0.5, 1.5)
  CHECK(mt.combine_pcgrad(rng) == 2);
  CHECK(f.a.grad(0, 0) == Approx(0.5));
  CHECK(f.a.grad(0, 1) == Approx(1.5));
  CHECK(f.b.grad(0, 0) == Approx(0.0).margin(1e-15));
  // The combined gradient no longer opposes either task.
  const Matrix<double>& g = mt.gradients();
  CHECK(0.5 * g(0, 0) + 1.5 * g(0, 1) >= 0.0);
  CHECK(0.5 * g(1, 0) + 1.5 * g(1, 1) >= 0.0);
  // No conflict: PCGrad is the plain sum.
  f.set_grad(1, 2, 3);
  mt.capture(0);
  f.set_grad(2, 1, 0);
  mt.capture(1);
  CHECK(mt.combine_pcgrad(rng) == 0);
  CHECK(f.a.grad(0, 0) == 3.0);
  CHECK(f.b.grad(0, 0) == 3.0);
  // Three random tasks: every projected g_i' has g_i'·g_j >= 0 for the last j it was projected on,
  // and the result matches a direct implementation with the same order.
  Rng data(5);
  MultiTaskFixture h;
  MultiTaskGradients<double> m3(h.params(), 3);
  for (int k = 0; k < 3; ++k) {
    h.a.grad = test::random_matrix<double>(1, 2, data);
    h.b.grad = test::random_matrix<double>(1, 1, data);
    m3.capture(k);
  }
  Rng r1(11), r2(11);
  m3.combine_pcgrad(r1);
  const Matrix<double> G = m3.gradients();
  Eigen::RowVectorXd expect = Eigen::RowVectorXd::Zero(3);
  for (int i = 0; i < 3; ++i) {
    std::vector<int> order{0, 1, 2};
    for (std::size_t k = order.size(); k > 1; --k)
      std::swap(order[k - 1], order[static_cast<std::size_t>(r2.uniform_int(k))]);
    Eigen::RowVectorXd gi = G.row(i);
    for (int j : order) {
      if (j == i) continue;
      const double d = gi.dot(G.row(j));
      if (d < 0) gi -= d / G.row(j).squaredNorm() * G.row(j);
    }
    expect += gi;
  }
  CHECK(h.a.grad(0, 0) == Approx(expect(0)));
  CHECK(h.a.grad(0, 1) == Approx(expect(1)));
  CHECK(h.b.grad(0, 0) == Approx(expect(2)));
}

TEST_CASE("multitask: uncertainty weighting's gradient is exact and its optimum is sigma^2 = L", "[train][multitask]") {
  UncertaintyWeighting<double> uw(3);
  uw.log_vars.value << 0.3, -0.2, 1.1;
  const std::vector<double> losses{0.8, 2.5, 0.1};
  uw.log_vars.zero_grad();
  const double v = uw.loss(losses);
  CHECK(v == Approx(std::exp(-0.3) * 0.8 + 0.3 + std::exp(0.2) * 2.5 - 0.2 + std::exp(-1.1) * 0.1 + 1.1));
  const Matrix<double> g = uw.log_vars.grad;
  auto fn = [&] {
    UncertaintyWeighting<double> tmp(3);
    tmp.log_vars.value = uw.log_vars.value;
    tmp.log_vars.set_trainable(false);
    return tmp.loss(losses);
  };
  CHECK(relative_error(g, numerical_gradient(uw.log_vars.value, fn)) < Tolerances<double>::grad);
  // At s_k = log L_k the gradient vanishes and the weights are 1 / L_k.
  for (int k = 0; k < 3; ++k) uw.log_vars.value(0, k) = std::log(losses[static_cast<std::size_t>(k)]);
  uw.log_vars.zero_grad();
  uw.loss(losses);
  CHECK(uw.log_vars.grad.cwiseAbs().maxCoeff() < 1e-12);
  CHECK(uw.weights()[1] == Approx(1.0 / 2.5));
  PEFT_REQUIRE_THROWS_WITH(uw.loss({1.0}), ConfigError, "1 losses for 3 tasks");
}
