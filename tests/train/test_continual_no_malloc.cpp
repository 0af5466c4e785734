// The per-step parts of continual and multi-task training allocate nothing after their first call:
// the distillation loss with its workspace, online EWC's penalty, the multi-task gradient capture
// and combinations, and the replay buffer once full (support/no_malloc.hpp).
#include "support/no_malloc.hpp"

#include <peft/loss/kl.hpp>
#include <peft/train/continual.hpp>
#include <peft/train/multitask.hpp>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("continual no-malloc: distillation, online EWC, multi-task combination, replay", "[train][no_malloc]") {
  Rng rng(1403);
  const Matrix<float> s = test::random_matrix<float>(8, 10, rng), t = test::random_matrix<float>(8, 10, rng);
  Matrix<float> acc = Matrix<float>::Zero(8, 10), scratch, lp;
  DistillationWorkspace<float> ws;
  const DistillationOptions opt{2.0, DistillationLoss::kKL};
  const std::vector<std::int64_t> labels{0, 1, 2, 3, 4, 5, 6, -100};
  CHECK(test::no_malloc::allocations_after_warmup([&] {
          add_distillation<float>(s, t, 0.5, opt, acc, ws, scratch);
          label_log_probs<float>(s, labels, lp);
        }) == 0);

  Parameter<float> w(6, 5), b(1, 5, true, true);
  w.value = test::random_matrix<float>(6, 5, rng);
  std::vector<NamedParameter<float>> params{{"w", &w}, {"b", &b}};
  OnlineEWC<float> ewc(params, 1.0, 0.9);
  w.grad.setConstant(0.1f);
  b.grad.setConstant(0.2f);
  ewc.accumulate();
  ewc.end_task();
  MultiTaskGradients<float> mt(params, 3);
  GradientConflicts report;
  CHECK(test::no_malloc::allocations_after_warmup([&] {
          ewc.add_to_gradients();
          for (int k = 0; k < 3; ++k) {
            w.grad.setConstant(static_cast<float>(k) - 1.f);
            b.grad.setConstant(1.f - static_cast<float>(k));
            mt.capture(k);
          }
          mt.conflicts(report);
          mt.combine_weighted();
          mt.combine_pcgrad(rng);
        }) == 0);

  ReplayBuffer buf(16, true, 3);
  std::vector<ReplayItem> drawn;
  std::int64_t id = 0;
  for (int i = 0; i < 64; ++i) buf.add({id++, i % 4, 0});
  buf.sample(8, drawn);
  // Under the sanitizers the count is Eigen's guard, which sees Eigen allocations only; the
  // buffer's vectors keep their capacity, so check the capacity directly too.
  const std::size_t cap = drawn.capacity();
  for (int i = 0; i < 64; ++i) buf.add({id++, i % 4, 1});
  buf.sample(8, drawn);
  CHECK(drawn.capacity() == cap);

  // Positive control: the guard is live for this code.
  CHECK(test::no_malloc::count_allocations([&] {
          Matrix<float> fresh = s * t.transpose();
          (void)fresh;
        }) > 0);
}
