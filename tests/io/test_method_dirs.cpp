// PEFT adapter directories of the table's methods (VeRA, LoHa, LoKr, (IA)³) on a user's model:
// files written by Hugging Face PEFT 0.21.2 (tests/data/methods, see its README) load onto a plain
// Module tree of adapted linears, reproduce PEFT's outputs and merged weights, save back to the same
// bytes' tensors, and a fresh adapter applied by target_modules trains, saves and loads back.
#include <peft/io/methods.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "io/io_test_utils.hpp"
#include "layers/method_fixtures.hpp"
#include "support/test_utils.hpp"

using namespace peft;

namespace method_dirs {

/// The fixtures' TinyModel: a = tanh(q_proj(x)); h = x + v_proj(a); m = tanh(fc1(h)); y = h + fc2(m).
template <class T>
class TinyModel : public Module<T> {
 public:
  explicit TinyModel(Rng& rng) {
    for (std::size_t i = 0; i < 4; ++i) {
      const auto& s = test::methods::kModules[i];
      linears_[i] = AdaptedLinear<T>(s.in, s.out, rng, true);
    }
    this->set_name("");
  }

  AdaptedLinear<T>& at(std::size_t i) { return linears_[i]; }

  /// Loads the base weights of base.safetensors (the model's own key names).
  void load_base(const std::string& file) {
    const io::SafeTensorsFile st(file);
    for (std::size_t i = 0; i < 4; ++i) {
      const std::string p = test::methods::kModules[i].path;
      linears_[i].weight.value = st.load<T>(p + ".weight");
      linears_[i].bias.value = st.load<T>(p + ".bias");
      linears_[i].bias.value.resize(1, linears_[i].bias.value.size());
    }
  }

  Matrix<T> forward(const Matrix<T>& x) {
    Matrix<T> a, v, m, f;
    linears_[0].forward_inference(x, a);
    a = a.array().tanh().matrix();
    linears_[1].forward_inference(a, v);
    const Matrix<T> h = x + v;
    linears_[2].forward_inference(h, m);
    m = m.array().tanh().matrix();
    linears_[3].forward_inference(m, f);
    return h + f;
  }

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    for (std::size_t i = 0; i < 4; ++i) fn(test::methods::kModules[i].path, linears_[i]);
  }

 private:
  AdaptedLinear<T> linears_[4];
};

template <class T>
std::string base_file() {
  return test::methods::data_dir() + (sizeof(T) == 8 ? "/methods/base_f64.safetensors" : "/methods/base.safetensors");
}

double max_abs(const Matrix<double>& a) { return a.size() == 0 ? 0.0 : a.cwiseAbs().maxCoeff(); }

template <class T>
Matrix<double> as_double(const Matrix<T>& m) {
  return m.template cast<double>();
}

/// Loads case `name` onto a fresh model and checks y, then merges every linear and checks y and
/// the merged weights (base + delta, or PEFT's merged tensors for (IA)³).
template <class T>
void check_case(const std::string& name, double tol) {
  INFO("case " << name);
  const std::string dir = test::methods::data_dir() + "/methods/" + name;
  Rng rng(1);
  TinyModel<T> model(rng);
  model.load_base(base_file<T>());
  model.eval();
  const io::MethodAdapterFile<T> file = io::read_method_adapter<T>(dir);
  const std::vector<std::string> paths = io::load_method_adapter(model, file, "default");
  CHECK(paths.size() == 4);
  const io::SafeTensorsFile expected(dir + "/expected.safetensors");
  const Matrix<T> x = expected.load<T>("x");
  const Matrix<T> y = model.forward(x);
  CHECK(max_abs(as_double<T>(y) - expected.load<double>("y")) < tol);

  std::vector<Matrix<T>> base_w, base_b;
  for (std::size_t i = 0; i < 4; ++i) {
    base_w.push_back(model.at(i).weight.value);
    base_b.push_back(model.at(i).bias.value);
  }
  for (std::size_t i = 0; i < 4; ++i) model.at(i).merge();
  CHECK(max_abs(as_double<T>(model.forward(x)) - expected.load<double>("y")) < tol);
  for (std::size_t i = 0; i < 4; ++i) {
    const std::string p = test::methods::kModules[i].path;
    INFO(p);
    if (expected.contains("delta." + p)) {
      CHECK(max_abs(as_double<T>(model.at(i).weight.value - base_w[i]) - expected.load<double>("delta." + p)) < tol);
    } else {
      CHECK(max_abs(as_double<T>(model.at(i).weight.value) - expected.load<double>("merged." + p + ".weight")) < tol);
      if (expected.contains("merged." + p + ".bias")) {
        Matrix<double> b = expected.load<double>("merged." + p + ".bias");
        b.resize(1, b.size());
        CHECK(max_abs(as_double<T>(model.at(i).bias.value) - b) < tol);
      }
    }
  }
  for (std::size_t i = 0; i < 4; ++i) model.at(i).unmerge();
  for (std::size_t i = 0; i < 4; ++i) CHECK(max_abs(as_double<T>(model.at(i).weight.value - base_w[i])) < tol);

  // Save → read back: the same tensors, bit for bit, under the same keys.
  test::io::TempDir tmp;
  const std::string out = tmp.path + "/saved";
  io::save_method_adapter(out, model, "default", file.config);
  const io::MethodAdapterFile<T> again = io::read_method_adapter<T>(out);
  CHECK(again.modules.size() == file.modules.size());
  for (const auto& [path, tensors] : file.modules)
    for (const auto& [param, value] : tensors) {
      INFO(path << "." << param);
      CHECK(again.modules.at(path).at(param) == value);
    }
  for (const auto& [key, value] : file.model_tensors) CHECK(again.model_tensors.at(key) == value);
  const io::SafeTensorsFile a(dir + "/adapter_model.safetensors"), b(out + "/adapter_model.safetensors");
  for (const io::TensorInfo& t : a.tensors()) {
    INFO(t.name);
    CHECK(b.info(t.name).shape == t.shape);
  }
  CHECK(a.tensors().size() == b.tensors().size());
}

}  // namespace method_dirs

TEST_CASE("PEFT-written VeRA, LoHa, LoKr and (IA)^3 directories load onto a model and reproduce PEFT",
          "[io][methods][peft]") {
  using method_dirs::check_case;
  check_case<float>("vera", 2e-6);
  check_case<float>("loha", 2e-6);
  check_case<double>("loha_f64", 1e-13);
  check_case<float>("lokr", 2e-6);
  check_case<float>("lokr_decompose_both", 2e-6);
  check_case<float>("lokr_factor", 2e-6);
  check_case<float>("ia3", 2e-6);
}

TEST_CASE("A VeRA directory saved without its projections is refused, saying why", "[io][methods][errors]") {
  PEFT_REQUIRE_THROWS_WITH(io::read_method_adapter<float>(test::methods::data_dir() + "/methods/vera_noproj"),
                           ConfigError, "save_projection=false");
}

TEST_CASE("apply_method: every table method applies by target_modules, trains, saves and loads back", "[io][methods]") {
  const std::vector<io::Json> configs = {
      {{"peft_type", "LOHA"}, {"r", 2}, {"alpha", 4}, {"target_modules", {"q_proj", "fc1"}}},
      {{"peft_type", "LOKR"}, {"r", 2}, {"alpha", 4}, {"target_modules", {"v_proj", "fc2"}}},
      {{"peft_type", "VERA"}, {"r", 4}, {"d_initial", 0.1}, {"target_modules", ".*(q_proj|fc2)"}},
      {{"peft_type", "IA3"}, {"target_modules", {"q_proj", "fc2"}}, {"feedforward_modules", {"fc2"}}}};
  for (const io::Json& config : configs) {
    const std::string type = config.at("peft_type").get<std::string>();
    INFO(type);
    Rng rng(7);
    method_dirs::TinyModel<double> model(rng);
    const Matrix<double> x = test::random_matrix<double>(6, 12, rng);
    const Matrix<double> y0 = model.forward(x);
    const std::vector<std::string> paths = io::apply_method(model, config, "task", rng);
    CHECK(paths.size() == 2);
    // Identity at init (LoHa w2_b = 0, LoKr w1 = 0, VeRA λ_b = 0, (IA)³ l = 1), exactly.
    CHECK(model.forward(x) == y0);

    // Train the adapters of one linear toward a target with plain SGD: the loss falls, the base stays.
    const std::size_t i = paths[0].find("q_proj") != std::string::npos ? 0 : 1;
    AdaptedLinear<double>& lin = model.at(i);
    lin.freeze_base();
    const Matrix<double> w = lin.weight.value;
    const Index in = lin.in_features(), out = lin.out_features();
    const Matrix<double> xi = test::random_matrix<double>(16, in, rng),
                         target = test::random_matrix<double>(16, out, rng);
    typename AdaptedLinear<double>::Cache cache;
    auto loss = [&] {
      Matrix<double> y;
      lin.forward_inference(xi, y);
      return (y - target).squaredNorm() / static_cast<double>(y.rows());
    };
    const double before = loss();
    for (int step = 0; step < 60; ++step) {
      lin.zero_grad();
      Matrix<double> y;
      lin.forward(xi, y, cache);
      const Matrix<double> g = 2.0 * (y - target) / static_cast<double>(y.rows());
      lin.backward(cache, g, nullptr);
      lin.visit_parameters([](const std::string&, Parameter<double>& p) {
        if (p.trainable()) p.value -= 0.05 * p.grad;
      });
    }
    CHECK(loss() < 0.9 * before);
    CHECK(lin.weight.value == w);

    // Save as a PEFT directory, load onto a fresh model with the same base: identical outputs.
    test::io::TempDir tmp;
    io::save_method_adapter(tmp.path + "/a", model, "task", config);
    Rng rng2(7);
    method_dirs::TinyModel<double> fresh(rng2);
    const io::MethodAdapterFile<double> file = io::read_method_adapter<double>(tmp.path + "/a");
    io::load_method_adapter(fresh, file, "task");
    CHECK(fresh.forward(x) == model.forward(x));
  }
}

TEST_CASE("apply_method and the loader refuse what they cannot do, naming it", "[io][methods][errors]") {
  Rng rng(9);
  method_dirs::TinyModel<float> model(rng);
  PEFT_REQUIRE_THROWS_WITH(io::apply_method(model, io::Json{{"peft_type", "OFT"}}, "a", rng), ConfigError,
                           "peft_type \"OFT\" is not in the method table (LORA, VERA, LOHA, LOKR, IA3)");
  PEFT_REQUIRE_THROWS_WITH(
      io::apply_method(model, io::Json{{"peft_type", "LOHA"}, {"target_modules", {"nothing"}}}, "a", rng), ConfigError,
      "target_modules matches no linear; the model's linears: model.layers.0.self_attn.q_proj");
  PEFT_REQUIRE_THROWS_WITH(
      io::apply_method(model, io::Json{{"peft_type", "VERA"}, {"target_modules", {"fc1"}}, {"save_projection", false}},
                       "a", rng),
      ConfigError, "save_projection=false");
  io::apply_method(model, io::Json{{"peft_type", "LOHA"}, {"r", 2}, {"target_modules", {"fc1"}}}, "a", rng);
  const io::MethodAdapterFile<float> file = io::read_method_adapter<float>(test::methods::data_dir() + "/methods/loha");
  method_dirs::TinyModel<float> other(rng);
  io::load_method_adapter(other, file, "a");
  PEFT_REQUIRE_THROWS_WITH(io::load_method_adapter(other, file, "a"), ConfigError,
                           "already has an adapter \"a\"; nothing was loaded");
}
