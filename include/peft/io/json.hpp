#pragma once
// Strict JSON parsing for file headers and configs: the whole text is valid UTF-8 without NUL
// bytes, no duplicate keys in any object (nlohmann would silently keep the last one, so a hostile
// file could show one value to us and another to Python), bounded nesting depth. Errors are
// IoError naming the file and the byte offset.
//
// The UTF-8 / NUL scan (check_json_text) runs over every byte first because nlohmann's lexer
// treats a NUL byte as the end of the input: `{"a":1}\0<anything>` would parse as `{"a":1}` and
// the bytes after the NUL would never be looked at. Raw NUL cannot occur in valid JSON (control
// characters in strings must be escaped, and NUL is not whitespace), so refusing it costs nothing.
// nlohmann validates UTF-8 only inside strings; the scan makes the rule hold for every byte.
//
// Two passes, both linear in the input (up to a log factor): a SAX pass checks duplicates (one key
// set per open object) and depth and stops at the first violation, then nlohmann's plain DOM
// parser builds the value. A parser callback would do both in one pass, but nlohmann's callback
// parser rescans the whole parent object at every object end, which is quadratic: an object of a
// million keys would take hours.
//
// Configs keep their key order (Json = ordered_json) because PEFT's rank_pattern is matched in
// insertion order; ordered_json finds keys by linear search, so its objects are capped at
// kMaxOrderedJsonKeys keys; parse_json_strict<nlohmann::json> gives the map-based, uncapped
// variant. safetensors headers use neither: peft/io/safetensors.hpp parses them by SAX straight
// into its own structs (no DOM), with check_json_text first.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "peft/core/error.hpp"

namespace peft::io {

using Json = nlohmann::ordered_json;

/// Objects of an ordered_json may hold at most this many keys (its key lookup is linear).
constexpr std::size_t kMaxOrderedJsonKeys = 10000;

/// A document may hold at most this many values (objects, arrays, strings, numbers, ...), counted
/// by the SAX pre-pass before any tree is built: the tree of `[[],[],...]` costs ~70 bytes a value,
/// so a hostile 100 MB file would otherwise take gigabytes (and a bad_alloc while nlohmann destroys
/// a half-built tree is thrown inside a noexcept destructor: an abort, not an error). An
/// adapter_config.json with 10 000 rank_pattern and alpha_pattern keys holds ~40 000.
constexpr std::size_t kMaxJsonValues = 1000000;

namespace detail {

/// SAX-parses the JSON text [begin, end) into `sax` (strict: nothing but whitespace after the
/// value, no comments), as `J::sax_parse(begin, end, sax, input_format_t::json, true)` does. That
/// call also instantiates nlohmann's binary readers (CBOR, MessagePack, UBJSON, BJData, BSON) for
/// the handler, about 250 KB of code per translation unit for formats we never read; its JSON branch
/// alone is this.
template <class J, class Sax>
bool sax_parse_json(const char* begin, const char* end, Sax* sax) {
  auto input = nlohmann::detail::input_adapter(begin, end);
  return nlohmann::detail::parser<J, decltype(input)>(std::move(input), nullptr, /*allow_exceptions=*/true)
      .sax_parse(sax, /*strict=*/true);
}

/// Throws IoError at the first NUL byte or invalid UTF-8 sequence of [begin, end) (RFC 3629:
/// no overlong forms, no surrogates U+D800..DFFF, nothing above U+10FFFF). `base_offset` is added
/// to the byte offset in the message. Runs at memory speed on ASCII (8 bytes per step).
inline void check_json_text(const char* begin, const char* end, const std::string& label, std::size_t base_offset = 0) {
  const auto* p = reinterpret_cast<const unsigned char*>(begin);
  const auto* const e = reinterpret_cast<const unsigned char*>(end);
  const auto fail = [&](const unsigned char* at, const char* what) {
    throw IoError(
        "\"" + label + "\": " + what + " at byte " +
        std::to_string(base_offset + static_cast<std::size_t>(at - reinterpret_cast<const unsigned char*>(begin))));
  };
  constexpr std::uint64_t kOnes = 0x0101010101010101ull, kHighs = 0x8080808080808080ull;
  while (p < e) {
    if (e - p >= 8) {
      std::uint64_t w;
      std::memcpy(&w, p, 8);
      // No byte ≥ 0x80 and no zero byte ((w − 1…1) & ~w & 0x80…80 is non-zero iff a byte is 0).
      if (((w | ((w - kOnes) & ~w)) & kHighs) == 0) {
        p += 8;
        continue;
      }
    }
    const unsigned char c = *p;
    if (c == 0) fail(p, "NUL byte (not allowed in JSON text)");
    if (c < 0x80) {
      ++p;
      continue;
    }
    // Lead byte → sequence length and the allowed range of the first continuation byte.
    std::size_t len = 0;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;  // overlong below U+0800
      if (c == 0xed) hi = 0x9f;  // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;  // overlong below U+10000
      if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
    } else {
      fail(p, "invalid UTF-8 (not a lead byte)");
    }
    if (static_cast<std::size_t>(e - p) < len) fail(p, "invalid UTF-8 (truncated sequence)");
    if (p[1] < lo || p[1] > hi) fail(p, "invalid UTF-8 (bad continuation byte)");
    for (std::size_t k = 2; k < len; ++k)
      if (p[k] < 0x80 || p[k] > 0xbf) fail(p, "invalid UTF-8 (bad continuation byte)");
    p += len;
  }
}

/// SAX pass: duplicate keys, nesting depth and key counts; builds nothing.
template <class J>
class StrictJsonCheck : public nlohmann::json_sax<J> {
 public:
  using Base = nlohmann::json_sax<J>;
  using typename Base::binary_t;
  using typename Base::number_float_t;
  using typename Base::number_integer_t;
  using typename Base::number_unsigned_t;
  using typename Base::string_t;

  StrictJsonCheck(const std::string& label, std::size_t base_offset, int max_depth, std::size_t max_keys)
      : label_(label), base_offset_(base_offset), max_depth_(max_depth), max_keys_(max_keys) {}

  bool null() override { return value(); }
  bool boolean(bool) override { return value(); }
  bool number_integer(number_integer_t) override { return value(); }
  bool number_unsigned(number_unsigned_t) override { return value(); }
  bool number_float(number_float_t, const string_t&) override { return value(); }
  bool string(string_t&) override { return value(); }
  bool binary(binary_t&) override { return value(); }

  bool start_object(std::size_t) override {
    value();
    enter();
    keys_.emplace_back();
    return true;
  }
  bool key(string_t& k) override {
    std::set<std::string>& seen = keys_.back();
    if (!seen.insert(k).second) throw IoError("\"" + label_ + "\": duplicate JSON key \"" + k + "\"");
    if (seen.size() > max_keys_)
      throw IoError("\"" + label_ + "\": a JSON object has more than " + std::to_string(max_keys_) + " keys");
    return true;
  }
  bool end_object() override {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) override {
    value();
    enter();
    return true;
  }
  bool end_array() override {
    --depth_;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) override {
    throw IoError("\"" + label_ + "\": invalid JSON at byte " + std::to_string(base_offset_ + position) + ": " +
                  e.what());
  }

 private:
  bool value() {
    if (++values_ > kMaxJsonValues)
      throw IoError("\"" + label_ + "\": the JSON holds more than " + std::to_string(kMaxJsonValues) +
                    " values (kMaxJsonValues)");
    return true;
  }
  void enter() {
    // Thrown from inside the parser so a hostile "[[[[..." stops at the limit, not at the end.
    if (++depth_ > max_depth_)
      throw IoError("\"" + label_ + "\": JSON nested deeper than " + std::to_string(max_depth_) + " levels");
  }

  const std::string& label_;
  std::size_t base_offset_;
  int max_depth_;
  std::size_t max_keys_;
  std::vector<std::set<std::string>> keys_;  ///< one key set per open object
  int depth_ = 0;                            ///< open objects and arrays
  std::size_t values_ = 0;                   ///< values seen so far
};

}  // namespace detail

/// Parses `text` (the contents of `label`); `base_offset` is added to byte offsets in messages
/// (the safetensors header starts at byte 8 of its file).
template <class J = Json>
J parse_json_strict(const char* begin, const char* end, const std::string& label, std::size_t base_offset = 0,
                    int max_depth = 64,
                    std::size_t max_keys = std::is_same<J, nlohmann::ordered_json>::value
                                               ? kMaxOrderedJsonKeys
                                               : static_cast<std::size_t>(-1)) {
  detail::check_json_text(begin, end, label, base_offset);
  detail::StrictJsonCheck<J> check(label, base_offset, max_depth, max_keys);
  try {
    detail::sax_parse_json<J>(begin, end, &check);
    return J::parse(begin, end, nullptr, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const nlohmann::json::parse_error& e) {
    throw IoError("\"" + label + "\": invalid JSON at byte " + std::to_string(base_offset + e.byte) + ": " + e.what());
  } catch (const nlohmann::json::exception& e) {
    throw IoError("\"" + label + "\": invalid JSON: " + e.what());
  }
}

inline Json parse_json_strict(const std::string& text, const std::string& label) {
  return parse_json_strict<Json>(text.data(), text.data() + text.size(), label);
}

}  // namespace peft::io

#if defined(PEFT_EXTERN_TEMPLATES)
// Test build: nlohmann's parser and the strict checks are instantiated once, in
// tests/support/separate_bodies.cpp.
namespace peft::io {
extern template Json parse_json_strict<Json>(const char*, const char*, const std::string&, std::size_t, int,
                                             std::size_t);
extern template nlohmann::json parse_json_strict<nlohmann::json>(const char*, const char*, const std::string&,
                                                                 std::size_t, int, std::size_t);
}  // namespace peft::io
#endif
