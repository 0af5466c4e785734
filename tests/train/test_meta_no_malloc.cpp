// Meta-learning's per-task work allocates nothing after the first task: MetaLearner's inner loops,
// Hessian-vector products and outer step, and PrototypicalLoss (support/no_malloc.hpp).
#include "support/no_malloc.hpp"

#include <peft/meta/maml.hpp>
#include <peft/meta/protonet.hpp>
#include <peft/optim/sgd.hpp>

#include "support/test_utils.hpp"

using namespace peft;

namespace {
/// L(θ) = ½‖θ ⊙ d − c‖² on one [2, 3] parameter: gradient d ⊙ (θ ⊙ d − c).
struct MetaNoMallocLoss {
  Parameter<float> theta{2, 3};
  Matrix<float> c = Matrix<float>::Constant(2, 3, 0.5f), d = Matrix<float>::Constant(2, 3, 1.5f);
  float operator()(MetaSplit) {
    theta.grad.array() += d.array() * (theta.value.array() * d.array() - c.array());
    return 0.5f * (theta.value.array() * d.array() - c.array()).square().sum();
  }
};
}  // namespace

TEST_CASE("meta: MetaLearner allocates nothing after its first task", "[train][meta][alloc]") {
  CHECK(peft::test::no_malloc::allocations_after_warmup(
            [] {
              Matrix<float> m(5, 4);
              m.setZero();
            },
            0, 3) > 0);
  MetaNoMallocLoss loss;
  SGD<float> outer(std::vector<NamedParameter<float>>{{"theta", &loss.theta}}, SGDOptions{0.1});
  SGD<float> inner(std::vector<NamedParameter<float>>{{"theta", &loss.theta}}, SGDOptions{0.2, 0.9});
  MetaLearner<float> learner({{"theta", &loss.theta}}, outer);
  CHECK(peft::test::no_malloc::allocations_after_warmup(
            [&] {
              learner.add_maml_task(loss, 0.1, 3);
              learner.add_fomaml_task(loss, inner, 3);
              learner.add_reptile_task(loss, inner, 3);
              learner.outer_step();
              learner.adapt_sgd(loss, 0.1, 2);
              learner.restore();
            },
            1, 5) == 0);
}

TEST_CASE("meta: PrototypicalLoss allocates nothing after its first episode", "[train][meta][alloc]") {
  Rng rng(2);
  const Matrix<float> s = test::random_matrix<float>(6, 4, rng), q = test::random_matrix<float>(5, 4, rng);
  const std::vector<std::int64_t> ys{0, 1, 2, 0, 1, 2}, yq{2, 1, 0, 0, 1};
  PrototypicalLoss<float> proto;
  Matrix<float> ds, dq;
  CHECK(peft::test::no_malloc::allocations_after_warmup([&] { proto.forward_backward(s, ys, q, yq, 3, &ds, &dq); }, 1,
                                                        5) == 0);
}
