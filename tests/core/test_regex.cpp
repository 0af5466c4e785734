#include <peft/core/regex.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

namespace {
const char* const kUnmatched = nullptr;

struct FullCase {
  const char* pattern;
  std::string subject;
  bool expected;
};

struct SearchCase {
  const char* pattern;
  const char* subject;
  bool expected;
  std::vector<const char*> groups;  // group 0 first; kUnmatched for a group that took no part
};
}  // namespace

// Expected values are what CPython 3.11's re.fullmatch / re.search return for the same inputs.
TEST_CASE("Regex agrees with Python's re.fullmatch", "[regex]") {
  const std::vector<FullCase> cases = {
      {".*\\.(q_proj|v_proj)", std::string("model.layers.3.self_attn.q_proj", 31), true},
      {".*\\.(q_proj|v_proj)", std::string("model.layers.3.self_attn.k_proj", 31), false},
      {"(.*\\.)?(layers\\.0\\.attn\\.q)", std::string("layers.0.attn.q", 15), true},
      {"(.*\\.)?(layers\\.0\\.attn\\.q)", std::string("model.layers.0.attn.q", 21), true},
      {"(.*\\.)?(layers\\.0\\.attn\\.q)", std::string("model.layers.10.attn.q", 22), false},
      {"model\\.layers\\.[0-9]+\\.mlp\\..*", std::string("model.layers.12.mlp.down_proj", 29), true},
      {"[^.]+\\.fc{1,2}", std::string("mlp.fcc", 7), true},
      {"[^.]+\\.fc{1,2}", std::string("mlp.fccc", 8), false},
      {"a{3}b{2,}c?", std::string("aaabbb", 6), true},
      {"a{3}b{2,}c?", std::string("aabbb", 5), false},
      {"(?:x|y)+", std::string("xyyx", 4), true},
      {"q_proj", std::string("layers.0.q_proj", 15), false},
      {"(?P<name>\\w+)\\.\\d", std::string("lin.7", 5), true},
      {"\\d+", std::string("123", 3), true},
      {"\\D+", std::string("abc", 3), true},
      {"\\s\\S", std::string(" x", 2), true},
      {"[\\w.]+", std::string("a.b_c.9", 7), true},
      {"[^\\d]+", std::string("abc", 3), true},
      {"[a\\-z]+", std::string("a-z", 3), true},
      {"[]a]+", std::string("]a]", 3), true},
      {"[a-]+", std::string("a--", 3), true},
      {"x{,2}", std::string("xx", 2), true},
      {"x{,2}", std::string("xxx", 3), false},
      {"x{2,}", std::string("x", 1), false},
      {"x{2,3}?", std::string("xxx", 3), true},
      {"a{x", std::string("a{x", 3), true},
      {"a{1,x}", std::string("a{1,x}", 6), true},
      {"\\x41\\u0042\\t\\0", std::string("AB\t\0", 4), true},
      {"caf.", std::string("café", 5), true},
      {"é+", std::string("éé", 4), true},
      {"[à-ü]x", std::string("éx", 3), true},
      {"^abc$", std::string("abc", 3), true},
      {"abc$", std::string("abc\n", 4), false},
      {"abc\\Z", std::string("abc\n", 4), false},
      {"\\Aab", std::string("ab", 2), true},
      {"\\bq\\b.*", std::string("q proj", 6), true},
      {"a\\Bb", std::string("ab", 2), true},
      {"(a|ab)(c|bcd)(d*)", std::string("abcd", 4), true},
      {"", std::string("", 0), true},
      {"a|", std::string("", 0), true},
      {"()", std::string("", 0), true},
      {".", std::string("\n", 1), false},
      {"[.]", std::string("x", 1), false},
      {"\\.", std::string("x", 1), false},
      {"(?:a*)*", std::string("aaa", 3), true},
      {"(a|b)*?c", std::string("ababc", 5), true},
  };
  for (const FullCase& c : cases) {
    INFO("pattern " << c.pattern << " subject " << c.subject);
    CHECK(compile_name_regex(c.pattern, "test").full_match(c.subject) == c.expected);
  }
}

TEST_CASE("Regex search agrees with Python's re.search, groups included", "[regex]") {
  const std::vector<SearchCase> cases = {
      {"(?:^|\\.)layers\\.(\\d+)\\.", "model.layers.12.attn.q.weight", true, {".layers.12.", "12"}},
      {"(?:^|\\.)layers\\.(\\d+)\\.", "layers.3.q", true, {"layers.3.", "3"}},
      {"layers\\.(\\d+)", "blocks.layers.12.q", true, {"layers.12", "12"}},
      {"(a|ab)(c|bcd)(d*)", "xabcd", true, {"abcd", "a", "bcd", ""}},
      {"(a+?)(b*)", "xaab", true, {"a", "a", ""}},
      {"(x)?y", "y", true, {"y", kUnmatched}},
      {"\\d+", "abc", false, {}},
      {"$", "ab", true, {""}},
      {"b*", "abb", true, {""}},
      {"b+", "abb", true, {"bb"}},
      {"\\b\\w", ".ab", true, {"a"}},
  };
  for (const SearchCase& c : cases) {
    INFO("pattern " << c.pattern << " subject " << c.subject);
    RegexMatch m;
    const bool found = compile_name_regex(c.pattern, "test").search(c.subject, &m);
    REQUIRE(found == c.expected);
    if (!found) continue;
    REQUIRE(m.size() == c.groups.size());
    for (std::size_t g = 0; g < c.groups.size(); ++g) {
      INFO("group " << g);
      CHECK(m[g].matched == (c.groups[g] != kUnmatched));
      if (c.groups[g] != kUnmatched) CHECK(m[g].str() == c.groups[g]);
    }
  }
  CHECK(compile_name_regex("(?:^|\\.)layers\\.(\\d+)\\.", "t").group_count() == 1);
}

TEST_CASE("Regex matches in linear time where backtracking engines take exponential time", "[regex]") {
  // Each of these takes Python's re (and libstdc++'s std::regex) minutes to hours, or overflows the
  // stack; the Pike VM does |program|·|name| steps. Finishing is the check: a backtracking engine
  // would run into the test timeout.
  const std::string name = "model.layers.0.self_attn.q_proj.lora_A.default.weight";
  CHECK_FALSE(compile_name_regex("(a*)*b", "t").full_match(std::string(1000, 'a') + "c"));
  CHECK_FALSE(compile_name_regex("(a+)+$", "t").full_match(std::string(1000, 'a') + "!"));
  CHECK_FALSE(compile_name_regex("(.*.*)*x", "t").full_match(name));
  CHECK_FALSE(compile_name_regex("(.*\\.)?((.*)*(.*)*(.*)*(.*)*z)", "t").full_match(std::string(1000, '.')));
  CHECK(compile_name_regex("(.*.*)*weight", "t").full_match(name));
  RegexMatch m;
  CHECK_FALSE(compile_name_regex("(x+x+)+y", "t").search(std::string(1000, 'x'), &m));
}

TEST_CASE("compile_name_regex refuses malformed and unsupported patterns, never misreads them", "[regex][errors]") {
  // Malformed: Python's own messages and positions. Unsupported (no linear-time matching): named.
  const std::vector<std::pair<const char*, const char*>> cases = {
      {"(", "cfg: invalid regular expression \"(\": missing ), unterminated subpattern at position 0"},
      {")", "unbalanced parenthesis at position 0"},
      {"a**", "multiple repeat at position 2"},
      {"a{2}{3}", "multiple repeat at position 4"},
      {"*a", "nothing to repeat at position 0"},
      {"^*", "nothing to repeat at position 1"},
      {"a{2,1}", "min repeat greater than max repeat"},
      {"[a-", "unterminated character set at position 0"},
      {"[z-a]", "bad character range"},
      {"\\", "bad escape (end of pattern)"},
      {"\\q", "bad escape \\q at position 0"},
      {"\\x4", "incomplete escape"},
      {"(?=a)a", "uses a look-around assertion"},
      {"(?<!a)b", "uses a look-around assertion"},
      {"(a)\\1", "uses a back-reference at position 3"},
      {"(?P<x>a)(?P=x)", "uses a back-reference"},
      {"(?i)a", "uses an inline flag"},
      {"a*+", "uses a possessive quantifier"},
  };
  for (const auto& [pattern, needle] : cases) {
    INFO(pattern);
    PEFT_REQUIRE_THROWS_WITH(compile_name_regex(pattern, "cfg"), ConfigError, needle);
  }
}

TEST_CASE("compile_name_regex refuses hostile sizes", "[regex][errors]") {
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex(std::string(2000, 'a'), "cfg"), ConfigError,
                           "has 2000 characters, expected at most 1024");
  // The parser recurses once per group: nesting is bounded.
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex(std::string(500, '(') + "a" + std::string(500, ')'), "cfg"), ConfigError,
                           "nests groups more than 16 deep");
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex(std::string(17, '(') + std::string(17, ')'), "cfg"), ConfigError,
                           "nests groups more than 16 deep");
  CHECK(compile_name_regex(std::string(16, '(') + "a" + std::string(16, ')'), "cfg").full_match("a"));
  // Counted repeats are expanded into copies of the program: their product is what counts.
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex("(a{1000}){1000}", "cfg"), ConfigError,
                           "expands to more than 10000 states");
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex("((a{30}){30}){30}", "cfg"), ConfigError, "expands to more than");
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex("x{99999}", "cfg"), ConfigError, "expands to more than");
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex("x{99999999999999999999}", "cfg"), ConfigError, "expands to more than");
  CHECK(compile_name_regex("(a{20}){20}", "cfg").full_match(std::string(400, 'a')));
  // Alternatives add up.
  std::string alts = "a";
  for (int i = 0; i < 60; ++i) alts += "|(b{200})";
  PEFT_REQUIRE_THROWS_WITH(compile_name_regex(alts, "cfg"), ConfigError, "expands to more than");
}

TEST_CASE("regex matching refuses names beyond the subject limit", "[regex][errors]") {
  const Regex re = compile_name_regex("(.*\\.)?(q)", "rank_pattern");
  CHECK(regex_full_match(std::string(1000, 'a') + ".q", re, "rank_pattern"));
  PEFT_REQUIRE_THROWS_WITH(regex_full_match(std::string(100000, 'a') + ".q", re, "rank_pattern"), ConfigError,
                           "has 100002 characters, expected at most 1024");
  RegexMatch m;
  const std::string long_name(5000, 'x');
  PEFT_REQUIRE_THROWS_WITH(regex_search_in(long_name, m, re, "layer_regex"), ConfigError, "layer_regex: name");
}

TEST_CASE("Regex classes \\d \\w \\s are ASCII (Python's re.ASCII); other characters match literally", "[regex]") {
  CHECK_FALSE(compile_name_regex("caf\\w", "t").full_match("café"));  // Python without re.ASCII: true
  CHECK(compile_name_regex("caf\\W", "t").full_match("café"));
  CHECK(compile_name_regex("caf[é]", "t").full_match("café"));
}

TEST_CASE("Regex treats invalid UTF-8 bytes as single characters", "[regex]") {
  const std::string bad = std::string("a") + static_cast<char>(0xFF) + "b";
  CHECK(compile_name_regex("a.b", "t").full_match(bad));
  CHECK_FALSE(compile_name_regex("a..b", "t").full_match(bad));
  const std::string truncated = std::string("x") + static_cast<char>(0xE2) + static_cast<char>(0x82);
  CHECK(compile_name_regex("x..", "t").full_match(truncated));
  CHECK_NOTHROW(compile_name_regex(std::string("[") + static_cast<char>(0xC3) + "]", "t"));
}

TEST_CASE("Regex counts its compilations and match runs (the test hook patterns rely on)", "[regex]") {
  const std::uint64_t compiled = detail::regex_counters().compiled.load();
  const std::uint64_t runs = detail::regex_counters().runs.load();
  const Regex re = compile_name_regex("(.*\\.)?(q)", "t");
  const Regex copy = re;  // copying is not compiling
  CHECK(detail::regex_counters().compiled.load() - compiled == 1);
  CHECK(copy.full_match("a.q"));
  CHECK_FALSE(re.search("x"));
  CHECK(detail::regex_counters().runs.load() - runs == 2);
}

// Python's re.match: anchored at the start, ending anywhere (what PEFT's get_pattern_key uses).
// Expected values from CPython 3.11.
TEST_CASE("Regex::match agrees with Python's re.match", "[regex]") {
  const std::vector<FullCase> cases = {
      {"ab", "abc", true},
      {"ab", "xab", false},
      {"a|ab", "abx", true},
      {"b*", "ccc", true},
      {"a$", "a\n", true},
      {"(a|b)+c", "ababcx", true},
      {"x", "", false},
      {"(.*\\.)?(self_attn)|(x)$", "model.layers.0.self_attn.q_proj", true},
      {"(.*\\.)?(self_attn)|(x)$", "model.mlp.fc1", false},
      {"(.*\\.)?(q_(proj))$", "model.q_proj\n", true},
      {"(.*\\.)?(q_(proj))$", "model.q_proj\nx", false},
  };
  for (const auto& c : cases) {
    INFO(c.pattern << " on " << c.subject);
    CHECK(Regex(c.pattern, "test").match(c.subject) == c.expected);
  }
}
