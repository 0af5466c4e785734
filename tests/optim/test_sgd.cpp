#include <peft/optim/sgd.hpp>

#include "optim_test_utils.hpp"

using namespace peft;
using test::check_trajectory;
using test::from_list;
using test::TwoParams;

// All reference values: torch.optim.SGD (torch 1.13, float64), benchmarks/peer/optim_reference.py.
TEMPLATE_TEST_CASE("SGD with weight decay matches torch", "[optim][sgd]", float, double) {
  TwoParams<TestType> m;
  SGD<TestType> opt(m, SGDOptions{0.1, 0.0, 0.0, 0.01, false});
  check_trajectory<TestType>(m, opt,
                             {{0.497, -0.919, 1.191, 0.2881875},
                              {0.4942266527, -0.8604658441, 1.0508679129, 0.3255058566618408},
                              {0.4916604466073981, -0.8158963607681156, 0.9637672454491149, 0.36173148400989363}},
                             {{-0.6570625, 1.1380000000000001},
                              {-0.5780380040113037, 0.9294859928},
                              {-0.5081461015972107, 0.7882541025562152}});
  CHECK(opt.state("weight")->momentum_buffer.size() == 0);  // no momentum, no buffer
}

TEMPLATE_TEST_CASE("SGD with momentum, dampening and weight decay matches torch", "[optim][sgd]", float, double) {
  TwoParams<TestType> m;
  SGD<TestType> opt(m, SGDOptions{0.1, 0.9, 0.1, 0.01, false});
  check_trajectory<TestType>(m, opt,
                             {{0.497, -0.919, 1.191, 0.2881875},  // first step: buffer = gradient, no dampening (torch)
                              {0.49180398743, -0.79341925969, 0.78678112161, 0.3561427709956567},
                              {0.48497916435357574, -0.6527303395247364, 0.4054427145527517, 0.4489164775575978}},
                             {{-0.6570625, 1.1380000000000001},
                              {-0.5022967036101733, 0.17453739352000017},
                              {-0.30614967913765606, -0.7472145646416509}});
  CHECK(opt.step_count("weight") == 3);
}

TEMPLATE_TEST_CASE("SGD with Nesterov momentum matches torch", "[optim][sgd]", float, double) {
  TwoParams<TestType> m;
  SGD<TestType> opt(m, SGDOptions{0.1, 0.9, 0.0, 0.01, true});
  check_trajectory<TestType>(m, opt,
                             {{0.4943, -0.8461, 0.9128999999999999, 0.32255625},
                              {0.48698385553667, -0.7017974195256099, 0.5733237837990899, 0.4224989498741918},
                              {0.47884548054517945, -0.5801938054249627, 0.33010353704589035, 0.540625811287678}},
                             {{-0.57341875, 0.3621999999999999},
                              {-0.36622627583128725, -0.45973633359112004},
                              {-0.13720978319647964, -1.235541004091238}});
}

TEMPLATE_TEST_CASE("SGD momentum for a parameter unfrozen mid-training matches torch", "[optim][sgd][unfreeze]", float,
                   double) {
  TwoParams<TestType> m;
  m.bias.set_trainable(false);
  SGD<TestType> opt(m, SGDOptions{0.1, 0.9});
  const std::vector<std::vector<double>> w = {
      {0.4975, -0.92, 1.1925, 0.2884375},
      {0.49293656406249997, -0.7901312, 0.7761697921874999, 0.360631559854126},
      {0.4868517808359605, -0.6439208113441889, 0.3847130674101892, 0.4609160155727923},
      {0.47983588832001606, -0.5056323146583885, 0.05670810227875834, 0.5813801611805046}};
  const std::vector<std::vector<double>> b = {
      {-0.75, 2.0}, {-0.75, 2.0}, {-0.6578125, 1.14}, {-0.49637906608581545, 0.15784559999999992}};
  check_trajectory<TestType>(m, opt, {w[0], w[1]}, {b[0], b[1]});
  CHECK(opt.state("bias") == nullptr);  // frozen: skipped, no state
  CHECK(opt.num_states() == 1);
  m.bias.set_trainable(true);  // gradual unfreezing: its momentum buffer starts now
  check_trajectory<TestType>(m, opt, {w[2], w[3]}, {b[2], b[3]});
  CHECK(opt.step_count("bias") == 2);
  CHECK(opt.step_count("weight") == 4);
}

TEST_CASE("SGD rejects bad options with named errors", "[optim][sgd][errors]") {
  TwoParams<double> m;
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(m, SGDOptions{-0.1}), ConfigError, "SGD: lr must be finite and >= 0");
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(m, SGDOptions{0.1, -0.5}), ConfigError, "momentum must be finite and >= 0");
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(m, SGDOptions{0.1, 0.9, 0.0, -1.0}), ConfigError, "weight_decay");
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(m, SGDOptions{0.1, 0.0, 0.0, 0.0, true}), ConfigError,
                           "Nesterov momentum requires momentum > 0 and dampening = 0");
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(m, SGDOptions{0.1, 0.9, 0.5, 0.0, true}), ConfigError, "dampening 0.5");
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(m, SGDOptions{0.1, 0.9, std::nan(""), 0.0, false}), ConfigError,
                           "dampening must be finite");
}
