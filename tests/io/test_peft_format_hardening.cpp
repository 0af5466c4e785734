// Adapter directories, hardened: every tensor finite on load, the config bound to its weights by
// SHA-256 (a torn save is refused), patterns compiled once per config, and collect_adapter saving
// what the layers trained (their alpha / rank / rsLoRA, modules_to_save).
#include <peft/io/peft_format.hpp>
#include <peft/layers/linear.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::raw_file;
using peft::test::io::TempDir;
using peft::test::io::write_bytes;

namespace {

AdapterConfig hardening_cfg(const std::string& text) {
  return parse_adapter_config(parse_json_strict(text, "cfg.json"), "cfg.json");
}

/// A float32 safetensors file written byte by byte: save_safetensors refuses non-finite values,
/// and these tests need files that hold them (as a file from elsewhere may).
struct RawTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<float> values;
};

void write_raw_safetensors(const std::string& path, const std::vector<RawTensor>& tensors) {
  Json header = Json::object();
  std::string data;
  for (const auto& t : tensors) {
    const std::size_t begin = data.size();
    data.append(reinterpret_cast<const char*>(t.values.data()), t.values.size() * sizeof(float));
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string h = header.dump();
  while (h.size() % 8 != 0) h += ' ';
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>((h.size() >> (8 * i)) & 0xFF);
  write_bytes(path, bytes + h + data);
}

std::vector<float> filled(std::size_t n, float v = 0.5f) { return std::vector<float>(n, v); }

/// LoRA layers q / v (adapters added by the test) and a plain linear head.
template <class T>
class HeadModel : public Module<T> {
 public:
  explicit HeadModel(Rng& rng) : q(6, 5, rng, false), v(6, 5, rng, false), classifier(5, 3, rng, true) {
    q.freeze_base();
    v.freeze_base();
    this->set_name("");
  }
  LoRALinear<T> q, v;
  Linear<T> classifier;

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("layers.0.q", q);
    fn("layers.0.v", v);
    fn("classifier", classifier);
  }
};

LoraConfig lora_of(int r, double alpha, bool rslora = false) {
  LoraConfig c;
  c.r = r;
  c.alpha = alpha;
  c.use_rslora = rslora;
  c.init = LoraInit::None;  // non-zero B
  return c;
}

bool any_contains(const std::vector<std::string>& v, const std::string& needle) {
  for (const auto& s : v)
    if (s.find(needle) != std::string::npos) return true;
  return false;
}

}  // namespace

TEST_CASE("PEFT adapter directory: a NaN or Inf in any tensor is refused on load", "[io][peft][finite]") {
  TempDir dir;
  const std::string d = dir.path + "/a";
  ::mkdir(d.c_str(), 0755);
  const std::string k = "base_model.model.q.";
  const std::string lora = R"({"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q"]})";
  const std::string dora = R"({"peft_type":"LORA","r":2,"lora_alpha":4,"use_dora":true,"target_modules":["q"]})";
  const std::string mts =
      R"({"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q"],"modules_to_save":["classifier"]})";
  const std::string all_bias = R"({"peft_type":"LORA","r":2,"lora_alpha":4,"bias":"all","target_modules":["q"]})";
  const std::string prompt = R"({"peft_type":"PROMPT_TUNING","num_virtual_tokens":2,"token_dim":4})";
  const std::string prefix =
      R"({"peft_type":"PREFIX_TUNING","num_virtual_tokens":2,"token_dim":2,"num_layers":1,"num_attention_heads":1})";
  struct Case {
    const char* kind;
    std::string config;
    std::vector<RawTensor> tensors;
    std::string bad_key;  // the tensor that gets the NaN / Inf
  };
  const std::vector<RawTensor> factors = {{k + "lora_A.weight", {2, 8}, filled(16)},
                                          {k + "lora_B.weight", {6, 2}, filled(12)}};
  auto plus = [&](RawTensor t) {
    std::vector<RawTensor> v = factors;
    v.push_back(std::move(t));
    return v;
  };
  const std::vector<Case> cases = {
      {"LoRA A factor", lora, factors, k + "lora_A.weight"},
      {"LoRA B factor", lora, factors, k + "lora_B.weight"},
      {"DoRA magnitude", dora, plus({k + "lora_magnitude_vector", {6}, filled(6)}), k + "lora_magnitude_vector"},
      {"prompt embeddings", prompt, {{"prompt_embeddings", {2, 4}, filled(8)}}, "prompt_embeddings"},
      {"prefix", prefix, {{"prompt_embeddings", {2, 4}, filled(8)}}, "prompt_embeddings"},
      {"modules_to_save weight", mts, plus({"base_model.model.classifier.weight", {3, 6}, filled(18)}),
       "base_model.model.classifier.weight"},
      {"bias", all_bias, plus({"base_model.model.q.bias", {6}, filled(6)}), "base_model.model.q.bias"},
  };
  for (const Case& c : cases)
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      INFO(c.kind << " with " << bad);
      write_bytes(d + "/adapter_config.json", c.config);
      write_raw_safetensors(d + "/adapter_model.safetensors", c.tensors);
      REQUIRE_NOTHROW(load_peft_adapter<float>(d));  // the clean file loads
      std::vector<RawTensor> ts = c.tensors;
      for (auto& t : ts)
        if (t.name == c.bad_key) t.values[1] = bad;
      write_raw_safetensors(d + "/adapter_model.safetensors", ts);
      const std::string what = std::isnan(bad) ? "holds NaN" : "holds Inf";
      PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), NumericError, "tensor \"" + c.bad_key + "\" " + what);
      PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<double>(d), NumericError, d + "/adapter_model.safetensors");
      PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<double>(d), NumericError, "at [0, 1]");
    }
}

TEST_CASE("PEFT adapter directory: the config carries the weights' SHA-256 and a torn pair is refused",
          "[io][peft][digest]") {
  Rng rng(5);
  PeftAdapter<float> ad;
  ad.config = hardening_cfg(R"({"peft_type":"LORA","r":2,"lora_alpha":16,"target_modules":["q"]})");
  LoraModuleWeights<float> m;
  m.path = "q";
  m.A = test::random_matrix<float>(2, 8, rng);
  m.B = test::random_matrix<float>(6, 2, rng);
  ad.lora.push_back(m);
  TempDir dir;
  const std::string a = dir.path + "/a";
  save_peft_adapter(a, ad);
  const Json saved = parse_json_strict(raw_file(a + "/adapter_config.json"), "saved");
  const std::string digest = sha256_hex(raw_file(a + "/adapter_model.safetensors"));
  CHECK(saved.at("peft_cpp").at("weights_sha256") == digest);
  CHECK(saved.at("peft_cpp").at("weights_file") == "adapter_model.safetensors");
  const PeftAdapter<float> back = load_peft_adapter<float>(a);
  CHECK(back.config.weights_sha256 == digest);
  CHECK(back.config.unknown_keys.empty());  // our key is known, not "unknown, kept"

  // The same adapter retrained at alpha 8 (and new factors) is saved elsewhere ...
  PeftAdapter<float> retrained = ad;
  retrained.config.lora_alpha = 4;
  retrained.lora[0].A *= 2.0f;
  save_peft_adapter(dir.path + "/b", retrained);
  const std::string new_digest = sha256_hex(raw_file(dir.path + "/b/adapter_model.safetensors"));
  // ... and a crash between the two renames of an overwrite of "a" leaves the new weights next to
  // the old config: the pair is refused, naming both files and both digests.
  write_bytes(a + "/adapter_model.safetensors", raw_file(dir.path + "/b/adapter_model.safetensors"));
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(a), IoError, a + "/adapter_config.json\" belongs to weights");
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(a), IoError, "SHA-256 " + digest);
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(a), IoError,
                           a + "/adapter_model.safetensors\" has SHA-256 " + new_digest);

  // The finished overwrite loads, with the new alpha, and keeps unrelated files.
  write_bytes(a + "/README.md", "keep me");
  save_peft_adapter(a, retrained);
  CHECK(raw_file(a + "/README.md") == "keep me");
  const PeftAdapter<float> now = load_peft_adapter<float>(a);
  CHECK(now.config.lora_alpha == 4);
  CHECK(now.lora[0].A == retrained.lora[0].A);
  CHECK(now.config.weights_sha256 == new_digest);

  // A config without the key, as PEFT writes it, loads unchecked.
  Json peft_style = parse_json_strict(raw_file(a + "/adapter_config.json"), "x");
  peft_style.erase("peft_cpp");
  write_bytes(a + "/adapter_config.json", peft_style.dump(2));
  write_bytes(a + "/adapter_model.safetensors", raw_file(dir.path + "/b/adapter_model.safetensors"));
  CHECK(load_peft_adapter<float>(a).config.weights_sha256.empty());

  // Overwriting a PEFT-written pair (config without a digest): a refused write (a NaN) leaves the
  // old pair as it was; a finished one gets a digest. (Between the two renames the digest-less old
  // config is already gone, so a crash there leaves a directory that does not load, not a wrong one.)
  const std::string peft_config = raw_file(a + "/adapter_config.json");
  const std::string peft_weights = raw_file(a + "/adapter_model.safetensors");
  PeftAdapter<float> broken = retrained;
  broken.lora[0].B(0, 0) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(save_peft_adapter(a, broken), NumericError);
  CHECK(raw_file(a + "/adapter_config.json") == peft_config);
  CHECK(raw_file(a + "/adapter_model.safetensors") == peft_weights);
  save_peft_adapter(a, ad);
  CHECK(load_peft_adapter<float>(a).config.weights_sha256 == sha256_hex(raw_file(a + "/adapter_model.safetensors")));
}

TEST_CASE("adapter config: the peft_cpp key is validated", "[io][peft][digest]") {
  const std::string ok(64, 'a');
  CHECK(hardening_cfg(R"({"peft_type":"LORA","peft_cpp":{"weights_sha256":")" + ok + R"("}})").weights_sha256 == ok);
  CHECK(hardening_cfg(R"({"peft_type":"LORA","peft_cpp":{"future":1}})").weights_sha256.empty());
  PEFT_REQUIRE_THROWS_WITH(hardening_cfg(R"({"peft_type":"LORA","peft_cpp":[1]})"), IoError,
                           "key \"peft_cpp\" must be an object");
  PEFT_REQUIRE_THROWS_WITH(hardening_cfg(R"({"peft_type":"LORA","peft_cpp":{"weights_sha256":"ABC"}})"), IoError,
                           "must be 64 lower-case hex digits");
  PEFT_REQUIRE_THROWS_WITH(hardening_cfg(R"({"peft_type":"LORA","peft_cpp":{"weights_file":"x.bin"}})"), IoError,
                           "\"weights_file\" must be \"adapter_model.safetensors\"");
  // to_json writes it back (and drops it when the config has no digest).
  AdapterConfig c = hardening_cfg(R"({"peft_type":"LORA","peft_cpp":{"weights_sha256":")" + ok + R"("}})");
  CHECK(to_json(c).at("peft_cpp").at("weights_sha256") == ok);
  c.weights_sha256.clear();
  CHECK_FALSE(to_json(c).contains("peft_cpp"));
}

TEST_CASE("adapter config: 10 000 rank / alpha pattern keys compile once and match once per module",
          "[io][peft][patterns]") {
  const int keys = 10000, modules = 200;
  Json j = {{"peft_type", "LORA"}, {"r", 8}, {"lora_alpha", 16}, {"target_modules", "model\\.layers\\.\\d+\\..*"}};
  Json rp = Json::object(), ap = Json::object();
  for (int i = 0; i < keys - 1; ++i) {
    // Module-path keys that match none of the modules below, one in 1000 a real regex.
    const std::string key = i % 1000 == 0 ? "model\\.blocks\\.(" + std::to_string(i) + "|x)\\.attn\\.q"
                                          : "model.blocks." + std::to_string(i) + ".attn.q";
    rp[key] = 1 + i % 7;
    ap[key] = 1.0 + i % 5;
  }
  rp["attn.q"] = 4;  // last: every module tries every key first
  ap["attn.q"] = 2.0;
  j["rank_pattern"] = rp;
  j["alpha_pattern"] = ap;

  const std::uint64_t compiled0 = peft::detail::regex_counters().compiled.load();
  const AdapterConfig c = parse_adapter_config(j, "big.json");
  const std::uint64_t compiled1 = peft::detail::regex_counters().compiled.load();
  // Only keys with regex syntax are compiled (10 per pattern), plus target_modules; plain keys
  // (module paths) need no program. Never more than one compilation per key.
  CHECK(compiled1 - compiled0 == static_cast<std::uint64_t>(2 * 10 + 1));

  const std::uint64_t tests0 = peft::detail::pattern_key_tests().load();
  const std::uint64_t runs0 = peft::detail::regex_counters().runs.load();
  for (int m = 0; m < modules; ++m) {
    const std::string path = "model.layers." + std::to_string(m) + ".attn.q";
    REQUIRE(c.rank_for(path) == 4);
    REQUIRE(c.alpha_for(path) == 2.0);
    REQUIRE(c.targets(path));
  }
  CHECK(peft::detail::regex_counters().compiled.load() == compiled1);  // nothing recompiled per module
  // Exactly one test per key per module for each pattern (the last key matches).
  CHECK(peft::detail::pattern_key_tests().load() - tests0 == static_cast<std::uint64_t>(2 * keys * modules));
  // The regex engine runs only for the regex keys (10 per pattern) and target_modules.
  CHECK(peft::detail::regex_counters().runs.load() - runs0 == static_cast<std::uint64_t>((2 * 10 + 1) * modules));
}

TEST_CASE("PEFT adapter directory: loading resolves each module's r and alpha with one pass over the patterns",
          "[io][peft][patterns]") {
  TempDir dir;
  const std::string d = dir.path + "/a";
  ::mkdir(d.c_str(), 0755);
  const int keys = 500, modules = 20;
  Json j = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"q"}}};
  Json rp = Json::object(), ap = Json::object();
  for (int i = 0; i < keys; ++i) {
    rp["blocks." + std::to_string(i) + ".q"] = 3;
    ap["blocks\\." + std::to_string(i) + "\\.q"] = 5.0;
  }
  j["rank_pattern"] = rp;
  j["alpha_pattern"] = ap;
  write_bytes(d + "/adapter_config.json", j.dump());
  std::vector<RawTensor> ts;
  for (int m = 0; m < modules; ++m) {
    const std::string k = "base_model.model.layers." + std::to_string(m) + ".q.";
    ts.push_back({k + "lora_A.weight", {2, 4}, filled(8)});
    ts.push_back({k + "lora_B.weight", {4, 2}, filled(8)});
  }
  write_raw_safetensors(d + "/adapter_model.safetensors", ts);
  const std::uint64_t compiled0 = peft::detail::regex_counters().compiled.load();
  const std::uint64_t tests0 = peft::detail::pattern_key_tests().load();
  const PeftAdapter<float> ad = load_peft_adapter<float>(d);
  REQUIRE(ad.lora.size() == static_cast<std::size_t>(modules));
  CHECK(ad.lora[0].scaling == 2.0);
  // The alpha keys have regex syntax (compiled once each); the rank keys are plain.
  CHECK(peft::detail::regex_counters().compiled.load() - compiled0 == static_cast<std::uint64_t>(keys));
  CHECK(peft::detail::pattern_key_tests().load() - tests0 <= static_cast<std::uint64_t>(2 * keys * modules));
}

TEST_CASE("PatternMap follows PEFT's get_pattern_key on both of its paths", "[io][peft][patterns]") {
  // Plain keys (no regex syntax but '.') skip the engine; the answers must be the regex's.
  const PatternMap<int> p{{"layers.1.v", 1}, {"v", 2}, {"a\\.b", 3}, {"x[0]", 4}};
  CHECK(*p.find("model.layers.1.v") == 1);
  CHECK(*p.find("layers.1.v") == 1);
  CHECK(*p.find("layers_1_v") == 1);        // '.' matches any character, as in the regex
  CHECK(*p.find("model.layers.2.v") == 2);  // suffix on a dot boundary
  CHECK(p.find("model.layers.2.vv") == nullptr);
  CHECK(p.find("model.xv") == nullptr);  // not at a dot boundary
  CHECK(*p.find("m.a.b") == 3);
  CHECK(p.find("m.a_b") == nullptr);  // an escaped dot is literal
  CHECK(*p.find("x0") == 4);          // regex: [0] is a class
  CHECK(*p.find("x[0]") == 4);        // no regex match; PEFT's dict lookup of the name itself
  CHECK(p.find("y.x[0]") == nullptr);
  const std::uint64_t compiled = peft::detail::regex_counters().compiled.load();
  const PatternMap<int> uni{{"a.c", 7}};
  CHECK(peft::detail::regex_counters().compiled.load() == compiled);  // a plain key needs no program
  CHECK(*uni.find("m.abc") == 7);
  CHECK(peft::detail::regex_counters().compiled.load() == compiled);
  CHECK(*uni.find("m.a\xC3\xA9"
                  "c") == 7);  // '.' is one code point: the regex engine decides
  CHECK(uni.find("m.a\xC3\xA9\xC3\xA9"
                 "c") == nullptr);
  PEFT_REQUIRE_THROWS_WITH(PatternMap<int>({{"(q", 1}}), ConfigError, "invalid regular expression");

  // PEFT runs re.match on the text (.*\.)?(key)$, not a fullmatch of (.*\.)?(key): a key may close
  // the group itself, and `$` also matches before a final newline. Values from CPython 3.11:
  //   re.match(r"(.*\.)?(self_attn)|(x)$", "model.layers.0.self_attn.q_proj") -> a match
  const PatternMap<int> breakout{{"self_attn)|(x", 32}};
  CHECK(*breakout.find("model.layers.0.self_attn.q_proj") == 32);
  CHECK(*breakout.find("x") == 32);
  CHECK(breakout.find("model.mlp.fc1") == nullptr);
  const PatternMap<int> newline{{"q_(proj)", 5}};
  CHECK(*newline.find("model.q_proj\n") == 5);  //   re.match(r"(.*\.)?(q_(proj))$", "model.q_proj\n")
  CHECK(newline.find("model.q_proj\nx") == nullptr);
}

TEMPLATE_TEST_CASE("collect_adapter saves the layers' alpha, rank and rsLoRA, not the config's", "[io][peft][collect]",
                   float, double) {
  using T = TestType;
  Rng rng(17);
  HeadModel<T> model(rng);
  model.q.add_adapter("default", lora_of(4, 16.0), rng);
  model.v.add_adapter("default", lora_of(4, 16.0), rng);
  // The caller's config says alpha 8: saving it would halve every delta.
  const AdapterConfig cfg = hardening_cfg(R"({"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q","v"]})");
  const PeftAdapter<T> ad = collect_adapter(model, "default", cfg);
  CHECK(ad.config.lora_alpha == 16.0);
  CHECK(any_contains(ad.warnings, "lora_alpha for \"layers.0.q\" = 8 replaced by the layers' 16"));
  TempDir dir;
  save_peft_adapter(dir.path + "/a", ad);
  const PeftAdapter<T> back = load_peft_adapter<T>(dir.path + "/a");
  CHECK(back.config.lora_alpha == 16.0);
  CHECK(back.find("layers.0.q")->scaling == model.q.adapter("default").config.scaling());

  // Per-module ranks and alphas go to rank_pattern / alpha_pattern; rsLoRA comes along.
  HeadModel<T> mixed(rng);
  mixed.q.add_adapter("default", lora_of(4, 16.0, true), rng);
  mixed.v.add_adapter("default", lora_of(2, 3.0, true), rng);
  const PeftAdapter<T> mad = collect_adapter(mixed, "default", cfg);
  CHECK(mad.config.use_rslora);
  save_peft_adapter(dir.path + "/m", mad);
  const PeftAdapter<T> mback = load_peft_adapter<T>(dir.path + "/m");
  CHECK(mback.find("layers.0.q")->scaling == mixed.q.adapter("default").config.scaling());
  CHECK(mback.find("layers.0.v")->scaling == mixed.v.adapter("default").config.scaling());
  CHECK(mback.find("layers.0.v")->rank() == 2);

  // A config that already gives every module its values is kept as written.
  const AdapterConfig exact =
      hardening_cfg(R"({"peft_type":"LORA","r":4,"lora_alpha":16,"use_rslora":true,"target_modules":["q","v"],)"
                    R"("rank_pattern":{"v":2},"alpha_pattern":{"v":3}})");
  const PeftAdapter<T> kept = collect_adapter(mixed, "default", exact);
  CHECK(kept.config.rank_pattern == exact.rank_pattern);
  CHECK(kept.config.alpha_pattern == exact.alpha_pattern);
  CHECK_FALSE(any_contains(kept.warnings, "replaced"));

  // rsLoRA on one layer only cannot be one PEFT config.
  HeadModel<T> split(rng);
  split.q.add_adapter("default", lora_of(4, 16.0, true), rng);
  split.v.add_adapter("default", lora_of(4, 16.0, false), rng);
  PEFT_REQUIRE_THROWS_WITH(collect_adapter(split, "default", cfg), ConfigError,
                           "module \"layers.0.v\" has use_rslora = false but module \"layers.0.q\" has true");
}

TEST_CASE("collect_adapter: a full-path pattern key that would reach another module is anchored",
          "[io][peft][collect]") {
  // "a.v" differs from the common rank; the key "a\.v" would also match "x.a.v".
  class Paths : public Module<double> {
   public:
    explicit Paths(Rng& rng) {
      for (int i = 0; i < 4; ++i) layers.emplace_back(3, 3, rng, false);
      set_name("");
    }
    std::vector<LoRALinear<double>> layers;

   protected:
    void visit_children(const ChildVisitor& fn) override {
      const char* names[] = {"a.v", "x.a.v", "b", "c"};
      for (std::size_t i = 0; i < layers.size(); ++i) fn(names[i], layers[i]);
    }
  };
  Rng rng(2);
  Paths model(rng);
  for (std::size_t i = 0; i < 4; ++i) model.layers[i].add_adapter("default", lora_of(i == 0 ? 1 : 2, 2.0), rng);
  const PeftAdapter<double> ad = collect_adapter(model, "default", hardening_cfg(R"({"peft_type":"LORA"})"));
  REQUIRE(ad.config.rank_pattern.size() == 1);
  CHECK(ad.config.rank_pattern[0].first == "^a\\.v");
  CHECK(ad.config.rank_for("a.v") == 1);
  CHECK(ad.config.rank_for("x.a.v") == 2);
}

TEMPLATE_TEST_CASE("collect_adapter saves modules_to_save under PEFT's keys and they load back", "[io][peft][collect]",
                   float, double) {
  using T = TestType;
  Rng rng(23);
  HeadModel<T> model(rng);
  model.q.add_adapter("default", lora_of(2, 4.0), rng);
  model.v.add_adapter("default", lora_of(2, 4.0), rng);
  model.classifier.weight.value *= T(3);  // "trained"
  const AdapterConfig cfg = hardening_cfg(
      R"({"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q","v"],"modules_to_save":["classifier"]})");
  NameMapping to_peft;
  to_peft.prefix_rules = {{"", "model."}};
  const PeftAdapter<T> ad = collect_adapter(model, "default", cfg, to_peft);
  REQUIRE(ad.full.size() == 2);
  CHECK(ad.warnings.empty());
  TempDir dir;
  save_peft_adapter(dir.path + "/a", ad);
  const SafeTensorsFile st(dir.path + "/a/adapter_model.safetensors");
  CHECK(st.contains("base_model.model.model.classifier.weight"));
  CHECK(st.contains("base_model.model.model.classifier.bias"));
  CHECK(st.info("base_model.model.model.classifier.bias").shape == std::vector<std::int64_t>{3});
  const PeftAdapter<T> back = load_peft_adapter<T>(dir.path + "/a");
  CHECK(back.config.modules_to_save == std::vector<std::string>{"classifier"});

  HeadModel<T> fresh(rng);
  fresh.q.add_adapter("default", back.config.lora_config_for("model.layers.0.q"), rng);
  fresh.v.add_adapter("default", back.config.lora_config_for("model.layers.0.v"), rng);
  REQUIRE(fresh.classifier.weight.value != model.classifier.weight.value);
  load_adapter_into(fresh, back, "default", to_peft.inverse());
  CHECK(fresh.classifier.weight.value == model.classifier.weight.value);
  CHECK(fresh.classifier.bias.value == model.classifier.bias.value);
  CHECK(fresh.v.adapter("default").B.value == model.v.adapter("default").B.value);

  // Without modules_to_save the trained head is reported, and an entry matching nothing refused.
  const AdapterConfig plain = hardening_cfg(R"({"peft_type":"LORA","r":2,"lora_alpha":4})");
  CHECK(any_contains(collect_adapter(model, "default", plain).warnings,
                     "parameter \"classifier.weight\" is trainable but not saved"));
  const AdapterConfig typo = hardening_cfg(R"({"peft_type":"LORA","r":2,"lora_alpha":4,"modules_to_save":["head"]})");
  PEFT_REQUIRE_THROWS_WITH(collect_adapter(model, "default", typo), ConfigError,
                           "modules_to_save entry \"head\" matches no module");
}
