#pragma once
// Strict JSON parsing for file headers and configs: valid UTF-8 (nlohmann's lexer rejects bad
// sequences), no duplicate keys in any object (nlohmann would silently keep the last one, so a
// hostile file could show one value to us and another to Python), bounded nesting depth. Object
// key order is kept (ordered_json) because PEFT's rank_pattern is matched in insertion order.
// Errors are IoError naming the file and the byte offset.
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "peft/core/error.hpp"

namespace peft::io {

using Json = nlohmann::ordered_json;

/// Parses `text` (the contents of `label`); `base_offset` is added to byte offsets in messages
/// (the safetensors header starts at byte 8 of its file).
inline Json parse_json_strict(const char* begin, const char* end, const std::string& label, std::size_t base_offset = 0,
                              int max_depth = 64) {
  std::vector<std::set<std::string>> keys;  // one key set per open object
  Json::parser_callback_t cb = [&](int depth, nlohmann::detail::parse_event_t ev, Json& parsed) -> bool {
    using E = nlohmann::detail::parse_event_t;
    // Thrown from inside the parser so a hostile "[[[[..." stops at the limit, not at the end.
    if (depth > max_depth)
      throw IoError("\"" + label + "\": JSON nested deeper than " + std::to_string(max_depth) + " levels");
    switch (ev) {
      case E::object_start:
        keys.emplace_back();
        break;
      case E::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case E::key:
        if (!keys.empty() && parsed.is_string()) {
          const std::string& k = parsed.get_ref<const std::string&>();
          if (!keys.back().insert(k).second) throw IoError("\"" + label + "\": duplicate JSON key \"" + k + "\"");
        }
        break;
      default:
        break;
    }
    return true;
  };
  Json j;
  try {
    j = Json::parse(begin, end, cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const nlohmann::json::parse_error& e) {
    throw IoError("\"" + label + "\": invalid JSON at byte " + std::to_string(base_offset + e.byte) + ": " + e.what());
  } catch (const nlohmann::json::exception& e) {
    throw IoError("\"" + label + "\": invalid JSON: " + e.what());
  }
  return j;
}

inline Json parse_json_strict(const std::string& text, const std::string& label) {
  return parse_json_strict(text.data(), text.data() + text.size(), label);
}

}  // namespace peft::io
