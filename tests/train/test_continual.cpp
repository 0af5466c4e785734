#include <peft/train/continual.hpp>
#include <peft/train/gradient_check.hpp>

#include <cmath>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

TEST_CASE("continual: ACC, BWT, FWT and forgetting of a hand-made accuracy matrix", "[train][continual]") {
  AccuracyMatrix r(3);
  const double m[3][3] = {{0.9, 0.6, 0.5}, {0.7, 0.95, 0.55}, {0.6, 0.8, 0.85}};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) r.set(i, j, m[i][j]);
  CHECK(std::isnan(r.metrics().fwt));  // no baseline yet
  r.set_baseline(0, 0.5);
  r.set_baseline(1, 0.5);
  r.set_baseline(2, 0.4);
  const ContinualMetrics cm = r.metrics();
  CHECK(cm.acc == Approx((0.6 + 0.8 + 0.85) / 3));
  CHECK(cm.bwt == Approx(((0.6 - 0.9) + (0.8 - 0.95)) / 2));
  CHECK(cm.fwt == Approx(((0.6 - 0.5) + (0.55 - 0.4)) / 2));
  // f_0 = max(0.9, 0.7) − 0.6, f_1 = max(0.6, 0.95) − 0.8
  CHECK(cm.forgetting == Approx((0.3 + 0.15) / 2));

  AccuracyMatrix partial(2);
  partial.set(0, 0, 1.0);
  PEFT_REQUIRE_THROWS_WITH(partial.metrics(), ConfigError, "R[0][1] is not set");
  PEFT_REQUIRE_THROWS_WITH(partial.set(2, 0, 1.0), ConfigError, "entry [2][0] is outside a 2-task matrix");
}

TEST_CASE("continual: run_task_sequence evaluates the baseline, then every task after each training",
          "[train][continual]") {
  std::vector<int> trained;
  double knowledge[3] = {0, 0, 0};
  const AccuracyMatrix r = run_task_sequence(
      3,
      [&](int i) {
        trained.push_back(i);
        for (double& k : knowledge) k *= 0.5;  // forget half of everything, then learn task i
        knowledge[i] = 1.0;
      },
      [&](int j) { return knowledge[j]; });
  CHECK(trained == std::vector<int>{0, 1, 2});
  CHECK(r.baseline(1) == 0.0);
  CHECK(r.at(0, 0) == 1.0);
  CHECK(r.at(2, 0) == 0.25);
  const ContinualMetrics cm = r.metrics();
  CHECK(cm.acc == Approx((0.25 + 0.5 + 1.0) / 3));
  CHECK(cm.bwt == Approx(-(0.75 + 0.5) / 2));
  CHECK(cm.forgetting == Approx((0.75 + 0.5) / 2));
  CHECK(cm.fwt == 0.0);
}

TEST_CASE("continual: online EWC decays the Fisher across tasks and its gradient is exact", "[train][continual]") {
  Rng rng(1401);
  Parameter<double> w(2, 3), b(1, 3, true, true);
  w.value = test::random_matrix<double>(2, 3, rng);
  b.value = test::random_matrix<double>(1, 3, rng);
  std::vector<NamedParameter<double>> params{{"w", &w}, {"b", &b}};
  OnlineEWC<double> ewc(params, 2.0, 0.5);
  CHECK(ewc.value() == 0.0);  // nothing consolidated yet
  // Task 1: two "batches" with known gradients.
  const Matrix<double> g1 = test::random_matrix<double>(2, 3, rng), g2 = test::random_matrix<double>(2, 3, rng);
  const Matrix<double> gb = test::random_matrix<double>(1, 3, rng);
  w.grad = g1;
  b.grad = gb;
  ewc.accumulate();
  w.grad = g2;
  ewc.accumulate();
  ewc.end_task();
  const Matrix<double> f1 = Matrix<double>((g1.array().square() + g2.array().square()) / 2.0);
  CHECK(test::rel_diff(ewc.fisher(0), f1) < 1e-15);
  CHECK(test::rel_diff(ewc.anchor(0), w.value) == 0.0);
  // Task 2: the weights moved; one batch.
  w.value.array() += 0.3;
  const Matrix<double> g3 = test::random_matrix<double>(2, 3, rng);
  w.grad = g3;
  ewc.accumulate();
  ewc.end_task();
  CHECK(test::rel_diff(ewc.fisher(0), Matrix<double>(0.5 * f1.array() + g3.array().square())) < 1e-15);
  CHECK(ewc.tasks_consolidated() == 2);
  // Move away from the anchor and check the penalty's gradient.
  w.value = test::random_matrix<double>(2, 3, rng);
  b.value = test::random_matrix<double>(1, 3, rng);
  w.zero_grad();
  b.zero_grad();
  const double v = ewc.add_to_gradients();
  CHECK(v == Approx(ewc.value()));
  CHECK(v > 0.0);
  auto pen = [&] { return ewc.value(); };
  CHECK(relative_error(w.grad, numerical_gradient(w.value, pen)) < Tolerances<double>::grad);
  CHECK(relative_error(b.grad, numerical_gradient(b.value, pen)) < Tolerances<double>::grad);

  PEFT_REQUIRE_THROWS_WITH(ewc.end_task(), ConfigError, "end_task() before any accumulate()");
  PEFT_REQUIRE_THROWS_WITH(OnlineEWC<double>(params, 1.0, 1.5), ConfigError, "gamma must be in [0, 1], got 1.5");
  b.set_trainable(false);
  PEFT_REQUIRE_THROWS_WITH(ewc.accumulate(), ConfigError, "parameter \"b\" has no gradient (frozen)");
}

TEST_CASE("continual: the reservoir keeps a uniform sample of the stream", "[train][continual][replay]") {
  // 400 items offered to a 40-item buffer, 300 times: each item is kept with probability 0.1.
  std::vector<int> kept(400, 0);
  for (std::uint64_t seed = 0; seed < 300; ++seed) {
    ReplayBuffer buf(40, false, seed);
    for (int i = 0; i < 400; ++i) buf.add({i, i % 4, i / 100});
    REQUIRE(buf.size() == 40);
    for (const auto& it : buf.items()) ++kept[static_cast<std::size_t>(it.id)];
  }
  // Mean over blocks of 100 items (early vs late): 100 · 300 · 0.1 = 3000 each, sd ≈ 52.
  for (int block = 0; block < 4; ++block) {
    int s = 0;
    for (int i = 0; i < 100; ++i) s += kept[static_cast<std::size_t>(block * 100 + i)];
    CHECK(std::abs(s - 3000) < 250);
  }
}

TEST_CASE("continual: the class-balanced reservoir evens out an imbalanced stream, and checkpoints",
          "[train][continual][replay]") {
  ReplayBuffer buf(50, true, 7);
  std::int64_t id = 0;
  for (int i = 0; i < 900; ++i) buf.add({id++, 0, 0});  // class 0 floods the stream first
  for (int c = 1; c < 5; ++c)
    for (int i = 0; i < 30; ++i) buf.add({id++, c, c});
  const std::vector<std::int64_t> counts = buf.class_counts();
  REQUIRE(counts.size() == 5);
  for (auto n : counts) CHECK(n == 10);
  ReplayBuffer plain(50, false, 7);
  for (int i = 0; i < 900; ++i) plain.add({i, 0, 0});
  for (int c = 1; c < 5; ++c)
    for (int i = 0; i < 30; ++i) plain.add({1000 + c * 100 + i, c, c});
  CHECK(plain.class_counts()[0] > 30);  // uniform over the stream: mostly class 0

  // Resume from a state: the same items afterwards as the uninterrupted buffer.
  const ReplayBuffer::State st = buf.state();
  ReplayBuffer resumed(50, true, 999);
  resumed.set_state(st);
  for (int i = 0; i < 200; ++i) {
    const ReplayItem it{id++, i % 7, 5};
    buf.add(it);
    resumed.add(it);
  }
  std::vector<ReplayItem> a, b;
  buf.sample(20, a);
  resumed.sample(20, b);
  REQUIRE(a.size() == 20);
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i].id == b[i].id);
  std::vector<std::int64_t> ids;
  for (const auto& it : a) ids.push_back(it.id);
  std::sort(ids.begin(), ids.end());
  CHECK(std::adjacent_find(ids.begin(), ids.end()) == ids.end());  // distinct

  ReplayBuffer::State bad = st;
  bad.seen += 1;
  PEFT_REQUIRE_THROWS_WITH(resumed.set_state(bad), ConfigError, "state counts are inconsistent");
  PEFT_REQUIRE_THROWS_WITH(ReplayBuffer(0, false, 1), ConfigError, "capacity must be > 0");
  PEFT_REQUIRE_THROWS_WITH(buf.add({1, -1, 0}), ConfigError, "label -1 is negative");
}

TEST_CASE("continual: add_distillation adds lambda times the distillation loss and its gradient",
          "[train][continual][lwf]") {
  Rng rng(1402);
  Matrix<double> s = test::random_matrix<double>(3, 4, rng, 2.0);
  const Matrix<double> t = test::random_matrix<double>(3, 4, rng, 2.0);
  const Matrix<double> base = test::random_matrix<double>(3, 4, rng);
  Matrix<double> acc = base, scratch, ref;
  DistillationWorkspace<double> ws;
  const DistillationOptions opt{2.0, DistillationLoss::kKL};
  const double v = add_distillation<double>(s, t, 0.7, opt, acc, ws, scratch);
  CHECK(v == Approx(0.7 * distillation_loss<double>(s, t, &ref, opt)));
  CHECK(test::rel_diff(acc, Matrix<double>(base + 0.7 * ref)) < 1e-14);
  Matrix<double> wrong(2, 4);
  PEFT_REQUIRE_THROWS_WITH(add_distillation<double>(s, t, 0.7, opt, wrong, ws, scratch), ShapeError,
                           "gradient accumulator has shape [2, 4]");
}
