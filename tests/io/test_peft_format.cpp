// Hugging Face PEFT adapter directories: config parsing (strict, unknown keys kept), the tensor
// naming conventions, loading into / saving from a model, all-or-nothing behaviour.
#include <peft/io/peft_format.hpp>
#include <peft/layers/ia3.hpp>
#include <peft/layers/prefix_attention.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::data_dir;
using peft::test::io::raw_file;
using peft::test::io::TempDir;
using peft::test::io::write_bytes;

namespace {
AdapterConfig cfg_from(const std::string& text) {
  return parse_adapter_config(parse_json_strict(text, "cfg.json"), "cfg.json");
}

/// A two-layer "model" whose layers are LoRALinear modules named like the fixture's q / v.
template <class T>
class TinyModel : public Module<T> {
 public:
  explicit TinyModel(Rng& rng) {
    for (int l = 0; l < 2; ++l) {
      q.emplace_back(8, 6, rng, false);
      v.emplace_back(8, 6, rng, false);
    }
    this->set_name("");
  }
  std::vector<LoRALinear<T>> q, v;

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    for (std::size_t l = 0; l < q.size(); ++l) {
      fn("layers." + std::to_string(l) + ".q", q[l]);
      fn("layers." + std::to_string(l) + ".v", v[l]);
    }
  }
};

NameMapping fixture_mapping() {
  NameMapping m;
  m.custom = [](const std::string& p) {
    // model.layers.0.attn.q → layers.0.q
    std::string s = p;
    if (s.rfind("model.", 0) == 0) s = s.substr(6);
    const auto at = s.find(".attn");
    if (at != std::string::npos) s.erase(at, 5);
    return s;
  };
  return m;
}
}  // namespace

TEST_CASE("adapter config: PEFT's fields, pattern lookup and scaling", "[io][peft]") {
  const AdapterConfig c = read_adapter_config(data_dir() + "/tiny_lora/adapter_config.json");
  CHECK(c.peft_type == "LORA");
  CHECK(c.r == 4);
  CHECK(c.lora_alpha == 16);
  CHECK(c.task_type == "CAUSAL_LM");
  CHECK(c.base_model_name_or_path == "tiny-test-model");
  CHECK(c.unknown_keys == std::vector<std::string>{"unknown_future_key"});
  // rank_pattern {"layers.1.attn.v": 2}, alpha_pattern {"q": 8}: PEFT's (.*\.)?(key)$ match.
  CHECK(c.rank_for("model.layers.1.attn.v") == 2);
  CHECK(c.rank_for("model.layers.0.attn.v") == 4);
  CHECK(c.rank_for("xlayers.1.attn.v") == 4);  // must match at a dot boundary
  CHECK(c.alpha_for("model.layers.0.attn.q") == 8);
  CHECK(c.alpha_for("model.layers.0.attn.qq") == 16);
  CHECK(c.scaling_for("model.layers.0.attn.q") == 2.0);
  CHECK(c.scaling_for("model.layers.1.attn.v") == 8.0);
  CHECK(c.targets("model.layers.0.attn.q"));
  CHECK(!c.targets("model.layers.0.attn.k"));
  CHECK(!c.targets("model.layers.0.attn.xq"));

  const AdapterConfig rs = cfg_from(R"J({"peft_type":"LORA","r":16,"lora_alpha":8,"use_rslora":true,
      "target_modules":"model\\.layers\\.\\d+\\.(q|v)","exclude_modules":["layers.1.q"]})J");
  CHECK(rs.scaling_for("x") == 2.0);  // 8 / √16
  CHECK(rs.targets("model.layers.0.q"));
  CHECK(!rs.targets("model.layers.1.q"));        // excluded
  CHECK(!rs.targets("model.layers.0.q.extra"));  // a string is a full match
  const LoraConfig lc = rs.lora_config_for("x");
  CHECK(lc.r == 16);
  CHECK(lc.use_rslora);
}

TEST_CASE("adapter config: targeting is core/targeting.hpp's, all-linear leaves out the output layer by name",
          "[io][peft][targeting]") {
  // A list: the whole path or a dotted suffix; a string: a full-match regex.
  const AdapterConfig list = cfg_from(R"({"peft_type":"LORA","target_modules":["q_proj","mlp.up_proj"]})");
  CHECK(list.target_modules == ModuleSelector{"q_proj", "mlp.up_proj"});
  CHECK(list.targets("model.layers.0.self_attn.q_proj"));
  CHECK(list.targets("model.layers.0.mlp.up_proj"));
  CHECK_FALSE(list.targets("model.layers.0.self_attn.xq_proj"));
  CHECK_FALSE(list.targets("model.layers.0.mlp.down_proj"));
  const AdapterConfig regex = cfg_from(R"({"peft_type":"LORA","target_modules":".*q_proj"})");
  CHECK(regex.target_modules.is_regex());
  CHECK(regex.targets("model.layers.0.self_attn.q_proj"));
  CHECK_FALSE(regex.targets("model.layers.0.self_attn.q_proj.base"));

  // "all-linear": every linear but lm_head (any depth) and the top-level score / classifier.
  const AdapterConfig all = cfg_from(R"({"peft_type":"LORA","target_modules":"all-linear",
      "exclude_modules":["layers.1.mlp.up_proj"],"modules_to_save":["pooler"]})");
  CHECK(all.target_modules.is_all_linear());
  CHECK(all.targets("model.layers.0.self_attn.q_proj"));
  CHECK(all.targets("model.layers.0.mlp.up_proj"));
  CHECK_FALSE(all.targets("lm_head"));
  CHECK_FALSE(all.targets("language_model.lm_head"));
  CHECK_FALSE(all.targets("score"));
  CHECK_FALSE(all.targets("classifier"));
  CHECK(all.targets("model.layers.0.mlp.score"));            // not the head: a nested module so named
  CHECK_FALSE(all.targets("model.layers.1.mlp.up_proj"));    // exclude_modules
  CHECK_FALSE(all.targets("pooler.dense"));                  // inside a module to save
  CHECK(to_json(all).at("target_modules") == "all-linear");  // the file keeps the shorthand
  const AdapterConfig named = cfg_from(R"({"peft_type":"LORA","target_modules":["lm_head"]})");
  CHECK(named.targets("lm_head"));  // only the shorthand leaves the head out
  const AdapterConfig none = cfg_from(R"({"peft_type":"LORA","target_modules":null})");
  CHECK_FALSE(none.target_modules.present());
  CHECK_FALSE(none.targets("model.layers.0.self_attn.q_proj"));
  CHECK(to_json(none).at("target_modules").is_null());
}

TEST_CASE("collect_adapter: an all-linear config does not cover an adapter on the output layer",
          "[io][peft][targeting]") {
  class WithHead : public Module<double> {
   public:
    explicit WithHead(Rng& rng) : body(8, 8, rng, false), lm_head(8, 12, rng, false) { set_name(""); }
    LoRALinear<double> body, lm_head;

   protected:
    void visit_children(const ChildVisitor& fn) override {
      fn("body", body);
      fn("lm_head", lm_head);
    }
  };
  Rng rng(5);
  WithHead model(rng);
  LoraConfig lc;  // r = 8 as the config's default, so the config's ranks stay
  lc.r = 8;
  lc.alpha = 8.0;
  model.body.add_adapter("default", lc, rng);
  const AdapterConfig all = cfg_from(R"({"peft_type":"LORA","target_modules":"all-linear"})");
  const PeftAdapter<double> body_only = collect_adapter(model, "default", all);
  CHECK(body_only.config.target_modules.is_all_linear());  // covers "body": kept
  model.lm_head.add_adapter("default", lc, rng);
  const PeftAdapter<double> with_head = collect_adapter(model, "default", all);
  CHECK(with_head.config.target_modules == ModuleSelector{"body", "lm_head"});  // PEFT would skip lm_head
  CHECK(std::find(with_head.warnings.begin(), with_head.warnings.end(),
                  "config target_modules replaced by the adapter's modules") != with_head.warnings.end());
}

TEST_CASE("collect_adapter: an (IA)^3 adapter of the same name is not mistaken for LoRA", "[io][peft]") {
  class TwoLinears : public Module<double> {
   public:
    explicit TwoLinears(Rng& rng) : a(8, 8, rng, false), b(8, 6, rng, false) { set_name(""); }
    LoRALinear<double> a, b;

   protected:
    void visit_children(const ChildVisitor& fn) override {
      fn("a", a);
      fn("b", b);
    }
  };
  Rng rng(6);
  TwoLinears model(rng);
  LoraConfig lc;
  lc.r = 8;
  model.a.add_adapter("default", lc, rng);
  add_ia3_adapter(model.a, "default", false);  // same name, another method, on the LoRA layer
  add_ia3_adapter(model.b, "default", true);   // and alone on a layer without LoRA
  const AdapterConfig config = cfg_from(R"({"peft_type":"LORA","target_modules":["a"]})");
  const PeftAdapter<double> ad = collect_adapter(model, "default", config);
  REQUIRE(ad.lora.size() == 1);
  CHECK(ad.lora[0].path == "a");
  CHECK(ad.lora[0].A == model.a.adapter("default").A.value);
}

TEST_CASE("adapter config: wrong types and unsupported features are rejected whole", "[io][peft]") {
  auto bad = [](const std::string& text, const std::string& needle) {
    INFO(text);
    PEFT_REQUIRE_THROWS_WITH(cfg_from(text), IoError, needle);
  };
  auto unsupported = [](const std::string& text, const std::string& needle) {
    INFO(text);
    PEFT_REQUIRE_THROWS_WITH(cfg_from(text), ConfigError, needle);
  };
  bad(R"({"r":4})", "missing key \"peft_type\"");
  bad(R"({"peft_type":"LORA","r":"8"})", "key \"r\" must be a positive integer, got \"8\"");
  bad(R"({"peft_type":"LORA","r":0})", "key \"r\" must be a positive integer");
  bad(R"({"peft_type":"LORA","r":4.5})", "key \"r\" must be a positive integer");
  bad(R"({"peft_type":"LORA","lora_alpha":"16"})", "key \"lora_alpha\" must be a finite number");
  bad(R"({"peft_type":"LORA","lora_alpha":-1})", "\"lora_alpha\" must be > 0");
  bad(R"({"peft_type":"LORA","use_dora":"yes"})", "key \"use_dora\" must be true or false");
  bad(R"({"peft_type":"LORA","target_modules":[1,2]})", "\"target_modules\" must be a string or a list of strings");
  bad(R"({"peft_type":"LORA","target_modules":"(q"})", "not a valid regular expression");
  bad(R"({"peft_type":"LORA","rank_pattern":{"q":"2"}})", "entry \"q\" must be a positive integer");
  bad(R"({"peft_type":"LORA","rank_pattern":[1]})", "\"rank_pattern\" must be an object");
  bad(R"({"peft_type":"LORA","alpha_pattern":{"q":0}})", "entry \"q\" must be a positive number");
  bad(R"({"peft_type":"LORA","lora_dropout":1.0})", "\"lora_dropout\" must be in [0, 1)");
  bad(R"({"peft_type":"LORA","bias":"some"})", "key \"bias\" must be");
  bad(R"({"peft_type":"LORA","r":4,"r":8})", "duplicate JSON key \"r\"");
  bad(R"([1])", "must be a JSON object");
  bad(R"({"peft_type":"PROMPT_TUNING","token_dim":8})", "\"num_virtual_tokens\" is required");
  unsupported(R"({"peft_type":"LORA","lora_bias":true})", "lora_bias = true");
  unsupported(R"({"peft_type":"LORA","init_lora_weights":"pissa_niter_4"})", "modifies the base weights");
  unsupported(R"({"peft_type":"LORA","layer_replication":[[0,2]]})", "layer_replication");
  unsupported(R"({"peft_type":"LORA","use_dora":true,"fan_in_fan_out":true})", "use_dora together with fan_in_fan_out");
  unsupported(R"({"peft_type":"IA3"})", "peft_type \"IA3\" is not supported");
  unsupported(R"({"peft_type":"LORA","init_lora_weights":"lora_ga"})", "modifies the base weights");
  unsupported(R"({"peft_type":"LORA","alora_invocation_tokens":[12,7]})", "alora_invocation_tokens");
  unsupported(R"({"peft_type":"LORA","arrow_config":{"top_k":3}})", "Arrow routing");
  unsupported(R"({"peft_type":"LORA","use_bdlora":true})", "BD-LoRA");
  unsupported(R"({"peft_type":"LORA","monteclora_config":{"n":2}})", "Monte Carlo LoRA");
  // A key we have never heard of that switches something on is refused, not loaded as plain LoRA.
  unsupported(R"({"peft_type":"LORA","use_hyper_lora":true})",
              "unknown key \"use_hyper_lora\" = true looks like a feature");
  unsupported(R"({"peft_type":"LORA","shiny_config":{"k":1}})", "unknown key \"shiny_config\"");
  // ... while the same keys switched off, and the newer bookkeeping keys, load.
  const AdapterConfig off =
      cfg_from(R"({"peft_type":"LORA","use_hyper_lora":false,"shiny_config":{},"alora_invocation_tokens":null,)"
               R"("arrow_config":null,"use_bdlora":false,"ensure_weight_tying":true,"velora_config":{"rank":4}})");
  CHECK(off.unknown_keys == std::vector<std::string>{"use_hyper_lora", "shiny_config"});
  // Prefix tuning with a projection: PEFT saves the collapsed table, which loads as a flat prefix.
  const AdapterConfig prefix =
      cfg_from(R"({"peft_type":"PREFIX_TUNING","num_virtual_tokens":4,"prefix_projection":true})");
  CHECK(prefix.prefix_projection);
}

TEST_CASE("adapter config: unknown keys survive a round trip through to_json", "[io][peft]") {
  const AdapterConfig c = cfg_from(R"({"peft_type":"LORA","r":4,"lora_alpha":8,"my_key":{"a":[1,2]},
      "rank_pattern":{"z":2,"a":3}})");
  const Json j = to_json(c);
  CHECK(j.at("my_key") == Json::parse(R"({"a":[1,2]})"));
  // rank_pattern keeps the file order (PEFT takes the first matching key).
  CHECK(j.at("rank_pattern").begin().key() == "z");
  const AdapterConfig back = parse_adapter_config(j, "again");
  CHECK(back.rank_pattern == c.rank_pattern);
  CHECK(back.unknown_keys == std::vector<std::string>{"my_key"});
}

TEMPLATE_TEST_CASE("PEFT adapter directory: load, apply to a model, merged forward equals PEFT's merge", "[io][peft]",
                   float, double) {
  using T = TestType;
  const PeftAdapter<T> ad = load_peft_adapter<T>(data_dir() + "/tiny_lora");
  REQUIRE(ad.lora.size() == 4);
  CHECK(ad.lora[0].path == "model.layers.0.attn.q");
  CHECK(ad.find("model.layers.1.attn.v")->rank() == 2);
  CHECK(ad.find("model.layers.1.attn.v")->scaling == 8.0);
  CHECK(ad.find("model.layers.0.attn.q")->scaling == 2.0);
  CHECK(ad.warnings.empty());

  Rng rng(3);
  TinyModel<T> model(rng);
  const NameMapping map = fixture_mapping();
  // The base weights come from the fixture's base file, the adapters get created from the config.
  const SafeTensorsFile base(data_dir() + "/tiny_base.safetensors");
  const SafeTensorsFile merged(data_dir() + "/tiny_lora.merged.safetensors");
  for (int l = 0; l < 2; ++l)
    for (const char* p : {"q", "v"}) {
      const std::string path = "model.layers." + std::to_string(l) + ".attn." + p;
      LoRALinear<T>& layer = (p[0] == 'q' ? model.q : model.v)[static_cast<std::size_t>(l)];
      layer.weight.value = base.load<T>(path + ".weight");
      layer.add_adapter("default", ad.config.lora_config_for(path));
    }
  load_adapter_into(model, ad, "default", map);
  model.eval();  // the config has lora_dropout = 0.05
  for (int l = 0; l < 2; ++l)
    for (const char* p : {"q", "v"}) {
      const std::string path = "model.layers." + std::to_string(l) + ".attn." + p;
      LoRALinear<T>& layer = (p[0] == 'q' ? model.q : model.v)[static_cast<std::size_t>(l)];
      const Matrix<T> x = test::random_matrix<T>(3, 8, rng);
      typename LoRALinear<T>::Cache cache;
      const Matrix<T> y = layer.forward(x, cache);
      const Matrix<T> expected = x * merged.load<T>(path + ".weight").transpose();
      INFO(path);
      CHECK(test::rel_diff(y, expected) < 10 * test::Tolerances<float>::rel);
    }
}

TEST_CASE("PEFT adapter directory: DoRA magnitude and prompt embeddings are read", "[io][peft]") {
  const PeftAdapter<double> dora = load_peft_adapter<double>(data_dir() + "/tiny_dora");
  CHECK(dora.config.use_dora);
  CHECK(dora.config.use_rslora);
  REQUIRE(dora.lora.size() == 4);
  CHECK(dora.lora[0].magnitude.rows() == 1);
  CHECK(dora.lora[0].magnitude.cols() == 6);
  CHECK(dora.lora[0].scaling == 8.0);  // 16 / √4

  const PeftAdapter<float> prompt = load_peft_adapter<float>(data_dir() + "/tiny_prompt");
  CHECK(prompt.config.peft_type == "PROMPT_TUNING");
  CHECK(prompt.prompt_embeddings.rows() == 5);
  CHECK(prompt.prompt_embeddings.cols() == 8);
  CHECK(prompt.lora.empty());
}

TEMPLATE_TEST_CASE("PEFT adapter directory: save from a model, load back identical", "[io][peft]", float, double) {
  using T = TestType;
  Rng rng(11);
  TinyModel<T> model(rng);
  AdapterConfig cfg = cfg_from(R"({"peft_type":"LORA","r":4,"lora_alpha":12,"target_modules":["q","v"],
                                  "rank_pattern":{"layers.1.v":2},"note":"kept"})");
  LoraConfig lc;
  lc.init = LoraInit::None;  // non-zero B so the test sees real values
  for (int l = 0; l < 2; ++l) {
    const std::string ls = std::to_string(l);
    for (auto* layer : {&model.q[static_cast<std::size_t>(l)], &model.v[static_cast<std::size_t>(l)]}) {
      const std::string path = layer->name();
      LoraConfig c = cfg.lora_config_for(path);
      c.init = LoraInit::None;
      layer->add_adapter("task", c, rng);
    }
  }
  NameMapping to_peft;
  to_peft.prefix_rules = {{"layers.", "model.layers."}};
  const PeftAdapter<T> ad = collect_adapter(model, "task", cfg, to_peft);
  REQUIRE(ad.lora.size() == 4);
  CHECK(ad.find("model.layers.1.v")->rank() == 2);

  TempDir dir;
  const std::string out = dir.path + "/adapter";
  save_peft_adapter(out, ad);
  CHECK(dir.entries() == std::vector<std::string>{"adapter"});  // no temporaries left
  CHECK(dir.entries("adapter") == std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"});
  const SafeTensorsFile st(out + "/adapter_model.safetensors");
  CHECK(st.contains("base_model.model.model.layers.0.q.lora_A.weight"));
  CHECK(st.contains("base_model.model.model.layers.1.v.lora_B.weight"));
  CHECK(st.metadata().at("format") == "pt");

  const PeftAdapter<T> back = load_peft_adapter<T>(out);
  CHECK(back.config.unknown_keys == std::vector<std::string>{"note"});
  CHECK(back.config.raw.at("note") == "kept");
  for (const auto& m : ad.lora) {
    const auto* b = back.find(m.path);
    REQUIRE(b != nullptr);
    CHECK(b->A == m.A);  // native dtype: bit-exact
    CHECK(b->B == m.B);
    CHECK(b->scaling == m.scaling);
  }

  // Into a fresh model through the inverse mapping.
  TinyModel<T> fresh(rng);
  for (auto* layer : {&fresh.q[0], &fresh.q[1], &fresh.v[0], &fresh.v[1]})
    layer->add_adapter("task", cfg.lora_config_for("model." + layer->name()));
  load_adapter_into(fresh, back, "task", to_peft.inverse());
  CHECK(fresh.v[1].adapters().back().B.value == model.v[1].adapters().back().B.value);

  // Saving into an existing directory replaces our two files and keeps everything else (a model
  // folder's README, another adapter's subfolder), as save_pretrained does.
  write_bytes(out + "/README.md", "keep me");
  ::mkdir((out + "/other").c_str(), 0755);
  write_bytes(out + "/other/adapter_config.json", "{}");
  save_peft_adapter(out, back, DType::BF16);
  CHECK(dir.entries() == std::vector<std::string>{"adapter"});
  CHECK(dir.entries("adapter") ==
        std::vector<std::string>{"README.md", "adapter_config.json", "adapter_model.safetensors", "other"});
  CHECK(raw_file(out + "/README.md") == "keep me");
  CHECK(raw_file(out + "/other/adapter_config.json") == "{}");

  // A conflict (a directory where a file goes) is found before anything moves.
  const std::string clash = dir.path + "/clash";
  ::mkdir(clash.c_str(), 0755);
  ::mkdir((clash + "/adapter_config.json").c_str(), 0755);
  PEFT_REQUIRE_THROWS_WITH(save_peft_adapter(clash, back), IoError, "expected a file there, found a directory");
  CHECK(dir.entries("clash") == std::vector<std::string>{"adapter_config.json"});
  CHECK(dir.entries() == std::vector<std::string>{"adapter", "clash"});  // no staging directory left
  CHECK(SafeTensorsFile(out + "/adapter_model.safetensors")
            .info("base_model.model.model.layers.0.q.lora_A.weight")
            .dtype == DType::BF16);
}

TEST_CASE("PEFT adapter directory: prefix tuning with a projection round-trips as PEFT's collapsed table",
          "[io][peft][prefix]") {
  Rng rng(31);
  PrefixConfig pc{3, 8, 2, /*prefix_projection=*/true, /*encoder_hidden_size=*/4};
  PrefixAttention<double> trained(pc, rng, "prefix_encoder");  // trained through PEFT's MLP

  // What PEFT writes: the config, and the MLP's output for the l virtual tokens [l, L·2·d].
  PeftAdapter<double> ad;
  ad.config = cfg_from(R"({"peft_type":"PREFIX_TUNING","task_type":"SEQ_CLS","num_virtual_tokens":3,"token_dim":8,)"
                       R"("num_layers":2,"num_attention_heads":2,"prefix_projection":true,"encoder_hidden_size":4})");
  ad.prompt_embeddings = trained.prompt_embeddings();
  TempDir dir;
  save_peft_adapter(dir.path + "/prefix", ad);
  const PeftAdapter<double> back = load_peft_adapter<double>(dir.path + "/prefix");
  CHECK(back.config.peft_type == "PREFIX_TUNING");
  CHECK(back.config.prefix_projection);
  REQUIRE(back.prompt_embeddings.rows() == 3);
  REQUIRE(back.prompt_embeddings.cols() == 2 * 2 * 8);

  // Served the way PEFT serves it (inference_mode: a flat table), every layer gets the trained
  // model's keys and values.
  pc.prefix_projection = false;
  PrefixAttention<double> served(pc, rng, "prefix_encoder");
  NameMapping to_layer;
  to_layer.prefix_rules = {{"prompt_embeddings", "embedding.weight"}};
  load_adapter_into(served, back, "default", to_layer);
  typename PrefixAttention<double>::Cache want, got;
  trained.forward(want);
  served.forward(got);
  for (Index i = 0; i < 2; ++i) {
    const PrefixKV<double> a = trained.layer(want, i), b = served.layer(got, i);
    CHECK(test::rel_diff(Matrix<double>(b.key), Matrix<double>(a.key)) < 1e-12);
    CHECK(test::rel_diff(Matrix<double>(b.value), Matrix<double>(a.value)) < 1e-12);
  }
  // A projected prefix collapses when it loads the table.
  pc.prefix_projection = true;
  PrefixAttention<double> projected(pc, rng);
  projected.load_prompt_embeddings(back.prompt_embeddings);
  CHECK_FALSE(projected.projected());
  CHECK(test::rel_diff(projected.prompt_embeddings(), ad.prompt_embeddings) < 1e-12);

  // A table whose width is not num_layers·2·token_dim is refused.
  PeftAdapter<double> narrow = ad;
  narrow.prompt_embeddings = Matrix<double>::Zero(3, 31);
  save_peft_adapter(dir.path + "/narrow", narrow);
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<double>(dir.path + "/narrow"), ShapeError,
                           "prompt_embeddings has 31 columns, expected 32");
}

TEST_CASE("PEFT adapter directory: broken adapters load nothing", "[io][peft]") {
  TempDir dir;
  const std::string d = dir.path + "/a";
  ::mkdir(d.c_str(), 0755);
  const std::string cfg = R"({"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q"]})";
  write_bytes(d + "/adapter_config.json", cfg);
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), IoError, "adapter_model.safetensors\" not found");
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(dir.path + "/nope"), IoError, "is not a directory");

  auto with = [&](const std::vector<NamedTensor<float>>& ts) {
    save_safetensors<float>(d + "/adapter_model.safetensors", ts);
  };
  const Matrix<float> a = Matrix<float>::Ones(2, 8), b = Matrix<float>::Ones(6, 2), b3 = Matrix<float>::Ones(6, 3);
  const std::string k = "base_model.model.q.";
  with({{k + "lora_A.weight", {2, 8}, a.data()}});
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), ConfigError, "lora_B.weight is missing");
  with({{k + "lora_A.weight", {2, 8}, a.data()}, {k + "lora_B.weight", {6, 3}, b3.data()}});
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), ShapeError, "does not fit lora_A");
  const Matrix<float> a3 = Matrix<float>::Ones(3, 8);
  with({{k + "lora_A.weight", {3, 8}, a3.data()}, {k + "lora_B.weight", {6, 3}, b3.data()}});
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), ShapeError, "config (r / rank_pattern) says 2");
  with({{k + "lora_A.weight", {2, 8}, a.data()},
        {k + "lora_B.weight", {6, 2}, b.data()},
        {k + "lora_B.bias", {6}, b.data()}});
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), ConfigError, "LoRA tensor of a kind we do not support");
  with({{k + "lora_A.weight", {2, 8}, a.data()},
        {k + "lora_B.weight", {6, 2}, b.data()},
        {k + "lora_magnitude_vector", {6}, b.data()}});
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), ConfigError, "use_dora = false");
  with({{"q.lora_A.weight", {2, 8}, a.data()}, {"q.lora_B.weight", {6, 2}, b.data()}});
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), IoError, "lacks the \"base_model.model.\" prefix");
  // NaN / Inf in every kind of tensor: test_peft_format_hardening.cpp (save_safetensors refuses to
  // write them, so those files are written byte by byte).
  const Matrix<float> ids = Matrix<float>::Ones(1, 2);
  with({{k + "lora_A.weight", {2, 8}, a.data()},
        {k + "lora_B.weight", {6, 2}, b.data()},
        {"x", {2}, ids.data(), DType::I64}});
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), IoError, "has dtype I64, expected a float type");
  // One tensor slot filled twice: the second would silently win.
  with({{k + "lora_A.weight", {2, 8}, a.data()},
        {k + "lora_B.weight", {6, 2}, b.data()},
        {"q.bias", {2}, ids.data()},
        {k + "bias", {2}, ids.data()}});
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), IoError,
                           "names \"q.bias\", which another tensor already holds");
  write_bytes(d + "/adapter_config.json",
              R"({"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q"],"use_dora":true})");
  with({{k + "lora_A.weight", {2, 8}, a.data()},
        {k + "lora_B.weight", {6, 2}, b.data()},
        {k + "lora_magnitude_vector", {6}, b.data()},
        {k + "lora_magnitude_vector.weight", {6}, b.data()}});
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), IoError, "is a second lora_magnitude_vector for module \"q\"");
  write_bytes(d + "/adapter_config.json", R"({"peft_type":"LORA","r":"2"})");
  PEFT_REQUIRE_THROWS_WITH(load_peft_adapter<float>(d), IoError, "adapter_config.json\": key \"r\"");
}

TEST_CASE("PEFT adapter: applying to a model that does not fit changes nothing", "[io][peft]") {
  const PeftAdapter<float> ad = load_peft_adapter<float>(data_dir() + "/tiny_lora");
  Rng rng(5);
  TinyModel<float> model(rng);
  // Adapters on layer 0 only: layer 1's names are missing, so nothing may be copied.
  model.q[0].add_adapter("default", ad.config.lora_config_for("model.layers.0.attn.q"));
  model.v[0].add_adapter("default", ad.config.lora_config_for("model.layers.0.attn.v"));
  const Matrix<float> before = model.q[0].adapters().back().A.value;
  PEFT_REQUIRE_THROWS_WITH(load_adapter_into(model, ad, "default", fixture_mapping()), ConfigError,
                           "model has no parameter \"layers.1.q.lora_A.default.weight\"");
  CHECK(model.q[0].adapters().back().A.value == before);
  // Wrong base shape.
  TinyModel<float> wide(rng);
  wide.q[0] = LoRALinear<float>(9, 6, rng, false);
  wide.set_name("");
  PEFT_REQUIRE_THROWS_WITH(load_adapter_into(wide, ad, "default", fixture_mapping()), ShapeError,
                           "model parameter \"layers.0.q.weight\" has shape [6, 9]");
}

TEST_CASE("PEFT adapter directory: a DoRA adapter loaded into LoRALinear equals PEFT's merged weights", "[io][peft]") {
  using T = double;
  const PeftAdapter<T> ad = load_peft_adapter<T>(data_dir() + "/tiny_dora");
  Rng rng(9);
  TinyModel<T> model(rng);
  const SafeTensorsFile base(data_dir() + "/tiny_base.safetensors");
  const SafeTensorsFile merged(data_dir() + "/tiny_dora.merged.safetensors");
  auto layer_of = [&](int l, char p) -> LoRALinear<T>& {
    return (p == 'q' ? model.q : model.v)[static_cast<std::size_t>(l)];
  };
  for (int l = 0; l < 2; ++l)
    for (char p : {'q', 'v'}) {
      const std::string path = "model.layers." + std::to_string(l) + ".attn." + p;
      layer_of(l, p).weight.value = base.load<T>(path + ".weight");
      const LoraConfig c = ad.config.lora_config_for(path);
      CHECK(c.use_dora);
      layer_of(l, p).add_adapter("default", c);
    }
  load_adapter_into(model, ad, "default", fixture_mapping());
  model.eval();
  for (int l = 0; l < 2; ++l)
    for (char p : {'q', 'v'}) {
      const std::string path = "model.layers." + std::to_string(l) + ".attn." + p;
      CHECK(layer_of(l, p).adapters().back().magnitude.value == ad.find(path)->magnitude);
      const Matrix<T> x = test::random_matrix<T>(3, 8, rng);
      typename LoRALinear<T>::Cache cache;
      const Matrix<T> y = layer_of(l, p).forward(x, cache);
      INFO(path);
      CHECK(test::rel_diff(y, Matrix<T>(x * merged.load<T>(path + ".weight").transpose())) < 1e-6);
    }
  // Saving it back gives PEFT's DoRA key, without ".weight".
  AdapterConfig cfg = ad.config;
  NameMapping to_peft;
  to_peft.custom = [](const std::string& p) {
    return "model." + p.substr(0, p.find('.', 7)) + ".attn" + p.substr(p.find('.', 7));
  };
  const PeftAdapter<T> back = collect_adapter(model, "default", cfg, to_peft);
  TempDir dir;
  save_peft_adapter(dir.path + "/d", back);
  const SafeTensorsFile st(dir.path + "/d/adapter_model.safetensors");
  CHECK(st.contains("base_model.model.model.layers.1.attn.v.lora_magnitude_vector"));
  CHECK(st.info("base_model.model.model.layers.1.attn.v.lora_magnitude_vector").shape == std::vector<std::int64_t>{6});
}
