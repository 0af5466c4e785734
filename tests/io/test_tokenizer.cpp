// Tokenizer (peft/io/tokenizer.hpp): every id, decode and pre-tokenizer piece of the fixtures made by
// Hugging Face tokenizers 0.23.3 (benchmarks/peer/make_tokenizer_fixtures.py, tests/data/tokenizers/),
// the byte tokenizer, and the refusals.
#include <peft/io/tokenizer.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "io/io_test_utils.hpp"
#include "support/test_utils.hpp"

using peft::io::Tokenizer;

namespace {

std::string tokenizer_dir(const std::string& name) { return peft::test::io::data_dir() + "/tokenizers/" + name; }

std::string show_ids(const std::vector<std::int32_t>& ids) {
  std::string s = "[";
  for (std::size_t k = 0; k < ids.size(); ++k) s += (k ? "," : "") + std::to_string(ids[k]);
  return s + "]";
}

struct FixtureCounts {
  std::size_t strings = 0, ids = 0, decodes = 0, pieces = 0;
};

/// Checks every case of <name>/expected.json; returns what was checked, fails with the first
/// mismatches.
FixtureCounts check_tokenizer_fixture(const std::string& name) {
  const Tokenizer tok = peft::io::load_tokenizer(tokenizer_dir(name) + "/tokenizer.json");
  const nlohmann::json expected =
      nlohmann::json::parse(peft::io::read_text_file(tokenizer_dir(name) + "/expected.json"));
  FixtureCounts counts;
  std::string mismatches;
  std::size_t n_bad = 0;
  const auto bad = [&](const std::string& what) {
    if (++n_bad <= 8) mismatches += what + "\n";
  };
  for (const nlohmann::json& c : expected.at("cases")) {
    const std::string text = c.at("text").get<std::string>();
    const auto ids = c.at("ids").get<std::vector<std::int32_t>>();
    const auto ids_special = c.at("ids_special").get<std::vector<std::int32_t>>();
    const auto got = tok.encode(text, false);
    const auto got_special = tok.encode(text, true);
    if (got != ids) bad(name + " ids of \"" + text + "\": " + show_ids(got) + " expected " + show_ids(ids));
    if (got_special != ids_special)
      bad(name + " ids+special of \"" + text + "\": " + show_ids(got_special) + " expected " + show_ids(ids_special));
    const std::string decoded = tok.decode(ids_special, false), decoded_skip = tok.decode(ids_special, true);
    if (decoded != c.at("decoded").get<std::string>())
      bad(name + " decode of \"" + text + "\": \"" + decoded + "\" expected \"" + c.at("decoded").get<std::string>() +
          "\"");
    if (decoded_skip != c.at("decoded_skip").get<std::string>())
      bad(name + " decode(skip) of \"" + text + "\": \"" + decoded_skip + "\" expected \"" +
          c.at("decoded_skip").get<std::string>() + "\"");
    if (c.contains("pre")) {
      const auto pre = c.at("pre").get<std::vector<std::string>>();
      const auto got_pre = tok.pre_tokenize(text);
      if (got_pre != pre) {
        std::string g;
        for (const auto& p : got_pre) g += "|" + p;
        bad(name + " pre-tokens of \"" + text + "\": " + g);
      }
      counts.pieces += pre.size();
    }
    ++counts.strings;
    counts.ids += ids.size() + ids_special.size();
    counts.decodes += 2;
  }
  INFO(mismatches);
  REQUIRE(n_bad == 0);
  return counts;
}

}  // namespace

TEST_CASE("tokenizer: ids, decodes and pre-tokens equal Hugging Face tokenizers on every fixture", "[io][tokenizer]") {
  const std::size_t n_strings = nlohmann::json::parse(peft::io::read_text_file(tokenizer_dir("strings.json"))).size();
  REQUIRE(n_strings > 90);
  for (const char* name :
       {"gpt2", "llama3", "qwen2", "smollm", "llama2", "mistral", "gpt2_prefix", "llama2_added", "metaspace_split"}) {
    SECTION(name) {
      const FixtureCounts c = check_tokenizer_fixture(name);
      REQUIRE(c.strings == n_strings);
      REQUIRE(c.ids > 2000);
    }
  }
}

TEST_CASE("tokenizer: special tokens, BOS and the Llama layouts", "[io][tokenizer]") {
  const Tokenizer llama3 = peft::io::load_tokenizer(tokenizer_dir("llama3") + "/tokenizer.json");
  const std::int32_t bos = *llama3.token_to_id("<|begin_of_text|>");
  REQUIRE(llama3.prefix_ids() == std::vector<std::int32_t>{bos});
  REQUIRE(llama3.suffix_ids().empty());
  REQUIRE(llama3.is_special(bos));
  REQUIRE(llama3.encode("", false).empty());
  REQUIRE(llama3.encode("", true) == std::vector<std::int32_t>{bos});
  // ignore_merges: a vocabulary entry no merge produces is taken whole
  REQUIRE(llama3.encode(" zzzzqq", false) == std::vector<std::int32_t>{*llama3.token_to_id("Ġzzzzqq")});
  REQUIRE(llama3.decode(llama3.encode("Hello <|eot_id|> x"), true) == "Hello  x");

  const Tokenizer llama2 = peft::io::load_tokenizer(tokenizer_dir("llama2") + "/tokenizer.json");
  REQUIRE(llama2.prefix_ids() == std::vector<std::int32_t>{1});
  REQUIRE(llama2.id_to_token(3) == "<0x00>");
  // byte_fallback: a character outside the vocabulary becomes its UTF-8 bytes, and decodes back
  const auto ids = llama2.encode("😀", false);
  REQUIRE(ids.size() >= 4);
  REQUIRE(llama2.decode(ids) == "😀");
  PEFT_REQUIRE_THROWS_WITH(llama2.id_to_token(100000), peft::ConfigError, "id 100000 is not in the vocabulary");
  REQUIRE(llama2.decode({1, 100000, 2}) == "<s></s>");  // unknown ids are dropped, as tokenizers does
}

TEST_CASE("tokenizer: the NFC normalizer (Qwen2) composes as tokenizers does (Unicode 9.0 tables)", "[io][tokenizer]") {
  const Tokenizer qwen2 = peft::io::load_tokenizer(tokenizer_dir("qwen2") + "/tokenizer.json");
  REQUIRE(qwen2.encode("A\u030a", false) == qwen2.encode("\u00c5", false));             // A + ring -> Å
  REQUIRE(qwen2.encode("\u212b", false) == qwen2.encode("\u00c5", false));              // Angstrom sign -> Å
  REQUIRE(qwen2.encode("\u1100\u1161\u11a8", false) == qwen2.encode("\uac01", false));  // Hangul jamo -> 각
  REQUIRE(qwen2.decode(qwen2.encode("q\u0307\u0323")) == "q\u0323\u0307");              // canonical order
  // Dives Akuru (Unicode 13.0) does not compose in tokenizers' Unicode 9.0 NFC
  REQUIRE(qwen2.decode(qwen2.encode("\U00011935\U00011930")) == "\U00011935\U00011930");
  REQUIRE(std::string(peft::io::unicode::kNfcVersion) == "9.0");
}

TEST_CASE("tokenizer: invalid UTF-8 input is refused; decode substitutes U+FFFD", "[io][tokenizer]") {
  const Tokenizer gpt2 = peft::io::load_tokenizer(tokenizer_dir("gpt2") + "/tokenizer.json");
  PEFT_REQUIRE_THROWS_WITH(gpt2.encode(std::string("ab\xC3", 3)), peft::IoError, "not valid UTF-8 at byte 2");
  PEFT_REQUIRE_THROWS_WITH(gpt2.encode(std::string("\xED\xA0\x80")), peft::IoError, "not valid UTF-8 at byte 0");
  // a lone byte token of a multi-byte character decodes to U+FFFD (String::from_utf8_lossy)
  const auto euro = gpt2.encode("€", false);
  REQUIRE(gpt2.decode(euro) == "€");
  REQUIRE(gpt2.decode({euro.front()}) == "\xEF\xBF\xBD");
}

TEST_CASE("tokenizer: the byte tokenizer", "[io][tokenizer]") {
  const Tokenizer bytes = Tokenizer::bytes({"<bos>", "<eos>"}, "<bos>");
  REQUIRE(bytes.vocab_size() == 258);
  const std::string text = "héllo<eos> \n";
  const auto ids = bytes.encode(text);
  REQUIRE(ids == std::vector<std::int32_t>{256, 'h', 0xC3, 0xA9, 'l', 'l', 'o', 257, ' ', '\n'});
  REQUIRE(bytes.encode(text, false).front() == 'h');
  REQUIRE(bytes.decode(ids) == "<bos>héllo<eos> \n");
  REQUIRE(bytes.decode(ids, true) == "héllo \n");
  REQUIRE(bytes.decode({0xC3, 'x', 0xE2, 0x82}) == "\xEF\xBF\xBDx\xEF\xBF\xBD");
  REQUIRE(Tokenizer::bytes().encode("ab") == std::vector<std::int32_t>{'a', 'b'});
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::bytes({"<a>"}, "<b>"), peft::ConfigError, "bos \"<b>\"");
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::bytes({"<a>", "<a>"}), peft::ConfigError, "given twice");
}

TEST_CASE("tokenizer: long inputs are linear (one 200 KB word, one 200 KB whitespace run)", "[io][tokenizer]") {
  const Tokenizer llama3 = peft::io::load_tokenizer(tokenizer_dir("llama3") + "/tokenizer.json");
  const std::string word(200000, 'a');
  const auto ids = llama3.encode(word, false);
  REQUIRE(llama3.decode(ids) == word);
  const std::string spaces = std::string(100000, ' ') + "x" + std::string(100000, '\n');
  REQUIRE(llama3.decode(llama3.encode(spaces, false)) == spaces);
}

TEST_CASE("tokenizer: components it does not implement are refused by name", "[io][tokenizer]") {
  peft::test::io::TempDir dir;
  const std::string path = dir.file("tokenizer.json");
  const auto with = [&](const std::string& model, const std::string& rest) {
    peft::test::io::write_bytes(path, "{\"model\": " + model + rest + "}");
    return path;
  };
  const std::string bpe = R"({"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";
  REQUIRE(Tokenizer::from_file(with(bpe, "")).encode("ab") == std::vector<std::int32_t>{2});
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::from_file(with(R"({"type": "WordPiece", "vocab": {}})", "")), peft::ConfigError,
                           "model \"WordPiece\" (only BPE is implemented) is not supported");
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::from_file(with(R"({"type": "Unigram", "vocab": []})", "")), peft::ConfigError,
                           "tokenizer \"" + path + "\": model \"Unigram\"");
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::from_file(with(bpe, R"(, "normalizer": {"type": "NFKC"})")), peft::ConfigError,
                           "normalizer \"NFKC\"");
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::from_file(with(bpe, R"(, "pre_tokenizer": {"type": "Whitespace"})")),
                           peft::ConfigError, "pre_tokenizer \"Whitespace\"");
  PEFT_REQUIRE_THROWS_WITH(
      Tokenizer::from_file(with(bpe, R"(, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\w+"},
                                       "behavior": "Isolated", "invert": false})")),
      peft::ConfigError, "pre_tokenizer Split regex \"\\w+\"");
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::from_file(with(bpe, R"(, "decoder": {"type": "WordPiece", "prefix": "##"})")),
                           peft::ConfigError, "decoder \"WordPiece\"");
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::from_file(with(bpe, R"(, "post_processor": {"type": "Foo"})")), peft::ConfigError,
                           "post_processor \"Foo\"");
  PEFT_REQUIRE_THROWS_WITH(
      Tokenizer::from_file(with(R"({"type": "BPE", "vocab": {"a": 0}, "merges": [], "dropout": 0.1})", "")),
      peft::ConfigError, "BPE dropout");
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::from_file(with(R"({"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]})", "")),
                           peft::IoError, "merge 0 (\"a\", \"b\") uses a token not in the vocabulary");
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::from_file(with(R"({"type": "BPE", "vocab": {"a": -1}, "merges": []})", "")),
                           peft::IoError, "token id is not an integer");
  PEFT_REQUIRE_THROWS_WITH(Tokenizer::from_file(with("[]", "")), peft::IoError, "\"model\" is not an object");
}
