// PeftConfig <-> io::AdapterConfig (models/peft_config_io.hpp), and the promise behind it: a config
// selects the same modules whether apply_peft reads it from memory or a file describes it.
#include <peft/io/json.hpp>
#include <peft/io/peft_format.hpp>
#include <peft/models/peft_config.hpp>
#include <peft/models/peft_config_io.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

namespace {

TransformerConfig config_io_model_config() {
  TransformerConfig c;
  c.input_dim = 12;
  c.max_seq_len = 8;
  c.dim = 16;
  c.num_heads = 2;
  c.ffn_dim = 32;
  c.num_layers = 2;
  c.num_classes = 4;
  return c;
}

io::AdapterConfig config_io_parse(const std::string& text) {
  return io::parse_adapter_config(io::parse_json_strict(text, "adapter_config.json"), "adapter_config.json");
}

/// The modules the file says PEFT targets, among the model's linears.
std::vector<std::string> config_io_file_targets(TransformerClassifier<float>& model, const io::AdapterConfig& c) {
  std::vector<std::string> out;
  for (const auto& [name, linear_non_head] : model.linear_names()) {
    (void)linear_non_head;
    if (c.targets(name)) out.push_back(name);
  }
  return out;
}

}  // namespace

TEST_CASE("to_peft_config / to_adapter_config: one config, both ways", "[peft_config][io]") {
  const io::AdapterConfig file = config_io_parse(R"({"peft_type":"LORA","r":4,"lora_alpha":12,"lora_dropout":0.1,
      "use_rslora":true,"init_lora_weights":"gaussian","target_modules":["q_proj","ffn.fc1"],
      "exclude_modules":"layers\\.1\\..*","rank_pattern":{"fc1":2},"alpha_pattern":{"layers.0.attn.q_proj":3},
      "modules_to_save":["classifier"]})");
  const PeftConfig pc = to_peft_config(file, "task");
  CHECK(pc.adapter_name == "task");
  REQUIRE(pc.lora);
  CHECK(pc.lora->target_modules == ModuleSelector{"q_proj", "ffn.fc1"});
  CHECK(pc.lora->exclude_modules.is_regex());
  CHECK(pc.lora->lora.r == 4);
  CHECK(pc.lora->lora.alpha == 12.0);
  CHECK(pc.lora->lora.dropout == 0.1);
  CHECK(pc.lora->lora.use_rslora);
  CHECK(pc.lora->lora.init == LoraInit::Gaussian);
  CHECK(pc.lora->rank_pattern == file.rank_pattern);
  CHECK(pc.lora->alpha_pattern == file.alpha_pattern);
  CHECK(pc.modules_to_save == std::vector<std::string>{"classifier"});

  // Back to a file: the same JSON values.
  const io::AdapterConfig back = to_adapter_config(pc, "base");
  const io::Json j = io::to_json(back), orig = io::to_json(file);
  for (const char* key : {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights",
                          "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "modules_to_save"}) {
    INFO(key);
    CHECK(j.at(key) == orig.at(key));
  }
  CHECK(j.at("base_model_name_or_path") == "base");
  const PeftConfig again = to_peft_config(config_io_parse(j.dump()));
  CHECK(again.lora->target_modules == pc.lora->target_modules);
  CHECK(again.lora->exclude_modules == pc.lora->exclude_modules);

  // "all-linear" keeps its spelling through the conversion and the file.
  PeftConfig all;
  all.lora.emplace();
  all.lora->target_modules = ModuleSelector::pattern("All-Linear");
  CHECK(io::to_json(to_adapter_config(all)).at("target_modules") == "All-Linear");
  CHECK(io::to_json(to_adapter_config(all)).at("exclude_modules").is_null());
  all.lora->lora.init = LoraInit::None;
  CHECK(to_peft_config(to_adapter_config(all)).lora->lora.init == LoraInit::None);
}

TEST_CASE("to_peft_config / to_adapter_config refuse what the other side cannot hold", "[peft_config][io][errors]") {
  PeftConfig two;
  two.lora.emplace();
  two.ia3.emplace();
  PEFT_REQUIRE_THROWS_WITH(to_adapter_config(two), ConfigError,
                           "to_adapter_config: the PeftConfig combines LoRA with (IA)^3");
  PEFT_REQUIRE_THROWS_WITH(to_adapter_config(PeftConfig{}), ConfigError, "has no LoRA part");
  PEFT_REQUIRE_THROWS_WITH(to_peft_config(config_io_parse(R"({"peft_type":"LORA","fan_in_fan_out":true})")),
                           ConfigError, "to_peft_config: fan_in_fan_out = true");
  PEFT_REQUIRE_THROWS_WITH(to_peft_config(config_io_parse(R"({"peft_type":"LORA","bias":"all"})")), ConfigError,
                           "bias = \"all\" trains biases");
  PEFT_REQUIRE_THROWS_WITH(to_peft_config(config_io_parse(R"({"peft_type":"LORA","init_lora_weights":"eva"})")),
                           ConfigError, "init_lora_weights = \"eva\" is not supported");
  PEFT_REQUIRE_THROWS_WITH(
      to_peft_config(config_io_parse(R"({"peft_type":"PROMPT_TUNING","num_virtual_tokens":2,"token_dim":4})")),
      ConfigError, "peft_type is \"PROMPT_TUNING\", expected \"LORA\"");
}

TEST_CASE("A config selects the same modules in the model and in the file", "[peft_config][io][targeting]") {
  Rng rng(47);
  const TransformerClassifier<float> base(config_io_model_config(), rng);
  struct Case {
    const char* json;
    std::vector<std::string> expected;  // empty: check only that both sides agree
  };
  const std::vector<Case> cases = {
      // all-linear: every linear but the head, in the model (its own flag) and in the file (by name)
      {R"({"peft_type":"LORA","target_modules":"all-linear"})", {}},
      {R"({"peft_type":"LORA","target_modules":"ALL-LINEAR","exclude_modules":["patch_embed","fc2"]})", {}},
      // list: whole name or dotted suffix
      {R"({"peft_type":"LORA","target_modules":["q_proj","layers.1.ffn.fc1"]})",
       {"layers.0.attn.q_proj", "layers.1.attn.q_proj", "layers.1.ffn.fc1"}},
      // regex: full match
      {R"({"peft_type":"LORA","target_modules":"layers\\.0\\.attn\\.(q|v)_proj"})",
       {"layers.0.attn.q_proj", "layers.0.attn.v_proj"}},
      // modules_to_save is never targeted, even when named
      {R"({"peft_type":"LORA","target_modules":["v_proj","classifier"],"modules_to_save":["classifier"]})",
       {"layers.0.attn.v_proj", "layers.1.attn.v_proj"}},
      // a regex may name the head: only all-linear leaves it out
      {R"({"peft_type":"LORA","target_modules":"classifier|layers\\.1\\.ffn\\.fc2"})",
       {"layers.1.ffn.fc2", "classifier"}},
  };
  for (const Case& tc : cases) {
    INFO(tc.json);
    const io::AdapterConfig file = config_io_parse(tc.json);
    auto m = base;
    PeftConfig pc = to_peft_config(file);
    pc.lora->lora.r = 2;  // the head has 4 outputs
    const PeftReport rep = apply_peft(m, pc, rng);
    CHECK(rep.lora_modules == config_io_file_targets(m, file));
    if (!tc.expected.empty()) CHECK(rep.lora_modules == tc.expected);
    const bool head_targeted =
        std::find(rep.lora_modules.begin(), rep.lora_modules.end(), "classifier") != rep.lora_modules.end();
    CHECK_FALSE((head_targeted && file.target_modules.is_all_linear()));
  }
  // all-linear, spelled out: 13 linears of 14, the head left out on both sides.
  auto m = base;
  const io::AdapterConfig all = config_io_parse(R"({"peft_type":"LORA","target_modules":"all-linear"})");
  CHECK(apply_peft(m, to_peft_config(all), rng).lora_modules.size() == 1 + 2 * 6);
  CHECK_FALSE(all.targets("classifier"));
  CHECK(all.targets("patch_embed"));
}
