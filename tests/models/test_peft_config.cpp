#include <peft/core/parameters.hpp>
#include <peft/models/peft_config.hpp>

#include "support/test_utils.hpp"

#include <algorithm>
#include <cstdint>

using namespace peft;

namespace {

TransformerConfig cfg(Index d = 16, Index layers = 2) {
  TransformerConfig c;
  c.input_dim = 12;
  c.max_seq_len = 8;
  c.dim = d;
  c.num_heads = 2;
  c.ffn_dim = 2 * d;
  c.num_layers = layers;
  c.num_classes = 4;
  return c;
}

PeftConfig lora(ModuleSelector target, int r = 2, double alpha = 4.0) {
  PeftConfig pc;
  LoraTargetConfig lc;
  lc.target_modules = std::move(target);
  lc.lora.r = r;
  lc.lora.alpha = alpha;
  pc.lora = lc;
  return pc;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

}  // namespace

TEST_CASE("apply_peft LoRA: exact, suffix, regex and all-linear targets; everything else frozen", "[peft_config]") {
  Rng rng(41);
  const TransformerClassifier<float> base(cfg(), rng);
  {
    auto m = base;
    const auto rep = apply_peft(m, lora({"layers.1.attn.q_proj"}), rng);
    CHECK(rep.lora_modules == std::vector<std::string>{"layers.1.attn.q_proj"});
    CHECK(rep.parameters.trainable == 2 * (16 + 16));  // r (d + k)
  }
  {
    auto m = base;
    const auto rep = apply_peft(m, lora({"q_proj", "ffn.fc1"}), rng);
    CHECK(rep.lora_modules == std::vector<std::string>{"layers.0.attn.q_proj", "layers.0.ffn.fc1",
                                                       "layers.1.attn.q_proj", "layers.1.ffn.fc1"});
    CHECK(rep.parameters.trainable == 2 * (2 * (16 + 16) + 2 * (16 + 32)));
    for (auto& np : trainable_parameters(m)) CHECK(np.name.find(".lora_") != std::string::npos);
    CHECK(m.layers[0].attn.q_proj.adapter("default").A.trainable());
    CHECK_FALSE(m.layers[0].attn.q_proj.weight.trainable());
    CHECK(m.layers[0].attn.q_proj.weight.grad.size() == 0);  // frozen: no gradient buffer
  }
  {
    auto m = base;
    const auto rep = apply_peft(m, lora(ModuleSelector::pattern(R"(layers\.0\..*_proj)")), rng);
    CHECK(rep.lora_modules.size() == 4);
    CHECK(contains(rep.lora_modules, "layers.0.attn.out_proj"));
  }
  {
    auto m = base;
    const auto rep = apply_peft(m, lora(ModuleSelector::pattern("all-linear")), rng);
    CHECK(rep.lora_modules.size() == 1 + 2 * 6);  // patch_embed + 6 per block, not the classifier
    CHECK_FALSE(contains(rep.lora_modules, "classifier"));
    // LoRA parameter count = Σ r (in + out)
    Index expected = 2 * (12 + 16);
    expected += 2 * (4 * 2 * (16 + 16) + 2 * 2 * (16 + 32));
    CHECK(rep.parameters.trainable == expected);
  }
}

TEST_CASE("apply_peft LoRA: exclude_modules, rank/alpha patterns, rslora", "[peft_config]") {
  Rng rng(42);
  const TransformerClassifier<double> base(cfg(), rng);
  auto m = base;
  PeftConfig pc = lora(ModuleSelector::pattern("all-linear"), 2, 4.0);
  pc.lora->exclude_modules = {"patch_embed", "layers.1.ffn.fc2"};
  pc.lora->rank_pattern = {{"layers.0.attn.q_proj", 5}, {"q_proj", 3}};
  pc.lora->alpha_pattern = {{R"(layers\.1\..*)", 10.0}};
  pc.lora->lora.use_rslora = true;
  const auto rep = apply_peft(m, pc, rng);
  CHECK_FALSE(contains(rep.lora_modules, "patch_embed"));
  CHECK_FALSE(contains(rep.lora_modules, "layers.1.ffn.fc2"));
  CHECK(contains(rep.lora_modules, "layers.0.ffn.fc2"));
  CHECK(m.layers[0].attn.q_proj.adapter("default").rank() == 5);
  CHECK(m.layers[1].attn.q_proj.adapter("default").rank() == 3);
  CHECK(m.layers[1].attn.k_proj.adapter("default").rank() == 2);
  CHECK(m.layers[0].attn.k_proj.adapter("default").config.alpha == 4.0);
  CHECK(m.layers[1].attn.k_proj.adapter("default").config.alpha == 10.0);
  CHECK(m.layers[1].attn.k_proj.adapter("default").scaling() == Approx(10.0 / std::sqrt(2.0)));
  // exclude as a regex
  auto m2 = base;
  PeftConfig pc2 = lora({"q_proj", "v_proj"});
  pc2.lora->exclude_modules = ModuleSelector::pattern(R"(layers\.0\..*)");
  CHECK(apply_peft(m2, pc2, rng).lora_modules ==
        std::vector<std::string>{"layers.1.attn.q_proj", "layers.1.attn.v_proj"});
}

TEST_CASE("apply_peft compiles each pattern once, not once per module", "[peft_config]") {
  Rng rng(44);
  const TransformerClassifier<double> base(cfg(), rng);
  auto m = base;
  const std::uint64_t before_selectors = peft::detail::regex_counters().compiled.load();
  PeftConfig pc = lora(ModuleSelector::pattern(R"(layers\.\d+\..*_proj)"));
  pc.lora->exclude_modules = ModuleSelector::pattern(R"(layers\.9\..*)");
  const std::uint64_t before_keys = peft::detail::regex_counters().compiled.load();
  CHECK(before_keys - before_selectors == 2);  // target_modules and exclude_modules, when made
  for (int i = 0; i < 50; ++i) {
    pc.lora->rank_pattern.add("blocks." + std::to_string(i) + ".q_proj", 3);
    pc.lora->alpha_pattern.add(R"(blocks\.)" + std::to_string(i) + R"(\.q_proj)", 6.0);
  }
  pc.lora->rank_pattern.add("attn.q_proj", 5);
  const std::uint64_t compiled = peft::detail::regex_counters().compiled.load();
  CHECK(compiled - before_keys == 50);  // on insertion, the 50 keys with regex syntax (plain ones need none)
  const std::uint64_t tests = peft::detail::pattern_key_tests().load();
  const auto rep = apply_peft(m, pc, rng);
  REQUIRE(rep.lora_modules.size() == 8);  // q, k, v, out per layer
  CHECK(m.layers[1].attn.q_proj.adapter("default").rank() == 5);
  CHECK(m.layers[1].attn.k_proj.adapter("default").rank() == 2);
  // Nothing is compiled again: not the selectors (nor their copies), not the pattern keys.
  CHECK(peft::detail::regex_counters().compiled.load() - compiled == 0);
  CHECK(peft::detail::pattern_key_tests().load() - tests <= 8u * (51 + 50));
}

TEST_CASE("apply_peft: modules_to_save stays trainable and is never targeted", "[peft_config]") {
  Rng rng(43);
  const TransformerClassifier<float> base(cfg(), rng);
  auto m = base;
  PeftConfig pc = lora(ModuleSelector::pattern(".*"));  // a regex that also matches the head ...
  pc.lora->target_modules = ModuleSelector::pattern(R"(.*(q_proj|classifier))");
  pc.modules_to_save = {"classifier"};
  const auto rep = apply_peft(m, pc, rng);
  CHECK_FALSE(contains(rep.lora_modules, "classifier"));  // ... but modules to save are skipped
  CHECK(rep.saved_modules == std::vector<std::string>{"classifier"});
  // the head is a ModulesToSave host: the adapter's copy trains, the original stays frozen
  CHECK(m.classifier.copy("default").weight.trainable());
  CHECK(m.classifier.copy("default").bias.trainable());
  CHECK_FALSE(m.classifier.original().weight.trainable());
  CHECK(rep.parameters.trainable == 2 * 2 * (16 + 16) + 4 * 16 + 4);
  // a suffix names nested modules; their whole subtree trains
  auto m2 = base;
  PeftConfig pc2;
  pc2.modules_to_save = {"norm1"};
  const auto rep2 = apply_peft(m2, pc2, rng);
  CHECK(rep2.saved_modules == std::vector<std::string>{"layers.0.norm1", "layers.1.norm1"});
  CHECK(rep2.parameters.trainable == 2 * 2 * 16);
}

TEST_CASE("apply_peft: adapters, IA3, prefix and prompt parameter counts equal closed forms", "[peft_config]") {
  Rng rng(44);
  const Index d = 16, L = 2;
  TransformerClassifier<float> base(cfg(d, L), rng);
  const Index total = count_parameters(base).total;
  for (AdapterPlacement placement :
       {AdapterPlacement::Houlsby, AdapterPlacement::Pfeiffer, AdapterPlacement::Parallel}) {
    auto m = base;
    PeftConfig pc;
    AdapterTargetConfig ac;
    ac.placement = placement;
    ac.options.reduction_factor = 4;  // b = 4
    pc.adapter = ac;
    const auto rep = apply_peft(m, pc, rng);
    const Index per = 2 * d * 4 + 4 + d;  // 2·d·b + b + d
    const Index count = (placement == AdapterPlacement::Houlsby ? 2 : 1) * L;
    CHECK(rep.parameters.trainable == count * per);
    CHECK(rep.parameters.total == total + count * per);
    const std::string name = placement == AdapterPlacement::Parallel ? "adapter_parallel" : "adapter_ffn";
    CHECK(m.layers[1].adapter_ffn->name() == "layers.1." + name);
  }
  {
    auto m = base;
    PeftConfig pc;
    pc.ia3.emplace();
    const auto rep = apply_peft(m, pc, rng);
    CHECK(rep.ia3_modules.size() == 3 * L);
    CHECK(rep.parameters.trainable == L * (d + d + 2 * d));  // l_k, l_v [d], l_ff [ffn_dim]
    std::vector<std::string> names;
    for (auto& np : trainable_parameters(m)) names.push_back(np.name);
    CHECK(contains(names, "layers.0.attn.k_proj.ia3_l.default"));
    CHECK(contains(names, "layers.1.ffn.fc2.ia3_l.default"));
  }
  {
    auto m = base;
    PeftConfig pc;
    pc.ia3.emplace();
    pc.ia3->target_modules = {"v_proj"};
    CHECK(apply_peft(m, pc, rng).parameters.trainable == L * d);
    CHECK(m.layers[0].attn.ia3_k() == nullptr);
  }
  {
    auto m = base;
    PeftConfig pc;
    pc.prefix = PrefixTargetConfig{5, false, 0};
    CHECK(apply_peft(m, pc, rng).parameters.trainable == L * 2 * 5 * d);  // 2·l·d per layer
    CHECK(trainable_parameters(m).front().name == "prefix_encoder.embedding.weight");
  }
  {
    auto m = base;
    PeftConfig pc;
    pc.prefix = PrefixTargetConfig{5, true, 7};  // reparameterized: l·d + h·d + h + h·L·2·d + L·2·d
    CHECK(apply_peft(m, pc, rng).parameters.trainable == 5 * d + 7 * d + 7 + 7 * L * 2 * d + L * 2 * d);
  }
  {
    auto m = base;
    PeftConfig pc;
    pc.prompt = PromptTargetConfig{6, PromptInit::Random, 0.5, {}};
    CHECK(apply_peft(m, pc, rng).parameters.trainable == 6 * d);  // n·d
    CHECK(trainable_parameters(m).front().name == "prompt_encoder.embedding.weight");
  }
}

TEST_CASE("apply_peft rejects selections that match nothing, listing the available names", "[peft_config][errors]") {
  Rng rng(45);
  const TransformerClassifier<float> base(cfg(), rng);
  auto m = base;
  PEFT_REQUIRE_THROWS_WITH(apply_peft(m, lora({"query"}), rng), ConfigError,
                           "apply_peft (LoRA): target_modules [\"query\"] matches no module (after exclude_modules and "
                           "modules_to_save); available modules: patch_embed, layers.0.attn.q_proj");
  PEFT_REQUIRE_THROWS_WITH(apply_peft(m, lora(ModuleSelector::pattern("q_proj")), rng), ConfigError,
                           "target_modules regex \"q_proj\" matches no module");
  PeftConfig excl = lora({"q_proj"});
  excl.lora->exclude_modules = {"q_proj"};
  PEFT_REQUIRE_THROWS_WITH(apply_peft(m, excl, rng), ConfigError, "matches no module");
  PEFT_REQUIRE_THROWS_WITH(apply_peft(m, lora(ModuleSelector{}), rng), ConfigError, "target_modules is empty");
  PeftConfig save;
  save.modules_to_save = {"head"};
  PEFT_REQUIRE_THROWS_WITH(apply_peft(m, save, rng), ConfigError,
                           "modules_to_save entry \"head\" matches no module; available modules: patch_embed, "
                           "embed_positions, layers");
  PeftConfig ia3;
  ia3.ia3.emplace();
  ia3.ia3->target_modules = {"q_proj"};
  PEFT_REQUIRE_THROWS_WITH(apply_peft(m, ia3, rng), ConfigError,
                           "cannot scale \"layers.0.attn.q_proj\"; this model supports attn.k_proj, attn.v_proj");
  ia3.ia3->target_modules = {"k_proj"};
  ia3.ia3->feedforward_modules = {"k_proj"};
  PEFT_REQUIRE_THROWS_WITH(apply_peft(m, ia3, rng), ConfigError, "as a feed-forward module");
  PeftConfig prompt;
  prompt.prompt = PromptTargetConfig{4, PromptInit::SampleVocab, 1.0, {}};
  PEFT_REQUIRE_THROWS_WITH(apply_peft(m, prompt, rng), ConfigError, "needs a token-input model");
  PeftConfig rank = lora({"patch_embed"}, 0);
  PEFT_REQUIRE_THROWS_WITH(apply_peft(m, rank, rng), ConfigError, "LoRALinear \"patch_embed\": rank r must be >= 1");
  {  // r above min(in, out) is legal, as in PEFT: applied, and reported through the warning sink
    std::vector<std::string> seen;
    const ScopedWarningHandler guard([&](const std::string& w) { seen.push_back(w); });
    auto wide = base;
    apply_peft(wide, lora({"patch_embed"}, 13), rng);
    REQUIRE(seen.size() == 1);
    CHECK(seen[0].find("LoRALinear \"patch_embed\": rank r = 13 exceeds min(in, out)") == 0);
  }
  PeftConfig adapter;
  adapter.adapter.emplace();
  adapter.adapter->options.reduction_factor = 64;
  PEFT_REQUIRE_THROWS_WITH(apply_peft(m, adapter, rng), ConfigError, "leaves no bottleneck for d=16");
  // a failed apply_peft leaves the model untouched: still fully trainable, no adapters
  CHECK(count_parameters(m).trainable == count_parameters(m).total);
  CHECK_FALSE(m.layers[0].adapter_ffn.has_value());
}
