#pragma once
// PEFT's rank_pattern / alpha_pattern: an ordered map from pattern keys to values, with the lookup
// of Hugging Face PEFT's get_pattern_key (peft/utils/other.py) followed by the dict lookup of its
// callers (lora/model.py: `rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), r)`):
//
//   1. the first key k, in insertion (= file) order, for which re.match(r"(.*\.)?(k)$", path)
//      succeeds gives the value;
//   2. otherwise get_pattern_key returns the path itself, so a key spelled exactly like the path
//      still gives its value (it matters only for keys whose regex does not match their own text);
//   3. otherwise none: the caller's default (r, lora_alpha).
//
// Each key is compiled at most once, when it is added, and a lookup tries each key at most once:
// a config with 10 000 keys over 200 modules costs at most 10 000 compilations and 2·10⁶ tests,
// not 10 000 compilations per module. Keys made only of literal characters and `.` (what PEFT
// and our tools write: module paths) are always valid patterns and are not compiled at all: they
// are tested by the equivalent rule "the path ends with the key, `.` matching any one character,
// at the start or after a dot" (only a path with non-ASCII characters or a newline, where `.`
// spans a code point, sends such a key through the regex engine, compiled for that call).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/regex.hpp"

namespace peft {

namespace detail {

/// Key tests made by PatternMap lookups (both paths), process-wide: for tests that bound the work
/// per module, next to regex_counters().
inline std::atomic<std::uint64_t>& pattern_key_tests() {
  static std::atomic<std::uint64_t> tests{0};
  return tests;
}

/// A pattern key with no regex syntax but `.`: characters that stand for themselves in Python's
/// re, ASCII only (a `.` over a multi-byte character is left to the regex engine).
inline bool is_plain_pattern_key(const std::string& key) {
  if (key.empty()) return false;
  for (const char ch : key) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c >= 0x7F || std::string_view("^$*+?{}[]\\|()").find(ch) != std::string_view::npos) return false;
  }
  return true;
}

/// re.match(r"(.*\.)?(key)$", path) for a plain key over an ASCII path without newlines: the key
/// takes exactly the last |key| characters (`.` matching any), and what precedes is empty or
/// ends with a dot (`.*` covers the rest, as the path has no newline).
inline bool plain_pattern_key_matches(const std::string& key, const std::string& path) {
  if (path.size() < key.size()) return false;
  const std::size_t start = path.size() - key.size();
  if (start > 0 && path[start - 1] != '.') return false;
  for (std::size_t i = 0; i < key.size(); ++i)
    if (key[i] != '.' && key[i] != path[start + i]) return false;
  return true;
}

}  // namespace detail

/// rank_pattern / alpha_pattern (see the file comment). Keeps insertion order; compiles on insert,
/// so an invalid key is a ConfigError at the point it is added.
template <class V>
class PatternMap {
 public:
  using value_type = std::pair<std::string, V>;
  using const_iterator = typename std::vector<value_type>::const_iterator;

  PatternMap() = default;
  PatternMap(std::initializer_list<value_type> entries) {
    for (const auto& e : entries) add(e.first, e.second);
  }

  /// Appends `key` → `value`; ConfigError naming `who` when the key is not a valid pattern.
  void add(const std::string& key, V value, const std::string& who = "rank_pattern / alpha_pattern") {
    Compiled c;
    c.plain = detail::is_plain_pattern_key(key) && wrapped(key).size() <= kMaxRegexPattern;
    if (!c.plain) c.re = std::make_shared<const Regex>(compile_name_regex(wrapped(key), who));
    exact_.emplace(key, entries_.size());  // keeps the first index of a repeated key
    entries_.emplace_back(key, std::move(value));
    compiled_.push_back(std::move(c));
  }
  void emplace_back(const std::string& key, V value) { add(key, std::move(value)); }
  void push_back(const value_type& e) { add(e.first, e.second); }
  void clear() {
    entries_.clear();
    compiled_.clear();
    exact_.clear();
  }

  std::size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  const_iterator begin() const { return entries_.begin(); }
  const_iterator end() const { return entries_.end(); }
  const value_type& operator[](std::size_t i) const { return entries_[i]; }
  const std::vector<value_type>& entries() const { return entries_; }

  /// The value PEFT gives the module at `path`, or nullptr (use the default). ConfigError naming
  /// `who` when the path is longer than regex matching allows (kMaxRegexSubject).
  const V* find(const std::string& path, const std::string& who = "rank_pattern / alpha_pattern") const {
    if (entries_.empty()) return nullptr;
    detail::check_regex_subject(path, who);
    bool plain_path = true;  // ASCII without newlines: plain keys may skip the regex engine
    for (const char ch : path) {
      const auto c = static_cast<unsigned char>(ch);
      if (c >= 0x80 || c == '\n') plain_path = false;
    }
    std::uint64_t tests = 0;
    const V* hit = nullptr;
    for (std::size_t i = 0; i < entries_.size() && hit == nullptr; ++i) {
      ++tests;
      const Compiled& c = compiled_[i];
      bool m = false;
      if (!c.plain)
        m = c.re->match(path);
      else if (plain_path)
        m = detail::plain_pattern_key_matches(entries_[i].first, path);
      else
        m = compile_name_regex(wrapped(entries_[i].first), who).match(path);
      if (m) hit = &entries_[i].second;
    }
    detail::pattern_key_tests().fetch_add(tests, std::memory_order_relaxed);
    if (hit) return hit;
    const auto it = exact_.find(path);
    return it == exact_.end() ? nullptr : &entries_[it->second].second;
  }

  friend bool operator==(const PatternMap& a, const PatternMap& b) { return a.entries_ == b.entries_; }
  friend bool operator!=(const PatternMap& a, const PatternMap& b) { return !(a == b); }

 private:
  /// PEFT's get_pattern_key regex for `key`, the same text: re.match(rf"(.*\.)?({key})$", path). Not
  /// a fullmatch of "(.*\.)?(key)": a key may close the group itself ("a)|(b"), and Python's `$`
  /// also matches before a final newline.
  static std::string wrapped(const std::string& key) { return "(.*\\.)?(" + key + ")$"; }

  struct Compiled {
    std::shared_ptr<const Regex> re;  // null for plain keys; shared: copying a config copies no programs
    bool plain = false;
  };
  std::vector<value_type> entries_;
  std::vector<Compiled> compiled_;
  std::unordered_map<std::string, std::size_t> exact_;
};

}  // namespace peft
