// Parameter groups, lazy state and the error paths shared by every optimizer (BasicOptimizer).
#include <peft/layers/lora_linear.hpp>
#include <peft/optim/adam.hpp>
#include <peft/optim/sgd.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "optim_test_utils.hpp"

using namespace peft;
using test::TwoParams;

TEST_CASE("Only trainable parameters get optimizer state, created on the first step", "[optim][state]") {
  TwoParams<double> m;
  m.weight.set_trainable(false);
  AdamW<double> opt(m, AdamWOptions{});
  CHECK(opt.num_states() == 0);  // lazy: nothing before the first step
  m.compute_grads();
  const Matrix<double> frozen_before = m.weight.value;
  opt.step();
  CHECK(opt.num_states() == 1);
  CHECK(opt.state("weight") == nullptr);
  CHECK(opt.state("bias") != nullptr);
  CHECK(m.weight.value == frozen_before);  // frozen: untouched
  CHECK(m.weight.grad.size() == 0);
}

TEST_CASE("A parameter frozen after it got state keeps it and is skipped", "[optim][state]") {
  TwoParams<double> m;
  SGD<double> opt(m, SGDOptions{0.1, 0.9});
  m.compute_grads();
  opt.step();
  m.bias.set_trainable(false);
  const Matrix<double> b = m.bias.value;
  m.compute_grads();
  opt.step();
  CHECK(m.bias.value == b);
  CHECK(opt.step_count("bias") == 1);
  CHECK(opt.state("bias") != nullptr);  // kept, as torch keeps state of parameters without grad
}

TEST_CASE("Learning rates and weight decay per group can be read and set", "[optim][groups]") {
  TwoParams<double> m;
  SGD<double> opt({{{{"weight", &m.weight}}, 0.1, 0.01, "w"}, {{{"bias", &m.bias}}, 0.2, 0.0, ""}}, SGDOptions{});
  REQUIRE(opt.num_groups() == 2);
  CHECK(opt.group_name(1) == "group1");  // unnamed groups are numbered
  opt.set_lr(1, 0.05);
  CHECK(opt.lr(1) == 0.05);
  CHECK(opt.initial_lr(1) == 0.2);  // schedules scale the initial lr
  opt.set_lr(0.3);
  CHECK(opt.lr(0) == 0.3);
  CHECK(opt.lr(1) == 0.3);
  opt.set_weight_decay(0, 0.5);
  CHECK(opt.weight_decay(0) == 0.5);
  // The group lr is what the step uses: θ ← θ − lr·g with no momentum.
  m.zero_grad();
  m.weight.grad.setOnes();
  const Matrix<double> w = m.weight.value;
  opt.set_weight_decay(0, 0.0);
  opt.set_lr(0, 0.25);
  opt.step();
  CHECK(test::rel_diff(m.weight.value, Matrix<double>(w.array() - 0.25)) < 1e-15);
  opt.zero_grad();
  CHECK(m.weight.grad.isZero(0));
}

TEST_CASE("add_param_group brings a new head into training", "[optim][groups]") {
  TwoParams<double> m;
  Adam<double> opt(std::vector<NamedParameter<double>>{{"weight", &m.weight}}, AdamOptions{});
  opt.add_param_group({{{"bias", &m.bias}}, 0.01, 0.0, "head"});
  CHECK(opt.num_groups() == 2);
  m.compute_grads();
  opt.step();
  CHECK(opt.step_count("bias") == 1);
  CHECK(opt.group_index("head") == 1);
}

TEST_CASE("Optimizers reject bad groups with named errors", "[optim][groups][errors]") {
  TwoParams<double> m;
  const SGDOptions o{0.1};
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(std::vector<ParamGroup<double>>{}, o), ConfigError,
                           "SGD: got no parameter groups");
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(std::vector<ParamGroup<double>>{{{}, 0.1, 0.0, "empty"}}, o), ConfigError,
                           "group \"empty\" has no parameters");
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(std::vector<ParamGroup<double>>{{{{"w", &m.weight}}, 0.1, 0.0, "a"},
                                                                       {{{"w2", &m.weight}}, 0.1, 0.0, "b"}},
                                       o),
                           ConfigError, "parameter \"w2\" appears in more than one group (already listed as \"w\")");
  PEFT_REQUIRE_THROWS_WITH(
      SGD<double>(std::vector<ParamGroup<double>>{{{{"w", &m.weight}, {"w", &m.weight}}, 0.1, 0.0, "a"}}, o),
      ConfigError, "listed twice in group \"a\"");
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(std::vector<ParamGroup<double>>{{{{"w", nullptr}}, 0.1, 0.0, "a"}}, o),
                           ConfigError, "parameter \"w\" in group \"a\" is null");
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(std::vector<ParamGroup<double>>{{{{"w", &m.weight}}, -0.1, 0.0, "neg"}}, o),
                           ConfigError, "lr of group \"neg\" must be finite and >= 0");
  PEFT_REQUIRE_THROWS_WITH(
      SGD<double>(
          std::vector<ParamGroup<double>>{{{{"w", &m.weight}}, 0.1, 0.0, "x"}, {{{"b", &m.bias}}, 0.1, 0.0, "x"}}, o),
      ConfigError, "two parameter groups are named \"x\"");
  SGD<double> opt(m, o);
  PEFT_REQUIRE_THROWS_WITH(opt.set_lr(0, std::nan("")), ConfigError, "lr of group \"default\"");
  PEFT_REQUIRE_THROWS_WITH(opt.set_weight_decay(0, -1.0), ConfigError, "weight_decay of group \"default\"");
  PEFT_REQUIRE_THROWS_WITH(opt.lr(3), ConfigError, "group index 3 out of range, 1 groups");
  PEFT_REQUIRE_THROWS_WITH(opt.group_index("head"), ConfigError,
                           "no parameter group named \"head\"; groups are \"default\"");
  PEFT_REQUIRE_THROWS_WITH(opt.state("nope"), ConfigError, "SGD: no parameter named \"nope\"");
  PEFT_REQUIRE_THROWS_WITH(opt.add_param_group({{{"b", &m.bias}}, 0.1, 0.0, "again"}), ConfigError,
                           "appears in more than one group");
}

TEST_CASE("step() rejects gradients and parameters whose shapes changed", "[optim][errors]") {
  TwoParams<double> m;
  AdamW<double> opt(m, AdamWOptions{});
  m.compute_grads();
  m.bias.grad.resize(2, 2);
  const Matrix<double> w_before = m.weight.value;
  PEFT_REQUIRE_THROWS_WITH(opt.step(), ShapeError,
                           "AdamW: parameter \"bias\" has gradient of shape [2, 2], expected [1, 2]");
  CHECK(m.weight.value == w_before);  // validated before anything moved
  CHECK(opt.num_states() == 0);
  m.compute_grads();
  opt.step();
  m.weight.value.resize(3, 2);  // resized behind the optimizer's back
  m.weight.grad.setZero(3, 2);
  PEFT_REQUIRE_THROWS_WITH(opt.step(), ShapeError,
                           "parameter \"weight\" has shape [3, 2] but its exp_avg has shape [2, 2]");

  TwoParams<double> m2;
  SGD<double> sgd(m2, SGDOptions{0.1, 0.9});
  m2.compute_grads();
  sgd.step();
  m2.bias.value.resize(1, 3);
  m2.bias.grad.setZero(1, 3);
  PEFT_REQUIRE_THROWS_WITH(sgd.step(), ShapeError, "momentum buffer has shape [1, 2]");
}

// ---- nothing trainable, and parameters that appear or vanish after the optimizer was built ----

TEST_CASE("An optimizer with nothing trainable is a ConfigError (torch: empty parameter list)", "[optim][errors]") {
  TwoParams<double> m;
  m.weight.set_trainable(false);
  m.bias.set_trainable(false);
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(m, SGDOptions{0.1}), ConfigError,
                           "SGD: none of the 2 parameters given is trainable, so there is nothing to optimize; add "
                           "adapters or unfreeze parameters before building the optimizer");
  PEFT_REQUIRE_THROWS_WITH(Adam<double>(m, AdamOptions{}), ConfigError, "Adam: none of the 2 parameters");
  PEFT_REQUIRE_THROWS_WITH(AdamW<double>(std::vector<NamedParameter<double>>{{"weight", &m.weight}}, AdamWOptions{}),
                           ConfigError, "AdamW: none of the 1 parameters given is trainable");
  PEFT_REQUIRE_THROWS_WITH(SGD<double>(std::vector<NamedParameter<double>>{}, SGDOptions{}), ConfigError,
                           "SGD: got an empty parameter list: parameter group \"default\" has no parameters");
  m.bias.set_trainable(true);  // one trainable parameter is enough; the frozen one joins when unfrozen
  SGD<double> opt(m, SGDOptions{0.1});
  CHECK(opt.watched_module() == &m);
}

TEST_CASE("A LoRA adapter added after the optimizer was built is reported at step()", "[optim][errors][lora]") {
  Rng rng(3);
  LoRALinear<double> layer(5, 4, rng, true, "layers.0.q");
  layer.add_adapter("a", LoraConfig{2, 4.0});
  layer.freeze_base();
  AdamW<double> opt(layer, AdamWOptions{});
  const Matrix<double> x = test::random_matrix<double>(3, 5, rng);
  const Matrix<double> g = test::random_matrix<double>(3, 4, rng);
  auto train_step = [&](Optimizer<double>& o) {
    o.zero_grad();
    typename LoRALinear<double>::Cache c;
    layer.forward(x, c);
    layer.backward(c, g, nullptr);
    o.step();
  };
  train_step(opt);
  CHECK(opt.step_count("lora_A.a.weight") == 1);

  layer.add_adapter("b", LoraConfig{2, 4.0});  // "b" is trainable now, "a" frozen
  const Matrix<double> a_before = layer.adapter("a").A.value;
  const std::string expected =
      "AdamW: trainable parameters \"lora_A.b.weight\", \"lora_B.b.weight\" of module \"layers.0.q\" are not in this "
      "optimizer (an adapter added, or a parameter unfrozen, after the optimizer was built); rebuild the optimizer, or "
      "pass the new parameters to add_param_group";
  PEFT_REQUIRE_THROWS_WITH(opt.step(), ConfigError, expected);
  PEFT_REQUIRE_THROWS_WITH(opt.zero_grad(), ConfigError, expected);
  CHECK(layer.adapter("a").A.value == a_before);  // nothing was stepped

  // torch's remedy: add the new parameters as a group; then training goes on.
  opt.add_param_group(
      {{{"lora_A.b.weight", &layer.adapter("b").A}, {"lora_B.b.weight", &layer.adapter("b").B}}, 1e-3, 0.0, "b"});
  train_step(opt);
  CHECK(opt.step_count("lora_A.b.weight") == 1);
  CHECK(opt.step_count("lora_A.a.weight") == 1);  // frozen since "b" became the active adapter

  // Or rebuild the optimizer.
  AdamW<double> rebuilt(layer, AdamWOptions{});
  train_step(rebuilt);
  CHECK(rebuilt.step_count("lora_B.b.weight") == 1);
}

TEST_CASE("A deleted adapter or an unfrozen parameter outside the optimizer is reported at step()",
          "[optim][errors][lora]") {
  Rng rng(4);
  LoRALinear<double> layer(5, 4, rng, true, "q");
  layer.add_adapter("a", LoraConfig{2, 4.0});
  layer.add_adapter("b", LoraConfig{3, 4.0});
  layer.set_active({"a", "b"});
  layer.freeze_base();
  SGD<double> opt(layer, SGDOptions{0.1});
  opt.zero_grad();
  layer.delete_adapter("a");  // the optimizer's pointers to a's parameters would dangle
  PEFT_REQUIRE_THROWS_WITH(
      opt.step(), ConfigError,
      "SGD: parameters \"lora_A.a.weight\", \"lora_B.a.weight\" of this optimizer are no longer in "
      "module \"q\" (an adapter deleted or replaced after the optimizer was built); rebuild "
      "the optimizer");

  // Built from groups of trainable parameters only, then the base is unfrozen: with the module
  // given, the optimizer sees it; without it, the caller chose the parameters and nothing is checked.
  SGD<double> watched(layer, std::vector<ParamGroup<double>>{{trainable_parameters(layer), 0.1, 0.0, "adapters"}},
                      SGDOptions{});
  SGD<double> unwatched(std::vector<ParamGroup<double>>{{trainable_parameters(layer), 0.1, 0.0, "adapters"}},
                        SGDOptions{});
  CHECK(unwatched.watched_module() == nullptr);
  layer.weight.set_trainable(true);
  PEFT_REQUIRE_THROWS_WITH(watched.step(), ConfigError, "trainable parameter \"weight\" of module \"q\" is not");
  layer.zero_grad();
  unwatched.step();
  CHECK(unwatched.step_count("lora_A.b.weight") == 1);
}

TEST_CASE("A step checks the module only after parameters changed (parameter_epoch)", "[optim]") {
  TwoParams<double> m;
  SGD<double> opt(m, SGDOptions{0.1});
  const std::uint64_t e0 = parameter_epoch();
  m.compute_grads();
  opt.step();
  opt.step();
  CHECK(parameter_epoch() == e0);  // steps create, destroy and (un)freeze nothing
  m.bias.set_trainable(true);      // no change of the flag: no new epoch
  CHECK(parameter_epoch() == e0);
  m.bias.set_trainable(false);
  CHECK(parameter_epoch() != e0);
  const std::uint64_t e1 = parameter_epoch();
  { const Parameter<double> p(2, 2, false); }  // created and destroyed
  CHECK(parameter_epoch() != e1);
  opt.step();  // re-checks the module, finds it consistent
}
