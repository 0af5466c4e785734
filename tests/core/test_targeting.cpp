// PEFT's module targeting (core/targeting.hpp): the one selector and matching rule behind both
// apply_peft and adapter_config.json.
#include <peft/core/patterns.hpp>
#include <peft/core/targeting.hpp>

#include <string>
#include <utility>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("ModuleSelector: a list matches the whole name or a dotted suffix", "[targeting]") {
  CHECK(module_name_matches("layers.0.attn.q_proj", "q_proj"));
  CHECK(module_name_matches("layers.0.attn.q_proj", "attn.q_proj"));
  CHECK(module_name_matches("q_proj", "q_proj"));
  CHECK_FALSE(module_name_matches("layers.0.attn.q_proj", "proj"));  // suffix only on a dot boundary
  CHECK_FALSE(module_name_matches("layers.0.attn.xq_proj", "q_proj"));
  CHECK_FALSE(module_name_matches("q_proj", "attn.q_proj"));

  const ModuleSelector list{"q_proj", "ffn.fc1"};
  CHECK(list.is_list());
  CHECK(list.matches("layers.3.attn.q_proj", true));
  CHECK(list.matches("layers.3.ffn.fc1", true));
  CHECK(list.matches("layers.3.attn.q_proj", false));  // a list looks at names only, even the head's
  CHECK_FALSE(list.matches("layers.3.ffn.fc2", true));
  CHECK(list.describe() == "[\"q_proj\", \"ffn.fc1\"]");
}

TEST_CASE("ModuleSelector: a string is a full-match regex", "[targeting]") {
  const ModuleSelector re = ModuleSelector::pattern(R"(layers\.\d+\.attn\.(q|v)_proj)");
  CHECK(re.is_regex());
  CHECK(re.matches("layers.1.attn.v_proj", true));
  CHECK_FALSE(re.matches("layers.1.attn.v_proj.x", true));  // full match, not search
  CHECK_FALSE(re.matches("model.layers.1.attn.v_proj", true));
  CHECK_FALSE(ModuleSelector::pattern("q_proj").matches("layers.0.attn.q_proj", true));  // not a suffix rule
  CHECK(re.describe() == R"(regex "layers\.\d+\.attn\.(q|v)_proj")");
  // compiled once, when made: copies and matches compile nothing
  const std::uint64_t compiled = peft::detail::regex_counters().compiled.load();
  const ModuleSelector copy = re;
  for (int i = 0; i < 10; ++i) CHECK(copy.matches("layers." + std::to_string(i) + ".attn.q_proj", true));
  CHECK(peft::detail::regex_counters().compiled.load() == compiled);
  PEFT_REQUIRE_THROWS_WITH(ModuleSelector::pattern("(unclosed", "my target_modules"), ConfigError,
                           "my target_modules: invalid regular expression \"(unclosed\"");
}

TEST_CASE("ModuleSelector: all-linear is every linear but the output layer; absent is nothing", "[targeting]") {
  const ModuleSelector all = ModuleSelector::pattern("all-linear");
  CHECK(all.is_all_linear());
  CHECK_FALSE(all.is_regex());
  CHECK(ModuleSelector::pattern("ALL-Linear").is_all_linear());         // PEFT lower-cases the shorthand
  CHECK(ModuleSelector::pattern("ALL-Linear").text() == "ALL-Linear");  // and the file keeps its spelling
  CHECK(all.matches("layers.0.attn.q_proj", true));
  CHECK_FALSE(all.matches("classifier", false));  // the caller says which module is the head
  CHECK_FALSE(all.matches("layers.0.norm1", false));

  // Known by name only: PEFT's output embedding (lm_head) and top-level score / classifier.
  CHECK(is_output_layer_name("lm_head"));
  CHECK(is_output_layer_name("language_model.lm_head"));
  CHECK(is_output_layer_name("score"));
  CHECK(is_output_layer_name("classifier"));
  CHECK_FALSE(is_output_layer_name("model.layers.0.mlp.score"));  // only the top-level head
  CHECK_FALSE(is_output_layer_name("classifier.dense"));          // RoBERTa's head: its linears are not "classifier"
  CHECK_FALSE(is_output_layer_name("my_lm_head"));
  CHECK_FALSE(all.matches_linear_by_name("lm_head"));
  CHECK_FALSE(all.matches_linear_by_name("model.lm_head"));
  CHECK_FALSE(all.matches_linear_by_name("classifier"));
  CHECK(all.matches_linear_by_name("model.layers.0.self_attn.q_proj"));
  CHECK(ModuleSelector{"lm_head"}.matches_linear_by_name("lm_head"));  // naming the head still targets it

  const ModuleSelector absent;
  CHECK_FALSE(absent.present());
  CHECK(absent.empty());
  CHECK_FALSE(absent.matches("q_proj", true));
  CHECK(ModuleSelector(std::vector<std::string>{}).empty());
  CHECK(ModuleSelector(std::vector<std::string>{}).present());  // [] is not null in a file
  CHECK(absent.describe() == "null");
}

TEST_CASE("module_targeted / select_modules: exclude_modules and modules_to_save win over targets", "[targeting]") {
  CHECK(inside_module_to_save("classifier", {"classifier"}));
  CHECK(inside_module_to_save("head.classifier.dense", {"classifier"}));
  CHECK(inside_module_to_save("classifier.out_proj", {"classifier"}));
  CHECK_FALSE(inside_module_to_save("my_classifier", {"classifier"}));
  CHECK_FALSE(inside_module_to_save("classifiers.0", {"classifier"}));

  const ModuleSelector all = ModuleSelector::pattern("all-linear");
  const ModuleSelector exclude{"layers.1.fc"};
  CHECK(module_targeted("layers.0.fc", true, all, exclude, {}));
  CHECK_FALSE(module_targeted("layers.1.fc", true, all, exclude, {}));
  CHECK_FALSE(module_targeted("layers.0.fc", true, all, ModuleSelector::pattern(R"(layers\.0\..*)"), {}));
  CHECK_FALSE(module_targeted("pooler.dense", true, all, {}, {"pooler"}));
  CHECK_FALSE(module_targeted("head", false, all, {}, {}));

  const std::vector<std::pair<std::string, bool>> candidates = {
      {"embed", true}, {"layers.0.fc", true}, {"layers.1.fc", true}, {"pooler.dense", true}, {"head", false}};
  CHECK(select_modules(candidates, all, exclude, {"pooler"}, "t") == std::vector<std::string>{"embed", "layers.0.fc"});
  CHECK(select_modules(candidates, ModuleSelector{"head", "fc"}, {}, {}, "t") ==
        std::vector<std::string>{"layers.0.fc", "layers.1.fc", "head"});
  PEFT_REQUIRE_THROWS_WITH(select_modules(candidates, {}, {}, {}, "sel"), ConfigError, "sel: target_modules is empty");
  PEFT_REQUIRE_THROWS_WITH(
      select_modules(candidates, ModuleSelector{"fc"}, ModuleSelector{"fc"}, {}, "sel"), ConfigError,
      "sel: target_modules [\"fc\"] matches no module (after exclude_modules and modules_to_save); "
      "available modules: embed, layers.0.fc");
}

TEST_CASE("LayerFilter: layers_to_transform / layers_pattern read the layer index as PEFT does", "[targeting]") {
  const LayerFilter plain({1, 3}, {});
  // PEFT: re.match(r".*\.[^.]*\.(\d+)\.", key): the last number with a component before it (itself after
  // a dot) and a component after it.
  CHECK(plain.layer_index("model.layers.3.mlp.fc1") == 3);
  CHECK(plain.layer_index("model.encoder.layer.12.attention.self.query") == 12);
  CHECK(plain.layer_index("model.layers.0.experts.7.w1") == 7);
  CHECK(plain.layer_index("layers.3.mlp.fc1") == -1);  // no dot before "layers": PEFT finds none
  CHECK(plain.layer_index("model.layers.3") == -1);    // nothing after the number
  CHECK(plain.keeps("model.layers.1.fc"));
  CHECK_FALSE(plain.keeps("model.layers.2.fc"));
  CHECK_FALSE(plain.keeps("lm_head"));
  const LayerFilter pattern({0}, {"layers"});
  CHECK(pattern.layer_index("model.layers.0.experts.7.w1") == 0);  // `.*\.layers\.(\d+)\.`
  CHECK(pattern.layer_index("model.h.0.attn") == -1);
  CHECK(LayerFilter({0}, {"h", "layers"}).layer_index("model.h.4.attn") == 4);
  CHECK_FALSE(LayerFilter().active());
  PEFT_REQUIRE_THROWS_WITH(LayerFilter({0}, {"(x"}, "cfg: layers_pattern"), ConfigError, "cfg: layers_pattern");

  // A suffix (or all-linear) is filtered; a key named exactly, or a regex, is not (as in PEFT).
  const ModuleSelector fc{"fc", "model.layers.2.fc"};
  CHECK(module_targeted("model.layers.1.fc", true, fc, {}, {}, plain));
  CHECK_FALSE(module_targeted("model.layers.0.fc", true, fc, {}, {}, plain));
  CHECK(module_targeted("model.layers.2.fc", true, fc, {}, {}, plain));
  CHECK_FALSE(module_targeted("model.layers.0.fc", true, ModuleSelector::pattern("all-linear"), {}, {}, plain));
  CHECK(module_targeted("model.layers.0.fc", true, ModuleSelector::pattern(R"(.*\.fc)"), {}, {}, plain));
  const std::vector<std::pair<std::string, bool>> candidates = {{"model.layers.0.fc", true},
                                                                {"model.layers.1.fc", true}};
  CHECK(select_modules(candidates, ModuleSelector{"fc"}, {}, {}, "t", plain) ==
        std::vector<std::string>{"model.layers.1.fc"});
  PEFT_REQUIRE_THROWS_WITH(select_modules(candidates, ModuleSelector{"fc"}, {}, {}, "t", LayerFilter({5}, {})),
                           ConfigError, "matches no module (after exclude_modules, layers_to_transform and");
}

TEST_CASE("rank_pattern / alpha_pattern: PatternMap::find is the one lookup", "[targeting]") {
  const PatternMap<int> ranks{{"layers.1.attn.q_proj", 7}, {"q_proj", 5}, {"fc.", 9}};
  CHECK(*ranks.find("layers.1.attn.q_proj") == 7);  // first match wins
  CHECK(*ranks.find("layers.0.attn.q_proj") == 5);
  CHECK(*ranks.find("layers.0.ffn.fc1") == 9);  // keys are regex fragments
  CHECK(ranks.find("layers.0.attn.k_proj") == nullptr);
  CHECK(ranks.find("layers.0.attn.xq_proj") == nullptr);
}
