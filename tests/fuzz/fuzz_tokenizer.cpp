// libFuzzer target: the tokenizer (io/tokenizer.hpp).
//   - input starting with '{': a tokenizer.json; it must load or throw a peft::Error, and a loaded
//     one must encode a few fixed strings and decode arbitrary ids without crashing;
//   - any other input: text for the committed fixtures (tests/data/tokenizers): encode must succeed
//     on valid UTF-8 (IoError otherwise), and the byte-level ones without stripping added tokens
//     (lstrip / rstrip) must give the text back on decode (lossless); decode of the input read as
//     ids must not crash.
#include <peft/io/tokenizer.hpp>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "fuzz_support.hpp"

namespace {

struct Fixture {
  peft::io::Tokenizer tok;
  bool lossless;  // byte-level: decode(encode(text)) == text
};

const std::vector<Fixture>& fixtures() {
  static const std::vector<Fixture> all = [] {
    std::string here = __FILE__;
    const std::string dir = here.substr(0, here.find_last_of('/')) + "/../data/tokenizers/";
    std::vector<Fixture> out;
    for (const char* name : {"gpt2", "llama3", "qwen2", "smollm", "llama2", "mistral", "metaspace_split"}) {
      const bool byte_level =
          std::string(name) != "llama2" && std::string(name) != "mistral" && std::string(name) != "metaspace_split";
      peft::io::Tokenizer tok = peft::io::load_tokenizer(dir + name + "/tokenizer.json");
      // An added token with lstrip / rstrip swallows the spaces next to it (as in tokenizers), so
      // decode cannot give them back: such a tokenizer is not lossless (llama3's "<tool>").
      bool strips = false;
      for (const auto& a : tok.added_tokens()) strips = strips || a.lstrip || a.rstrip;
      out.push_back({std::move(tok), byte_level && !strips});
    }
    out.push_back({peft::io::Tokenizer::bytes({"<bos>", "<eos>"}), true});
    return out;
  }();
  return all;
}

std::vector<std::int32_t> as_ids(const std::uint8_t* data, std::size_t size) {
  std::vector<std::int32_t> ids;
  for (std::size_t i = 0; i + 1 < size; i += 2)
    ids.push_back(static_cast<std::int32_t>(data[i] | (data[i + 1] << 8)) - 16);
  return ids;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::vector<std::int32_t> ids = as_ids(data, size);
  if (size > 0 && data[0] == '{') {
    const fuzz::MemFile file(data, size);
    try {
      const peft::io::Tokenizer tok = peft::io::load_tokenizer(file.path());
      for (const char* text : {"", "Hello world", " it's 12345\n\n  x", "<s>\xC3\xA9\xF0\x9F\x98\x80</s>"}) {
        (void)tok.decode(tok.encode(text), true);
        (void)tok.encode(text, false);
      }
      (void)tok.decode(ids, false);
    } catch (const peft::Error&) {
    }
    return 0;
  }
  const std::string text(reinterpret_cast<const char*>(data), size);
  const bool valid = peft::io::detail::tok::first_invalid_utf8(text) == std::string::npos;
  for (const Fixture& f : fixtures()) {
    try {
      const std::vector<std::int32_t> got = f.tok.encode(text, false);
      if (!valid) std::abort();  // invalid UTF-8 must be refused
      if (f.lossless && f.tok.decode(got) != text) std::abort();
      (void)f.tok.encode(text, true);
    } catch (const peft::IoError&) {
      if (valid) std::abort();
    }
    (void)f.tok.decode(ids, true);
    (void)f.tok.pre_tokenize(valid ? text : std::string());
  }
  return 0;
}
