#include <peft/meta/maml.hpp>

#include <peft/optim/adam.hpp>
#include <peft/optim/sgd.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"
#include "train/meta_test_utils.hpp"

using namespace peft;
using peft::test::meta::MetaTinyTask;
using peft::test::meta::read_meta_fixture;

namespace {
/// The fixture's three meta-gradient blocks as one flat vector, in the subset's order.
ColVector<double> maml_fixture_flat(const std::map<std::string, Matrix<double>>& fx, const std::string& prefix) {
  const Matrix<double>& a = fx.at(prefix + "_w1");
  const Matrix<double>& b = fx.at(prefix + "_w2");
  const Matrix<double>& c = fx.at(prefix + "_b2");
  ColVector<double> v(a.size() + b.size() + c.size());
  v << Eigen::Map<const ColVector<double>>(a.data(), a.size()), Eigen::Map<const ColVector<double>>(b.data(), b.size()),
      Eigen::Map<const ColVector<double>>(c.data(), c.size());
  return v;
}

/// L(θ) = ½ θᵀ A θ + bᵀθ on one [1, n] parameter (exact gradient Aθ + b, Hessian A).
struct MetaQuadratic {
  Parameter<double> theta;
  Matrix<double> a;
  RowVector<double> b;
  double operator()(MetaSplit) {
    const RowVector<double> g = theta.value * a + b;  // A symmetric
    theta.grad += g;
    return 0.5 * (theta.value * a * theta.value.transpose())(0, 0) + (b * theta.value.transpose())(0, 0);
  }
};
}  // namespace

TEST_CASE("MetaLearner: second-order MAML matches torch autograd on a tiny MLP", "[train][meta]") {
  const auto fx = read_meta_fixture();
  MetaTinyTask task(fx);
  SGD<double> outer(task.subset(), SGDOptions{0.1});
  MetaLearner<double> learner(task.subset(), outer);
  const double alpha = fx.at("alpha")(0, 0);
  const int steps = static_cast<int>(fx.at("steps")(0, 0));
  ColVector<double> before, after, g;
  learner.gather_values(before);
  const double lq = learner.maml_gradient(task, alpha, steps, g);
  learner.gather_values(after);
  CHECK(after == before);  // θ restored exactly
  CHECK(lq == Approx(fx.at("query_loss")(0, 0)).epsilon(1e-12));
  const ColVector<double> ref = maml_fixture_flat(fx, "maml");
  CHECK(relative_error(g, ref) < 1e-6);
  // and the first-order form really differs from it (the test would not see a missing Hessian term)
  CHECK(relative_error(maml_fixture_flat(fx, "fomaml"), ref) > 1e-3);
}

TEST_CASE("MetaLearner: first-order MAML and Reptile with an SGD inner loop match torch", "[train][meta]") {
  const auto fx = read_meta_fixture();
  MetaTinyTask task(fx);
  SGD<double> outer(task.subset(), SGDOptions{0.1});
  SGD<double> inner(task.subset(), SGDOptions{fx.at("alpha")(0, 0)});
  MetaLearner<double> learner(task.subset(), outer);
  const int steps = static_cast<int>(fx.at("steps")(0, 0));
  ColVector<double> g;
  learner.fomaml_gradient(task, inner, steps, g);
  CHECK(relative_error(g, maml_fixture_flat(fx, "fomaml")) < 1e-12);
  learner.reptile_gradient(task, inner, steps, g);
  CHECK(relative_error(g, maml_fixture_flat(fx, "reptile")) < 1e-12);
}

TEST_CASE("MetaLearner: the MAML meta-gradient is the derivative of the adapted query loss", "[train][meta]") {
  const auto fx = read_meta_fixture();
  MetaTinyTask task(fx);
  SGD<double> outer(task.subset(), SGDOptions{0.1});
  MetaLearner<double> learner(task.subset(), outer);
  const int steps = 3;
  const double alpha = 0.2;
  ColVector<double> g;
  learner.maml_gradient(task, alpha, steps, g);
  // finite differences of θ ↦ L_q(θ_k(θ)), the inner loop run each time
  auto adapted_query_loss = [&] {
    learner.adapt_sgd(task, alpha, steps);
    const double l = task(MetaSplit::query);
    learner.restore();
    return l;
  };
  ColVector<double> num(learner.size());
  Index o = 0;
  for (const NamedParameter<double>& p : learner.parameters()) {
    const Matrix<double> n = numerical_gradient<double>(p.param->value, adapted_query_loss, 1e-5);
    num.segment(o, n.size()) = Eigen::Map<const ColVector<double>>(n.data(), n.size());
    o += n.size();
  }
  CHECK(relative_error(g, num) < 1e-7);
}

TEST_CASE("MetaLearner: Hessian-vector products of a quadratic are exact up to rounding", "[train][meta]") {
  Rng rng(3);
  MetaQuadratic q;
  q.theta = Parameter<double>(1, 6);
  q.theta.value = test::random_matrix<double>(1, 6, rng, 100.0);  // a large θ: ε follows its scale
  const Matrix<double> m = test::random_matrix<double>(6, 6, rng);
  q.a = m * m.transpose();
  q.b = test::random_matrix<double>(1, 6, rng);
  SGD<double> outer(std::vector<NamedParameter<double>>{{"theta", &q.theta}}, SGDOptions{0.1});
  MetaLearner<double> learner({{"theta", &q.theta}}, outer);
  ColVector<double> v = test::random_matrix<double>(6, 1, rng, 1e-3), hv;
  learner.hessian_vector_product(q, v, hv);
  const ColVector<double> exact = q.a * v;
  CHECK(relative_error(hv, exact) < 1e-8);
  v.setZero();
  learner.hessian_vector_product(q, v, hv);
  CHECK(hv.isZero(0.0));
}

TEST_CASE("MetaLearner: outer_step applies the mean task meta-gradient", "[train][meta]") {
  const auto fx = read_meta_fixture();
  MetaTinyTask task(fx);
  SGD<double> outer(task.subset(), SGDOptions{1.0});
  Adam<double> inner(task.subset(), AdamOptions{0.05});
  MetaLearner<double> learner(task.subset(), outer);
  ColVector<double> theta, g1, g2, after;
  learner.gather_values(theta);
  learner.fomaml_gradient(task, inner, 3, g1);
  learner.fomaml_gradient(task, inner, 3, g2);
  CHECK(g1 == g2);  // Adam's state is reset per task: the same task gives the same gradient
  const Matrix<double> ys_a = task.ys;
  const Matrix<double> ys_b = -2.0 * task.ys;  // a second task: other support targets
  task.ys = ys_b;
  learner.reptile_gradient(task, inner, 3, g2);
  learner.gather_values(after);
  CHECK(after == theta);
  task.ys = ys_a;
  learner.add_fomaml_task(task, inner, 3);
  task.ys = ys_b;
  learner.add_reptile_task(task, inner, 3);
  CHECK(learner.pending_tasks() == 2);
  learner.outer_step();
  learner.gather_values(after);
  CHECK(learner.pending_tasks() == 0);
  CHECK(relative_error(after, ColVector<double>(theta - 0.5 * (g1 + g2))) < 1e-12);
}

TEST_CASE("MetaLearner: Reptile on a family of quadratic tasks finds their mean optimum", "[train][meta]") {
  // Task t: L_t(θ) = ½‖θ − c_t‖², c_t ~ N(μ, 1); Reptile's fixed point is E[θ_k] = θ ⇒ θ = μ.
  Rng rng(9);
  MetaQuadratic q;
  q.theta = Parameter<double>(1, 3);
  q.a = Matrix<double>::Identity(3, 3);
  const RowVector<double> mu = (RowVector<double>(3) << 2.0, -1.0, 0.5).finished();
  SGD<double> outer(std::vector<NamedParameter<double>>{{"theta", &q.theta}}, SGDOptions{0.1});
  SGD<double> inner(std::vector<NamedParameter<double>>{{"theta", &q.theta}}, SGDOptions{0.3});
  MetaLearner<double> learner({{"theta", &q.theta}}, outer);
  for (int it = 0; it < 400; ++it) {
    for (int t = 0; t < 4; ++t) {
      q.b = -(mu + test::random_matrix<double>(1, 3, rng));  // ∇ = θ − c_t
      learner.add_reptile_task(q, inner, 5);
    }
    learner.outer_step();
  }
  CHECK((q.theta.value - mu).norm() < 0.25);
}

TEST_CASE("MetaLearner: bad input is refused by name", "[train][meta]") {
  const auto fx = read_meta_fixture();
  MetaTinyTask task(fx);
  SGD<double> outer(task.subset(), SGDOptions{0.1});
  PEFT_REQUIRE_THROWS_WITH(MetaLearner<double>({}, outer), ConfigError, "no parameters");
  PEFT_REQUIRE_THROWS_WITH(MetaLearner<double>({{"fc1.bias", &task.fc1.bias}}, outer), ConfigError,
                           "\"fc1.bias\" is frozen");
  PEFT_REQUIRE_THROWS_WITH(MetaLearner<double>({{"a", &task.fc2.bias}, {"b", &task.fc2.bias}}, outer), ConfigError,
                           "\"b\" is listed twice (also as \"a\")");
  MetaLearner<double> learner(task.subset(), outer);
  ColVector<double> g;
  PEFT_REQUIRE_THROWS_WITH(learner.maml_gradient(task, -1.0, 1, g), ConfigError, "inner_lr must be finite and >= 0");
  PEFT_REQUIRE_THROWS_WITH(learner.maml_gradient(task, 0.1, -2, g), ConfigError, "inner steps must be >= 0, got -2");
  PEFT_REQUIRE_THROWS_WITH(learner.outer_step(), ConfigError, "no task added");
  PEFT_REQUIRE_THROWS_WITH(learner.restore(), ConfigError, "without a preceding adapt()");
  MetaLearner<double> no_outer(task.subset());
  no_outer.add_maml_task(task, 0.1, 1);
  PEFT_REQUIRE_THROWS_WITH(no_outer.outer_step(), ConfigError, "built without an outer optimizer");
  ColVector<double> v(3), hv;
  PEFT_REQUIRE_THROWS_WITH(learner.hessian_vector_product(task, v, hv), ShapeError, "v has 3 values, expected 16");
  task.fc2.weight.set_trainable(false);
  PEFT_REQUIRE_THROWS_WITH(learner.maml_gradient(task, 0.1, 1, g), ConfigError, "\"fc2.weight\" was frozen");
}
