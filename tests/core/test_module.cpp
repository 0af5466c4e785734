// Module naming and traversal; parameters.hpp utilities (named/trainable lists, counts,
// freeze/unfreeze by full-match regular expression).
#include <peft/core/module.hpp>
#include <peft/core/parameters.hpp>

#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

namespace {

template <class T>
class Leaf : public Module<T> {
 public:
  Leaf(Index in, Index out) : weight(out, in), bias(1, out, true, true) {}
  Parameter<T> weight;
  Parameter<T> bias;

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    fn("weight", weight);
    fn("bias", bias);
  }
};

template <class T>
class Block : public Module<T> {
 public:
  Block() : q(4, 4), v(4, 2), norm(1, 4, true, true) {}
  Leaf<T> q, v;
  Parameter<T> norm;

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override { fn("norm", norm); }
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("attn.q", q);
    fn("attn.v", v);
  }
};

template <class T>
class Model : public Module<T> {
 public:
  std::vector<Block<T>> layers = std::vector<Block<T>>(2);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    for (std::size_t i = 0; i < layers.size(); ++i) fn("layers." + std::to_string(i), layers[i]);
  }
};

template <class T>
std::vector<std::string> names(Module<T>& m) {
  std::vector<std::string> out;
  for (const auto& np : named_parameters(m)) out.push_back(np.name);
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("Module names and visits parameters in a stable dotted order", "[module]", float, double) {
  Model<TestType> model;
  const std::vector<std::string> expected = {
      "layers.0.norm",          "layers.0.attn.q.weight", "layers.0.attn.q.bias",   "layers.0.attn.v.weight",
      "layers.0.attn.v.bias",   "layers.1.norm",          "layers.1.attn.q.weight", "layers.1.attn.q.bias",
      "layers.1.attn.v.weight", "layers.1.attn.v.bias"};
  CHECK(names(model) == expected);
  // The visitor hands out the real parameters, not copies.
  const auto np = named_parameters(model);
  CHECK(np[1].param == &model.layers[0].q.weight);
  CHECK(np[9].param == &model.layers[1].v.bias);

  // A prefix is prepended to every name.
  std::vector<std::string> prefixed;
  model.visit_parameters([&](const std::string& n, Parameter<TestType>&) { prefixed.push_back(n); }, "model");
  CHECK(prefixed.front() == "model.layers.0.norm");
  CHECK(prefixed.back() == "model.layers.1.attn.v.bias");
}

TEMPLATE_TEST_CASE("set_name propagates to children; train/eval to the subtree", "[module]", float, double) {
  Model<TestType> model;
  CHECK(model.name().empty());
  model.set_name("enc");
  CHECK(model.name() == "enc");
  CHECK(model.layers[1].name() == "enc.layers.1");
  CHECK(model.layers[1].v.name() == "enc.layers.1.attn.v");
  model.set_name("");
  CHECK(model.layers[0].q.name() == "layers.0.attn.q");

  CHECK(model.training());
  model.eval();
  CHECK_FALSE(model.training());
  CHECK_FALSE(model.layers[1].q.training());
  model.train();
  CHECK(model.layers[1].q.training());

  CHECK(Module<TestType>::join("", "a") == "a");
  CHECK(Module<TestType>::join("a", "") == "a");
  CHECK(Module<TestType>::join("a", "b") == "a.b");
}

TEMPLATE_TEST_CASE("count_parameters, trainable_parameters and zero_grad", "[module]", float, double) {
  Model<TestType> model;
  // Per block: norm 4 + q (16 + 4) + v (8 + 2) = 34.
  ParameterCount c = count_parameters(model);
  CHECK(c.total == 68);
  CHECK(c.trainable == 68);
  CHECK(c.frozen() == 0);
  CHECK(c.trainable_percent() == 100.0);

  CHECK(freeze(model) == 10);
  c = count_parameters(model);
  CHECK(c.trainable == 0);
  CHECK(c.trainable_percent() == 0.0);
  CHECK(trainable_parameters(model).empty());

  CHECK(unfreeze(model, R"(layers\.\d+\.attn\.q\.weight)") == 2);
  c = count_parameters(model);
  CHECK(c.trainable == 32);
  CHECK(c.frozen() == 36);
  CHECK(c.trainable_percent() == Approx(100.0 * 32 / 68));
  const auto tp = trainable_parameters(model);
  REQUIRE(tp.size() == 2);
  CHECK(tp[0].name == "layers.0.attn.q.weight");
  CHECK(tp[1].name == "layers.1.attn.q.weight");
  CHECK(model.layers[0].q.bias.grad.size() == 0);  // frozen: no gradient storage

  model.layers[0].q.weight.grad.setConstant(TestType(3));
  model.zero_grad();
  CHECK(model.layers[0].q.weight.grad.cwiseAbs().maxCoeff() == TestType(0));

  Module<TestType> empty;
  CHECK(count_parameters(empty).total == 0);
  CHECK(count_parameters(empty).trainable_percent() == 0.0);
}

TEST_CASE("freeze/unfreeze patterns match the whole name", "[module]") {
  Model<double> model;
  model.set_name("enc");
  // "attn.q" alone is a substring, not a full match: it must match nothing and throw.
  PEFT_REQUIRE_THROWS_WITH(freeze(model, "attn.q"), ConfigError, "pattern \"attn.q\" matches no parameter");
  PEFT_REQUIRE_THROWS_WITH(freeze(model, "attn.q"), ConfigError, "module \"enc\"");
  // The message lists real names so a typo is easy to fix.
  PEFT_REQUIRE_THROWS_WITH(unfreeze(model, "layers.0.attn.k.weight"), ConfigError, "layers.0.attn.q.weight");
  CHECK(count_parameters(model).trainable == 68);  // nothing changed on failure

  CHECK(freeze(model, ".*bias") == 4);
  CHECK(count_parameters(model).trainable == 68 - 12);
  CHECK(freeze(model, "layers\\.1\\..*") == 5);
  CHECK_FALSE(model.layers[1].norm.trainable());
  CHECK(model.layers[0].norm.trainable());
}

TEST_CASE("an invalid regular expression is a ConfigError", "[module][errors]") {
  Model<float> model;
  PEFT_REQUIRE_THROWS_WITH(freeze(model, "layers.(0"), ConfigError, "invalid regular expression \"layers.(0\"");
  PEFT_REQUIRE_THROWS_WITH(unfreeze(model, "[a-"), ConfigError, "unfreeze: invalid regular expression");
}
