#include <peft/optim/schedule.hpp>
#include <peft/optim/sgd.hpp>

#include "optim_test_utils.hpp"

using namespace peft;

namespace {
// Steps and values of the Hugging Face transformers lambdas (optimization.py), printed by
// benchmarks/peer/optim_reference.py (function schedules()).
const std::vector<std::int64_t> kSteps = {0, 1, 5, 9, 10, 11, 37, 55, 99, 100, 130};

void check_values(const Schedule& s, const std::vector<double>& expected) {
  for (std::size_t i = 0; i < kSteps.size(); ++i) {
    INFO("step " << kSteps[i]);
    CHECK(s.multiplier(kSteps[i]) == Approx(expected[i]).margin(1e-15).epsilon(1e-13));
  }
}
}  // namespace

TEST_CASE("Linear warmup then linear decay matches HF get_linear_schedule_with_warmup", "[optim][schedule]") {
  check_values(LinearSchedule(10, 100),
               {0.0, 0.1, 0.5, 0.9, 1.0, 0.9888888888888889, 0.7, 0.5, 0.011111111111111112, 0.0, 0.0});
}

TEST_CASE("Linear warmup then cosine decay matches HF get_cosine_schedule_with_warmup", "[optim][schedule]") {
  check_values(CosineSchedule(10, 100), {0.0, 0.1, 0.5, 0.9, 1.0, 0.9996954135095479, 0.7938926261462366, 0.5,
                                         0.00030458649045211894, 0.0, 0.24999999999999978});
  check_values(CosineSchedule(10, 100, 2.0), {0.0, 0.1, 0.5, 0.9, 1.0, 0.9951340343707852, 0.09549150281252622, 1.0,
                                              0.9951340343707851, 1.0, 0.24999999999999922});
  // HF get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate = 0.1)
  check_values(CosineSchedule(10, 100, 0.5, 0.1), {0.0, 0.1, 0.5, 0.9, 1.0, 0.9997258721585931, 0.8145033635316129,
                                                   0.55, 0.10027412784140691, 0.1, 0.32499999999999984});
}

TEST_CASE("Constant schedules and the linear min_lr_ratio floor", "[optim][schedule]") {
  CHECK(ConstantSchedule().multiplier(0) == 1.0);
  CHECK(ConstantSchedule().multiplier(12345) == 1.0);
  CHECK(ConstantSchedule(4).multiplier(1) == 0.25);
  CHECK(ConstantSchedule(4).multiplier(4) == 1.0);
  const LinearSchedule floor(0, 10, 0.2);
  CHECK(floor.multiplier(0) == Approx(1.0));
  CHECK(floor.multiplier(5) == Approx(0.6));  // 0.5·0.8 + 0.2
  CHECK(floor.multiplier(10) == Approx(0.2));
  CHECK(floor.multiplier(50) == Approx(0.2));
  CHECK(LinearSchedule(0, 10).multiplier(0) == 1.0);  // no warmup: full lr at step 0
}

TEST_CASE("apply_schedule reproduces torch LambdaLR with the HF cosine lambda", "[optim][schedule]") {
  // torch: SGD(lr=0.5) + LambdaLR(cosine W=2 N=6); grad 1; step(); scheduler.step(); 4 times.
  test::TwoParams<double> m;
  m.weight.set_trainable(false);
  m.bias.value.setZero();
  SGD<double> opt(std::vector<ParamGroup<double>>{{{{"bias", &m.bias}}, 0.5, 0.0, "p"}}, SGDOptions{});
  const CosineSchedule schedule(2, 6);
  for (std::int64_t k = 0; k < 4; ++k) {
    apply_schedule(opt, schedule, k);
    m.bias.grad.setOnes();
    opt.step();
  }
  CHECK(m.bias.value(0, 0) == Approx(-1.176776695296637).epsilon(1e-14));
  CHECK(opt.initial_lr(0) == 0.5);
}

TEST_CASE("Schedules reject bad arguments with named errors", "[optim][schedule][errors]") {
  PEFT_REQUIRE_THROWS_WITH(LinearSchedule(20, 10), ConfigError,
                           "LinearSchedule: warmup_steps 20 exceeds total_steps 10");
  PEFT_REQUIRE_THROWS_WITH(CosineSchedule(-1, 10), ConfigError, "CosineSchedule: warmup_steps must be >= 0, got -1");
  PEFT_REQUIRE_THROWS_WITH(CosineSchedule(0, 0), ConfigError, "total_steps must be > 0, got 0");
  PEFT_REQUIRE_THROWS_WITH(CosineSchedule(0, 10, 0.0), ConfigError, "num_cycles must be finite and > 0");
  PEFT_REQUIRE_THROWS_WITH(CosineSchedule(0, 10, 0.5, 1.5), ConfigError, "min_lr_ratio must be in [0, 1], got 1.5");
  PEFT_REQUIRE_THROWS_WITH(LinearSchedule(0, 10, -0.1), ConfigError, "min_lr_ratio");
  PEFT_REQUIRE_THROWS_WITH(ConstantSchedule(-3), ConfigError, "ConstantSchedule: warmup_steps must be >= 0, got -3");
  PEFT_REQUIRE_THROWS_WITH(LinearSchedule(1, 10).multiplier(-1), ConfigError, "step must be >= 0, got -1");
}
