#include <peft/core/regex.hpp>

#include <string>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("compile_name_regex accepts the patterns PEFT configs use", "[regex]") {
  for (const char* p : {".*\\.(q_proj|v_proj)", "(.*\\.)?(layers\\.0\\.attn\\.q)", "model\\.layers\\.[0-9]+\\.mlp\\..*",
                        "[^.]+\\.fc{1,2}", "a{3}b{2,}c?", "(?:x|y)+"}) {
    INFO(p);
    CHECK_NOTHROW(compile_name_regex(p, "test"));
  }
  const std::regex re = compile_name_regex(".*\\.(q_proj|v_proj)", "test");
  CHECK(regex_full_match("model.layers.3.self_attn.q_proj", re, "test"));
  CHECK_FALSE(regex_full_match("model.layers.3.self_attn.k_proj", re, "test"));
  std::smatch m;
  const std::string name = "blocks.layers.12.q";
  CHECK(regex_search_in(name, m, compile_name_regex("layers\\.(\\d+)", "test"), "test"));
  CHECK(m[1].str() == "12");
}

TEST_CASE("compile_name_regex refuses hostile patterns before std::regex sees them", "[regex][errors]") {
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex("(", "cfg"), ConfigError, "cfg: invalid regular expression \"(\"");
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex(std::string(2000, 'a'), "cfg"), ConfigError,
                           "has 2000 characters, expected at most 1024");
  // libstdc++ compiles nested groups recursively: thousands of them overflow the stack.
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex(std::string(500, '(') + "a" + std::string(500, ')'), "cfg"), ConfigError,
                           "nests groups more than 16 deep");
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex(std::string(17, '(') + std::string(17, ')'), "cfg"), ConfigError,
                           "nests groups more than 16 deep");
  CHECK_NOTHROW(compile_name_regex(std::string(16, '(') + "a" + std::string(16, ')'), "cfg"));
  // Counted repeats are expanded into copies of the automaton: their product is what counts.
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex("(a{1000}){1000}", "cfg"), ConfigError, "expands to more than 10000 states");
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex("((a{30}){30}){30}", "cfg"), ConfigError, "expands to more than");
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex("x{99999}", "cfg"), ConfigError, "expands to more than");
  CHECK_NOTHROW(compile_name_regex("(a{20}){20}", "cfg"));
  // Alternatives add up.
  std::string alts = "a";
  for (int i = 0; i < 60; ++i) alts += "|(b{200})";
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex(alts, "cfg"), ConfigError, "expands to more than");
}

TEST_CASE("regex matching refuses names too long for the recursive matcher", "[regex][errors]") {
  const std::regex re = compile_name_regex("(.*\\.)?(q)", "rank_pattern");
  CHECK(regex_full_match(std::string(1000, 'a') + ".q", re, "rank_pattern"));
  PEFT_REQUIRE_THROWS_WITH(regex_full_match(std::string(100000, 'a') + ".q", re, "rank_pattern"), ConfigError,
                           "has 100002 characters, expected at most 1024");
  std::smatch m;
  const std::string long_name(5000, 'x');
  PEFT_REQUIRE_THROWS_WITH(regex_search_in(long_name, m, re, "layer_regex"), ConfigError, "layer_regex: name");
}
