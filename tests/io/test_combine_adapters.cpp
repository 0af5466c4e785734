// io/adapter_factors.hpp and io/combine_adapters.hpp: adapter directories of any method with a
// LoRA-factor form (LoRA, VeRA, LoHa, LoKr), made with the library (apply_method, trained-like
// values, save_method_adapter) or by Hugging Face PEFT (tests/data/methods), read as factors and
// combined whole; the combined LoRA adapter's update per module is the weighted sum of the
// methods' own deltas. (IA)³, DoRA and sources that do not match are refused, naming why.
#include <peft/io/adapter_factors.hpp>
#include <peft/io/combine_adapters.hpp>
#include <peft/io/methods.hpp>

#include <map>
#include <string>
#include <vector>

#include "io/io_test_utils.hpp"
#include "layers/method_fixtures.hpp"
#include "support/test_utils.hpp"

using namespace peft;

namespace combine_adapters_test {

struct Slot {
  const char* path;
  Index in, out;
};
// Modules of several sizes (VeRA's shared projection is then wider than some of them).
const Slot kSlots[] = {{"enc.0.attn.q", 12, 10}, {"enc.0.attn.v", 8, 12}, {"enc.0.mlp.up", 12, 16}};

/// A plain Module tree of three adapted linears named as kSlots.
class ThreeLinears : public Module<double> {
 public:
  explicit ThreeLinears(Rng& rng) {
    for (std::size_t i = 0; i < 3; ++i) linears_[i] = AdaptedLinear<double>(kSlots[i].in, kSlots[i].out, rng, true);
    this->set_name("");
  }
  AdaptedLinear<double>& at(std::size_t i) { return linears_[i]; }

 protected:
  void visit_children(const typename Module<double>::ChildVisitor& fn) override {
    for (std::size_t i = 0; i < 3; ++i) fn(kSlots[i].path, linears_[i]);
  }

 private:
  AdaptedLinear<double> linears_[3];
};

/// Applies `config` as adapter "a" to a fresh model, gives every adapter parameter trained-like
/// values, saves the directory, and returns each module's own delta (AdapterMethod::add_delta).
std::map<std::string, Matrix<double>> make_dir(const io::Json& config, const std::string& dir, std::uint64_t seed) {
  Rng rng(seed);
  ThreeLinears model(rng);
  io::apply_method(model, config, "a", rng);
  std::map<std::string, Matrix<double>> deltas;
  for (auto& [path, linear] : io::adapted_linears(model)) {
    if (!linear->has_adapter("a")) continue;
    AdapterMethod<double>& m = linear->method("a");
    m.visit_parameters([&](const std::string&, Parameter<double>& p) {
      if (p.trainable()) p.value = test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.5);
    });
    if (!m.has_factors()) continue;  // (IA)³: a gain, no delta of its own
    Matrix<double> d = Matrix<double>::Zero(linear->out_features(), linear->in_features());
    m.add_delta(MergeRecord<double>{}, 1.0, d);
    deltas[path] = d;
  }
  io::save_method_adapter(dir, model, "a", config);
  return deltas;
}

/// A LoRA directory on the same modules (random factors, alpha 5, r 2: scaling 2.5).
std::map<std::string, Matrix<double>> make_lora_dir(const std::string& dir, std::uint64_t seed) {
  Rng rng(seed);
  io::PeftAdapter<double> ad;
  ad.config.r = 2;
  ad.config.lora_alpha = 5.0;
  std::vector<std::string> paths;
  std::map<std::string, Matrix<double>> deltas;
  for (const Slot& s : kSlots) {
    io::LoraModuleWeights<double> m;
    m.path = s.path;
    m.A = test::random_matrix<double>(2, s.in, rng, 0.5);
    m.B = test::random_matrix<double>(s.out, 2, rng, 0.5);
    m.alpha = 5.0;
    m.scaling = 2.5;
    deltas[m.path] = m.scaling * m.B * m.A;
    paths.push_back(m.path);
    ad.lora.push_back(std::move(m));
  }
  ad.config.target_modules = ModuleSelector::list(paths);
  ad.config.raw = io::Json::object();
  io::save_peft_adapter(dir, ad);
  return deltas;
}

const io::Json kVera = {{"peft_type", "VERA"}, {"r", 3}, {"target_modules", {"q", "v", "up"}}};
const io::Json kLoha = {{"peft_type", "LOHA"}, {"r", 2}, {"alpha", 3}, {"target_modules", {"q", "v", "up"}}};
const io::Json kLokr = {{"peft_type", "LOKR"}, {"r", 2}, {"alpha", 3}, {"target_modules", {"q", "v", "up"}}};

double max_abs_diff(const Matrix<double>& a, const Matrix<double>& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  return (a - b).cwiseAbs().maxCoeff();
}

}  // namespace combine_adapters_test

TEST_CASE("Adapter directories of every method read as LoRA factors equal to the methods' deltas", "[io][combine]") {
  using namespace combine_adapters_test;
  test::io::TempDir dir;
  for (const io::Json& config : {kLoha, kLokr}) {
    INFO(config.dump());
    const auto deltas = make_dir(config, dir.file("x"), 5);
    const io::AdapterFactors<double> f = io::read_adapter_factors<double>(dir.file("x"));
    CHECK(f.peft_type == config.at("peft_type").get<std::string>());
    CHECK(f.open_in.empty());
    REQUIRE(f.modules.size() == 3);
    for (const auto& [path, d] : deltas) CHECK(max_abs_diff(f.modules.at(path).delta(), d) < 1e-12);
    io::detail::remove_tree(dir.file("x"));
  }
  // VeRA: the input sizes are open (vera_A is [3, 12], shared) until the shapes close them.
  const auto vera = make_dir(kVera, dir.file("vera"), 6);
  const io::AdapterFactors<double> open = io::read_adapter_factors<double>(dir.file("vera"));
  CHECK(open.open_in.size() == 3);
  CHECK(open.modules.at("enc.0.attn.v").A.cols() == 12);
  io::ModuleShapes shapes;
  for (const Slot& s : kSlots) shapes[s.path] = {s.out, s.in};
  const io::AdapterFactors<double> closed = io::read_adapter_factors<double>(dir.file("vera"), shapes);
  CHECK(closed.open_in.empty());
  for (const auto& [path, d] : vera) {
    CHECK(closed.modules.at(path).rank() == 3);
    CHECK(max_abs_diff(closed.modules.at(path).delta(), d) < 1e-12);
  }
  shapes["enc.0.attn.q"] = {11, 12};
  PEFT_REQUIRE_THROWS_WITH(io::read_adapter_factors<double>(dir.file("vera"), shapes), ShapeError,
                           "its tensors give 10 output features, the given shape [11, 12] has 11");
}

TEST_CASE("combine_adapter_dirs: VeRA, LoHa, LoKr and LoRA directories combine to the weighted sum of their deltas",
          "[io][combine]") {
  using namespace combine_adapters_test;
  test::io::TempDir dir;
  const auto vera = make_dir(kVera, dir.file("vera"), 11);
  const auto loha = make_dir(kLoha, dir.file("loha"), 12);
  const auto lokr = make_dir(kLokr, dir.file("lokr"), 13);
  const auto lora = make_lora_dir(dir.file("lora"), 14);
  for (const char* method : {"cat", "linear", "svd"}) {
    INFO(method);
    io::CombineAdaptersOptions opt;
    REQUIRE(parse_combine_method(method, opt.combine.method));
    opt.weights = {0.7, -1.3};
    std::size_t calls = 0;
    opt.on_module = [&](std::size_t done, std::size_t count) {
      CHECK(done == ++calls);
      CHECK(count == 3);
    };
    // VeRA first: its input sizes come from the LoHa source of the same modules.
    const std::string out = dir.file(std::string("vl_") + method);
    const io::CombineAdaptersReport rep = io::combine_adapter_dirs({dir.file("vera"), dir.file("loha")}, out, opt);
    CHECK(rep.adapters == 2);
    CHECK(rep.modules == 3);
    CHECK(calls == 3);
    CHECK(rep.largest_error < 1e-9);  // lossless rank
    const io::PeftAdapter<double> got = io::load_peft_adapter<double>(out);
    REQUIRE(got.lora.size() == 3);
    for (const auto& m : got.lora) {
      INFO(m.path);
      CHECK(m.scaling == 1.0);
      if (std::string(method) == "cat") CHECK(m.rank() == 3 + 4);  // VeRA r, LoHa r²
      const Matrix<double> want = 0.7 * vera.at(m.path) - 1.3 * loha.at(m.path);
      CHECK(max_abs_diff(Matrix<double>(m.scaling * m.B * m.A), want) < 1e-12);
    }
  }
  // All four methods, mixed, with the shapes given (so VeRA could also come alone).
  io::CombineAdaptersOptions opt;
  opt.combine.method = CombineMethod::Linear;
  opt.weights = {0.5, 2.0, -1.0, 0.25};
  for (const Slot& s : kSlots) opt.shapes[s.path] = {s.out, s.in};
  io::combine_adapter_dirs({dir.file("lokr"), dir.file("vera"), dir.file("lora"), dir.file("loha")}, dir.file("all"),
                           opt);
  const io::PeftAdapter<double> all = io::load_peft_adapter<double>(dir.file("all"));
  for (const auto& m : all.lora) {
    INFO(m.path);
    const Matrix<double> want =
        0.5 * lokr.at(m.path) + 2.0 * vera.at(m.path) - 1.0 * lora.at(m.path) + 0.25 * loha.at(m.path);
    CHECK(max_abs_diff(Matrix<double>(m.scaling * m.B * m.A), want) < 1e-12);
  }
  opt.weights = {3.0};
  io::combine_adapter_dirs({dir.file("vera")}, dir.file("vera_only"), opt);
  for (const auto& m : io::load_peft_adapter<double>(dir.file("vera_only")).lora)
    CHECK(max_abs_diff(Matrix<double>(m.scaling * m.B * m.A), 3.0 * vera.at(m.path)) < 1e-12);
}

TEST_CASE("combine_adapter_dirs refuses (IA)^3, DoRA, an unknown VeRA input size and sources that do not match",
          "[io][combine][errors]") {
  using namespace combine_adapters_test;
  test::io::TempDir dir;
  make_dir(kLoha, dir.file("loha"), 21);
  make_dir(kVera, dir.file("vera"), 22);
  make_dir({{"peft_type", "IA3"}, {"target_modules", {"q", "v", "up"}}, {"feedforward_modules", {"up"}}},
           dir.file("ia3"), 23);
  make_dir({{"peft_type", "LOHA"}, {"r", 2}, {"target_modules", {"q", "v"}}}, dir.file("loha_qv"), 24);
  make_dir({{"peft_type", "LOKR"}, {"r", 2}, {"target_modules", {"q", "up"}}}, dir.file("lokr_qu"), 25);
  const io::CombineAdaptersOptions opt;
  PEFT_REQUIRE_THROWS_WITH(io::combine_adapter_dirs({dir.file("loha"), dir.file("ia3")}, dir.file("o"), opt),
                           ConfigError,
                           "ia3\" is an (IA)^3 adapter: it scales the base weight's rows or columns (a gain on W, not "
                           "an additive low-rank delta)");
  PEFT_REQUIRE_THROWS_WITH(io::combine_adapter_dirs({test::methods::data_dir() + "/tiny_dora"}, dir.file("o"), opt),
                           ConfigError, "is a DoRA adapter (its delta is not s·B·A)");
  PEFT_REQUIRE_THROWS_WITH(io::combine_adapter_dirs({dir.file("vera"), dir.file("vera")}, dir.file("o"), opt),
                           ConfigError,
                           "VeRA module \"enc.0.attn.q\" of \"" + dir.file("vera") +
                               "\": its input size is not stored in the adapter directory");
  PEFT_REQUIRE_THROWS_WITH(io::combine_adapter_dirs({dir.file("loha"), dir.file("loha_qv")}, dir.file("o"), opt),
                           ConfigError, "loha_qv\" adapts 2 modules, \"" + dir.file("loha") + "\" adapts 3");
  PEFT_REQUIRE_THROWS_WITH(io::combine_adapter_dirs({dir.file("loha_qv"), dir.file("lokr_qu")}, dir.file("o"), opt),
                           ConfigError,
                           "lokr_qu\" has no module \"enc.0.attn.v\" (adapters must target the same modules)");
  io::CombineAdaptersOptions two = opt;
  two.weights = {1.0};
  PEFT_REQUIRE_THROWS_WITH(io::combine_adapter_dirs({dir.file("loha"), dir.file("loha")}, dir.file("o"), two),
                           ConfigError, "1 weights for 2 adapters");
  // A VeRA module narrower than another source's says so.
  io::CombineAdaptersOptions wide = opt;
  wide.shapes["enc.0.attn.v"] = {12, 13};
  PEFT_REQUIRE_THROWS_WITH(io::combine_adapter_dirs({dir.file("vera")}, dir.file("o"), wide), ShapeError,
                           "is given input size 13, but its shared projection has 12 columns");
  CHECK_FALSE(io::path_exists(dir.file("o")));
}

TEST_CASE("VeRA, LoHa and LoKr directories written by PEFT read as factors of PEFT's deltas and combine",
          "[io][combine][peft]") {
  using namespace combine_adapters_test;
  const std::string methods = test::methods::data_dir() + "/methods";
  const io::ModuleShapes shapes = io::module_shapes_of_safetensors(methods + "/base.safetensors");
  CHECK(shapes.size() == 4);
  CHECK(shapes.at("model.layers.0.mlp.fc2") == std::pair<Index, Index>(12, 16));
  Matrix<double> sum[4];
  for (const char* c : {"vera", "loha", "lokr", "lokr_factor", "lokr_decompose_both"}) {
    INFO(c);
    const io::AdapterFactors<double> f = io::read_adapter_factors<double>(methods + "/" + c, shapes);
    CHECK(f.open_in.empty());
    const io::SafeTensorsFile expected(methods + "/" + c + "/expected.safetensors");
    for (std::size_t i = 0; i < 4; ++i) {
      const std::string p = test::methods::kModules[i].path;
      INFO(p);
      const Matrix<double> want = expected.load<double>("delta." + p);
      CHECK(max_abs_diff(f.modules.at(p).delta(), want) < 2e-6);
      if (std::string(c) == "vera" || std::string(c) == "loha" || std::string(c) == "lokr")
        sum[i] = sum[i].size() == 0 ? want : Matrix<double>(sum[i] + want);
    }
  }
  test::io::TempDir dir;
  io::CombineAdaptersOptions opt;
  opt.combine.method = CombineMethod::Svd;
  io::combine_adapter_dirs({methods + "/vera", methods + "/loha", methods + "/lokr"}, dir.file("c"), opt);
  const io::PeftAdapter<double> got = io::load_peft_adapter<double>(dir.file("c"));
  for (std::size_t i = 0; i < 4; ++i) {
    const io::LoraModuleWeights<double>* m = got.find(test::methods::kModules[i].path);
    REQUIRE(m != nullptr);
    CHECK(max_abs_diff(Matrix<double>(m->scaling * m->B * m->A), sum[i]) < 1e-5);
  }
}
