#include <peft/optim/adam.hpp>
#include <peft/optim/param_groups.hpp>

#include <cmath>

#include "optim_test_utils.hpp"

using namespace peft;
using test::TwoParams;

namespace {
/// embed.{weight,bias}, layers.{0,1,2}.{weight,bias}, head.{weight,bias}
struct Stack : Module<double> {
  TwoParams<double> embed;
  std::vector<TwoParams<double>> layers = std::vector<TwoParams<double>>(3);
  TwoParams<double> head;

 protected:
  void visit_children(const ChildVisitor& fn) override {
    fn("embed", embed);
    for (std::size_t i = 0; i < layers.size(); ++i) fn("layers." + std::to_string(i), layers[i]);
    fn("head", head);
  }
};

std::vector<std::string> names(const ParamGroup<double>& g) {
  std::vector<std::string> out;
  for (const auto& p : g.params) out.push_back(p.name);
  return out;
}
}  // namespace

TEST_CASE("param_groups_by_rules: first match wins, the rest goes to default", "[optim][groups]") {
  Stack s;
  const auto groups = param_groups_by_rules<double>(
      s, {{".*bias", 0.1, 0.0, "no_decay"}, {"layers\\..*", 0.01, 0.05, ""}, {"head\\..*", 0.2, 0.05, "head"}}, 1e-3,
      0.01);
  REQUIRE(groups.size() == 4);
  CHECK(names(groups[0]) ==
        std::vector<std::string>{"embed.bias", "layers.0.bias", "layers.1.bias", "layers.2.bias", "head.bias"});
  CHECK(groups[0].lr == 0.1);
  CHECK(groups[1].name == "layers\\..*");  // unnamed rule: named by its pattern
  CHECK(names(groups[1]) == std::vector<std::string>{"layers.0.weight", "layers.1.weight", "layers.2.weight"});
  CHECK(groups[1].weight_decay == 0.05);
  CHECK(names(groups[2]) == std::vector<std::string>{"head.weight"});
  CHECK(groups[3].name == "default");
  CHECK(names(groups[3]) == std::vector<std::string>{"embed.weight"});
  CHECK(groups[3].lr == 1e-3);
  CHECK(groups[3].weight_decay == 0.01);
  AdamW<double> opt(groups, AdamWOptions{});  // the groups feed an optimizer directly
  CHECK(opt.num_groups() == 4);
}

TEST_CASE("param_groups_by_rules can keep frozen parameters out", "[optim][groups]") {
  Stack s;
  freeze<double>(s, "embed\\..*");
  const auto all = param_groups_by_rules<double>(s, {}, 1e-3, 0.0);
  REQUIRE(all.size() == 1);
  CHECK(all[0].params.size() == 10);
  const auto trainable = param_groups_by_rules<double>(s, {}, 1e-3, 0.0, true);
  CHECK(trainable[0].params.size() == 8);
  PEFT_REQUIRE_THROWS_WITH(param_groups_by_rules<double>(s, {{"embed\\..*", 0.1, 0.0, "e"}}, 1e-3, 0.0, true),
                           ConfigError, "rule \"embed\\..*\" matches no trainable parameter");
}

TEST_CASE("parameters_matching selects by full name", "[optim][groups]") {
  Stack s;
  CHECK(parameters_matching<double>(s, "layers\\.1\\..*").size() == 2);
  PEFT_REQUIRE_THROWS_WITH(parameters_matching<double>(s, "layer\\.1.*"), ConfigError,
                           "pattern \"layer\\.1.*\" matches no parameter");
}

TEST_CASE("layerwise_lr_groups: lr = base · decay^(num_layers − index)", "[optim][groups][llrd]") {
  Stack s;
  LayerwiseLrOptions o;
  o.base_lr = 1.0;
  o.decay = 0.5;
  o.num_layers = 3;
  o.weight_decay = 0.1;
  o.fixed_layers = {{"embed\\..*", -1}};
  o.no_decay_pattern = ".*bias";
  const auto groups = layerwise_lr_groups<double>(s, o);
  // layers −1 (embed), 0, 1, 2, 3 (head: no layer index → num_layers), each split by decay / no decay
  REQUIRE(groups.size() == 10);
  const std::vector<Index> layers = {-1, 0, 1, 2, 3};
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const double lr = std::pow(0.5, static_cast<double>(3 - layers[i]));
    const auto& decay = groups[2 * i];
    const auto& no_decay = groups[2 * i + 1];
    INFO("layer " << layers[i]);
    CHECK(decay.name == "layer" + std::to_string(layers[i]));
    CHECK(no_decay.name == "layer" + std::to_string(layers[i]) + ".no_decay");
    CHECK(decay.lr == Approx(lr).epsilon(1e-15));
    CHECK(no_decay.lr == Approx(lr).epsilon(1e-15));
    CHECK(decay.weight_decay == 0.1);
    CHECK(no_decay.weight_decay == 0.0);
    CHECK(decay.params.size() == 1);
  }
  CHECK(names(groups[4]) == std::vector<std::string>{"layers.1.weight"});
  CHECK(names(groups[9]) == std::vector<std::string>{"head.bias"});
}

TEST_CASE("layerwise_lr_groups: default layer and a custom layer regex", "[optim][groups][llrd]") {
  Stack s;
  LayerwiseLrOptions o;
  o.base_lr = 0.1;
  o.decay = 0.9;
  o.num_layers = 3;
  o.default_layer = 0;  // embed and head both at the bottom
  const auto groups = layerwise_lr_groups<double>(s, o);
  REQUIRE(groups.size() == 3);  // layer0 (embed, layers.0, head), layer1, layer2
  CHECK(groups[0].params.size() == 6);
  CHECK(groups[0].lr == Approx(0.1 * 0.9 * 0.9 * 0.9));
  CHECK(groups[2].lr == Approx(0.1 * 0.9));
  o.layer_regex = "^layers\\.(\\d+)";
  o.default_layer.reset();
  CHECK(layerwise_lr_groups<double>(s, o).size() == 4);
}

TEST_CASE("layerwise_lr_groups rejects bad options with named errors", "[optim][groups][llrd][errors]") {
  Stack s;
  LayerwiseLrOptions o;
  o.num_layers = 0;
  PEFT_REQUIRE_THROWS_WITH(layerwise_lr_groups<double>(s, o), ConfigError, "num_layers must be > 0, got 0");
  o.num_layers = 2;
  PEFT_REQUIRE_THROWS_WITH(layerwise_lr_groups<double>(s, o), ConfigError,
                           "parameter \"layers.2.weight\" has layer index 2, expected < num_layers 2");
  o.num_layers = 3;
  o.decay = 1.5;
  PEFT_REQUIRE_THROWS_WITH(layerwise_lr_groups<double>(s, o), ConfigError, "decay must be in (0, 1], got 1.5");
  o.decay = 0.9;
  o.base_lr = -1.0;
  PEFT_REQUIRE_THROWS_WITH(layerwise_lr_groups<double>(s, o), ConfigError, "base_lr must be finite and >= 0");
  o.base_lr = 1e-3;
  o.weight_decay = -1.0;
  PEFT_REQUIRE_THROWS_WITH(layerwise_lr_groups<double>(s, o), ConfigError, "weight_decay must be finite");
  o.weight_decay = 0.0;
  o.layer_regex = "layers\\.\\d+";
  PEFT_REQUIRE_THROWS_WITH(layerwise_lr_groups<double>(s, o), ConfigError, "has no capture group");
  o.layer_regex = "layers\\.(\\d+\\.";
  PEFT_REQUIRE_THROWS_WITH(layerwise_lr_groups<double>(s, o), ConfigError, "invalid regular expression");
  o.layer_regex = LayerwiseLrOptions{}.layer_regex;
  o.fixed_layers = {{"embedding\\..*", -1}};
  PEFT_REQUIRE_THROWS_WITH(layerwise_lr_groups<double>(s, o), ConfigError,
                           "fixed_layers rule \"embedding\\..*\" matches no parameter");
  o.fixed_layers.clear();
  o.no_decay_pattern = ".*norm.*";
  PEFT_REQUIRE_THROWS_WITH(layerwise_lr_groups<double>(s, o), ConfigError, "no_decay_pattern \".*norm.*\" matches no");
  o.no_decay_pattern.clear();
  o.trainable_only = true;
  freeze<double>(s);
  PEFT_REQUIRE_THROWS_WITH(layerwise_lr_groups<double>(s, o), ConfigError, "has no trainable parameters");
}

TEST_CASE("param_groups_by_rules rejects bad rules with named errors", "[optim][groups][errors]") {
  Stack s;
  PEFT_REQUIRE_THROWS_WITH(param_groups_by_rules<double>(s, {{"blocks\\..*", 0.1, 0.0, "b"}}, 1e-3, 0.0), ConfigError,
                           "rule \"blocks\\..*\" matches no parameter");
  // A rule shadowed by an earlier one matches nothing left: also an error.
  PEFT_REQUIRE_THROWS_WITH(
      param_groups_by_rules<double>(s, {{".*", 0.1, 0.0, "all"}, {"head\\..*", 0.1, 0.0, "head"}}, 1e-3, 0.0),
      ConfigError, "not already taken by an earlier rule");
  PEFT_REQUIRE_THROWS_WITH(param_groups_by_rules<double>(s, {{"(", 0.1, 0.0, ""}}, 1e-3, 0.0), ConfigError,
                           "invalid regular expression \"(\"");
}
