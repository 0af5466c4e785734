#pragma once
// Tokenizer: loads a Hugging Face `tokenizer.json` and gives the token ids of the reference
// `tokenizers` package (0.23.3) for the BPE kinds Llama-family models use, plus a plain byte
// tokenizer for models trained from scratch.
//
//   peft::io::Tokenizer tok = peft::io::load_tokenizer("model/tokenizer.json");
//   std::vector<std::int32_t> ids = tok.encode("Hello world");          // with BOS etc. if the file adds it
//   std::vector<std::int32_t> raw = tok.encode("Hello world", false);   // add_special_tokens = false
//   std::string text = tok.decode(ids, /*skip_special_tokens=*/true);
//   peft::io::Tokenizer bytes = peft::io::Tokenizer::bytes({"<bos>", "<eos>"});  // ids 0..255, then 256, 257
//
// Pipeline (as tokenizers' TokenizerImpl::encode_single_sequence):
//   1. added tokens with normalized=false are cut out of the raw text (leftmost-longest, with
//      single_word / lstrip / rstrip);
//   2. each remaining segment is normalized (Prepend, Replace, NFC, Sequence), then added tokens with
//      normalized=true are cut out of it (matched against their normalized form);
//   3. each remaining segment is pre-tokenized (ByteLevel, Split, Digits, Metaspace, Sequence);
//   4. each piece goes through the BPE model (merges by rank with a heap over a linked list of
//      symbols, O(n log n) per piece; ignore_merges, byte_fallback, unk / fuse_unk,
//      continuing_subword_prefix, end_of_word_suffix);
//   5. the post-processor (TemplateProcessing, Bert/Roberta, ByteLevel, Sequence) adds its special
//      tokens when add_special_tokens is true.
// decode maps ids to tokens (dropping special added tokens on request) and runs the decoder
// (ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence); invalid UTF-8 in the result
// becomes U+FFFD per maximal invalid subsequence, as Rust's String::from_utf8_lossy.
//
// The split regexes of ByteLevel / Split need \p{L}, \p{N}, negative look-ahead and (?i:...): they
// are not compiled by a regex engine but recognised (exact pattern strings: GPT-2's, Llama 3's and
// Qwen2's) and run by hand-written linear scanners with the Unicode classes of
// peft/io/unicode_tables.hpp. Any other pattern, model, normalizer, pre-tokenizer, post-processor or
// decoder is refused with a ConfigError naming the component and the file.
//
// Only single sequences are encoded (a template's "pair" is read past). Unicode: the classes are
// UCD 15.0 (tokenizers' Oniguruma has 16.0: the 4 924 letters and 80 numbers assigned since then are
// "other" here), NFC is restricted to Unicode 9.0 like tokenizers' own (tests/data/tokenizers/README.md).
//
// Input text must be valid UTF-8 (IoError otherwise: Python's str cannot hold anything else, so there
// is no reference behaviour to follow). The object is immutable after loading: encode / decode are
// const and thread-safe (no per-word cache).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/separate.hpp"
#include "peft/io/file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/unicode_tables.hpp"

namespace peft::io {

/// A token of tokenizer.json's "added_tokens" (or a special token of a byte tokenizer).
struct AddedToken {
  std::string content;
  std::int32_t id = 0;
  bool special = false;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
};

/// A tokenizer.json's largest id may exceed its number of tokens by at most this much (real
/// vocabularies are dense; the id -> token table is sized by the largest id, so a hostile
/// `"a": 2000000000` would otherwise allocate gigabytes).
constexpr std::size_t kMaxTokenizerIdSlack = std::size_t{1} << 20;

namespace detail::tok {

// ---- UTF-8 and character classes -------------------------------------------------------------

/// Decodes the code point at s[i] (valid UTF-8 assumed) and its length in bytes.
inline char32_t utf8_at(std::string_view s, std::size_t i, std::size_t* len) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    *len = 1;
    return b0;
  }
  const auto cont = [&](std::size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(s[i + k]) & 0x3F); };
  if (b0 < 0xE0) {
    *len = 2;
    return (static_cast<char32_t>(b0 & 0x1F) << 6) | cont(1);
  }
  if (b0 < 0xF0) {
    *len = 3;
    return (static_cast<char32_t>(b0 & 0x0F) << 12) | (cont(1) << 6) | cont(2);
  }
  *len = 4;
  return (static_cast<char32_t>(b0 & 0x07) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3);
}

inline void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

/// Length of the valid UTF-8 sequence at s[i] (RFC 3629), or 0 if there is none; `*valid` gets the
/// length of the maximal prefix of a valid sequence (>= 1), for U+FFFD substitution.
inline std::size_t utf8_valid_len(const unsigned char* s, std::size_t n, std::size_t i, std::size_t* prefix) {
  const unsigned char b0 = s[i];
  *prefix = 1;
  if (b0 < 0x80) return 1;
  std::size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (std::size_t k = 1; k < need; ++k) {
    if (i + k >= n) return 0;
    const unsigned char b = s[i + k];
    if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return 0;
    *prefix = k + 1;
  }
  return need;
}

/// Rust's String::from_utf8_lossy: each maximal invalid subsequence becomes U+FFFD.
inline std::string utf8_lossy(std::string_view bytes) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const std::size_t n = bytes.size();
  std::string out;
  out.reserve(n);
  for (std::size_t i = 0; i < n;) {
    std::size_t prefix = 0;
    const std::size_t len = utf8_valid_len(s, n, i, &prefix);
    if (len) {
      out.append(bytes.substr(i, len));
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      i += prefix;
    }
  }
  return out;
}

/// Byte offset of the first invalid UTF-8 sequence, or npos.
inline std::size_t first_invalid_utf8(std::string_view bytes) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  std::size_t prefix = 0;
  for (std::size_t i = 0; i < bytes.size();) {
    const std::size_t len = utf8_valid_len(s, bytes.size(), i, &prefix);
    if (!len) return i;
    i += len;
  }
  return std::string_view::npos;
}

/// The table entry of a code point: class (low 4 bits) | unicode::kWord.
inline std::uint8_t class_bits(char32_t c) {
  if (c < 0x80) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return unicode::kLetter | unicode::kWord;
    if (c >= '0' && c <= '9') return unicode::kNumber | unicode::kWord;
    if (c == ' ' || (c >= 0x09 && c <= 0x0D)) return unicode::kSpace;
    if (c == '_') return unicode::kConnector | unicode::kWord;
    return unicode::kOther;
  }
  const unicode::ClassRange* begin = unicode::kClassRanges;
  const unicode::ClassRange* end = begin + unicode::kClassRangeCount;
  const unicode::ClassRange* it =
      std::upper_bound(begin, end, static_cast<std::uint32_t>(c),
                       [](std::uint32_t v, const unicode::ClassRange& r) { return v < r.lo; });
  if (it == begin) return unicode::kOther;
  --it;
  return static_cast<std::uint32_t>(c) <= it->hi ? it->cls : static_cast<std::uint8_t>(unicode::kOther);
}

/// \p{L} -> kLetter, \p{N} -> kNumber, White_Space (\s) -> kSpace, ...
inline unicode::CharClass char_class(char32_t c) { return static_cast<unicode::CharClass>(class_bits(c) & 0x0F); }

/// Rust regex `\w` (UTS #18: Alphabetic, M*, Nd, Pc, Join_Control); used for added tokens with
/// single_word.
inline bool is_word_char(char32_t c) { return (class_bits(c) & unicode::kWord) != 0; }

/// Canonical combining class (tables of Unicode <= unicode::kNfcVersion).
inline std::uint8_t ccc(char32_t c) {
  if (c < 0x300) return 0;
  const unicode::CccRange* begin = unicode::kCccRanges;
  const unicode::CccRange* end = begin + unicode::kCccRangeCount;
  const unicode::CccRange* it = std::upper_bound(begin, end, static_cast<std::uint32_t>(c),
                                                 [](std::uint32_t v, const unicode::CccRange& r) { return v < r.lo; });
  if (it == begin) return 0;
  --it;
  return static_cast<std::uint32_t>(c) <= it->hi ? it->ccc : 0;
}

constexpr char32_t kHangulS = 0xAC00, kHangulL = 0x1100, kHangulV = 0x1161, kHangulT = 0x11A7;
constexpr char32_t kHangulLCount = 19, kHangulVCount = 21, kHangulTCount = 28;
constexpr char32_t kHangulNCount = kHangulVCount * kHangulTCount, kHangulSCount = kHangulLCount * kHangulNCount;

inline void decompose(char32_t c, std::vector<char32_t>& out) {
  if (c >= kHangulS && c < kHangulS + kHangulSCount) {
    const char32_t s = c - kHangulS;
    out.push_back(kHangulL + s / kHangulNCount);
    out.push_back(kHangulV + (s % kHangulNCount) / kHangulTCount);
    if (s % kHangulTCount) out.push_back(kHangulT + s % kHangulTCount);
    return;
  }
  const unicode::Decomposition* begin = unicode::kDecompositions;
  const unicode::Decomposition* end = begin + unicode::kDecompositionCount;
  const unicode::Decomposition* it =
      std::lower_bound(begin, end, static_cast<std::uint32_t>(c),
                       [](const unicode::Decomposition& d, std::uint32_t v) { return d.cp < v; });
  if (it == end || it->cp != static_cast<std::uint32_t>(c)) {
    out.push_back(c);
    return;
  }
  for (std::size_t k = 0; k < it->length; ++k) out.push_back(unicode::kDecompositionPool[it->offset + k]);
}

/// The primary composite of (a, b), or 0.
inline char32_t compose(char32_t a, char32_t b) {
  if (a >= kHangulL && a < kHangulL + kHangulLCount && b >= kHangulV && b < kHangulV + kHangulVCount)
    return kHangulS + ((a - kHangulL) * kHangulVCount + (b - kHangulV)) * kHangulTCount;
  if (a >= kHangulS && a < kHangulS + kHangulSCount && (a - kHangulS) % kHangulTCount == 0 && b > kHangulT &&
      b < kHangulT + kHangulTCount)
    return a + (b - kHangulT);
  const unicode::Composition* begin = unicode::kCompositions;
  const unicode::Composition* end = begin + unicode::kCompositionCount;
  const unicode::Composition* it =
      std::lower_bound(begin, end, std::make_pair(static_cast<std::uint32_t>(a), static_cast<std::uint32_t>(b)),
                       [](const unicode::Composition& x, const std::pair<std::uint32_t, std::uint32_t>& v) {
                         return x.first != v.first ? x.first < v.first : x.second < v.second;
                       });
  if (it == end || it->first != static_cast<std::uint32_t>(a) || it->second != static_cast<std::uint32_t>(b)) return 0;
  return it->composite;
}

/// Unicode Normalization Form C (UAX #15): canonical decomposition, canonical ordering, composition.
inline std::string nfc(const std::string& s) {
  bool ascii = true;
  for (char ch : s) ascii = ascii && static_cast<unsigned char>(ch) < 0x80;
  if (ascii) return s;
  std::vector<char32_t> d;
  d.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    std::size_t len = 0;
    decompose(utf8_at(s, i, &len), d);
    i += len;
  }
  for (std::size_t i = 0; i < d.size();) {  // stable sort of each run of non-starters by class
    if (!ccc(d[i])) {
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < d.size() && ccc(d[j])) ++j;
    std::stable_sort(d.begin() + static_cast<std::ptrdiff_t>(i), d.begin() + static_cast<std::ptrdiff_t>(j),
                     [](char32_t a, char32_t b) { return ccc(a) < ccc(b); });
    i = j;
  }
  std::vector<char32_t> out;
  out.reserve(d.size());
  std::ptrdiff_t starter = -1;
  int last_cc = 0;
  for (char32_t c : d) {
    const int cc = ccc(c);
    if (starter >= 0) {
      const bool adjacent = static_cast<std::ptrdiff_t>(out.size()) == starter + 1;
      if (adjacent || (last_cc != 0 && last_cc < cc)) {
        if (const char32_t composite = compose(out[static_cast<std::size_t>(starter)], c)) {
          out[static_cast<std::size_t>(starter)] = composite;
          continue;
        }
      }
    }
    if (cc == 0) {
      starter = static_cast<std::ptrdiff_t>(out.size());
      last_cc = 0;
    } else {
      last_cc = cc;
    }
    out.push_back(c);
  }
  std::string r;
  r.reserve(s.size());
  for (char32_t c : out) append_utf8(r, c);
  return r;
}

/// A decoded string: code points and their byte offsets (offsets has one more entry, the size).
struct Chars {
  std::vector<char32_t> cp;
  std::vector<unicode::CharClass> cls;
  std::vector<std::size_t> offset;
  explicit Chars(std::string_view s) {
    cp.reserve(s.size());
    offset.reserve(s.size() + 1);
    for (std::size_t i = 0; i < s.size();) {
      std::size_t len = 1;
      const char32_t c = utf8_at(s, i, &len);
      cp.push_back(c);
      cls.push_back(char_class(c));
      offset.push_back(i);
      i += len;
    }
    offset.push_back(s.size());
  }
  std::size_t size() const { return cp.size(); }
};

/// GPT-2's byte -> printable character map (bytes_char of tokenizers' byte_level.rs).
inline const std::vector<std::string>& byte_to_unicode() {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      append_utf8(t[static_cast<std::size_t>(b)],
                  printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++));
    }
    return t;
  }();
  return table;
}

/// Inverse of byte_to_unicode: code point -> byte, -1 where the code point is not in the map.
inline int unicode_to_byte(char32_t c) {
  static const std::vector<int> table = [] {
    std::vector<int> t(512, -1);
    const auto& fwd = byte_to_unicode();
    for (int b = 0; b < 256; ++b) {
      std::size_t len = 0;
      t[utf8_at(fwd[static_cast<std::size_t>(b)], 0, &len)] = b;
    }
    return t;
  }();
  return c < 512 ? table[c] : -1;
}

// ---- splitting (tokenizers' NormalizedString::split) --------------------------------------------

/// A span [begin, end) in bytes, and whether it is a match of the pattern.
struct Span {
  std::size_t begin, end;
  bool match;
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

/// Applies a split behaviour to the spans (which cover the string) and returns the kept sub-ranges.
inline std::vector<std::pair<std::size_t, std::size_t>> apply_behavior(const std::vector<Span>& spans,
                                                                       Behavior behavior) {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::kIsolated:
      for (const Span& s : spans) out.emplace_back(s.begin, s.end);
      break;
    case Behavior::kRemoved:
      for (const Span& s : spans)
        if (!s.match) out.emplace_back(s.begin, s.end);
      break;
    case Behavior::kContiguous:
      for (const Span& s : spans) {
        if (s.match == previous_match && !out.empty()) {
          out.back().second = s.end;
        } else {
          out.emplace_back(s.begin, s.end);
        }
        previous_match = s.match;
      }
      break;
    case Behavior::kMergedWithPrevious:
      for (const Span& s : spans) {
        if (s.match && !previous_match && !out.empty()) {
          out.back().second = s.end;
        } else {
          out.emplace_back(s.begin, s.end);
        }
        previous_match = s.match;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->match && !previous_match && !out.empty()) {
          out.back().first = it->begin;
        } else {
          out.emplace_back(it->begin, it->end);
        }
        previous_match = it->match;
      }
      std::reverse(out.begin(), out.end());
      break;
  }
  return out;
}

/// Matches [begin, end) (byte offsets, non-overlapping, sorted) -> spans covering [0, size).
inline std::vector<Span> spans_from_matches(const std::vector<std::pair<std::size_t, std::size_t>>& matches,
                                            std::size_t size, bool invert) {
  std::vector<Span> spans;
  if (size == 0) {
    spans.push_back({0, 0, invert});
    return spans;
  }
  std::size_t prev = 0;
  for (const auto& m : matches) {
    if (prev != m.first) spans.push_back({prev, m.first, invert});
    spans.push_back({m.first, m.second, !invert});
    prev = m.second;
  }
  if (prev != size) spans.push_back({prev, size, invert});
  return spans;
}

// ---- the split-regex scanners --------------------------------------------------------------------

/// The split patterns recognised by their exact strings.
enum class SplitRegex { kGpt2, kLlama3, kQwen2 };

inline const std::string& gpt2_pattern() {
  static const std::string p = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
  return p;
}
inline const std::string& llama3_pattern() {
  static const std::string p =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  return p;
}
inline const std::string& qwen2_pattern() {
  static const std::string p =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  return p;
}

inline std::optional<SplitRegex> recognise_split_regex(const std::string& pattern) {
  if (pattern == gpt2_pattern()) return SplitRegex::kGpt2;
  if (pattern == llama3_pattern()) return SplitRegex::kLlama3;
  if (pattern == qwen2_pattern()) return SplitRegex::kQwen2;
  return std::nullopt;
}

/// Length (in characters) of a contraction 's 't 're 've 'm 'll 'd at i, or 0. `fold`: the
/// case-insensitive group (?i:...) of Llama 3 / Qwen2, where Oniguruma's case folding also maps
/// U+017F LATIN SMALL LETTER LONG S to s.
inline std::size_t match_contraction(const Chars& c, std::size_t i, bool fold) {
  const std::size_t n = c.size();
  if (c.cp[i] != U'\'' || i + 1 >= n) return 0;
  const auto lower = [&](std::size_t k) -> char32_t {
    const char32_t x = c.cp[k];
    if (!fold) return x;
    if (x >= U'A' && x <= U'Z') return x - U'A' + U'a';
    if (x == 0x17F) return U's';
    return x;
  };
  const char32_t a = lower(i + 1);
  if (a == U's' || a == U't' || a == U'm' || a == U'd') return 2;
  if (i + 2 < n) {
    const char32_t b = lower(i + 2);
    if ((a == U'r' && b == U'e') || (a == U'v' && b == U'e') || (a == U'l' && b == U'l')) return 3;
  }
  return 0;
}

/// Runs the pattern as a leftmost-first regex would over every position (find_iter); returns the
/// matches as byte ranges. Linear in the input: every alternative scans only what its match consumes
/// (plus one character), and a whitespace run is measured once per match.
inline std::vector<std::pair<std::size_t, std::size_t>> scan_split_regex(std::string_view s, SplitRegex kind) {
  const Chars c(s);
  const std::size_t n = c.size();
  std::vector<std::pair<std::size_t, std::size_t>> out;
  const auto is = [&](std::size_t k, unicode::CharClass cls) { return k < n && c.cls[k] == cls; };
  const auto is_other = [&](std::size_t k) {  // [^\s\p{L}\p{N}]
    return k < n && c.cls[k] != unicode::kSpace && c.cls[k] != unicode::kLetter && c.cls[k] != unicode::kNumber;
  };
  const auto run = [&](std::size_t k, auto pred) {
    while (k < n && pred(k)) ++k;
    return k;
  };
  const auto letters = [&](std::size_t k) {
    return run(k, [&](std::size_t j) { return c.cls[j] == unicode::kLetter; });
  };
  const auto spaces = [&](std::size_t k) { return run(k, [&](std::size_t j) { return c.cls[j] == unicode::kSpace; }); };
  const auto is_crlf = [&](std::size_t k) { return k < n && (c.cp[k] == U'\r' || c.cp[k] == U'\n'); };
  const bool llama = kind != SplitRegex::kGpt2;
  const std::size_t max_digits = kind == SplitRegex::kLlama3 ? 3 : (kind == SplitRegex::kQwen2 ? 1 : n);

  std::size_t i = 0;
  while (i < n) {
    std::size_t e = 0;  // end (exclusive, in characters) of the match at i; 0 = none yet
    // 1. contractions
    if (std::size_t len = match_contraction(c, i, llama)) e = i + len;
    if (!e && !llama) {
      // 2.-4. ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
      const std::size_t j = (c.cp[i] == U' ' && i + 1 < n) ? i + 1 : i;
      for (std::size_t start : {j, i}) {
        if (e) break;
        if (start == i + 1 || start == i) {
          if (is(start, unicode::kLetter)) {
            e = letters(start);
          }
        }
      }
      if (!e) {
        for (std::size_t start : {j, i}) {
          if (is(start, unicode::kNumber)) {
            e = run(start, [&](std::size_t k) { return c.cls[k] == unicode::kNumber; });
            break;
          }
        }
      }
      if (!e) {
        for (std::size_t start : {j, i}) {
          if (is_other(start)) {
            e = run(start, is_other);
            break;
          }
        }
      }
    }
    if (!e && llama) {
      // 2. [^\r\n\p{L}\p{N}]?\p{L}+
      const bool prefix_ok = !is_crlf(i) && !is(i, unicode::kLetter) && !is(i, unicode::kNumber);
      if (prefix_ok && is(i + 1, unicode::kLetter)) {
        e = letters(i + 1);
      } else if (is(i, unicode::kLetter)) {
        e = letters(i);
      }
      // 3. \p{N}{1,max}
      if (!e && is(i, unicode::kNumber)) {
        e = i;
        while (e < n && e - i < max_digits && c.cls[e] == unicode::kNumber) ++e;
      }
      // 4. ` ?[^\s\p{L}\p{N}]+[\r\n]*`
      if (!e) {
        const std::size_t start = (c.cp[i] == U' ' && is_other(i + 1)) ? i + 1 : i;
        if (is_other(start)) e = run(run(start, is_other), is_crlf);
      }
      // 5. \s*[\r\n]+ : the whitespace run up to its last CR/LF
      if (!e && is(i, unicode::kSpace)) {
        const std::size_t ws_end = spaces(i);
        for (std::size_t k = ws_end; k > i; --k) {
          if (is_crlf(k - 1)) {
            e = k;
            break;
          }
        }
      }
    }
    // \s+(?!\S) then \s+
    if (!e && is(i, unicode::kSpace)) {
      const std::size_t ws_end = spaces(i);
      if (ws_end == n) {
        e = ws_end;
      } else if (ws_end - i >= 2) {
        e = ws_end - 1;  // back off one so that a space precedes the next word
      } else {
        e = ws_end;
      }
    }
    if (!e) e = i + 1;  // unreachable: every character is L, N, whitespace or other
    out.emplace_back(c.offset[i], c.offset[e]);
    i = e;
  }
  return out;
}

// ---- JSON helpers --------------------------------------------------------------------------------

using JsonMap = nlohmann::json;

struct Ctx {
  std::string label;  // the file
  [[noreturn]] void refuse(const std::string& what) const {
    throw ConfigError("tokenizer \"" + label + "\": " + what + " is not supported");
  }
  [[noreturn]] void bad(const std::string& what) const { throw IoError("tokenizer \"" + label + "\": " + what); }
  const JsonMap& get(const JsonMap& obj, const char* key, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(key)) bad(where + " has no \"" + key + "\"");
    return obj.at(key);
  }
  std::string str(const JsonMap& obj, const char* key, const std::string& where) const {
    const JsonMap& v = get(obj, key, where);
    if (!v.is_string()) bad(where + ": \"" + key + "\" is not a string");
    return v.get<std::string>();
  }
  bool flag(const JsonMap& obj, const char* key, bool fallback, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(key) || obj.at(key).is_null()) return fallback;
    if (!obj.at(key).is_boolean()) bad(where + ": \"" + key + "\" is not a boolean");
    return obj.at(key).get<bool>();
  }
  std::int32_t id(const JsonMap& v, const std::string& where) const {
    if (!v.is_number_integer() || v.get<std::int64_t>() < 0 ||
        v.get<std::int64_t>() > std::numeric_limits<std::int32_t>::max())
      bad(where + ": token id is not an integer in [0, 2^31)");
    return static_cast<std::int32_t>(v.get<std::int64_t>());
  }
  std::string type(const JsonMap& obj, const std::string& where) const {
    if (!obj.is_object()) bad(where + " is not an object");
    return str(obj, "type", where);
  }
};

/// A "pattern" object of Split / Replace: {"String": s} or {"Regex": r}.
struct PatternSpec {
  bool regex = false;
  std::string text;
};

inline PatternSpec read_pattern(const Ctx& ctx, const JsonMap& obj, const std::string& where) {
  const JsonMap& p = ctx.get(obj, "pattern", where);
  if (p.is_object() && p.contains("String") && p.at("String").is_string())
    return {false, p.at("String").get<std::string>()};
  if (p.is_object() && p.contains("Regex") && p.at("Regex").is_string())
    return {true, p.at("Regex").get<std::string>()};
  ctx.bad(where + ": \"pattern\" is neither {\"String\": ...} nor {\"Regex\": ...}");
}

/// Non-overlapping leftmost occurrences of a literal (tokenizers: regex::escape, find_iter).
inline std::vector<std::pair<std::size_t, std::size_t>> find_literal(std::string_view s, const std::string& lit) {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  if (lit.empty()) return out;
  for (std::size_t pos = s.find(lit); pos != std::string_view::npos; pos = s.find(lit, pos + lit.size()))
    out.emplace_back(pos, pos + lit.size());
  return out;
}

inline std::string replace_all(std::string_view s, const std::string& from, const std::string& to) {
  std::string out;
  if (from.empty()) return std::string(s);
  std::size_t prev = 0;
  for (std::size_t pos = s.find(from); pos != std::string_view::npos; pos = s.find(from, pos + from.size())) {
    out.append(s.substr(prev, pos - prev));
    out += to;
    prev = pos + from.size();
  }
  out.append(s.substr(prev));
  return out;
}

// ---- components --------------------------------------------------------------------------------

struct Normalizer {
  enum Kind { kPrepend, kReplace, kNfc } kind;
  std::string a, b;  // Prepend: a = prepend; Replace: a -> b
};

/// A piece of text being pre-tokenized; `at_start`: it begins at offset 0 of the original text
/// (Metaspace's prepend_scheme "first").
struct Piece {
  std::string text;
  bool at_start;
};

struct PreTokenizer {
  enum Kind { kByteLevel, kSplitRegex, kSplitLiteral, kDigits, kMetaspace } kind;
  bool add_prefix_space = false, use_regex = true;             // ByteLevel
  SplitRegex regex = SplitRegex::kGpt2;                        // Split (Regex)
  std::string literal;                                         // Split (String)
  Behavior behavior = Behavior::kIsolated;                     // Split
  bool invert = false;                                         // Split
  bool individual_digits = false;                              // Digits
  std::string replacement;                                     // Metaspace
  enum Prepend { kAlways, kFirst, kNever } prepend = kAlways;  // Metaspace
  bool split = true;                                           // Metaspace
};

struct Decoder {
  enum Kind { kByteLevel, kMetaspace, kReplace, kByteFallback, kFuse, kStrip } kind;
  std::string a, b;  // Replace: a -> b; Metaspace: a = replacement; Strip: a = content
  std::size_t start = 0, stop = 0;
  bool prepend_first_token = true;  // Metaspace: prepend_scheme != never
};

struct MergeEntry {
  std::uint32_t rank;
  std::int32_t new_id;
};

/// A byte trie for leftmost-longest matching of added tokens.
struct Trie {
  struct Node {
    std::map<unsigned char, std::int32_t> next;
    std::int32_t token = -1;  // index into the token list
  };
  std::vector<Node> nodes{Node{}};
  void insert(const std::string& s, std::int32_t token) {
    std::int32_t at = 0;
    for (unsigned char ch : s) {
      auto it = nodes[static_cast<std::size_t>(at)].next.find(ch);
      if (it == nodes[static_cast<std::size_t>(at)].next.end()) {
        nodes.push_back(Node{});
        const auto created = static_cast<std::int32_t>(nodes.size() - 1);
        nodes[static_cast<std::size_t>(at)].next.emplace(ch, created);
        at = created;
      } else {
        at = it->second;
      }
    }
    nodes[static_cast<std::size_t>(at)].token = token;
  }
  bool empty() const { return nodes.size() == 1; }
  /// Longest token starting at s[i]: (token index, length) or (-1, 0).
  std::pair<std::int32_t, std::size_t> longest_at(std::string_view s, std::size_t i) const {
    std::int32_t at = 0;
    std::pair<std::int32_t, std::size_t> best{-1, 0};
    for (std::size_t k = i; k < s.size(); ++k) {
      const auto& next = nodes[static_cast<std::size_t>(at)].next;
      auto it = next.find(static_cast<unsigned char>(s[k]));
      if (it == next.end()) break;
      at = it->second;
      if (nodes[static_cast<std::size_t>(at)].token >= 0) best = {nodes[static_cast<std::size_t>(at)].token, k + 1 - i};
    }
    return best;
  }
};

}  // namespace detail::tok

/// A loaded tokenizer (see the top of this header). Copyable; immutable after loading.
class Tokenizer {
 public:
  /// Reads `tokenizer.json`.
  static Tokenizer from_file(const std::string& path) { return from_json(read_text_file(path), path); }
  /// Parses the text of a tokenizer.json; `label` names it in errors.
  static Tokenizer from_json(const std::string& text, const std::string& label);
  /// A plain byte tokenizer: id b is byte b (0..255), then one id per special token (256, 257, ...),
  /// matched in the text before bytes; decode turns bytes back into text (invalid UTF-8 -> U+FFFD).
  static Tokenizer bytes(const std::vector<std::string>& special_tokens = {}, const std::string& bos = {});

  /// Text -> ids; `add_special_tokens` runs the post-processor (e.g. the BOS of Llama models).
  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  /// Ids -> text; `skip_special_tokens` drops added tokens marked special.
  std::string decode(const std::vector<std::int32_t>& ids, bool skip_special_tokens = false) const;
  /// The pre-tokenizer alone on `text` (no added tokens, no normalizer): its pieces, as
  /// tokenizers' `pre_tokenizer.pre_tokenize_str`.
  std::vector<std::string> pre_tokenize(std::string_view text) const;

  /// Number of ids (model vocabulary and added tokens; the largest id + 1).
  std::size_t vocab_size() const { return id_to_token_.size(); }
  std::optional<std::int32_t> token_to_id(const std::string& token) const;
  /// The token string of `id` (added tokens by content); ConfigError for an unknown id.
  const std::string& id_to_token(std::int32_t id) const;
  const std::vector<AddedToken>& added_tokens() const { return added_; }
  bool is_special(std::int32_t id) const;
  /// Ids the post-processor adds before / after the text with add_special_tokens.
  const std::vector<std::int32_t>& prefix_ids() const { return prefix_; }
  const std::vector<std::int32_t>& suffix_ids() const { return suffix_; }

 private:
  using Pieces = std::vector<detail::tok::Piece>;

  Pieces run_pre_tokenizer(Pieces pieces) const;
  void encode_piece(const std::string& piece, std::vector<std::int32_t>& out) const;
  /// Splits `text` on the added tokens of `trie`: (segment, added-token index or -1, byte offset).
  struct Segment {
    std::string text;
    std::int32_t added;
    bool at_start;
  };
  void split_added(const detail::tok::Trie& trie, const Segment& seg, std::vector<Segment>& out) const;
  std::string normalize(std::string s) const;
  void finish();

  std::string label_;
  bool byte_model_ = false;  // the plain byte tokenizer
  std::unordered_map<std::string, std::int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> present_;  // ids with a token (a vocabulary may have gaps)
  std::unordered_map<std::uint64_t, detail::tok::MergeEntry> merges_;
  std::optional<std::int32_t> unk_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  std::string subword_prefix_, word_suffix_;
  std::vector<std::int32_t> byte_ids_;  // byte_fallback: id of <0xNN>, -1 if absent

  std::vector<AddedToken> added_;
  std::unordered_map<std::int32_t, std::size_t> added_by_id_;
  std::unordered_map<std::int32_t, std::string> added_decode_form_;  // normalized form of normalized tokens
  detail::tok::Trie raw_trie_, normalized_trie_;

  std::vector<detail::tok::Normalizer> normalizers_;
  std::vector<detail::tok::PreTokenizer> pre_;
  std::vector<detail::tok::Decoder> decoders_;
  bool has_decoder_ = false;
  std::vector<std::int32_t> prefix_, suffix_;
};

/// Reads a Hugging Face tokenizer.json (see Tokenizer).
inline Tokenizer load_tokenizer(const std::string& path) { return Tokenizer::from_file(path); }

// The definitions below are compiled once in the project's test build (peft/core/separate.hpp).
#if PEFT_SEPARATE_BODIES

// ---- loading ---------------------------------------------------------------------------------------

namespace detail::tok {

inline void read_normalizer(const Ctx& ctx, const JsonMap& n, std::vector<Normalizer>& out) {
  if (n.is_null()) return;
  const std::string type = ctx.type(n, "normalizer");
  if (type == "Sequence") {
    const JsonMap& list = ctx.get(n, "normalizers", "normalizer Sequence");
    if (!list.is_array()) ctx.bad("normalizer Sequence: \"normalizers\" is not a list");
    for (const JsonMap& item : list) read_normalizer(ctx, item, out);
  } else if (type == "Prepend") {
    out.push_back({Normalizer::kPrepend, ctx.str(n, "prepend", "normalizer Prepend"), {}});
  } else if (type == "NFC") {
    out.push_back({Normalizer::kNfc, {}, {}});
  } else if (type == "Replace") {
    const PatternSpec p = read_pattern(ctx, n, "normalizer Replace");
    if (p.regex) ctx.refuse("normalizer Replace with a Regex pattern (\"" + p.text + "\")");
    out.push_back({Normalizer::kReplace, p.text, ctx.str(n, "content", "normalizer Replace")});
  } else {
    ctx.refuse("normalizer \"" + type + "\"");
  }
}

inline Behavior read_behavior(const Ctx& ctx, const JsonMap& n, const std::string& where) {
  const std::string b = ctx.str(n, "behavior", where);
  if (b == "Removed") return Behavior::kRemoved;
  if (b == "Isolated") return Behavior::kIsolated;
  if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::kMergedWithNext;
  if (b == "Contiguous") return Behavior::kContiguous;
  ctx.refuse(where + " behavior \"" + b + "\"");
}

inline PreTokenizer::Prepend read_prepend_scheme(const Ctx& ctx, const JsonMap& n, const std::string& where) {
  if (n.contains("prepend_scheme")) {
    const std::string s = ctx.str(n, "prepend_scheme", where);
    if (s == "always") return PreTokenizer::kAlways;
    if (s == "first") return PreTokenizer::kFirst;
    if (s == "never") return PreTokenizer::kNever;
    ctx.refuse(where + " prepend_scheme \"" + s + "\"");
  }
  return ctx.flag(n, "add_prefix_space", true, where) ? PreTokenizer::kAlways : PreTokenizer::kNever;  // older files
}

inline std::string read_replacement(const Ctx& ctx, const JsonMap& n, const std::string& where) {
  const std::string r = ctx.str(n, "replacement", where);
  std::size_t len = 0;
  if (r.empty() || first_invalid_utf8(r) != std::string::npos || (utf8_at(r, 0, &len), len != r.size()))
    ctx.bad(where + ": \"replacement\" is not one character");
  return r;
}

inline void read_pre_tokenizer(const Ctx& ctx, const JsonMap& n, std::vector<PreTokenizer>& out) {
  if (n.is_null()) return;
  const std::string type = ctx.type(n, "pre_tokenizer");
  PreTokenizer p{};
  if (type == "Sequence") {
    const JsonMap& list = ctx.get(n, "pretokenizers", "pre_tokenizer Sequence");
    if (!list.is_array()) ctx.bad("pre_tokenizer Sequence: \"pretokenizers\" is not a list");
    for (const JsonMap& item : list) read_pre_tokenizer(ctx, item, out);
    return;
  } else if (type == "ByteLevel") {
    p.kind = PreTokenizer::kByteLevel;
    p.add_prefix_space = ctx.flag(n, "add_prefix_space", true, "pre_tokenizer ByteLevel");
    p.use_regex = ctx.flag(n, "use_regex", true, "pre_tokenizer ByteLevel");
  } else if (type == "Split") {
    const PatternSpec pat = read_pattern(ctx, n, "pre_tokenizer Split");
    p.behavior = read_behavior(ctx, n, "pre_tokenizer Split");
    p.invert = ctx.flag(n, "invert", false, "pre_tokenizer Split");
    if (pat.regex) {
      const std::optional<SplitRegex> kind = recognise_split_regex(pat.text);
      if (!kind)
        ctx.refuse("pre_tokenizer Split regex \"" + pat.text +
                   "\" (only the GPT-2, Llama 3 and Qwen2 split patterns are implemented)");
      p.kind = PreTokenizer::kSplitRegex;
      p.regex = *kind;
    } else {
      p.kind = PreTokenizer::kSplitLiteral;
      p.literal = pat.text;
    }
  } else if (type == "Digits") {
    p.kind = PreTokenizer::kDigits;
    p.individual_digits = ctx.flag(n, "individual_digits", false, "pre_tokenizer Digits");
  } else if (type == "Metaspace") {
    p.kind = PreTokenizer::kMetaspace;
    p.replacement = read_replacement(ctx, n, "pre_tokenizer Metaspace");
    p.prepend = read_prepend_scheme(ctx, n, "pre_tokenizer Metaspace");
    p.split = ctx.flag(n, "split", true, "pre_tokenizer Metaspace");
  } else {
    ctx.refuse("pre_tokenizer \"" + type + "\"");
  }
  out.push_back(std::move(p));
}

inline void read_decoder(const Ctx& ctx, const JsonMap& n, std::vector<Decoder>& out) {
  const std::string type = ctx.type(n, "decoder");
  Decoder d{};
  if (type == "Sequence") {
    const JsonMap& list = ctx.get(n, "decoders", "decoder Sequence");
    if (!list.is_array()) ctx.bad("decoder Sequence: \"decoders\" is not a list");
    for (const JsonMap& item : list) read_decoder(ctx, item, out);
    return;
  } else if (type == "ByteLevel") {
    d.kind = Decoder::kByteLevel;
  } else if (type == "Metaspace") {
    d.kind = Decoder::kMetaspace;
    d.a = read_replacement(ctx, n, "decoder Metaspace");
    d.prepend_first_token = read_prepend_scheme(ctx, n, "decoder Metaspace") != PreTokenizer::kNever;
  } else if (type == "Replace") {
    const PatternSpec p = read_pattern(ctx, n, "decoder Replace");
    if (p.regex) ctx.refuse("decoder Replace with a Regex pattern (\"" + p.text + "\")");
    d.kind = Decoder::kReplace;
    d.a = p.text;
    d.b = ctx.str(n, "content", "decoder Replace");
  } else if (type == "ByteFallback") {
    d.kind = Decoder::kByteFallback;
  } else if (type == "Fuse") {
    d.kind = Decoder::kFuse;
  } else if (type == "Strip") {
    d.kind = Decoder::kStrip;
    d.a = ctx.str(n, "content", "decoder Strip");
    std::size_t len = 0;
    if (d.a.empty() || first_invalid_utf8(d.a) != std::string::npos || (utf8_at(d.a, 0, &len), len != d.a.size()))
      ctx.bad("decoder Strip: \"content\" is not one character");
    const JsonMap& start = ctx.get(n, "start", "decoder Strip");
    const JsonMap& stop = ctx.get(n, "stop", "decoder Strip");
    if (!start.is_number_unsigned() || !stop.is_number_unsigned())
      ctx.bad("decoder Strip: start / stop are not counts");
    d.start = start.get<std::size_t>();
    d.stop = stop.get<std::size_t>();
  } else {
    ctx.refuse("decoder \"" + type + "\"");
  }
  out.push_back(std::move(d));
}

/// The ids a post-processor adds around a single sequence.
inline void read_post_processor(const Ctx& ctx, const JsonMap& n, std::vector<std::int32_t>& prefix,
                                std::vector<std::int32_t>& suffix) {
  if (n.is_null()) return;
  const std::string type = ctx.type(n, "post_processor");
  if (type == "Sequence") {
    const JsonMap& list = ctx.get(n, "processors", "post_processor Sequence");
    if (!list.is_array()) ctx.bad("post_processor Sequence: \"processors\" is not a list");
    for (const JsonMap& item : list) read_post_processor(ctx, item, prefix, suffix);
  } else if (type == "ByteLevel") {
    // offsets only
  } else if (type == "TemplateProcessing") {
    if (!prefix.empty() || !suffix.empty()) ctx.refuse("a post_processor Sequence with two templates");
    const JsonMap& single = ctx.get(n, "single", "post_processor TemplateProcessing");
    const JsonMap& specials = ctx.get(n, "special_tokens", "post_processor TemplateProcessing");
    if (!single.is_array() || !specials.is_object()) ctx.bad("post_processor TemplateProcessing: malformed template");
    bool seen_sequence = false;
    for (const JsonMap& piece : single) {
      if (piece.is_object() && piece.contains("Sequence")) {
        if (seen_sequence) ctx.bad("post_processor TemplateProcessing: two sequences in \"single\"");
        seen_sequence = true;
      } else if (piece.is_object() && piece.contains("SpecialToken")) {
        const std::string name = ctx.str(piece.at("SpecialToken"), "id", "post_processor TemplateProcessing");
        if (!specials.contains(name))
          ctx.bad("post_processor TemplateProcessing: special token \"" + name + "\" undefined");
        const JsonMap& ids = ctx.get(specials.at(name), "ids", "post_processor special token \"" + name + "\"");
        if (!ids.is_array()) ctx.bad("post_processor special token \"" + name + "\": \"ids\" is not a list");
        for (const JsonMap& id : ids) (seen_sequence ? suffix : prefix).push_back(ctx.id(id, "post_processor"));
      } else {
        ctx.bad("post_processor TemplateProcessing: unknown template piece");
      }
    }
  } else if (type == "BertProcessing" || type == "RobertaProcessing") {
    const auto token = [&](const char* key) {
      const JsonMap& v = ctx.get(n, key, "post_processor " + type);
      if (!v.is_array() || v.size() != 2) ctx.bad("post_processor " + type + ": \"" + key + "\" is not [token, id]");
      return ctx.id(v[1], "post_processor " + type);
    };
    prefix.push_back(token("cls"));
    suffix.push_back(token("sep"));
  } else {
    ctx.refuse("post_processor \"" + type + "\"");
  }
}

}  // namespace detail::tok

PEFT_SEPARATE_INLINE Tokenizer Tokenizer::from_json(const std::string& text, const std::string& label) {
  using detail::tok::JsonMap;
  const detail::tok::Ctx ctx{label};
  const JsonMap root = parse_json_strict<nlohmann::json>(text.data(), text.data() + text.size(), label);
  if (!root.is_object()) ctx.bad("the document is not an object");
  Tokenizer t;
  t.label_ = label;

  // model
  const JsonMap& model = ctx.get(root, "model", "the document");
  if (!model.is_object()) ctx.bad("\"model\" is not an object");
  std::string model_type = model.is_object() && model.contains("type") && model.at("type").is_string()
                               ? model.at("type").get<std::string>()
                               : std::string();
  if (model_type.empty() && model.is_object() && model.contains("merges")) model_type = "BPE";  // old files
  if (model_type != "BPE") ctx.refuse("model \"" + model_type + "\" (only BPE is implemented)");
  if (model.contains("dropout") && !model.at("dropout").is_null() &&
      !(model.at("dropout").is_number() && model.at("dropout").get<double>() == 0.0))
    ctx.refuse("BPE dropout");
  const JsonMap& vocab = ctx.get(model, "vocab", "model");
  if (!vocab.is_object()) ctx.bad("model: \"vocab\" is not an object");
  std::int32_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const std::int32_t id = ctx.id(it.value(), "model vocab \"" + it.key() + "\"");
    t.vocab_[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  t.fuse_unk_ = ctx.flag(model, "fuse_unk", false, "model");
  t.byte_fallback_ = ctx.flag(model, "byte_fallback", false, "model");
  t.ignore_merges_ = ctx.flag(model, "ignore_merges", false, "model");
  if (model.contains("unk_token") && !model.at("unk_token").is_null()) {
    const std::string unk = ctx.str(model, "unk_token", "model");
    const auto it = t.vocab_.find(unk);
    if (it == t.vocab_.end()) ctx.bad("model: unk_token \"" + unk + "\" is not in the vocabulary");
    t.unk_ = it->second;
  }
  if (model.contains("continuing_subword_prefix") && !model.at("continuing_subword_prefix").is_null())
    t.subword_prefix_ = ctx.str(model, "continuing_subword_prefix", "model");
  if (model.contains("end_of_word_suffix") && !model.at("end_of_word_suffix").is_null())
    t.word_suffix_ = ctx.str(model, "end_of_word_suffix", "model");
  const JsonMap& merges = ctx.get(model, "merges", "model");
  if (!merges.is_array()) ctx.bad("model: \"merges\" is not a list");
  std::uint32_t rank = 0;
  for (const JsonMap& m : merges) {
    if (m.is_string() != merges.front().is_string())  // tokenizers takes all strings or all pairs
      ctx.bad("merges mix the \"a b\" and [a, b] forms");
    std::string a, b;
    if (m.is_string()) {  // "a b"
      const std::string s = m.get<std::string>();
      if (s.compare(0, 8, "#version") == 0) continue;  // as tokenizers' convert_merges_to_hashmap
      const std::size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
        ctx.bad("merge " + std::to_string(rank) + " \"" + s + "\" is not two tokens separated by one space");
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      ctx.bad("merge " + std::to_string(rank) + " is neither \"a b\" nor [a, b]");
    }
    const auto ia = t.vocab_.find(a), ib = t.vocab_.find(b), iab = t.vocab_.find(a + b);
    if (ia == t.vocab_.end() || ib == t.vocab_.end() || iab == t.vocab_.end())
      ctx.bad("merge " + std::to_string(rank) + " (\"" + a + "\", \"" + b + "\") uses a token not in the vocabulary");
    const std::uint64_t key = (static_cast<std::uint64_t>(ia->second) << 32) | static_cast<std::uint32_t>(ib->second);
    t.merges_[key] = {rank, iab->second};
    ++rank;
  }

  // added tokens
  if (root.contains("added_tokens") && !root.at("added_tokens").is_null()) {
    const JsonMap& list = root.at("added_tokens");
    if (!list.is_array()) ctx.bad("\"added_tokens\" is not a list");
    for (const JsonMap& a : list) {
      AddedToken tok;
      tok.content = ctx.str(a, "content", "added token");
      tok.id = ctx.id(ctx.get(a, "id", "added token \"" + tok.content + "\""), "added token \"" + tok.content + "\"");
      const std::string where = "added token \"" + tok.content + "\"";
      tok.special = ctx.flag(a, "special", false, where);
      tok.single_word = ctx.flag(a, "single_word", false, where);
      tok.lstrip = ctx.flag(a, "lstrip", false, where);
      tok.rstrip = ctx.flag(a, "rstrip", false, where);
      tok.normalized = ctx.flag(a, "normalized", !tok.special, where);
      if (tok.content.empty()) continue;
      max_id = std::max(max_id, tok.id);
      t.added_.push_back(std::move(tok));
    }
  }

  detail::tok::read_normalizer(ctx, root.contains("normalizer") ? root.at("normalizer") : JsonMap(), t.normalizers_);
  detail::tok::read_pre_tokenizer(ctx, root.contains("pre_tokenizer") ? root.at("pre_tokenizer") : JsonMap(), t.pre_);
  if (root.contains("decoder") && !root.at("decoder").is_null()) {
    detail::tok::read_decoder(ctx, root.at("decoder"), t.decoders_);
    t.has_decoder_ = true;
  }
  detail::tok::read_post_processor(ctx, root.contains("post_processor") ? root.at("post_processor") : JsonMap(),
                                   t.prefix_, t.suffix_);
  for (const char* key : {"truncation", "padding"})
    if (root.contains(key) && !root.at(key).is_null()) ctx.refuse(std::string("\"") + key + "\" (set it to null)");

  const std::size_t n_tokens = t.vocab_.size() + t.added_.size();
  if (max_id >= 0 && static_cast<std::size_t>(max_id) >= n_tokens + kMaxTokenizerIdSlack)
    ctx.bad("token id " + std::to_string(max_id) + " is beyond the " + std::to_string(n_tokens) +
            " tokens of the file by more than kMaxTokenizerIdSlack (" + std::to_string(kMaxTokenizerIdSlack) + ")");
  t.id_to_token_.assign(static_cast<std::size_t>(max_id + 1), std::string());
  t.present_.assign(t.id_to_token_.size(), false);
  for (const auto& kv : t.vocab_) {
    t.id_to_token_[static_cast<std::size_t>(kv.second)] = kv.first;
    t.present_[static_cast<std::size_t>(kv.second)] = true;
  }
  t.finish();
  for (std::int32_t id : t.prefix_)
    if (static_cast<std::size_t>(id) >= t.id_to_token_.size())
      ctx.bad("post_processor: id " + std::to_string(id) + " out of range");
  for (std::int32_t id : t.suffix_)
    if (static_cast<std::size_t>(id) >= t.id_to_token_.size())
      ctx.bad("post_processor: id " + std::to_string(id) + " out of range");
  return t;
}

PEFT_SEPARATE_INLINE Tokenizer Tokenizer::bytes(const std::vector<std::string>& special_tokens,
                                                const std::string& bos) {
  Tokenizer t;
  t.label_ = "bytes";
  t.byte_model_ = true;
  t.id_to_token_.resize(256);
  for (int b = 0; b < 256; ++b) t.id_to_token_[static_cast<std::size_t>(b)] = std::string(1, static_cast<char>(b));
  for (const std::string& s : special_tokens) {
    if (s.empty()) throw ConfigError("byte tokenizer: empty special token");
    for (const AddedToken& a : t.added_)
      if (a.content == s) throw ConfigError("byte tokenizer: special token \"" + s + "\" given twice");
    AddedToken tok;
    tok.content = s;
    tok.id = static_cast<std::int32_t>(256 + t.added_.size());
    tok.special = true;
    t.added_.push_back(tok);
  }
  t.id_to_token_.resize(256 + t.added_.size());
  t.present_.assign(t.id_to_token_.size(), true);
  t.finish();
  if (!bos.empty()) {
    const std::optional<std::int32_t> id = t.token_to_id(bos);
    if (!id || *id < 256) throw ConfigError("byte tokenizer: bos \"" + bos + "\" is not one of its special tokens");
    t.prefix_.push_back(*id);
  }
  return t;
}

PEFT_SEPARATE_INLINE void Tokenizer::finish() {
  for (std::size_t k = 0; k < added_.size(); ++k) {
    AddedToken& a = added_[k];
    added_by_id_[a.id] = k;
    id_to_token_[static_cast<std::size_t>(a.id)] = a.content;
    present_[static_cast<std::size_t>(a.id)] = true;
    if (a.normalized && !normalizers_.empty()) {
      std::string n = normalize(a.content);
      if (n != a.content) added_decode_form_[a.id] = n;
      normalized_trie_.insert(n, static_cast<std::int32_t>(k));
    } else if (a.normalized) {
      normalized_trie_.insert(a.content, static_cast<std::int32_t>(k));
    } else {
      raw_trie_.insert(a.content, static_cast<std::int32_t>(k));
    }
  }
  if (byte_fallback_) {
    byte_ids_.assign(256, -1);
    static const char* hex = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) {
      const std::string name = std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">";
      const auto it = vocab_.find(name);
      if (it != vocab_.end()) byte_ids_[static_cast<std::size_t>(b)] = it->second;
    }
  }
}

// ---- encoding ------------------------------------------------------------------------------------

PEFT_SEPARATE_INLINE std::string Tokenizer::normalize(std::string s) const {
  for (const detail::tok::Normalizer& n : normalizers_) {
    if (n.kind == detail::tok::Normalizer::kPrepend) {
      if (!s.empty()) s = n.a + s;
    } else if (n.kind == detail::tok::Normalizer::kNfc) {
      s = detail::tok::nfc(s);
    } else {
      s = detail::tok::replace_all(s, n.a, n.b);
    }
  }
  return s;
}

PEFT_SEPARATE_INLINE void Tokenizer::split_added(const detail::tok::Trie& trie, const Segment& seg,
                                                 std::vector<Segment>& out) const {
  const std::string& s = seg.text;
  const auto emit = [&](std::size_t begin, std::size_t end, std::int32_t added) {
    if (begin < end) out.push_back({s.substr(begin, end - begin), added, seg.at_start && begin == 0});
  };
  if (trie.empty()) {
    emit(0, s.size(), -1);
    return;
  }
  // tokenizers' AddedVocabulary::find_matches over a leftmost-longest Aho-Corasick iterator: a
  // discarded match (single_word) still moves the search past its end.
  std::size_t start_offset = 0;
  std::size_t i = 0;
  while (i < s.size()) {
    const std::pair<std::int32_t, std::size_t> m = trie.longest_at(s, i);
    if (m.first < 0) {
      ++i;
      continue;
    }
    std::size_t start = i, stop = i + m.second;
    i = stop;
    const AddedToken& tok = added_[static_cast<std::size_t>(m.first)];
    if (tok.single_word) {
      bool start_space = true, stop_space = true;
      if (start > 0) {
        std::size_t b = start - 1;
        while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
        std::size_t len = 0;
        start_space = !detail::tok::is_word_char(detail::tok::utf8_at(s, b, &len));
      }
      if (stop < s.size()) {
        std::size_t len = 0;
        stop_space = !detail::tok::is_word_char(detail::tok::utf8_at(s, stop, &len));
      }
      if (!start_space || !stop_space) continue;
    }
    if (tok.lstrip) {
      std::size_t b = start;
      while (b > 0) {
        std::size_t p = b - 1;
        while (p > 0 && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
        std::size_t len = 0;
        if (detail::tok::char_class(detail::tok::utf8_at(s, p, &len)) != unicode::kSpace) break;
        b = p;
      }
      start = std::max(b, start_offset);
    }
    if (tok.rstrip) {
      while (stop < s.size()) {
        std::size_t len = 0;
        if (detail::tok::char_class(detail::tok::utf8_at(s, stop, &len)) != unicode::kSpace) break;
        stop += len;
      }
      i = std::max(i, stop);
    }
    emit(start_offset, start, -1);
    out.push_back({s.substr(start, stop - start), m.first, seg.at_start && start == 0});
    start_offset = stop;
  }
  emit(start_offset, s.size(), -1);
}

PEFT_SEPARATE_INLINE Tokenizer::Pieces Tokenizer::run_pre_tokenizer(Pieces pieces) const {
  using namespace detail::tok;
  for (const PreTokenizer& p : pre_) {
    Pieces next;
    next.reserve(pieces.size());
    const auto split_by = [&](const Piece& piece, const std::vector<std::pair<std::size_t, std::size_t>>& matches,
                              Behavior behavior, bool invert) {
      const std::vector<Span> spans = spans_from_matches(matches, piece.text.size(), invert);
      for (const auto& r : apply_behavior(spans, behavior))
        if (r.first < r.second)
          next.push_back({piece.text.substr(r.first, r.second - r.first), piece.at_start && r.first == 0});
    };
    for (Piece& piece : pieces) {
      switch (p.kind) {
        case PreTokenizer::kByteLevel: {
          if (p.add_prefix_space && (piece.text.empty() || piece.text[0] != ' ')) piece.text.insert(0, 1, ' ');
          const std::size_t first = next.size();
          if (p.use_regex) {
            split_by(piece, scan_split_regex(piece.text, SplitRegex::kGpt2), Behavior::kIsolated, false);
          } else if (!piece.text.empty()) {
            next.push_back(piece);
          }
          const auto& map = byte_to_unicode();
          for (std::size_t k = first; k < next.size(); ++k) {
            std::string mapped;
            mapped.reserve(next[k].text.size() * 2);
            for (unsigned char ch : next[k].text) mapped += map[ch];
            next[k].text = std::move(mapped);
          }
          break;
        }
        case PreTokenizer::kSplitRegex:
          split_by(piece, scan_split_regex(piece.text, p.regex), p.behavior, p.invert);
          break;
        case PreTokenizer::kSplitLiteral:
          split_by(piece, find_literal(piece.text, p.literal), p.behavior, p.invert);
          break;
        case PreTokenizer::kDigits: {
          std::vector<std::pair<std::size_t, std::size_t>> matches;
          for (std::size_t i = 0; i < piece.text.size();) {
            std::size_t len = 0;
            const char32_t c = utf8_at(piece.text, i, &len);
            if (char_class(c) == unicode::kNumber) matches.emplace_back(i, i + len);
            i += len;
          }
          split_by(piece, matches, p.individual_digits ? Behavior::kIsolated : Behavior::kContiguous, false);
          break;
        }
        case PreTokenizer::kMetaspace: {
          piece.text = replace_all(piece.text, " ", p.replacement);
          const bool starts = piece.text.compare(0, p.replacement.size(), p.replacement) == 0;
          if (!starts && (p.prepend == PreTokenizer::kAlways || (p.prepend == PreTokenizer::kFirst && piece.at_start)))
            piece.text.insert(0, p.replacement);
          if (p.split) {
            split_by(piece, find_literal(piece.text, p.replacement), Behavior::kMergedWithNext, false);
          } else if (!piece.text.empty()) {
            next.push_back(piece);
          }
          break;
        }
      }
    }
    pieces = std::move(next);
  }
  return pieces;
}

PEFT_SEPARATE_INLINE void Tokenizer::encode_piece(const std::string& w, std::vector<std::int32_t>& out) const {
  if (w.empty()) return;
  if (ignore_merges_) {
    const auto it = vocab_.find(w);
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // BPE::merge_word: one symbol per character (byte_fallback: per byte of an unknown character),
  // unknown characters -> unk (fused when fuse_unk), then merge_all.
  struct Symbol {
    std::int32_t id;
    std::int64_t prev, next;
    bool alive;
  };
  std::vector<Symbol> sym;
  sym.reserve(w.size());
  const auto add = [&](std::int32_t id) {
    const auto k = static_cast<std::int64_t>(sym.size());
    sym.push_back({id, k - 1, -1, true});
    if (k > 0) sym[static_cast<std::size_t>(k - 1)].next = k;
  };
  std::int32_t pending_unk = -1;  // an unk not yet added (fuse_unk extends it)
  std::string s;
  for (std::size_t i = 0; i < w.size();) {
    std::size_t len = 0;
    detail::tok::utf8_at(w, i, &len);
    s.assign(w, i, len);
    if (i > 0 && !subword_prefix_.empty()) s = subword_prefix_ + s;
    if (i + len == w.size() && !word_suffix_.empty()) s += word_suffix_;
    i += len;
    const auto it = vocab_.find(s);
    if (it != vocab_.end()) {
      if (pending_unk >= 0) add(pending_unk);
      pending_unk = -1;
      add(it->second);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char ch : s) all = all && byte_ids_[ch] >= 0;
      if (all) {
        for (unsigned char ch : s) add(byte_ids_[ch]);
        continue;
      }
    }
    if (unk_) {
      if (pending_unk >= 0 && !fuse_unk_) add(pending_unk);
      pending_unk = *unk_;
    }
  }
  if (pending_unk >= 0) add(pending_unk);

  struct Merge {
    std::uint32_t rank;
    std::size_t pos;
    std::int32_t new_id;
    bool operator>(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const auto find = [&](std::int32_t a, std::int32_t b) -> const detail::tok::MergeEntry* {
    const auto it = merges_.find((static_cast<std::uint64_t>(a) << 32) | static_cast<std::uint32_t>(b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  std::vector<Merge> heap_storage;
  heap_storage.reserve(sym.size());
  std::priority_queue<Merge, std::vector<Merge>, std::greater<Merge>> queue(std::greater<Merge>(),
                                                                            std::move(heap_storage));
  for (std::size_t k = 0; k + 1 < sym.size(); ++k)
    if (const auto* m = find(sym[k].id, sym[k + 1].id)) queue.push({m->rank, k, m->new_id});
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& cur = sym[top.pos];
    if (!cur.alive || cur.next < 0) continue;
    const auto right_pos = static_cast<std::size_t>(cur.next);
    const auto* m = find(cur.id, sym[right_pos].id);
    if (!m || m->new_id != top.new_id) continue;  // an expired entry
    cur.id = top.new_id;
    cur.next = sym[right_pos].next;
    sym[right_pos].alive = false;
    if (cur.next >= 0) sym[static_cast<std::size_t>(cur.next)].prev = static_cast<std::int64_t>(top.pos);
    if (cur.prev >= 0) {
      const auto prev = static_cast<std::size_t>(cur.prev);
      if (const auto* pm = find(sym[prev].id, cur.id)) queue.push({pm->rank, prev, pm->new_id});
    }
    if (cur.next >= 0) {
      if (const auto* nm = find(cur.id, sym[static_cast<std::size_t>(cur.next)].id))
        queue.push({nm->rank, top.pos, nm->new_id});
    }
  }
  for (const Symbol& x : sym)
    if (x.alive) out.push_back(x.id);
}

PEFT_SEPARATE_INLINE std::vector<std::int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const std::size_t bad = detail::tok::first_invalid_utf8(text);
  if (bad != std::string_view::npos)
    throw IoError("tokenizer \"" + label_ + "\": text is not valid UTF-8 at byte " + std::to_string(bad));
  std::vector<std::int32_t> out;
  if (add_special_tokens) out = prefix_;
  std::vector<Segment> raw;
  split_added(raw_trie_, Segment{std::string(text), -1, true}, raw);
  std::vector<Segment> normalized;
  for (const Segment& seg : raw) {
    if (seg.added >= 0) {
      out.push_back(added_[static_cast<std::size_t>(seg.added)].id);
      continue;
    }
    if (byte_model_) {
      for (unsigned char ch : seg.text) out.push_back(ch);
      continue;
    }
    normalized.clear();
    split_added(normalized_trie_, Segment{normalize(seg.text), -1, seg.at_start}, normalized);
    for (const Segment& part : normalized) {
      if (part.added >= 0) {
        out.push_back(added_[static_cast<std::size_t>(part.added)].id);
        continue;
      }
      for (const detail::tok::Piece& piece : run_pre_tokenizer({{part.text, part.at_start}}))
        encode_piece(piece.text, out);
    }
  }
  if (add_special_tokens) out.insert(out.end(), suffix_.begin(), suffix_.end());
  return out;
}

PEFT_SEPARATE_INLINE std::vector<std::string> Tokenizer::pre_tokenize(std::string_view text) const {
  std::vector<std::string> out;
  if (text.empty()) return out;
  for (detail::tok::Piece& p : run_pre_tokenizer({{std::string(text), true}})) out.push_back(std::move(p.text));
  return out;
}

// ---- decoding ------------------------------------------------------------------------------------

PEFT_SEPARATE_INLINE std::optional<std::int32_t> Tokenizer::token_to_id(const std::string& token) const {
  for (const AddedToken& a : added_)
    if (a.content == token) return a.id;
  const auto it = vocab_.find(token);
  if (it != vocab_.end()) return it->second;
  return std::nullopt;
}

PEFT_SEPARATE_INLINE const std::string& Tokenizer::id_to_token(std::int32_t id) const {
  if (id < 0 || static_cast<std::size_t>(id) >= id_to_token_.size() || !present_[static_cast<std::size_t>(id)])
    throw ConfigError("tokenizer \"" + label_ + "\": id " + std::to_string(id) + " is not in the vocabulary of " +
                      std::to_string(id_to_token_.size()));
  return id_to_token_[static_cast<std::size_t>(id)];
}

PEFT_SEPARATE_INLINE bool Tokenizer::is_special(std::int32_t id) const {
  const auto it = added_by_id_.find(id);
  return it != added_by_id_.end() && added_[it->second].special;
}

PEFT_SEPARATE_INLINE std::string Tokenizer::decode(const std::vector<std::int32_t>& ids,
                                                   bool skip_special_tokens) const {
  using namespace detail::tok;
  std::vector<std::string> special_contents;
  for (const AddedToken& a : added_)
    if (a.special) special_contents.push_back(a.content);
  const auto is_special_text = [&](const std::string& t) {
    return std::find(special_contents.begin(), special_contents.end(), t) != special_contents.end();
  };
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (std::int32_t id : ids) {
    if (id < 0 || static_cast<std::size_t>(id) >= id_to_token_.size() || !present_[static_cast<std::size_t>(id)])
      continue;  // tokenizers drops ids it does not know
    const auto form = added_decode_form_.find(id);
    const std::string& t = form != added_decode_form_.end() ? form->second : id_to_token_[static_cast<std::size_t>(id)];
    if (skip_special_tokens && is_special_text(t)) continue;
    tokens.push_back(t);
  }
  if (byte_model_) {
    std::string bytes;
    for (const std::string& t : tokens) bytes += t;
    return utf8_lossy(bytes);
  }
  if (!has_decoder_) {
    std::string out;
    for (std::size_t k = 0; k < tokens.size(); ++k) out += (k ? " " : "") + tokens[k];
    return out;
  }
  for (const Decoder& d : decoders_) {
    std::vector<std::string> next;
    switch (d.kind) {
      case Decoder::kByteLevel: {
        std::string bytes;
        for (const std::string& t : tokens) {
          std::string mapped;
          bool ok = true;
          for (std::size_t i = 0; i < t.size() && ok;) {
            std::size_t len = 0;
            const int b = unicode_to_byte(utf8_at(t, i, &len));
            if (b < 0)
              ok = false;
            else
              mapped.push_back(static_cast<char>(b));
            i += len;
          }
          bytes += ok ? mapped : t;
        }
        next.push_back(utf8_lossy(bytes));
        break;
      }
      case Decoder::kMetaspace:
        for (std::size_t k = 0; k < tokens.size(); ++k)
          next.push_back(replace_all(tokens[k], d.a, k == 0 && d.prepend_first_token ? "" : " "));
        break;
      case Decoder::kReplace:
        for (const std::string& t : tokens) next.push_back(replace_all(t, d.a, d.b));
        break;
      case Decoder::kByteFallback: {
        std::string pending;
        const auto flush = [&] {
          if (pending.empty()) return;
          if (first_invalid_utf8(pending) == std::string::npos) {
            next.push_back(pending);
          } else {
            for (std::size_t k = 0; k < pending.size(); ++k) next.push_back("\xEF\xBF\xBD");
          }
          pending.clear();
        };
        const auto hex = [](char ch) {
          if (ch >= '0' && ch <= '9') return ch - '0';
          if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
          if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
          return -1;
        };
        for (const std::string& t : tokens) {
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && hex(t[3]) >= 0 && hex(t[4]) >= 0) {
            pending.push_back(static_cast<char>(hex(t[3]) * 16 + hex(t[4])));
          } else {
            flush();
            next.push_back(t);
          }
        }
        flush();
        break;
      }
      case Decoder::kFuse: {
        std::string all;
        for (const std::string& t : tokens) all += t;
        next.push_back(std::move(all));
        break;
      }
      case Decoder::kStrip:
        for (const std::string& t : tokens) {
          std::vector<std::size_t> starts;  // byte offset of each character
          for (std::size_t i = 0; i < t.size();) {
            std::size_t len = 0;
            utf8_at(t, i, &len);
            starts.push_back(i);
            i += len;
          }
          const std::size_t n = starts.size();
          const auto is_content = [&](std::size_t k) {
            const std::size_t end = k + 1 < n ? starts[k + 1] : t.size();
            return t.compare(starts[k], end - starts[k], d.a) == 0;
          };
          std::size_t start_cut = 0, stop_cut = n;
          for (std::size_t k = 0; k < std::min(d.start, n) && is_content(k); ++k) start_cut = k + 1;
          for (std::size_t k = 0; k < std::min(d.stop, n) && is_content(n - k - 1); ++k) stop_cut = n - k - 1;
          if (start_cut >= stop_cut) {
            next.emplace_back();
          } else {
            const std::size_t b = starts[start_cut], e = stop_cut < n ? starts[stop_cut] : t.size();
            next.push_back(t.substr(b, e - b));
          }
        }
        break;
    }
    tokens = std::move(next);
  }
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

#endif  // PEFT_SEPARATE_BODIES

}  // namespace peft::io
