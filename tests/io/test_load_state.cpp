// load_safetensors / save_safetensors on whole models: torch's load_state_dict(strict=...) report,
// name maps, dtype conversion, sharded checkpoints, refusals that leave the model unchanged, and a
// fixture written by torch + safetensors whose forward outputs the loaded model reproduces.
#include <peft/io/load_state.hpp>
#include <peft/layers/activations.hpp>
#include <peft/layers/linear.hpp>
#include <peft/layers/lora_linear.hpp>

#include <sys/stat.h>
#include <limits>
#include <string>
#include <vector>

#include "io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::TempDir;

namespace {

/// A user-defined model: fc1 (with bias) → tanh → fc2 (no bias), as torch's
/// nn.Sequential-free module {fc1: Linear(4, 6), fc2: Linear(6, 3, bias=False)}.
template <class T>
struct StateNet : Module<T> {
  Linear<T> fc1, fc2;
  explicit StateNet(std::uint64_t seed) {
    Rng rng(seed);
    fc1 = Linear<T>(4, 6, rng);
    fc2 = Linear<T>(6, 3, rng, false);
  }
  Matrix<T> forward(const Matrix<T>& x) const {
    Matrix<T> h, y;
    fc1.forward_inference(x, h);
    h = h.array().tanh().matrix();
    fc2.forward_inference(h, y);
    return y;
  }

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("fc1", fc1);
    fn("fc2", fc2);
  }
};

template <class T>
std::vector<Matrix<T>> state_values(StateNet<T>& m) {
  std::vector<Matrix<T>> v;
  m.visit_parameters([&](const std::string&, Parameter<T>& p) { v.push_back(p.value); });
  return v;
}

template <class T>
bool same_state(StateNet<T>& m, const std::vector<Matrix<T>>& v) {
  const std::vector<Matrix<T>> now = state_values(m);
  if (now.size() != v.size()) return false;
  for (std::size_t i = 0; i < v.size(); ++i)
    if (now[i].rows() != v[i].rows() || now[i].cols() != v[i].cols() || now[i] != v[i]) return false;
  return true;
}

/// A file whose tensors are StateNet's under `prefix`, values from `src` (float), stored as `dtype`.
void save_state_net_file(const std::string& path, StateNet<float>& src, const std::string& prefix = "",
                         DType dtype = DType::F32) {
  std::vector<NamedTensor<float>> t;
  src.visit_parameters([&](const std::string& name, Parameter<float>& p) {
    t.emplace_back(prefix + name, p.shape(), p.value.data(), dtype);
  });
  save_safetensors<float>(path, t);
}

/// A raw file: the header for `specs` followed by `data` (bytes the writer would refuse, e.g. NaN).
void write_state_raw(const std::string& path, const std::vector<TensorSpec>& specs, const std::string& data) {
  peft::test::io::write_bytes(path, build_safetensors_header(specs, {}, path) + data);
}

}  // namespace

TEMPLATE_TEST_CASE("load_safetensors: strict round trip with save_safetensors", "[io][load_state]", float, double) {
  using T = TestType;
  TempDir dir;
  StateNet<T> a(1), b(2);
  save_safetensors(a, dir.file("m.safetensors"));
  const SafeTensorsFile f(dir.file("m.safetensors"));
  REQUIRE(f.tensors().size() == 3);
  CHECK(f.info("fc1.bias").shape == std::vector<std::int64_t>{6});
  CHECK(f.info("fc1.weight").shape == std::vector<std::int64_t>{6, 4});
  CHECK(f.info("fc1.weight").dtype == native_dtype<T>());

  const LoadStateReport r = load_safetensors(b, dir.file("m.safetensors"));
  CHECK(r.complete());
  CHECK(r.loaded == std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight"});
  CHECK(same_state(b, state_values(a)));  // bit for bit: T's own dtype

  // trainable_only, another dtype, metadata.
  b.fc1.weight.set_trainable(false);
  SaveStateOptions so;
  so.trainable_only = true;
  so.native = false;
  so.dtype = DType::BF16;
  so.metadata = {{"format", "pt"}};
  save_safetensors(b, dir.file("t.safetensors"), so);
  const SafeTensorsFile t(dir.file("t.safetensors"));
  CHECK(t.tensors().size() == 2);
  CHECK(!t.contains("fc1.weight"));
  CHECK(t.info("fc2.weight").dtype == DType::BF16);
  CHECK(t.metadata().at("format") == "pt");
}

TEST_CASE("save_safetensors(model): atomic, keeps the mode of a replaced file, refuses NaN", "[io][load_state]") {
  TempDir dir;
  StateNet<float> a(1);
  const std::string path = dir.file("m.safetensors");
  save_safetensors(a, path);
  REQUIRE(::chmod(path.c_str(), 0640) == 0);
  const std::string before = peft::test::io::raw_file(path);
  a.fc2.weight.value(1, 2) = std::numeric_limits<float>::quiet_NaN();
  PEFT_REQUIRE_THROWS_WITH(save_safetensors(a, path), NumericError, "tensor \"fc2.weight\": element 8 is nan");
  CHECK(peft::test::io::raw_file(path) == before);
  CHECK(dir.entries() == std::vector<std::string>{"m.safetensors"});
  a.fc2.weight.value(1, 2) = 0.5f;
  save_safetensors(a, path);
  struct stat st;
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0640);
  SaveStateOptions so;
  so.native = false;
  so.dtype = DType::I32;
  PEFT_REQUIRE_THROWS_WITH(save_safetensors(a, path, so), ConfigError, "not a floating-point type");
}

TEST_CASE("load_safetensors: strict refuses missing and unexpected keys, non-strict reports them", "[io][load_state]") {
  TempDir dir;
  StateNet<float> src(1), dst(2);
  const std::vector<Matrix<float>> before = state_values(dst);
  // Missing fc2.weight, unexpected "extra.weight".
  const Matrix<float> extra = Matrix<float>::Ones(2, 2);
  save_safetensors<float>(dir.file("partial.safetensors"), {{"fc1.weight", {6, 4}, src.fc1.weight.value.data()},
                                                            {"fc1.bias", {6}, src.fc1.bias.value.data()},
                                                            {"extra.weight", {2, 2}, extra.data()}});
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, dir.file("partial.safetensors")), ConfigError,
                           "strict load: 1 missing (model parameters the file lacks): \"fc2.weight\"; 1 unexpected "
                           "(file tensors that name no parameter): \"extra.weight\" (nothing was loaded");
  CHECK(same_state(dst, before));

  LoadStateOptions opt;
  opt.strict = false;
  const LoadStateReport r = load_safetensors(dst, dir.file("partial.safetensors"), opt);
  CHECK(!r.complete());
  CHECK(r.loaded == std::vector<std::string>{"fc1.weight", "fc1.bias"});
  CHECK(r.missing == std::vector<std::string>{"fc2.weight"});
  CHECK(r.unexpected == std::vector<std::string>{"extra.weight"});
  CHECK(dst.fc1.weight.value == src.fc1.weight.value);
  CHECK(dst.fc1.bias.value == src.fc1.bias.value);
  CHECK(dst.fc2.weight.value == before[2]);
}

TEST_CASE("load_safetensors: a shape mismatch is always an error naming key and shapes, nothing changes",
          "[io][load_state]") {
  TempDir dir;
  StateNet<float> src(1), dst(2);
  const std::vector<Matrix<float>> before = state_values(dst);
  const Matrix<float> w = Matrix<float>::Ones(5, 4);
  save_safetensors<float>(dir.file("bad.safetensors"), {{"fc1.weight", {5, 4}, w.data()},
                                                        {"fc1.bias", {1, 6}, src.fc1.bias.value.data()},
                                                        {"fc2.weight", {3, 6}, src.fc2.weight.value.data()}});
  LoadStateOptions opt;
  opt.strict = false;
  for (bool strict : {true, false}) {
    opt.strict = strict;
    PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, dir.file("bad.safetensors"), opt), ShapeError,
                             "2 tensors of the wrong shape: \"fc1.weight\": expected [6, 4], file has [5, 4]; "
                             "\"fc1.bias\": expected [6], file has [1, 6]");
    CHECK(same_state(dst, before));
  }
}

TEST_CASE("load_safetensors: name maps (callable, exact renames, prefix rules, skipping)", "[io][load_state]") {
  TempDir dir;
  StateNet<float> src(1);
  save_state_net_file(dir.file("hf.safetensors"), src, "model.");
  {
    StateNet<float> dst(2);
    PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, dir.file("hf.safetensors")), ConfigError, "3 missing");
    const LoadStateReport r = load_safetensors(dst, dir.file("hf.safetensors"), strip_prefix("model."));
    CHECK(r.loaded.size() == 3);
    CHECK(same_state(dst, state_values(src)));
  }
  {
    StateNet<float> dst(2);
    LoadStateOptions opt;
    opt.name_map = rename_prefixes({{"model.fc1.", "fc1."}, {"model.", "head."}});
    opt.rename = {{"model.fc2.weight", "fc2.weight"}};  // exact renames win over name_map
    const LoadStateReport r = load_safetensors(dst, dir.file("hf.safetensors"), opt);
    CHECK(r.complete());
    CHECK(same_state(dst, state_values(src)));
  }
  {
    // "" skips a key: reported as skipped, and its parameter is missing.
    StateNet<float> dst(2);
    LoadStateOptions opt;
    opt.strict = false;
    opt.name_map = [](const std::string& k) { return k == "model.fc2.weight" ? std::string() : k.substr(6); };
    const LoadStateReport r = load_safetensors(dst, dir.file("hf.safetensors"), opt);
    CHECK(r.skipped == std::vector<std::string>{"model.fc2.weight"});
    CHECK(r.missing == std::vector<std::string>{"fc2.weight"});
    CHECK(r.unexpected.empty());
  }
  {
    StateNet<float> dst(2);
    const std::vector<Matrix<float>> before = state_values(dst);
    LoadStateOptions opt;
    opt.name_map = [](const std::string& k) { return k.find("fc1") != std::string::npos ? "fc1.weight" : k.substr(6); };
    PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, dir.file("hf.safetensors"), opt), ConfigError,
                             "both map to parameter \"fc1.weight\"");
    CHECK(same_state(dst, before));
  }
}

TEMPLATE_TEST_CASE("load_safetensors: F64, F32, F16 and BF16 convert to the model's scalar; integers are refused",
                   "[io][load_state]", float, double) {
  using T = TestType;
  TempDir dir;
  StateNet<float> src(1);
  for (DType d : {DType::F64, DType::F32, DType::F16, DType::BF16}) {
    INFO(dtype_name(d));
    save_state_net_file(dir.file("d.safetensors"), src, "", d);
    StateNet<T> dst(2);
    REQUIRE(load_safetensors(dst, dir.file("d.safetensors")).complete());
    // What the file holds, decoded by the reader, is what the parameter holds.
    const SafeTensorsFile f(dir.file("d.safetensors"));
    CHECK(dst.fc1.weight.value == f.load<T>("fc1.weight"));
    const double tol = d == DType::BF16 ? 1e-2 : d == DType::F16 ? 1e-3 : 1e-7;
    CHECK(test::rel_diff(dst.fc1.weight.value.template cast<double>(), src.fc1.weight.value.cast<double>()) < tol);
  }
  StateNet<T> dst(2);
  const std::vector<std::int32_t> ints(18, 1);
  const std::string bytes(reinterpret_cast<const char*>(ints.data()), 18 * 4);
  write_state_raw(dir.file("i.safetensors"), {{"fc2.weight", DType::I32, {3, 6}}}, bytes);
  LoadStateOptions opt;
  opt.strict = false;
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, dir.file("i.safetensors"), opt), ConfigError,
                           "tensor \"fc2.weight\" is I32; only F64, F32, F16 and BF16");
}

TEST_CASE("load_safetensors: NaN, Inf and values beyond float's range are refused with the key named",
          "[io][load_state]") {
  TempDir dir;
  StateNet<float> dst(2);
  const std::vector<Matrix<float>> before = state_values(dst);
  LoadStateOptions opt;
  opt.strict = false;
  std::vector<float> w(24, 0.25f);
  w[7] = std::numeric_limits<float>::infinity();
  std::vector<float> b(6, 0.5f);
  std::string data(reinterpret_cast<const char*>(b.data()), 24);
  data += std::string(reinterpret_cast<const char*>(w.data()), 96);
  write_state_raw(dir.file("inf.safetensors"), {{"fc1.bias", DType::F32, {6}}, {"fc1.weight", DType::F32, {6, 4}}},
                  data);
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, dir.file("inf.safetensors"), opt), NumericError,
                           "tensor \"fc1.weight\" element 7 is inf");
  CHECK(same_state(dst, before));

  // A finite F64 beyond float's range: Inf once converted.
  std::vector<double> big(6, 1.0);
  big[2] = 1e300;
  write_state_raw(dir.file("big.safetensors"), {{"fc1.bias", DType::F64, {6}}},
                  std::string(reinterpret_cast<const char*>(big.data()), 48));
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, dir.file("big.safetensors"), opt), NumericError,
                           "tensor \"fc1.bias\" element 2 is inf as F32 (F64 in the file, perhaps beyond its range)");
  CHECK(same_state(dst, before));
  StateNet<double> wide(2);
  CHECK(load_safetensors(wide, dir.file("big.safetensors"), opt).loaded == std::vector<std::string>{"fc1.bias"});
  CHECK(wide.fc1.bias.value(0, 2) == 1e300);
}

TEST_CASE("load_safetensors: a base checkpoint into AdaptedLinear hosts with adapters", "[io][load_state]") {
  TempDir dir;
  Rng rng(3);
  Linear<double> base(8, 6, rng);
  LoRALinear<double> host(8, 6, rng);
  LoraConfig lc;
  lc.r = 2;
  host.add_adapter("default", lc, rng);
  host.add_adapter("other", lc, rng);
  save_safetensors<double>(dir.file("base.safetensors"),
                           {{"weight", {6, 8}, base.weight.value.data()}, {"bias", {6}, base.bias.value.data()}});
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(host, dir.file("base.safetensors")), ConfigError,
                           "4 missing (model parameters the file lacks): \"lora_A.default.weight\"");
  LoadStateOptions opt;
  opt.ignore_adapter_parameters = true;
  const LoadStateReport r = load_safetensors(host, dir.file("base.safetensors"), opt);
  CHECK(r.complete());
  CHECK(r.loaded == std::vector<std::string>{"weight", "bias"});
  CHECK(r.ignored_adapter == std::vector<std::string>{"lora_A.default.weight", "lora_B.default.weight",
                                                      "lora_A.other.weight", "lora_B.other.weight"});
  CHECK(host.weight.value == base.weight.value);
  CHECK(host.bias.value == base.bias.value);
  // A whole state (base and adapters) round-trips through save_safetensors.
  save_safetensors(host, dir.file("all.safetensors"));
  LoRALinear<double> copy(8, 6, rng);
  copy.add_adapter("default", lc, rng);
  copy.add_adapter("other", lc, rng);
  CHECK(load_safetensors(copy, dir.file("all.safetensors")).loaded.size() == 6);
  Matrix<double> x = test::random_matrix<double>(3, 8, rng), y1, y2;
  typename LoRALinear<double>::Cache c1, c2;
  host.forward(x, y1, c1);
  copy.forward(x, y2, c2);
  CHECK(y1 == y2);

  // A predicate of the caller's decides what an adapter parameter is.
  LoRALinear<double> other(8, 6, rng);
  other.add_adapter("default", lc, rng);
  opt.is_adapter_parameter = [](const std::string& n) { return n.find(".default.") != std::string::npos; };
  CHECK(load_safetensors(other, dir.file("base.safetensors"), opt).ignored_adapter.size() == 2);
  opt.is_adapter_parameter = [](const std::string& n) { return n.rfind("lora_A", 0) == 0; };
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(other, dir.file("base.safetensors"), opt), ConfigError,
                           "1 missing (model parameters the file lacks): \"lora_B.default.weight\"");

  CHECK(is_peft_adapter_parameter("layers.0.attn.q_proj.lora_B.default.weight"));
  CHECK(is_peft_adapter_parameter("lora_magnitude_vector.default"));
  CHECK(is_peft_adapter_parameter("layers.1.adapter_attn.adapter_up.weight"));
  CHECK(is_peft_adapter_parameter("ia3_l.default"));
  CHECK(is_peft_adapter_parameter("classifier.modules_to_save.default.weight"));
  CHECK(!is_peft_adapter_parameter("layers.0.attn.q_proj.weight"));
  CHECK(!is_peft_adapter_parameter("floral_head.weight"));  // a segment must start with the prefix
}

TEST_CASE("load_safetensors: a sharded checkpoint (model.safetensors.index.json)", "[io][load_state]") {
  TempDir dir;
  StateNet<float> src(1), dst(2);
  save_safetensors<float>(
      dir.file("model-00001-of-00002.safetensors"),
      {{"fc1.weight", {6, 4}, src.fc1.weight.value.data()}, {"fc1.bias", {6}, src.fc1.bias.value.data()}});
  save_safetensors<float>(dir.file("model-00002-of-00002.safetensors"),
                          {{"fc2.weight", {3, 6}, src.fc2.weight.value.data()}});
  const std::string index = dir.file("model.safetensors.index.json");
  peft::test::io::write_bytes(index, R"({"metadata": {"total_size": 240}, "weight_map": {
    "fc1.weight": "model-00001-of-00002.safetensors", "fc1.bias": "model-00001-of-00002.safetensors",
    "fc2.weight": "model-00002-of-00002.safetensors"}})");
  const LoadStateReport r = load_safetensors(dst, index);
  CHECK(r.complete());
  CHECK(same_state(dst, state_values(src)));

  peft::test::io::write_bytes(index, R"({"weight_map": {"fc1.weight": "model-00002-of-00002.safetensors",
    "fc1.bias": "model-00001-of-00002.safetensors", "fc2.weight": "model-00002-of-00002.safetensors"}})");
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, index), IoError,
                           "weight_map puts \"fc1.weight\" in \"model-00002-of-00002.safetensors\", which has no");
  peft::test::io::write_bytes(index, R"({"weight_map": {"fc1.weight": "../model-00001-of-00002.safetensors"}})");
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, index), IoError, "is not a file name in the index's directory");
  peft::test::io::write_bytes(index, R"({"weight_map": {"fc1.weight": "model-00001-of-00002.safetensors"}})");
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, index), IoError,
                           "holds \"fc1.bias\", which the weight_map does not list there");
  peft::test::io::write_bytes(index, R"({"weight_map": {"fc1.weight": 3}})");
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, index), IoError,
                           "weight_map[\"fc1.weight\"] must be a shard file name, got 3");
  peft::test::io::write_bytes(index, R"({"weight_map": {"fc1.weight": "missing.safetensors"}})");
  CHECK_THROWS_AS(load_safetensors(dst, index), IoError);
  peft::test::io::write_bytes(index, R"({"weight_map": {"fc1.weight": "a", "fc1.weight": "b"}})");
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, index), IoError, "duplicate");
  peft::test::io::write_bytes(index, R"({"weight_map": [)");
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, index), IoError, "invalid JSON");
  CHECK(same_state(dst, state_values(src)));  // every refusal above left the model as loaded
  peft::test::io::write_bytes(index, R"({"metadata": {}})");
  PEFT_REQUIRE_THROWS_WITH(load_safetensors(dst, index), IoError, "needs an object \"weight_map\"");
}

TEST_CASE("load_safetensors: a state dict saved by torch + safetensors reproduces torch's forward",
          "[io][load_state][peer]") {
  // tests/data/torch_state/README.md: written by safetensors.torch.save_file (torch 2.15.0).
  const std::string d = peft::test::io::data_dir() + "/torch_state";
  const SafeTensorsFile ref(d + "/reference.safetensors");
  const Matrix<double> x = ref.load<double>("x");
  {
    StateNet<float> m(7);
    const LoadStateReport r = load_safetensors(m, d + "/model.safetensors", strip_prefix("model."));
    CHECK(r.loaded.size() == 3);
    const Matrix<float> y = m.forward(x.cast<float>());
    CHECK(test::rel_diff(y, ref.load<float>("y32")) < 1e-6);
  }
  {
    StateNet<double> m(7);
    REQUIRE(load_safetensors(m, d + "/model.safetensors", strip_prefix("model.")).complete());
    CHECK(test::rel_diff(m.forward(x), ref.load<double>("y64")) < 1e-12);
    PEFT_REQUIRE_THROWS_WITH(load_safetensors(m, d + "/model.safetensors"), ConfigError,
                             "3 unexpected (file tensors that name no parameter): \"model.fc1.bias\"");
  }
  {
    StateNet<double> m(7);
    REQUIRE(SafeTensorsFile(d + "/model_fp16.safetensors").info("model.fc1.weight").dtype == DType::F16);
    REQUIRE(load_safetensors(m, d + "/model_fp16.safetensors", strip_prefix("model.")).complete());
    CHECK(test::rel_diff(m.forward(x), ref.load<double>("y16")) < 1e-12);
  }
}
