// Repeated optimizer steps (and the losses, clipping, schedules and regularizers called around
// them) allocate nothing after the first step: every heap allocation counted (support/no_malloc.hpp).
#include "support/no_malloc.hpp"

#include <peft/loss/bradley_terry.hpp>
#include <peft/loss/cross_entropy.hpp>
#include <peft/loss/mse.hpp>
#include <peft/optim/adam.hpp>
#include <peft/optim/clip.hpp>
#include <peft/optim/regularizers.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/optim/sgd.hpp>

#include "optim_test_utils.hpp"

using namespace peft;
using test::TwoParams;

namespace {
/// Runs `fn` five times with Eigen allocations forbidden; returns the forbidden allocations.
template <class Fn>
long without_malloc(Fn&& fn) {
  return peft::test::no_malloc::allocations_after_warmup(fn, 0, 5);
}

template <class T>
void set_grads(TwoParams<T>& m, T value) {
  m.weight.grad.setConstant(value);
  m.bias.grad.setConstant(-value);
}
}  // namespace

TEST_CASE("optim: the no-malloc guard is live in this build", "[optim][alloc]") {
  CHECK(without_malloc([] {
          Matrix<float> m(7, 9);
          m.setZero();
        }) > 0);
}

TEMPLATE_TEST_CASE("Optimizer steps allocate nothing after the first", "[optim][alloc]", float) {
  using T = TestType;
  TwoParams<T> a, b, c, d;
  d.bias.set_trainable(false);  // a frozen parameter is skipped without allocating
  SGD<T> sgd(a, SGDOptions{0.1, 0.9, 0.0, 0.01, true});
  Adam<T> adam(b, AdamOptions{0.1, 0.9, 0.999, 1e-8, 0.05});
  AdamW<T> adamw(c, AdamWOptions{});
  AdamW<T> partly_frozen(d, AdamWOptions{});
  const CosineSchedule schedule(2, 10);
  for (auto* m : {&a, &b, &c, &d}) m->compute_grads();
  sgd.step();  // first step: state is created here
  adam.step();
  adamw.step();
  partly_frozen.step();
  const Matrix<T> before = c.weight.value;
  std::int64_t k = 1;
  const long allocations = without_malloc([&] {
    for (auto* m : {&a, &b, &c}) set_grads<T>(*m, T(0.5));
    d.weight.grad.setConstant(T(0.5));
    apply_schedule(adamw, schedule, k++);
    sgd.step();
    adam.step();
    adamw.step();
    partly_frozen.step();
    sgd.zero_grad();
  });
  CHECK(allocations == 0);
  CHECK(adamw.step_count("weight") == 6);
  CHECK(c.weight.value != before);
  CHECK(partly_frozen.num_states() == 1);
}

TEMPLATE_TEST_CASE("Losses, clipping and regularizers allocate nothing with reused buffers", "[optim][loss][alloc]",
                   float) {
  using T = TestType;
  TwoParams<T> m;
  const std::vector<NamedParameter<T>> params = {{"weight", &m.weight}, {"bias", &m.bias}};
  L2SP<T> l2sp(params, 0.1);
  EWC<T> ewc(params, 0.1);
  m.compute_grads();
  ewc.accumulate();
  ewc.finalize();
  Rng rng(5);
  const Matrix<T> logits = test::random_matrix<T>(8, 5, rng);
  const std::vector<std::int64_t> labels = {0, 1, 2, 3, 4, -100, 1, 2};
  const Matrix<T> pred = test::random_matrix<T>(8, 1, rng);
  const Matrix<T> target = test::random_matrix<T>(8, 1, rng);
  Matrix<T> dlogits(8, 5), dpred(8, 1), dc(8, 1), dr(8, 1);
  T total = 0;
  const long allocations = without_malloc([&] {
    total += cross_entropy<T>(logits, labels, &dlogits, {0.1, -100});
    total += mse<T>(pred, target, &dpred);
    total += bradley_terry<T>(pred, target, &dc, &dr);
    m.weight.grad.setConstant(T(10));
    total += static_cast<T>(clip_grad_norm(params, 1.0));
    total += l2sp.add_to_gradients();
    total += ewc.add_to_gradients();
  });
  CHECK(allocations == 0);
  CHECK(std::isfinite(static_cast<double>(total)));
}
