// libFuzzer target: the name-pattern engine (peft/core/regex.hpp). The input is a pattern, a NUL,
// then a subject. Compiling must either succeed or throw ConfigError; matching must finish in
// |program|·|subject| steps (a backtracking engine would time out here) and agree between
// full_match and search where they must.
#include <peft/core/regex.hpp>

#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const std::size_t nul = input.find('\0');
  const std::string pattern = input.substr(0, nul);
  const std::string subject =
      nul == std::string::npos ? std::string("model.layers.0.self_attn.q_proj") : input.substr(nul + 1);
  try {
    const peft::Regex re = peft::compile_name_regex(pattern, "fuzz");
    if (subject.size() > peft::kMaxRegexSubject) return 0;
    const bool full = re.full_match(subject);
    peft::RegexMatch m;
    const bool found = re.search(subject, &m);
    if (full && !found) std::abort();  // a full match is also a match somewhere
    if (found && (m.size() != static_cast<std::size_t>(re.group_count()) + 1 || !m[0].matched)) std::abort();
    // Anchoring the pattern turns search into fullmatch.
    const peft::Regex anchored = peft::compile_name_regex("\\A(?:" + pattern + ")\\Z", "fuzz");
    if (anchored.search(subject) != full) std::abort();
  } catch (const peft::ConfigError&) {
  }
  return 0;
}
