// PeftModel (models/peft_model.hpp) on a user's own model: two LoRALinear hosts and a
// ModulesToSave head, driven through every method of the handle with PEFT's semantics.
#include <peft/io/methods.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/models/peft_model.hpp>

#include <algorithm>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;

namespace peft_model_test {

/// y = head(tanh(fc2(tanh(fc1(x))))): fc1 [6 → 8], fc2 [8 → 8] adapted linears, head [8 → 3] a
/// module to save (one copy per adapter).
template <class T>
class Encoder : public Module<T> {
 public:
  explicit Encoder(Rng& rng) : fc1(6, 8, rng), fc2(8, 8, rng), head(Linear<T>(8, 3, rng)) { this->set_name(""); }

  LoRALinear<T> fc1, fc2;
  ModulesToSave<T, Linear<T>> head;

  struct Cache {
    typename LoRALinear<T>::Cache c1, c2;
    typename Linear<T>::Cache c3;
    Matrix<T> h1, h2;
  };

  Matrix<T> forward(const Matrix<T>& x, Cache& c) {
    c.h1 = fc1.forward(x, c.c1).array().tanh().matrix();
    c.h2 = fc2.forward(c.h1, c.c2).array().tanh().matrix();
    return head.forward(c.h2, c.c3);
  }
  Matrix<T> forward(const Matrix<T>& x) {
    Cache c;
    return forward(x, c);
  }
  void backward(const Cache& c, const Matrix<T>& dy) {
    Matrix<T> d2, d1;
    head.backward(c.c3, dy, &d2);
    d2.array() *= T(1) - c.h2.array().square();  // tanh' = 1 − h²
    fc2.backward(c.c2, d2, &d1);
    d1.array() *= T(1) - c.h1.array().square();
    fc1.backward(c.c1, d1, nullptr);
  }

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("fc1", fc1);
    fn("fc2", fc2);
    fn("head", head);
  }
};

inline io::Json lora_json(bool with_head = true) {
  io::Json j = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"fc1", "fc2"}}};
  if (with_head) j["modules_to_save"] = {"head"};
  return j;
}

template <class T>
Matrix<T> input(Index rows = 5) {
  Rng rng(99);
  Matrix<T> x(rows, 6);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(rng.uniform(-1.0, 1.0));
  return x;
}

/// A few SGD steps on an MSE-like loss: every trainable parameter moves.
template <class T>
void train_steps(Encoder<T>& m, int steps = 3) {
  const Matrix<T> x = input<T>();
  for (int s = 0; s < steps; ++s) {
    m.zero_grad();
    typename Encoder<T>::Cache c;
    const Matrix<T> y = m.forward(x, c);
    const Matrix<T> dy = (y.array() - T(1)).matrix() / static_cast<T>(y.size());
    m.backward(c, dy);
    m.visit_parameters([](const std::string&, Parameter<T>& p) {
      if (p.trainable()) p.value -= T(0.5) * p.grad;
    });
  }
}

template <class T>
std::vector<std::string> names_of(Module<T>& m) {
  std::vector<std::string> out;
  m.visit_parameters([&](const std::string& n, Parameter<T>&) { out.push_back(n); });
  return out;
}

template <class T>
std::map<std::string, Matrix<T>> values_of(Module<T>& m) {
  std::map<std::string, Matrix<T>> out;
  m.visit_parameters([&](const std::string& n, Parameter<T>& p) { out[n] = p.value; });
  return out;
}

inline bool has_name(const std::vector<std::string>& v, const std::string& n) {
  return std::find(v.begin(), v.end(), n) != v.end();
}

}  // namespace peft_model_test

using namespace peft_model_test;

TEST_CASE("PEFT's trainable-parameter line: thousands separators and 4 decimals", "[peft_model]") {
  CHECK(with_thousands(0) == "0");
  CHECK(with_thousands(999) == "999");
  CHECK(with_thousands(1000) == "1,000");
  CHECK(with_thousands(1234567) == "1,234,567");
  ParameterCount c;
  c.trainable = 1234;
  c.total = 5678;
  CHECK(trainable_parameters_line(c) == "trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330");
  CHECK(trainable_parameters_line(ParameterCount{}) == "trainable params: 0 || all params: 0 || trainable%: 0.0000");
}

TEMPLATE_TEST_CASE("PeftModel: add_adapter, names, counts and print_trainable_parameters", "[peft_model]", float,
                   double) {
  using T = TestType;
  Rng rng(1);
  Encoder<T> m(rng);
  CHECK(names_of(m) ==
        std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"});
  PeftModel<T> pm(m);
  CHECK(pm.add_adapter("a", lora_json()) == std::vector<std::string>{"fc1", "fc2"});
  // base 6·8+8 + 8·8+8 + 8·3+3 = 155; LoRA r=2: fc1 2·6+8·2 = 28, fc2 2·8+8·2 = 32; head copy 27.
  CHECK(pm.trainable_parameters() == "trainable params: 87 || all params: 242 || trainable%: 35.9504");
  std::ostringstream os;
  pm.print_trainable_parameters(os);
  CHECK(os.str() == "trainable params: 87 || all params: 242 || trainable%: 35.9504\n");
  const std::vector<std::string> n = names_of(m);
  CHECK(has_name(n, "head.original_module.weight"));
  CHECK(has_name(n, "head.modules_to_save.a.weight"));
  CHECK(has_name(n, "head.modules_to_save.a.bias"));
  CHECK_FALSE(has_name(n, "head.weight"));
  CHECK(has_name(n, "fc1.lora_A.a.weight"));
  CHECK_FALSE(m.head.original().weight.trainable());
  CHECK(m.head.copy("a").weight.trainable());
  CHECK_FALSE(m.fc1.weight.trainable());

  pm.add_adapter("b", lora_json());  // PEFT: adding keeps the active adapter
  CHECK(pm.active_adapters() == std::vector<std::string>{"a"});
  CHECK(pm.adapters() == std::vector<std::string>{"a", "b"});
  CHECK(pm.trainable_parameters() == "trainable params: 87 || all params: 329 || trainable%: 26.4438");
  CHECK_FALSE(m.head.copy("b").weight.trainable());
  pm.set_adapter("b");
  CHECK(m.head.copy("b").weight.trainable());
  CHECK_FALSE(m.head.copy("a").weight.trainable());
  CHECK(m.fc1.active_adapters() == std::vector<std::string>{"b"});

  PEFT_REQUIRE_THROWS_WITH(pm.add_adapter("a", lora_json()), ConfigError, "adapter \"a\" already exists");
  PEFT_REQUIRE_THROWS_WITH(pm.set_adapter("zz"), ConfigError, "no adapter \"zz\" (adapters: \"a\", \"b\")");
  PEFT_REQUIRE_THROWS_WITH(pm.set_adapter({"a", "b"}), ConfigError,
                           "adapters \"a\", \"b\" each have a copy of module to save \"head\"");
}

TEMPLATE_TEST_CASE("PeftModel: per-adapter heads, training b leaves a bit-identical, switching", "[peft_model]", float,
                   double) {
  using T = TestType;
  Rng rng(2);
  Encoder<T> m(rng);
  const Matrix<T> x = input<T>();
  const Matrix<T> base_out = m.forward(x);
  PeftModel<T> pm(m);
  pm.add_adapter("a", lora_json());
  train_steps(m);
  const Matrix<T> out_a = m.forward(x);
  REQUIRE(out_a != base_out);
  const auto before = values_of(m);

  pm.add_adapter("b", lora_json());
  pm.set_adapter("b");
  train_steps(m);
  const auto after = values_of(m);
  for (const auto& [name, v] : before)  // every parameter of a (and the base) is bit-identical
    CHECK(after.at(name) == v);
  CHECK(m.head.copy("b").weight.value != m.head.copy("a").weight.value);
  const Matrix<T> out_b = m.forward(x);
  pm.set_adapter("a");
  CHECK(m.forward(x) == out_a);
  pm.set_adapter("b");
  CHECK(m.forward(x) == out_b);
  {
    auto off = pm.disable_adapters();
    CHECK(pm.adapters_disabled());
    CHECK(m.forward(x) == base_out);
  }
  CHECK_FALSE(pm.adapters_disabled());
  CHECK(m.forward(x) == out_b);
  // An exception leaving the scope enables them too.
  try {
    auto off = pm.disable_adapters();
    throw std::runtime_error("step failed");
  } catch (const std::runtime_error&) {
  }
  CHECK(m.forward(x) == out_b);
  pm.enable_adapters();
  {  // nested: the inner guard leaves them disabled for the outer one
    auto outer = pm.disable_adapters();
    { auto inner = pm.disable_adapters(); }
    CHECK(m.forward(x) == base_out);
  }
  CHECK(m.forward(x) == out_b);
}

TEMPLATE_TEST_CASE("PeftModel: merge ≡ unmerged, set_adapter while merged warns, misuse refused", "[peft_model]", float,
                   double) {
  using T = TestType;
  const T tol = test::Tolerances<T>::rel;
  Rng rng(3);
  Encoder<T> m(rng);
  const Matrix<T> x = input<T>();
  PeftModel<T> pm(m);
  pm.add_adapter("a", lora_json());
  train_steps(m);
  pm.add_adapter("b", lora_json());
  pm.set_adapter("b");
  train_steps(m);
  const Matrix<T> out_b = m.forward(x);
  pm.merge();
  CHECK(pm.merged_adapters() == std::vector<std::string>{"b"});
  CHECK(m.forward(x).isApprox(out_b, tol));
  PEFT_REQUIRE_THROWS_WITH(pm.merge({"b"}), ConfigError, "adapter \"b\" is already merged");
  PEFT_REQUIRE_THROWS_WITH(pm.delete_adapter("b"), ConfigError, "adapter \"b\" is merged; unmerge() before deleting");
  PEFT_REQUIRE_THROWS_WITH((void)pm.disable_adapters(), ConfigError,
                           "cannot disable adapters while adapters \"b\" are merged");

  std::vector<std::string> warnings;
  {
    ScopedWarningHandler h([&](const std::string& w) { warnings.push_back(w); });
    pm.set_adapter("a");  // unmerges b first, not base + a + b
  }
  REQUIRE(warnings.size() == 1);
  CHECK(warnings[0] ==
        "PeftModel: adapters \"b\" are merged; unmerging them before activating \"a\" (an adapter cannot be set while "
        "the model is merged)");
  CHECK_FALSE(pm.merged());
  pm.set_adapter("b");
  CHECK(m.forward(x).isApprox(out_b, tol));
  pm.merge();
  pm.unmerge();
  CHECK(m.forward(x).isApprox(out_b, tol));
  {
    auto off = pm.disable_adapters();
    PEFT_REQUIRE_THROWS_WITH(pm.merge(), ConfigError, "adapters are disabled");
  }
}

TEMPLATE_TEST_CASE("PeftModel: delete_adapter, merge_and_unload leaves plain linears", "[peft_model]", float, double) {
  using T = TestType;
  const T tol = test::Tolerances<T>::rel;
  Rng rng(4);
  Encoder<T> m(rng);
  const Matrix<T> x = input<T>();
  PeftModel<T> pm(m);
  pm.add_adapter("a", lora_json());
  train_steps(m);
  pm.add_adapter("b", lora_json());
  pm.set_adapter("b");
  train_steps(m);
  std::vector<std::string> warnings;
  {
    ScopedWarningHandler h([&](const std::string& w) { warnings.push_back(w); });
    pm.delete_adapter("b");
  }
  CHECK(warnings == std::vector<std::string>{"PeftModel: adapter \"b\" was active and is deleted; the active "
                                             "adapter is now \"a\""});
  CHECK(pm.adapters() == std::vector<std::string>{"a"});
  CHECK(pm.active_adapters() == std::vector<std::string>{"a"});
  CHECK_FALSE(m.head.has_copy("b"));
  CHECK_FALSE(m.fc1.has_adapter("b"));
  PEFT_REQUIRE_THROWS_WITH(pm.delete_adapter("b"), ConfigError, "no adapter \"b\"");

  const Matrix<T> out_a = m.forward(x);
  pm.merge();
  const Matrix<T> merged = m.forward(x);
  CHECK(merged.isApprox(out_a, tol));
  pm.unmerge();
  Module<T>& plain = pm.merge_and_unload();
  CHECK(&plain == &m);
  CHECK(m.forward(x).isApprox(merged, tol));
  CHECK(names_of(m) ==
        std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"});
  CHECK(m.fc1.num_adapters() == 0);
  CHECK_FALSE(m.fc1.merged());
  CHECK(m.head.num_copies() == 0);
  CHECK(pm.adapters().empty());
  CHECK(count_parameters(m).total == 155);
}

TEMPLATE_TEST_CASE("PeftModel: save_pretrained / load_pretrained round trip of two adapters, bit-identical",
                   "[peft_model][io]", float, double) {
  using T = TestType;
  Rng rng(5);
  Encoder<T> m(rng);
  const Encoder<T> pristine = m;
  const Matrix<T> x = input<T>();
  PeftModel<T> pm(m);
  pm.add_adapter("default", lora_json());
  train_steps(m);
  pm.add_adapter("other", lora_json());
  pm.set_adapter("other");
  train_steps(m);
  const Matrix<T> out_other = m.forward(x);
  pm.set_adapter("default");
  const Matrix<T> out_default = m.forward(x);

  test::io::TempDir dir;
  pm.save_pretrained(dir.path + "/out");
  CHECK(io::path_exists(dir.path + "/out/adapter_config.json"));  // PEFT: "default" at the top
  CHECK(io::path_exists(dir.path + "/out/other/adapter_model.safetensors"));
  // The head's copy under the module's own keys, as PEFT writes it.
  const io::SafeTensorsFile st(dir.path + "/out/other/adapter_model.safetensors");
  CHECK(st.contains("base_model.model.head.weight"));
  CHECK(st.contains("base_model.model.head.bias"));
  CHECK_FALSE(st.contains("base_model.model.head.modules_to_save.other.weight"));

  Encoder<T> fresh = pristine;
  PeftModel<T> loaded(fresh);
  CHECK(loaded.load_pretrained(dir.path + "/out") == std::vector<std::string>{"default", "other"});
  CHECK(loaded.active_adapters() == std::vector<std::string>{"default"});
  CHECK(fresh.forward(x) == out_default);
  loaded.set_adapter("other");
  CHECK(fresh.forward(x) == out_other);
  const auto want = values_of(m), got = values_of(fresh);
  CHECK(want.size() == got.size());
  for (const auto& [name, v] : want) {
    INFO(name);
    REQUIRE(got.count(name) == 1);
    CHECK(got.at(name) == v);
  }
  // One adapter alone, by name.
  Encoder<T> one = pristine;
  PeftModel<T> single(one);
  single.load_pretrained(dir.path + "/out", "other");
  CHECK(one.forward(x) == out_other);
  CHECK(single.adapters() == std::vector<std::string>{"other"});
}

TEMPLATE_TEST_CASE("PeftModel: every method of the table, and a plain module to save warns", "[peft_model]", float,
                   double) {
  using T = TestType;
  const T tol = test::Tolerances<T>::rel;
  Rng rng(6);
  Encoder<T> m(rng);
  const Matrix<T> x = input<T>();
  PeftModel<T> pm(m);
  const std::vector<io::Json> configs = {
      {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"use_dora", true}, {"target_modules", {"fc1", "fc2"}}},
      {{"peft_type", "VERA"}, {"r", 4}, {"target_modules", {"fc1", "fc2"}}},
      {{"peft_type", "LOHA"}, {"r", 2}, {"alpha", 4}, {"target_modules", {"fc1", "fc2"}}},
      {{"peft_type", "LOKR"}, {"r", 2}, {"alpha", 4}, {"target_modules", {"fc1", "fc2"}}},
      {{"peft_type", "IA3"}, {"target_modules", {"fc1", "fc2"}}, {"feedforward_modules", {"fc2"}}},
  };
  for (std::size_t i = 0; i < configs.size(); ++i) {
    const std::string name = "m" + std::to_string(i);
    INFO(name);
    pm.add_adapter(name, configs[i]);
    pm.set_adapter(name);
    train_steps(m, 1);
    const Matrix<T> out = m.forward(x);
    pm.merge();
    CHECK(m.forward(x).isApprox(out, tol));
    pm.unmerge();
  }
  CHECK(pm.adapters().size() == 5);

  // modules_to_save naming a plain module: today's behaviour (trained in place), with a warning.
  std::vector<std::string> warnings;
  {
    ScopedWarningHandler h([&](const std::string& w) { warnings.push_back(w); });
    io::Json j = lora_json(false);
    j["modules_to_save"] = {"fc2"};
    pm.add_adapter("plain", j);
  }
  REQUIRE(warnings.size() == 1);
  CHECK(warnings[0] ==
        "PeftModel::add_adapter(\"plain\"): module to save \"fc2\" is a plain module, trained in place and shared by "
        "every adapter (training adapter \"plain\" changes it for the others too); declare it as "
        "peft::ModulesToSave<T, M> for one copy per adapter");
  CHECK(m.fc2.weight.trainable());
  io::Json bad = lora_json(false);
  bad["modules_to_save"] = {"nope"};
  PEFT_REQUIRE_THROWS_WITH(pm.add_adapter("bad", bad), ConfigError, "modules_to_save entry \"nope\" matches no module");
  CHECK_FALSE(pm.has_adapter("bad"));
  CHECK_FALSE(m.fc1.has_adapter("bad"));
}

TEMPLATE_TEST_CASE("PeftModel: from a PeftConfig (LoRA, IA3); others refused", "[peft_model]", float, double) {
  using T = TestType;
  Rng rng(7);
  Encoder<T> m(rng);
  PeftModel<T> pm(m);
  PeftConfig pc;
  pc.lora.emplace();
  pc.lora->target_modules = ModuleSelector::list({"fc1"});
  pc.lora->lora.r = 2;
  pc.modules_to_save = {"head"};
  CHECK(pm.add_adapter("l", pc) == std::vector<std::string>{"fc1"});
  CHECK(m.head.has_copy("l"));
  PeftConfig ia3;
  ia3.ia3.emplace();
  ia3.ia3->target_modules = ModuleSelector::list({"fc1", "fc2"});
  ia3.ia3->feedforward_modules = ModuleSelector::list({"fc2"});
  CHECK(pm.add_adapter("i", ia3) == std::vector<std::string>{"fc1", "fc2"});
  PeftConfig prefix;
  prefix.prefix.emplace();
  PEFT_REQUIRE_THROWS_WITH(pm.add_adapter("p", prefix), ConfigError, "apply_peft");
}

TEMPLATE_TEST_CASE("ModulesToSave files: the copy's bytes are what an in-place head writes", "[peft_model][io]", float,
                   double) {
  using T = TestType;
  Rng rng(8);
  Encoder<T> m(rng);
  PeftModel<T> pm(m);
  pm.add_adapter("default", lora_json());
  train_steps(m);
  Encoder<T> in_place = m;  // the same values, the head trained in place (no copies: plain names)
  in_place.head.unload();
  CHECK(has_name(names_of(in_place), "head.weight"));
  test::io::TempDir dir;
  io::save_method_adapter(dir.path + "/host", m, "default", lora_json());
  io::save_method_adapter(dir.path + "/plain", in_place, "default", lora_json());
  for (const char* f : {"/adapter_model.safetensors", "/adapter_config.json"})
    CHECK(io::read_text_file(dir.path + "/host" + f) == io::read_text_file(dir.path + "/plain" + f));
  // Loading it into a model with a host makes that adapter's copy; a plain head is loaded in place.
  Rng rng2(8);
  Encoder<T> fresh(rng2);
  const io::MethodAdapterFile<T> file = io::read_method_adapter<T>(dir.path + "/host");
  io::load_method_adapter(fresh, file, "default");
  REQUIRE(fresh.head.has_copy("default"));
  CHECK(fresh.head.copy("default").weight.value == m.head.copy("default").weight.value);
  CHECK(fresh.head.original().weight.value == m.head.original().weight.value);
}

TEST_CASE("apply_peft: the TransformerClassifier head gets one copy per adapter", "[peft_model]") {
  Rng rng(9);
  TransformerConfig c;
  c.input_dim = 6;
  c.max_seq_len = 4;
  c.dim = 8;
  c.num_heads = 2;
  c.ffn_dim = 16;
  c.num_layers = 1;
  c.num_classes = 3;
  TransformerClassifier<double> model(c, rng);
  PeftConfig pc;
  pc.lora.emplace();
  pc.lora->target_modules = ModuleSelector::list({"q_proj", "v_proj"});
  pc.modules_to_save = {"classifier"};
  pc.adapter_name = "a";
  apply_peft(model, pc, rng);
  pc.adapter_name = "b";
  apply_peft(model, pc, rng);
  CHECK(model.classifier.names() == std::vector<std::string>{"a", "b"});
  CHECK(model.classifier.active_copy() == "b");
  const std::vector<std::string> n = names_of(model);
  CHECK(has_name(n, "classifier.original_module.weight"));
  CHECK(has_name(n, "classifier.modules_to_save.a.weight"));
  CHECK(has_name(n, "classifier.modules_to_save.b.bias"));
  CHECK_FALSE(model.classifier.copy("a").weight.trainable());
  CHECK(model.classifier.copy("b").weight.trainable());
  // The head is no LoRA target while it holds copies: "all-linear" leaves it out as before.
  CHECK(io::linear_slots<double>(model).size() == 7);  // patch_embed and the block's six
  // A plain module to save (the final norm) is trained in place, with the warning.
  std::vector<std::string> warnings;
  {
    ScopedWarningHandler h([&](const std::string& w) { warnings.push_back(w); });
    PeftConfig pn;
    pn.modules_to_save = {"embed_positions"};
    pn.adapter_name = "c";
    apply_peft(model, pn, rng);
  }
  REQUIRE(warnings.size() == 1);
  CHECK(warnings[0].find("apply_peft: module to save \"embed_positions\" is a plain module") == 0);
}

TEMPLATE_TEST_CASE("PeftModel: bias \"lora_only\" and \"all\" train biases, saved with the adapter", "[peft_model][io]",
                   float, double) {
  using T = TestType;
  for (const char* bias : {"lora_only", "all"}) {
    INFO("bias = " << bias);
    const bool all = std::string(bias) == "all";
    Rng rng(8);
    Encoder<T> m(rng);
    const Encoder<T> pristine = m;
    const Matrix<T> x = input<T>();
    io::Json cfg = lora_json(false);  // the head is not a module to save here
    cfg["bias"] = bias;
    PeftModel<T> pm(m);
    pm.add_adapter("default", cfg);
    CHECK(m.fc1.bias.trainable());
    CHECK(m.fc2.bias.trainable());
    CHECK(m.head.original().bias.trainable() == all);  // "all": every bias; "lora_only": adapted linears'
    CHECK_FALSE(m.fc1.weight.trainable());
    const Matrix<T> fc1_bias = m.fc1.bias.value;
    train_steps(m);
    CHECK(m.fc1.bias.value != fc1_bias);
    const Matrix<T> out = m.forward(x);

    // Another adapter with bias "none" active: the biases are frozen again (they stay as trained).
    pm.add_adapter("plain", lora_json(false));
    pm.set_adapter("plain");
    CHECK_FALSE(m.fc1.bias.trainable());
    pm.set_adapter("default");
    CHECK(m.fc1.bias.trainable());

    test::io::TempDir dir;
    pm.save_pretrained(dir.path + "/out");
    const io::SafeTensorsFile st(dir.path + "/out/adapter_model.safetensors");
    CHECK(st.contains("base_model.model.fc1.base_layer.bias"));  // PEFT wraps an adapted linear
    CHECK(st.contains("base_model.model.fc2.base_layer.bias"));
    CHECK_FALSE(st.contains("base_model.model.fc1.bias"));
    CHECK(st.contains("base_model.model.head.bias") == all);
    Encoder<T> fresh = pristine;
    PeftModel<T> loaded(fresh);
    loaded.load_adapter(dir.path + "/out", "default");
    CHECK(fresh.forward(x) == out);
    CHECK(fresh.fc1.bias.value == m.fc1.bias.value);
  }
  // apply_method alone trains no bias, and says where biases are trained.
  Rng rng(9);
  Encoder<T> m(rng);
  io::Json cfg = lora_json(false);
  cfg["bias"] = "all";
  PEFT_REQUIRE_THROWS_WITH(io::apply_method(m, cfg, "x", rng), ConfigError, "PeftModel::add_adapter trains them");
}
