// Hostile-input corpus: malformed safetensors files and adapter_config.json contents, each written
// to a temporary directory and loaded through the public loaders (SafeTensorsFile,
// read_adapter_config). One row per input: the bytes, the expected outcome (a typed peft::Error, or
// acceptance for unusual but valid input) and a substring of the message. Every row was handled
// cleanly when the table was written; a row that starts crashing or accepting is a regression.
#include <peft/io/peft_format.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/io/tokenizer.hpp>

#include <string>
#include <typeinfo>
#include <vector>

#include "io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::TempDir;
using peft::test::io::write_bytes;

namespace {

enum class Outcome { Accept, Io, Config, Numeric, Shape };

struct HostileRow {
  std::string name;
  std::string bytes;
  Outcome outcome;
  std::string needle;  ///< substring of the error message (empty for Accept)
};

const char* hostile_outcome_name(Outcome o) {
  switch (o) {
    case Outcome::Accept: return "accepted";
    case Outcome::Io: return "IoError";
    case Outcome::Config: return "ConfigError";
    case Outcome::Numeric: return "NumericError";
    case Outcome::Shape: return "ShapeError";
  }
  return "?";
}

Outcome hostile_outcome_of(const Error& e) {
  if (dynamic_cast<const IoError*>(&e)) return Outcome::Io;
  if (dynamic_cast<const ConfigError*>(&e)) return Outcome::Config;
  if (dynamic_cast<const NumericError*>(&e)) return Outcome::Numeric;
  if (dynamic_cast<const ShapeError*>(&e)) return Outcome::Shape;
  return Outcome::Accept;  // a bare peft::Error: never expected, reported as a mismatch below
}

/// Writes each row to `dir/<index>/<file>` and runs `load(path)` on it.
template <class Load>
void run_hostile_table(const std::vector<HostileRow>& rows, const std::string& file, Load&& load) {
  TempDir dir;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const HostileRow& r = rows[i];
    INFO("row " << i << ": " << r.name << " (expected " << hostile_outcome_name(r.outcome) << ": " << r.needle << ")");
    const std::string sub = dir.file(std::to_string(i));
    REQUIRE(::mkdir(sub.c_str(), 0755) == 0);
    const std::string path = sub + "/" + file;
    write_bytes(path, r.bytes);
    try {
      load(path);
      CHECK(r.outcome == Outcome::Accept);
    } catch (const Error& e) {
      INFO("message: " << e.what());
      CHECK(hostile_outcome_name(hostile_outcome_of(e)) == std::string(hostile_outcome_name(r.outcome)));
      CHECK(std::string(e.what()).find(r.needle) != std::string::npos);
      CHECK(std::string(e.what()).find(path) != std::string::npos);  // every message names the file
    } catch (const std::exception& e) {
      FAIL("not a peft::Error: " << typeid(e).name() << ": " << e.what());
    }
  }
}

/// A safetensors image: 8-byte length prefix (the header's size unless `length` is given), the
/// header, `data_bytes` zero bytes.
std::string hostile_st(const std::string& header, std::size_t data_bytes = 0,
                       std::uint64_t length = ~std::uint64_t{0}) {
  std::string out(8, '\0');
  peft::io::detail::store_le<std::uint64_t>(reinterpret_cast<unsigned char*>(&out[0]),
                                            length == ~std::uint64_t{0} ? header.size() : length);
  return out + header + std::string(data_bytes, '\0');
}

/// One tensor entry: "name":{"dtype":..,"shape":..,"data_offsets":..} (values as raw JSON).
std::string hostile_entry(const std::string& name, const std::string& dtype, const std::string& shape,
                          const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":" + dtype + ",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

std::string hostile_obj(const std::string& body) { return "{" + body + "}"; }

const std::string kHostileA = hostile_entry("a", "\"F32\"", "[2]", "[0,8]");  // 8 bytes at 0

}  // namespace

TEST_CASE("hostile inputs: malformed safetensors files", "[io][safetensors][hostile]") {
  const std::string nul(1, '\0');
  const std::vector<HostileRow> rows = {
      // ---- the length prefix ----
      {"empty file", "", Outcome::Io, "too short for the 8-byte header length"},
      {"7-byte file", std::string(7, '\x01'), Outcome::Io, "too short"},
      {"length larger than the file", hostile_st(hostile_obj(kHostileA), 8, hostile_obj(kHostileA).size() + 9),
       Outcome::Io, "runs past the end of the"},
      {"length 2^64 - 1", hostile_st(hostile_obj(kHostileA), 8, ~std::uint64_t{0} - 1), Outcome::Io,
       "exceeds the limit of 100000000 bytes"},
      {"length past the 100 MB limit", hostile_st(hostile_obj(kHostileA), 8, 100000001), Outcome::Io,
       "exceeds the limit"},
      {"length zero", hostile_st(hostile_obj(kHostileA), 8, 0), Outcome::Io, "does not start with '{'"},
      {"length one", hostile_st(hostile_obj(kHostileA), 8, 1), Outcome::Io, "does not start with '{'"},
      {"odd length cutting the JSON", hostile_st(hostile_obj(kHostileA), 8, hostile_obj(kHostileA).size() - 3),
       Outcome::Io, "invalid JSON at byte"},
      {"odd length, unpadded but complete (valid)", hostile_st(hostile_obj(kHostileA) + " ", 8), Outcome::Accept, ""},
      {"padded with spaces (valid)", hostile_st(hostile_obj(kHostileA) + "       ", 8), Outcome::Accept, ""},
      // ---- the header bytes ----
      {"NUL then garbage inside the declared length", hostile_st(hostile_obj(kHostileA) + nul + "\x01\x02garbage", 8),
       Outcome::Io, "NUL byte (not allowed in JSON text) at byte " + std::to_string(8 + hostile_obj(kHostileA).size())},
      {"NUL padding", hostile_st(hostile_obj(kHostileA) + nul + nul + nul, 8), Outcome::Io, "NUL byte"},
      {"invalid UTF-8 in a name", hostile_st("{\"\xff\":{}}"), Outcome::Io,
       "invalid UTF-8 (not a lead byte) at byte 10"},
      {"overlong UTF-8", hostile_st("{\"\xe0\x80\xaf\":{}}"), Outcome::Io,
       "invalid UTF-8 (bad continuation byte) at byte 10"},
      {"UTF-16 surrogate in UTF-8", hostile_st("{\"\xed\xb0\x80\":{}}"), Outcome::Io, "invalid UTF-8"},
      {"truncated UTF-8 at the end", hostile_st(hostile_obj(kHostileA) + " \xf0\x9f", 8), Outcome::Io,
       "invalid UTF-8 (truncated sequence)"},
      {"garbage after the object", hostile_st(hostile_obj(kHostileA) + " {}", 8), Outcome::Io, "invalid JSON at byte"},
      {"byte order mark", hostile_st("\xef\xbb\xbf" + hostile_obj(kHostileA), 8), Outcome::Io,
       "does not start with '{'"},
      {"comment", hostile_st("{/* c */" + kHostileA + "}", 8), Outcome::Io, "invalid JSON"},
      // ---- not the expected JSON ----
      {"array", hostile_st("[1,2]"), Outcome::Io, "does not start with '{'"},
      {"string", hostile_st("\"{}\""), Outcome::Io, "does not start with '{'"},
      {"unterminated object", hostile_st("{\"a\":{"), Outcome::Io, "invalid JSON at byte"},
      {"entry is an array", hostile_st("{\"a\":[0,8]}"), Outcome::Io,
       "tensor \"a\": entry must be an object, got an array"},
      {"entry is null", hostile_st("{\"a\":null}"), Outcome::Io, "entry must be an object, got null"},
      {"empty tensor name", hostile_st(hostile_obj(hostile_entry("", "\"F32\"", "[0]", "[0,0]"))), Outcome::Io,
       "tensor with an empty name"},
      {"duplicate tensor", hostile_st(hostile_obj(kHostileA + "," + kHostileA), 8), Outcome::Io,
       "duplicate JSON key \"a\""},
      {"duplicate __metadata__", hostile_st("{\"__metadata__\":{},\"__metadata__\":{}}"), Outcome::Io,
       "duplicate JSON key \"__metadata__\""},
      {"duplicate field",
       hostile_st("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8), Outcome::Io,
       "duplicate JSON key \"dtype\""},
      {"unexpected field", hostile_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":0}}", 8),
       Outcome::Io, "tensor \"a\": unexpected field \"x\""},
      {"missing field", hostile_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8), Outcome::Io,
       "needs \"dtype\", \"shape\" and \"data_offsets\""},
      // ---- dtype ----
      {"unknown dtype", hostile_st(hostile_obj(hostile_entry("a", "\"Q4_K\"", "[2]", "[0,8]")), 8), Outcome::Io,
       "unknown or unsupported dtype \"Q4_K\""},
      {"F8 dtype (not supported)", hostile_st(hostile_obj(hostile_entry("a", "\"F8_E4M3\"", "[2]", "[0,2]")), 2),
       Outcome::Io, "unsupported dtype \"F8_E4M3\""},
      {"lower-case dtype", hostile_st(hostile_obj(hostile_entry("a", "\"f32\"", "[2]", "[0,8]")), 8), Outcome::Io,
       "unsupported dtype \"f32\""},
      {"dtype not a string", hostile_st(hostile_obj(hostile_entry("a", "4", "[2]", "[0,8]")), 8), Outcome::Io,
       "\"dtype\" must be a string, got 4"},
      // ---- shape ----
      {"negative dimension", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[-2]", "[0,8]")), 8), Outcome::Io,
       "\"shape\" entry must be a non-negative integer, got -2"},
      {"fractional dimension", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[2.5]", "[0,8]")), 8), Outcome::Io,
       "must be a non-negative integer, got 2.5"},
      {"dimension as a string", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[\"2\"]", "[0,8]")), 8),
       Outcome::Io, "must be a non-negative integer, got \"2\""},
      {"dimension overflowing a double", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[1e400]", "[0,8]")), 8),
       Outcome::Io, "number overflow parsing '1e400'"},
      {"dimension past 2^64",
       hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[18446744073709551616]", "[0,8]")), 8), Outcome::Io,
       "must be a non-negative integer"},
      {"dimension past 2^63", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[9223372036854775808]", "[0,0]"))),
       Outcome::Io, "more elements than fit in 64 bits"},
      {"element count overflows",
       hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[4294967296,4294967296]", "[0,8]")), 8), Outcome::Io,
       "more elements than fit in 64 bits"},
      {"byte count overflows",
       hostile_st(hostile_obj(hostile_entry("a", "\"F64\"", "[2305843009213693952]", "[0,8]")), 8), Outcome::Io,
       "× F64 overflows 64 bits"},
      {"shape not an array", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "2", "[0,8]")), 8), Outcome::Io,
       "\"shape\" must be an array, got 2"},
      {"nested shape", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[[2]]", "[0,8]")), 8), Outcome::Io,
       "\"shape\" entry must be a non-negative integer, got an array"},
      {"size not matching dtype × shape", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[3]", "[0,8]")), 8),
       Outcome::Io, "hold 8 bytes, but F32 [3] needs 12"},
      {"zero-size tensor with bytes", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[0,4]", "[0,4]")), 4),
       Outcome::Io, "hold 4 bytes, but F32 [0, 4] needs 0"},
      // ---- data_offsets ----
      {"begin > end", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[2]", "[8,0]")), 8), Outcome::Io,
       "data_offsets [8, 0] end before they begin"},
      {"past the end", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[2]", "[0,8]")), 4), Outcome::Io,
       "run past the 4-byte data section"},
      {"huge end",
       hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[2]", "[18446744073709551607,18446744073709551615]")), 8),
       Outcome::Io, "run past the 8-byte data section"},
      {"negative offset", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[2]", "[-8,0]")), 8), Outcome::Io,
       "data_offsets[0] must be a non-negative integer, got -8"},
      {"three offsets", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[2]", "[0,8,8]")), 8), Outcome::Io,
       "\"data_offsets\" must be [begin, end], got more than two values"},
      {"one offset", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[2]", "[8]")), 8), Outcome::Io,
       "\"data_offsets\" must be [begin, end], got [8]"},
      {"offsets not an array", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[2]", "{}")), 8), Outcome::Io,
       "\"data_offsets\" must be [begin, end], got an object"},
      {"gap before the first tensor", hostile_st(hostile_obj(hostile_entry("a", "\"F32\"", "[2]", "[4,12]")), 12),
       Outcome::Io, "gap in the data section: bytes 0..4"},
      {"gap between tensors",
       hostile_st(hostile_obj(kHostileA + "," + hostile_entry("b", "\"F32\"", "[1]", "[12,16]")), 16), Outcome::Io,
       "gap in the data section: bytes 8..12"},
      {"overlapping tensors",
       hostile_st(hostile_obj(kHostileA + "," + hostile_entry("b", "\"F32\"", "[2]", "[4,12]")), 12), Outcome::Io,
       "overlaps tensor \"a\""},
      {"two tensors on the same bytes",
       hostile_st(hostile_obj(kHostileA + "," + hostile_entry("b", "\"F32\"", "[2]", "[0,8]")), 8), Outcome::Io,
       "overlaps tensor"},
      {"trailing bytes after the last tensor", hostile_st(hostile_obj(kHostileA), 9), Outcome::Io,
       "1 trailing bytes after the last tensor"},
      {"declared out of file order (valid)",
       hostile_st(hostile_obj(hostile_entry("b", "\"F32\"", "[1]", "[8,12]") + "," + kHostileA), 12), Outcome::Accept,
       ""},
      // ---- __metadata__ ----
      {"metadata is an array", hostile_st("{\"__metadata__\":[\"a\"]}"), Outcome::Io,
       "\"__metadata__\" must be an object of strings, got an array"},
      {"metadata is a string", hostile_st("{\"__metadata__\":\"pt\"}"), Outcome::Io,
       "must be an object of strings, got \"pt\""},
      {"metadata value is a number", hostile_st("{\"__metadata__\":{\"format\":1}}"), Outcome::Io,
       "\"__metadata__\" key \"format\" must map to a string, got 1"},
      {"metadata value is null", hostile_st("{\"__metadata__\":{\"format\":null}}"), Outcome::Io, "got null"},
      {"metadata value is an object", hostile_st("{\"__metadata__\":{\"format\":{}}}"), Outcome::Io, "got an object"},
      {"duplicate metadata key", hostile_st("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}"), Outcome::Io,
       "duplicate JSON key \"k\""},
      // ---- deep nesting (the schema stops it at the first level that is not allowed) ----
      {"deep arrays as an entry", hostile_st("{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}"),
       Outcome::Io, "entry must be an object, got an array"},
      {"deep objects in metadata", hostile_st("{\"__metadata__\":{\"k\":" + std::string(50000, '{') + "}}"),
       Outcome::Io, "key \"k\" must map to a string, got an object"},
      {"deep arrays in a shape", hostile_st("{\"a\":{\"shape\":" + std::string(100000, '[')), Outcome::Io,
       "\"shape\" entry must be a non-negative integer, got an array"},
      {"deep unterminated nesting", hostile_st(std::string(100000, '{')), Outcome::Io, "invalid JSON at byte 10"},
  };
  run_hostile_table(rows, "model.safetensors", [](const std::string& path) { (void)SafeTensorsFile(path); });
}

TEST_CASE("hostile inputs: adapter_config.json through read_adapter_config", "[io][peft][hostile]") {
  const std::string lora = "\"peft_type\":\"LORA\",\"target_modules\":[\"q\"]";
  auto cfg = [&](const std::string& extra) { return "{" + lora + "," + extra + "}"; };
  std::string many_keys = "{" + lora;
  for (int i = 0; i <= 10000; ++i) many_keys += ",\"k" + std::to_string(i) + "\":0";
  many_keys += "}";
  const std::vector<HostileRow> rows = {
      {"baseline (valid)", cfg("\"r\":8,\"lora_alpha\":16"), Outcome::Accept, ""},
      // ---- not a config object ----
      {"empty file", "", Outcome::Io, "invalid JSON at byte"},
      {"array", "[]", Outcome::Io, "adapter config must be a JSON object"},
      {"string", "\"LORA\"", Outcome::Io, "adapter config must be a JSON object"},
      {"missing peft_type", "{\"r\":8}", Outcome::Io, "missing key \"peft_type\""},
      {"peft_type not a string", "{\"peft_type\":5}", Outcome::Io, "key \"peft_type\" must be a string, got 5"},
      {"unknown peft_type", "{\"peft_type\":\"IA3\"}", Outcome::Config, "peft_type \"IA3\" is not supported"},
      {"empty peft_type", "{\"peft_type\":\"\"}", Outcome::Config, "peft_type \"\" is not supported"},
      // ---- JSON-level ----
      {"NUL then garbage", cfg("\"r\":8") + std::string(1, '\0') + "{\"r\":-1}", Outcome::Io, "NUL byte"},
      {"invalid UTF-8", cfg("\"task_type\":\"\xc3\x28\""), Outcome::Io, "invalid UTF-8 (bad continuation byte)"},
      {"duplicate key", cfg("\"r\":8,\"r\":64"), Outcome::Io, "duplicate JSON key \"r\""},
      {"trailing comma", cfg("\"r\":8,"), Outcome::Io, "invalid JSON at byte"},
      {"NaN literal", cfg("\"lora_alpha\":NaN"), Outcome::Io, "invalid JSON at byte"},
      {"Infinity literal", cfg("\"lora_alpha\":Infinity"), Outcome::Io, "invalid JSON at byte"},
      {"deeply nested value", cfg("\"x\":" + std::string(100000, '[') + std::string(100000, ']')), Outcome::Io,
       "nested deeper than 64 levels"},
      {"deeply nested, unterminated", std::string(100000, '{'), Outcome::Io, "invalid JSON"},
      {"object of more than 10000 keys", many_keys, Outcome::Io, "a JSON object has more than 10000 keys"},
      // ---- r ----
      {"negative r", cfg("\"r\":-8"), Outcome::Io, "key \"r\" must be a positive integer, got -8"},
      {"zero r", cfg("\"r\":0"), Outcome::Io, "key \"r\" must be a positive integer, got 0"},
      {"fractional r", cfg("\"r\":8.5"), Outcome::Io, "must be a positive integer, got 8.5"},
      {"r as a string", cfg("\"r\":\"8\""), Outcome::Io, "must be a positive integer, got \"8\""},
      {"r as a bool", cfg("\"r\":true"), Outcome::Io, "must be a positive integer, got true"},
      {"r past 2^30", cfg("\"r\":1073741825"), Outcome::Io, "must be a positive integer"},
      {"r = 2^64 - 1", cfg("\"r\":18446744073709551615"), Outcome::Io, "must be a positive integer"},
      {"r = 2^63", cfg("\"r\":9223372036854775808"), Outcome::Io, "must be a positive integer"},
      {"r past 2^64", cfg("\"r\":18446744073709551616"), Outcome::Io, "must be a positive integer"},
      {"r overflowing a double", cfg("\"r\":1e400"), Outcome::Io, "number overflow parsing '1e400'"},
      // ---- lora_alpha, lora_dropout ----
      {"negative alpha", cfg("\"lora_alpha\":-16"), Outcome::Io, "key \"lora_alpha\" must be > 0"},
      {"zero alpha", cfg("\"lora_alpha\":0"), Outcome::Io, "key \"lora_alpha\" must be > 0"},
      {"alpha overflowing a double", cfg("\"lora_alpha\":1e400"), Outcome::Io, "number overflow parsing '1e400'"},
      {"alpha huge but finite (valid)", cfg("\"lora_alpha\":1e308"), Outcome::Accept, ""},
      {"alpha subnormal (valid)", cfg("\"lora_alpha\":5e-324"), Outcome::Accept, ""},
      {"alpha as a string", cfg("\"lora_alpha\":\"16\""), Outcome::Io,
       "\"lora_alpha\" must be a finite number, got \"16\""},
      {"dropout 1", cfg("\"lora_dropout\":1"), Outcome::Io, "key \"lora_dropout\" must be in [0, 1)"},
      {"negative dropout", cfg("\"lora_dropout\":-0.1"), Outcome::Io, "must be in [0, 1)"},
      // ---- other keys of the wrong type or value ----
      {"target_modules a number", "{\"peft_type\":\"LORA\",\"target_modules\":5}", Outcome::Io,
       "key \"target_modules\" must be a string or a list of strings, got 5"},
      {"target_modules with numbers", "{\"peft_type\":\"LORA\",\"target_modules\":[1,2]}", Outcome::Io,
       "must be a string or a list of strings"},
      {"target_modules a broken regex", "{\"peft_type\":\"LORA\",\"target_modules\":\"(q\"}", Outcome::Io,
       "key \"target_modules\" is not a valid regular expression"},
      {"use_dora a string", cfg("\"use_dora\":\"yes\""), Outcome::Io, "key \"use_dora\" must be true or false"},
      {"unknown bias", cfg("\"bias\":\"some\""), Outcome::Io,
       "key \"bias\" must be \"none\", \"all\" or \"lora_only\""},
      {"rank_pattern entry zero", cfg("\"rank_pattern\":{\"q\":0}"), Outcome::Io,
       "key \"rank_pattern\" entry \"q\" must be a positive integer, got 0"},
      {"rank_pattern a list", cfg("\"rank_pattern\":[8]"), Outcome::Io, "must be an object of positive integers"},
      {"alpha_pattern entry overflowing", cfg("\"alpha_pattern\":{\"q\":1e400}"), Outcome::Io, "number overflow"},
      {"alpha_pattern entry negative", cfg("\"alpha_pattern\":{\"q\":-2}"), Outcome::Io,
       "key \"alpha_pattern\" entry \"q\" must be a positive number, got -2"},
      {"alpha_pattern a broken regex", cfg("\"alpha_pattern\":{\"(q\":2}"), Outcome::Io,
       "is not a valid regular expression"},
      {"modules_to_save a string", cfg("\"modules_to_save\":\"head\""), Outcome::Io, "must be a list of strings"},
      {"init_lora_weights a number", cfg("\"init_lora_weights\":1"), Outcome::Io, "true, false or a string"},
      {"an unknown feature switched on", cfg("\"use_magic\":true"), Outcome::Config,
       "unknown key \"use_magic\" = true looks like a feature"},
      {"an unsupported feature", cfg("\"lora_bias\":true"), Outcome::Config, "lora_bias = true"},
      // ---- prompt tuning ----
      {"prompt tuning without tokens", "{\"peft_type\":\"PROMPT_TUNING\"}", Outcome::Io,
       "key \"num_virtual_tokens\" is required and must be > 0"},
      {"prompt tuning with 1e20 tokens", "{\"peft_type\":\"PROMPT_TUNING\",\"num_virtual_tokens\":1e20}", Outcome::Io,
       "key \"num_virtual_tokens\" must be a positive integer"},
      {"prompt tuning with negative token_dim",
       "{\"peft_type\":\"PROMPT_TUNING\",\"num_virtual_tokens\":4,\"token_dim\":-1}", Outcome::Io,
       "key \"token_dim\" must be a positive integer, got -1"},
  };
  run_hostile_table(rows, kAdapterConfigFile, [](const std::string& path) { (void)read_adapter_config(path); });
}

TEST_CASE("hostile inputs: a JSON document is bounded in values before any tree is built", "[io][json][hostile]") {
  // "[0,0,...]" with n zeros holds n + 1 values (the array and its elements).
  const auto zeros = [](std::size_t n) {
    std::string t = "[0";
    t.reserve(2 * n + 2);
    for (std::size_t i = 1; i < n; ++i) t += ",0";
    return t + "]";
  };
  std::string many = zeros(kMaxJsonValues - 1);
  CHECK(parse_json_strict(many, "at the limit").size() == kMaxJsonValues - 1);
  many = zeros(kMaxJsonValues);
  PEFT_REQUIRE_THROWS_WITH(parse_json_strict(many, "over the limit"), IoError,
                           "more than " + std::to_string(kMaxJsonValues) + " values");
  TempDir dir;
  write_bytes(dir.path + "/adapter_config.json", "{\"peft_type\":\"LORA\",\"x\":" + many + "}");
  PEFT_REQUIRE_THROWS_WITH(read_adapter_config(dir.path + "/adapter_config.json"), IoError, "values (kMaxJsonValues)");
}

TEST_CASE("hostile inputs: tokenizer.json through load_tokenizer", "[io][tokenizer][hostile]") {
  const auto doc = [](const std::string& model, const std::string& rest = "") {
    return "{\"model\":" + model + rest + "}";
  };
  const std::string ab = R"({"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]})";
  const std::vector<HostileRow> rows = {
      {"valid", doc(ab), Outcome::Accept, ""},
      {"empty file", "", Outcome::Io, "invalid JSON"},
      {"array", "[]", Outcome::Io, "the document is not an object"},
      {"no model", "{}", Outcome::Io, "the document has no \"model\""},
      {"model is a number", doc("3"), Outcome::Io, "\"model\" is not an object"},
      {"vocab is a list", doc(R"({"type":"BPE","vocab":[],"merges":[]})"), Outcome::Io, "\"vocab\" is not an object"},
      {"negative id", doc(R"({"type":"BPE","vocab":{"a":-1},"merges":[]})"), Outcome::Io, "token id is not an integer"},
      {"fractional id", doc(R"({"type":"BPE","vocab":{"a":0.5},"merges":[]})"), Outcome::Io,
       "token id is not an integer"},
      {"id 2^40", doc(R"({"type":"BPE","vocab":{"a":1099511627776},"merges":[]})"), Outcome::Io,
       "token id is not an integer"},
      {"sparse id 2e9 (gigabytes of table)", doc(R"({"type":"BPE","vocab":{"a":2000000000},"merges":[]})"), Outcome::Io,
       "kMaxTokenizerIdSlack"},
      {"duplicate vocab key", doc(R"({"type":"BPE","vocab":{"a":0,"a":1},"merges":[]})"), Outcome::Io, "duplicate"},
      {"merge is a number", doc(R"({"type":"BPE","vocab":{"a":0},"merges":[7]})"), Outcome::Io,
       "neither \"a b\" nor [a, b]"},
      {"merge without a space", doc(R"({"type":"BPE","vocab":{"a":0},"merges":["ab"]})"), Outcome::Io,
       "not two tokens separated by one space"},
      {"merge of three tokens", doc(R"({"type":"BPE","vocab":{"a":0},"merges":["a b c"]})"), Outcome::Io,
       "not two tokens"},
      {"merge of unknown tokens", doc(R"({"type":"BPE","vocab":{"a":0},"merges":[["a","z"]]})"), Outcome::Io,
       "uses a token not in the vocabulary"},
      {"merges of both forms", doc(R"({"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b",["a","b"]]})"),
       Outcome::Io, "merges mix the \"a b\" and [a, b] forms"},
      {"a #version line is skipped (valid)", doc(R"({"type":"BPE","vocab":{"a":0},"merges":["#version: 0.2"]})"),
       Outcome::Accept, ""},
      {"unk_token not in vocab", doc(R"({"type":"BPE","vocab":{"a":0},"merges":[],"unk_token":"<unk>"})"), Outcome::Io,
       "unk_token \"<unk>\" is not in the vocabulary"},
      {"added_tokens not a list", doc(ab, R"(,"added_tokens":{})"), Outcome::Io, "\"added_tokens\" is not a list"},
      {"added token without id", doc(ab, R"(,"added_tokens":[{"content":"<s>"}])"), Outcome::Io, "has no \"id\""},
      {"added token content not a string", doc(ab, R"(,"added_tokens":[{"id":3,"content":5}])"), Outcome::Io,
       "\"content\" is not a string"},
      {"added token flag not a boolean", doc(ab, R"(,"added_tokens":[{"id":3,"content":"x","special":1}])"),
       Outcome::Io, "\"special\" is not a boolean"},
      {"template id out of range",
       doc(ab,
           R"(,"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},)"
           R"({"Sequence":{"id":"A","type_id":0}}],"special_tokens":{"<s>":{"id":"<s>","ids":[99],"tokens":["<s>"]}}})"),
       Outcome::Io, "id 99 out of range"},
      {"template token undefined",
       doc(ab, R"(,"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}}],)"
               R"("special_tokens":{}})"),
       Outcome::Io, "special token \"<s>\" undefined"},
      {"Metaspace replacement of two characters",
       doc(ab, R"(,"pre_tokenizer":{"type":"Metaspace","replacement":"ab","prepend_scheme":"always","split":true})"),
       Outcome::Io, "\"replacement\" is not one character"},
      {"Strip with a negative count", doc(ab, R"(,"decoder":{"type":"Strip","content":" ","start":-1,"stop":0})"),
       Outcome::Io, "start / stop are not counts"},
      {"Split pattern neither String nor Regex",
       doc(ab, R"(,"pre_tokenizer":{"type":"Split","pattern":{"Glob":"*"},"behavior":"Isolated","invert":false})"),
       Outcome::Io, "neither {\"String\": ...} nor {\"Regex\": ...}"},
      {"unknown Split behavior",
       doc(ab, R"(,"pre_tokenizer":{"type":"Split","pattern":{"String":" "},"behavior":"Sideways","invert":false})"),
       Outcome::Config, "behavior \"Sideways\""},
      {"WordPiece model", doc(R"({"type":"WordPiece","vocab":{"a":0}})"), Outcome::Config, "model \"WordPiece\""},
      {"NFKC normalizer", doc(ab, R"(,"normalizer":{"type":"NFKC"})"), Outcome::Config, "normalizer \"NFKC\""},
      {"padding set", doc(ab, R"(,"padding":{"strategy":"BatchLongest"})"), Outcome::Config, "\"padding\""},
      {"normalizers nested past the depth limit",
       doc(ab, ",\"normalizer\":" + std::string(70, '[') + std::string(70, ']')), Outcome::Io, "nested deeper than 64"},
  };
  run_hostile_table(rows, "tokenizer.json", [](const std::string& path) { (void)peft::io::load_tokenizer(path); });
}
