#pragma once
// Shared by the VeRA / LoHa / LoKr tests: where the Hugging Face PEFT fixtures live
// (tests/data/methods, see its README), the tiny model's adapted modules, and PEFT's per-module
// rank/alpha lookup (the library's PatternMap, which follows PEFT's get_pattern_key).
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include <peft/core/patterns.hpp>
#include <peft/core/types.hpp>
#include <peft/io/json.hpp>

namespace peft::test::methods {

inline std::string data_dir() {
  if (const char* d = std::getenv("PEFT_TEST_DATA")) return d;
  std::string here = __FILE__;
  here = here.substr(0, here.find_last_of('/'));
  return here.substr(0, here.find_last_of('/')) + "/data";
}

inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

/// The fixture model's adapted linears: [out, in] weights.
struct ModuleShape {
  const char* path;
  Index in, out;
};
inline const ModuleShape kModules[] = {{"model.layers.0.self_attn.q_proj", 12, 8},
                                       {"model.layers.0.self_attn.v_proj", 8, 12},
                                       {"model.layers.0.mlp.fc1", 12, 16},
                                       {"model.layers.0.mlp.fc2", 16, 12}};

/// Sets `value` from a config's rank_pattern / alpha_pattern object for module `path` when a key
/// matches (PEFT's rule); returns whether one did.
template <class V>
bool match_pattern(const peft::io::Json& patterns, const std::string& path, V& value) {
  PatternMap<V> map;
  for (auto it = patterns.begin(); it != patterns.end(); ++it) map.emplace_back(it.key(), it.value().template get<V>());
  const V* v = map.find(path);
  if (v != nullptr) value = *v;
  return v != nullptr;
}

}  // namespace peft::test::methods
