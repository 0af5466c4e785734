#pragma once
// Regular expressions over module and parameter names, with limits that make hostile input safe.
//
// Patterns come from files (adapter_config.json's target_modules, rank_pattern, ...) and names
// from tensor headers, so both may be hostile. libstdc++'s std::regex compiles and matches by
// recursion and expands counted repeats into copies of the automaton, so a pattern nested a few
// thousand groups deep, a repeat like `(a{1000}){1000}` or a name of a million characters would
// overflow the stack or exhaust memory. compile_name_regex therefore refuses patterns longer than
// kMaxRegexPattern characters, nested deeper than kMaxRegexNesting groups, or whose expanded size
// (each atom times its repeat count, through the nesting) exceeds kMaxRegexExpansion; the
// matchers refuse names longer than kMaxRegexSubject. Real module paths and PEFT patterns are
// far inside these limits. Everything throws ConfigError naming `who`.
#include <cstddef>
#include <regex>
#include <string>

#include "peft/core/error.hpp"

namespace peft {

constexpr std::size_t kMaxRegexPattern = 1024;    ///< characters of a pattern
constexpr int kMaxRegexNesting = 16;              ///< nested groups
constexpr double kMaxRegexExpansion = 1e4;        ///< atoms after expanding counted repeats
constexpr std::size_t kMaxRegexSubject = 1024;    ///< characters of a name matched against a pattern

namespace detail {

/// Estimates the expanded size of an ECMAScript pattern (sequence of atoms, each times its
/// repeat count) and its group nesting; malformed syntax is left for std::regex to report.
class RegexShape {
 public:
  explicit RegexShape(const std::string& p) : p_(p) {}

  /// Expanded size of the whole pattern; sets max_depth().
  double measure() {
    const double n = alternation(0);
    while (i_ < p_.size()) {  // an unbalanced ')': skip it, std::regex rejects the pattern
      ++i_;
      alternation(0);
    }
    return n;
  }
  int max_depth() const { return max_depth_; }

 private:
  double alternation(int depth) {
    double best = sequence(depth);
    while (i_ < p_.size() && p_[i_] == '|') {
      ++i_;
      const double n = sequence(depth);
      best += n;  // alternatives all become part of the automaton
    }
    return best;
  }

  double sequence(int depth) {
    double total = 0;
    while (i_ < p_.size() && p_[i_] != '|' && p_[i_] != ')') {
      const double atom_size = atom(depth);
      total += atom_size * repeat();
      if (total > kMaxRegexExpansion) return total;  // no need to look further
    }
    return total;
  }

  double atom(int depth) {
    const char c = p_[i_++];
    if (c == '\\') {
      if (i_ < p_.size()) ++i_;
      return 1;
    }
    if (c == '[') {  // a class is one atom; skip to its closing bracket
      if (i_ < p_.size() && p_[i_] == '^') ++i_;
      if (i_ < p_.size() && p_[i_] == ']') ++i_;
      while (i_ < p_.size() && p_[i_] != ']') i_ += (p_[i_] == '\\' && i_ + 1 < p_.size()) ? 2 : 1;
      if (i_ < p_.size()) ++i_;
      return 1;
    }
    if (c == '(') {
      if (depth + 1 > max_depth_) max_depth_ = depth + 1;
      if (depth + 1 > kMaxRegexNesting) {  // stop descending: the caller rejects the pattern
        i_ = p_.size();
        return 1;
      }
      if (i_ + 1 < p_.size() && p_[i_] == '?') i_ += 2;  // (?: (?= (?!
      const double inner = alternation(depth + 1);
      if (i_ < p_.size() && p_[i_] == ')') ++i_;
      return inner + 1;
    }
    return 1;
  }

  /// The repeat factor of the quantifier at i_ (consumed): {n}, {n,}, {n,m} count; *, +, ? are 1.
  double repeat() {
    if (i_ >= p_.size()) return 1;
    const char c = p_[i_];
    if (c == '*' || c == '+' || c == '?') {
      ++i_;
      if (i_ < p_.size() && p_[i_] == '?') ++i_;  // lazy
      return 1;
    }
    if (c != '{') return 1;
    std::size_t j = i_ + 1;
    double lo = 0, hi = -1;
    bool digits = false;
    while (j < p_.size() && p_[j] >= '0' && p_[j] <= '9') {
      lo = lo * 10 + (p_[j++] - '0');
      digits = true;
    }
    if (!digits) return 1;  // a literal '{'
    if (j < p_.size() && p_[j] == ',') {
      ++j;
      if (j < p_.size() && p_[j] >= '0' && p_[j] <= '9') {
        hi = 0;
        while (j < p_.size() && p_[j] >= '0' && p_[j] <= '9') hi = hi * 10 + (p_[j++] - '0');
      }
    }
    if (j >= p_.size() || p_[j] != '}') return 1;
    i_ = j + 1;
    if (i_ < p_.size() && p_[i_] == '?') ++i_;
    const double n = hi > lo ? hi : lo;
    return n + 1;  // {n,} adds a star after n copies
  }

  const std::string& p_;
  std::size_t i_ = 0;
  int max_depth_ = 0;
};

}  // namespace detail

/// std::regex (ECMAScript) for `pattern`, or ConfigError when it is malformed or beyond the limits.
inline std::regex compile_name_regex(const std::string& pattern, const std::string& who) {
  const std::string shown = pattern.size() > 80 ? pattern.substr(0, 80) + "..." : pattern;
  if (pattern.size() > kMaxRegexPattern)
    throw ConfigError(who + ": regular expression \"" + shown + "\" has " + std::to_string(pattern.size()) +
                      " characters, expected at most " + std::to_string(kMaxRegexPattern));
  detail::RegexShape shape(pattern);
  const double expanded = shape.measure();
  if (shape.max_depth() > kMaxRegexNesting)  // the scan stops one level past the limit
    throw ConfigError(who + ": regular expression \"" + shown + "\" nests groups more than " +
                      std::to_string(kMaxRegexNesting) + " deep");
  if (expanded > kMaxRegexExpansion)
    throw ConfigError(who + ": regular expression \"" + shown + "\" expands to more than " +
                      std::to_string(static_cast<long long>(kMaxRegexExpansion)) +
                      " states (counted repeats); expected a simpler pattern");
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw ConfigError(who + ": invalid regular expression \"" + shown + "\": " + e.what());
  }
}

namespace detail {
inline void check_regex_subject(const std::string& subject, const std::string& who) {
  if (subject.size() > kMaxRegexSubject)
    throw ConfigError(who + ": name \"" + subject.substr(0, 80) + "...\" has " + std::to_string(subject.size()) +
                      " characters, expected at most " + std::to_string(kMaxRegexSubject) + " to match a pattern");
}
}  // namespace detail

/// Whether the whole of `subject` matches (std::regex_match, Python's re.fullmatch).
inline bool regex_full_match(const std::string& subject, const std::regex& re, const std::string& who) {
  detail::check_regex_subject(subject, who);
  return std::regex_match(subject, re);
}

/// std::regex_search with the same subject limit.
inline bool regex_search_in(const std::string& subject, std::smatch& m, const std::regex& re, const std::string& who) {
  detail::check_regex_subject(subject, who);
  return std::regex_search(subject, m, re);
}
/// The match results would point into a destroyed temporary (as std::regex_search forbids too).
bool regex_search_in(const std::string&&, std::smatch&, const std::regex&, const std::string&) = delete;

}  // namespace peft
