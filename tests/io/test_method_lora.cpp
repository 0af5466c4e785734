// LoRA and DoRA as a row of the method table (io/methods.hpp) on a user's own Module tree: applied
// by target_modules / regex / all-linear / exclude_modules / layers_to_transform / rank_pattern,
// trained a step, saved as a PEFT directory (byte for byte what collect_adapter + save_peft_adapter
// write), loaded back bit-identical, and merged into a safetensors file as the model merges in memory.
#include <peft/io/methods.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "io/io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;

namespace lora_row {

/// A user's MLP: y = classifier(tanh(layers.1.proj(tanh(layers.0.proj(x))))), three LoRALinear hosts.
template <class T>
class UserMlp : public Module<T> {
 public:
  explicit UserMlp(Rng& rng) : proj0(6, 8, rng, true), proj1(8, 8, rng, true), classifier(8, 3, rng, true) {
    this->set_name("");
  }

  LoRALinear<T> proj0, proj1, classifier;

  struct Cache {
    typename LoRALinear<T>::Cache c0, c1, c2;
    Matrix<T> h0, h1;
  };

  Matrix<T> forward(const Matrix<T>& x, Cache& c) {
    c.h0 = proj0.forward(x, c.c0).array().tanh().matrix();
    c.h1 = proj1.forward(c.h0, c.c1).array().tanh().matrix();
    return classifier.forward(c.h1, c.c2);
  }
  Matrix<T> forward(const Matrix<T>& x) {
    Cache c;
    return forward(x, c);
  }

  void backward(const Cache& c, const Matrix<T>& dy) {
    Matrix<T> dh1, dh0;
    classifier.backward(c.c2, dy, &dh1);
    dh1.array() *= T(1) - c.h1.array().square();  // tanh' = 1 − h²
    proj1.backward(c.c1, dh1, &dh0);
    dh0.array() *= T(1) - c.h0.array().square();
    proj0.backward(c.c0, dh0, nullptr);
  }

  void freeze_bases() {
    for (LoRALinear<T>* l : {&proj0, &proj1, &classifier}) l->freeze_base();
  }

  /// The base weights as a safetensors model file (the model's own names).
  void save_base(const std::string& path) const {
    std::vector<io::NamedTensor<T>> t;
    auto add = [&](const std::string& p, const LoRALinear<T>& l) {
      t.push_back({p + ".weight", {l.weight.value.rows(), l.weight.value.cols()}, l.weight.value.data()});
      t.push_back({p + ".bias", {l.bias.value.cols()}, l.bias.value.data()});
    };
    add("net.layers.0.proj", proj0);
    add("net.layers.1.proj", proj1);
    add("classifier", classifier);
    io::save_safetensors<T>(path, t);
  }

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("net.layers.0.proj", proj0);
    fn("net.layers.1.proj", proj1);
    fn("classifier", classifier);
  }
};

/// One SGD step on the MSE toward `target`; returns the loss before it.
template <class T>
T sgd_step(UserMlp<T>& m, const Matrix<T>& x, const Matrix<T>& target, T lr) {
  m.zero_grad();
  typename UserMlp<T>::Cache c;
  const Matrix<T> y = m.forward(x, c);
  const T loss = (y - target).squaredNorm() / static_cast<T>(y.rows());
  m.backward(c, (T(2) / static_cast<T>(y.rows())) * (y - target));
  m.visit_parameters([&](const std::string&, Parameter<T>& p) {
    if (p.trainable()) p.value -= lr * p.grad;
  });
  return loss;
}

template <class T>
std::vector<std::string> applied(const io::Json& config) {
  Rng rng(3);
  UserMlp<T> m(rng);
  return io::apply_method(m, config, "task", rng);
}

}  // namespace lora_row

TEST_CASE("LoRA row: target_modules, regex, all-linear, exclude_modules and layers_to_transform select as PEFT",
          "[io][methods][lora]") {
  using lora_row::applied;
  using V = std::vector<std::string>;
  const io::Json base = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}};
  auto with = [&](io::Json extra) {
    io::Json c = base;
    for (auto it = extra.begin(); it != extra.end(); ++it) c[it.key()] = it.value();
    return c;
  };
  CHECK(applied<float>(with({{"target_modules", {"proj"}}})) == V{"net.layers.0.proj", "net.layers.1.proj"});
  CHECK(applied<float>(with({{"target_modules", "all-linear"}})) == V{"net.layers.0.proj", "net.layers.1.proj"});
  CHECK(applied<float>(with({{"target_modules", R"(net\.layers\.0\..*|classifier)"}})) ==
        V{"net.layers.0.proj", "classifier"});
  CHECK(applied<float>(with({{"target_modules", {"proj", "classifier"}}, {"exclude_modules", {"layers.0.proj"}}})) ==
        V{"net.layers.1.proj", "classifier"});
  // layers_to_transform filters what a suffix or all-linear selects, by PEFT's layer index rule.
  CHECK(applied<float>(with({{"target_modules", {"proj"}}, {"layers_to_transform", {1}}})) == V{"net.layers.1.proj"});
  CHECK(applied<float>(with({{"target_modules", "all-linear"}, {"layers_to_transform", 0}})) == V{"net.layers.0.proj"});
  CHECK(applied<float>(
            with({{"target_modules", {"proj"}}, {"layers_to_transform", {0}}, {"layers_pattern", "layers"}})) ==
        V{"net.layers.0.proj"});
  PEFT_REQUIRE_THROWS_WITH(
      applied<float>(with({{"target_modules", {"proj"}}, {"layers_to_transform", {0}}, {"layers_pattern", "blocks"}})),
      ConfigError, "apply_method (LoRA): target_modules matches no linear");
}

TEST_CASE("LoRA row: rank_pattern / alpha_pattern, use_rslora and use_dora reach the layers", "[io][methods][lora]") {
  Rng rng(4);
  lora_row::UserMlp<double> m(rng);
  const io::Json config = {{"peft_type", "LORA"},
                           {"r", 2},
                           {"lora_alpha", 4},
                           {"use_rslora", true},
                           {"use_dora", true},
                           {"target_modules", {"proj"}},
                           {"rank_pattern", {{"layers.1.proj", 3}}},
                           {"alpha_pattern", {{"layers.1.proj", 6}}}};
  io::apply_method(m, config, "task", rng);
  CHECK(m.proj0.adapter("task").rank() == 2);
  CHECK(m.proj1.adapter("task").rank() == 3);
  CHECK(m.proj1.adapter("task").config.alpha == 6.0);
  CHECK(m.proj1.adapter("task").config.use_rslora);
  CHECK(m.proj0.adapter("task").dora());
  CHECK(std::string(m.proj0.method("task").kind()) == "DoRA");
  CHECK_FALSE(m.classifier.has_adapter("task"));
  // A second application of the same name is refused before anything changes.
  PEFT_REQUIRE_THROWS_WITH(io::apply_method(m, config, "task", rng), ConfigError,
                           "already has a LoRA adapter \"task\"; nothing was applied");
  // What applying cannot honour on [out, in] hosts is refused by name.
  io::Json fan = config;
  fan["fan_in_fan_out"] = true;
  fan["use_dora"] = false;
  PEFT_REQUIRE_THROWS_WITH(io::apply_method(m, fan, "other", rng), ConfigError, "fan_in_fan_out = true");
  io::Json bias = config;
  bias["bias"] = "all";
  PEFT_REQUIRE_THROWS_WITH(io::apply_method(m, bias, "other", rng), ConfigError, "bias = \"all\" trains biases");
  CHECK_FALSE(m.proj0.has_adapter("other"));
}

TEMPLATE_TEST_CASE("LoRA row on a user's MLP: train, save, load bit-identical, merge a file as in memory",
                   "[io][methods][lora]", float, double) {
  using T = TestType;
  for (const bool dora : {false, true}) {
    INFO("use_dora = " << dora);
    Rng rng(11);
    lora_row::UserMlp<T> model(rng);
    model.freeze_bases();
    const lora_row::UserMlp<T> base_model = model;
    const Matrix<T> x = test::random_matrix<T>(5, 6, rng), target = test::random_matrix<T>(5, 3, rng);
    const Matrix<T> y0 = model.forward(x);
    const io::Json config = {{"peft_type", "LORA"},
                             {"r", 2},
                             {"lora_alpha", 5},
                             {"use_dora", dora},
                             {"target_modules", {"proj", "classifier"}},
                             {"rank_pattern", {{"classifier", 1}}}};
    const std::vector<std::string> paths = io::apply_method(model, config, "task", rng);
    REQUIRE(paths.size() == 3);
    CHECK(model.forward(x) == y0);  // B = 0 (and m = ‖W‖_row): the base, exactly

    const T before = lora_row::sgd_step<T>(model, x, target, T(0.02));
    for (int i = 0; i < 5; ++i) lora_row::sgd_step<T>(model, x, target, T(0.02));
    const Matrix<T> y1 = model.forward(x);
    CHECK((y1 - target).squaredNorm() / 5 < before);
    CHECK(model.proj0.weight.value == base_model.proj0.weight.value);  // the base did not train

    // Save through the table: the same bytes as the LoRA writer itself (collect_adapter + save_peft_adapter).
    test::io::TempDir tmp;
    const std::vector<std::string> warnings = io::save_method_adapter(tmp.file("a"), model, "task", config);
    CHECK(warnings.empty());
    io::save_peft_adapter(tmp.file("b"),
                          io::collect_adapter(model, "task", io::parse_adapter_config(config, "config")));
    for (const char* f : {io::kAdapterConfigFile, io::kAdapterWeightsFile})
      CHECK(test::io::raw_file(tmp.file("a") + "/" + f) == test::io::raw_file(tmp.file("b") + "/" + f));

    // Load onto a fresh copy of the base: bit-identical parameters and outputs.
    lora_row::UserMlp<T> fresh = base_model;
    const io::MethodAdapterFile<T> file = io::read_method_adapter<T>(tmp.file("a"));
    CHECK(file.format->peft_type == "LORA");
    std::vector<std::string> loaded = io::load_method_adapter(fresh, file, "task"), sorted = paths;
    std::sort(loaded.begin(), loaded.end());
    std::sort(sorted.begin(), sorted.end());
    CHECK(loaded == sorted);
    CHECK(fresh.forward(x) == y1);
    model.visit_parameters([&](const std::string& n, Parameter<T>& p) {
      bool found = false;
      fresh.visit_parameters([&](const std::string& k, Parameter<T>& q) {
        if (k != n) return;
        found = true;
        CHECK(q.value == p.value);
      });
      CHECK(found);
    });
    // The loaded adapter saves to the same bytes again.
    io::save_method_adapter(tmp.file("c"), fresh, "task", file.config);
    CHECK(test::io::raw_file(tmp.file("c") + "/" + io::kAdapterWeightsFile) ==
          test::io::raw_file(tmp.file("a") + "/" + io::kAdapterWeightsFile));

    // Merge into a file of the base: the weights the model holds after merging in memory.
    base_model.save_base(tmp.file("base.safetensors"));
    const io::MergeFileReport rep =
        io::merge_method_file(tmp.file("base.safetensors"), file, tmp.file("merged.safetensors"));
    CHECK(rep.merged == 3);
    CHECK(rep.copied == 3);
    const io::SafeTensorsFile merged(tmp.file("merged.safetensors"));
    lora_row::UserMlp<T> in_memory = model;
    const std::pair<const char*, LoRALinear<T>*> layers[] = {{"net.layers.0.proj", &in_memory.proj0},
                                                             {"net.layers.1.proj", &in_memory.proj1},
                                                             {"classifier", &in_memory.classifier}};
    for (const auto& [path, layer] : layers) {
      INFO(path);
      layer->merge();
      const Matrix<T> w = merged.load<T>(std::string(path) + ".weight");
      CHECK(test::rel_diff(w, layer->weight.value) < test::Tolerances<T>::rel);
      const Matrix<T> b = merged.load<T>(std::string(path) + ".bias");
      CHECK(b.size() == layer->bias.value.size());
      CHECK(std::equal(b.data(), b.data() + b.size(), layer->bias.value.data()));
    }
    CHECK(test::rel_diff(in_memory.forward(x), y1) < test::Tolerances<T>::rel);
  }
}

TEST_CASE("LoRA row: PEFT's own LoRA and DoRA fixtures read, load and merge through the table", "[io][methods][lora]") {
  for (const char* name : {"tiny_lora", "tiny_dora"}) {
    INFO(name);
    const std::string dir = test::io::data_dir() + "/" + name;
    const io::MethodAdapterFile<float> file = io::read_method_adapter<float>(dir);
    const io::PeftAdapter<float> direct = io::load_peft_adapter<float>(dir);
    const io::PeftAdapter<float> via = io::lora_adapter_of(file);
    REQUIRE(via.lora.size() == direct.lora.size());
    for (std::size_t i = 0; i < via.lora.size(); ++i) {
      CHECK(via.lora[i].path == direct.lora[i].path);
      CHECK(via.lora[i].A == direct.lora[i].A);
      CHECK(via.lora[i].B == direct.lora[i].B);
      CHECK(via.lora[i].magnitude == direct.lora[i].magnitude);
      CHECK(via.lora[i].scaling == direct.lora[i].scaling);
    }
    test::io::TempDir tmp;
    io::merge_method_file(test::io::data_dir() + "/tiny_base.safetensors", file, tmp.file("m.safetensors"));
    io::merge_adapter_file(test::io::data_dir() + "/tiny_base.safetensors", direct, tmp.file("d.safetensors"));
    CHECK(test::io::raw_file(tmp.file("m.safetensors")) == test::io::raw_file(tmp.file("d.safetensors")));
  }
}
