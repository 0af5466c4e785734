#pragma once
// Regular expressions over module and parameter names: Python `re` syntax, linear-time matching.
//
// Patterns come from files (adapter_config.json's target_modules, rank_pattern, ...) and names
// from tensor headers, so both may be hostile. Backtracking matchers (libstdc++'s std::regex,
// Python's re) take exponential time on a pattern like `(.*.*)*x` and recurse once per character:
// a 40-byte config could hang or crash a loader. This engine compiles a pattern into a Thompson
// NFA program and runs it as a Pike VM (Thompson 1968; Cox, "Regular Expression Matching: the
// Virtual Machine Approach", 2009): time O(|program| · |name|), memory O(|program|), no recursion
// while matching, and Perl/Python's leftmost-first rule for which submatch a group captures.
//
// Syntax (Python's re, what Hugging Face PEFT configs use):
//   literals; `.` (any character but \n); classes [...] with ranges, ^ negation and \d \w \s;
//   \d \D \w \W \s \S (ASCII meaning, as with re.ASCII); \t \n \r \f \v \a \0 \xHH \uHHHH;
//   escaped punctuation; anchors ^ $ \A \Z \b \B; groups (...), (?:...), (?P<name>...);
//   alternation |; quantifiers * + ? {n} {n,} {,m} {n,m} and their lazy forms (*? ...).
// Look-around, back-references, inline flags and possessive quantifiers are refused with a
// ConfigError, never silently misread. Text is matched by Unicode code point (UTF-8; an invalid
// byte counts as one character), as Python matches str. Apart from \d \w \s being ASCII, whether
// a name matches is Python's answer (checked against CPython on 20 000 random pattern/name
// pairs); which submatch a group reports can differ where a repeated group can match the empty
// string (`(a|)*`), as with RE2.
//
// Limits (each refusal is a ConfigError naming `who`): kMaxRegexPattern characters,
// kMaxRegexNesting nested groups (the parser recurses per group), kMaxRegexProgram instructions
// after counted repeats are expanded (`(a{1000}){1000}` is a million), and names of at most
// kMaxRegexSubject characters (bounds the matching time at |program| · |name| steps).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/separate.hpp"

namespace peft {

constexpr std::size_t kMaxRegexPattern = 1024;  ///< characters of a pattern
constexpr int kMaxRegexNesting = 16;            ///< nested groups
constexpr double kMaxRegexProgram = 1e4;        ///< instructions after expanding counted repeats
constexpr std::size_t kMaxRegexSubject = 1024;  ///< bytes of a name matched against a pattern

namespace detail {

constexpr char32_t kRxNoChar = 0xFFFFFFFF;  // "no character here" (before the start, after the end)

/// One UTF-8 code point of s at i and its byte length; an invalid byte b is U+DC00+b (as Python's
/// surrogateescape), so every byte string has a decoding and nothing is skipped.
inline std::pair<char32_t, std::size_t> rx_decode(std::string_view s, std::size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return {b0, 1};
  const std::size_t len = b0 >= 0xF0 && b0 < 0xF5 ? 4 : b0 >= 0xE0 ? 3 : b0 >= 0xC2 && b0 < 0xE0 ? 2 : 0;
  if (len == 0 || i + len > s.size()) return {0xDC00 + b0, 1};
  char32_t cp = b0 & (0x7F >> len);
  for (std::size_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return {0xDC00 + b0, 1};
    cp = (cp << 6) | (b & 0x3F);
  }
  const bool overlong = (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
  if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {0xDC00 + b0, 1};
  return {cp, len};
}

inline bool rx_is_word(char32_t c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/// A character class: sorted, merged ranges of code points, possibly negated.
struct RxClass {
  std::vector<std::pair<char32_t, char32_t>> ranges;
  bool negated = false;

  bool contains(char32_t c) const {
    bool in = false;
    for (const auto& [lo, hi] : ranges)
      if (c >= lo && c <= hi) {
        in = true;
        break;
      }
    return in != negated;
  }
};

enum class RxOp : std::uint8_t { kChar, kAny, kClass, kSplit, kJmp, kSave, kAssert, kMatch };
enum class RxAssert : std::uint8_t { kBegin, kEnd, kTextBegin, kTextEnd, kWordBoundary, kNotWordBoundary };

/// A VM instruction. kChar: c; kClass: x = class index; kSplit: try x, then y; kJmp: x;
/// kSave: x = capture slot; kAssert: assertion.
struct RxInst {
  RxOp op = RxOp::kMatch;
  RxAssert assertion = RxAssert::kBegin;
  char32_t c = 0;
  int x = 0;
  int y = 0;
};

/// Parse tree of a pattern.
struct RxNode {
  enum class Kind : std::uint8_t { kEmpty, kChar, kAny, kClass, kConcat, kAlt, kGroup, kRepeat, kAssert };
  Kind kind = Kind::kEmpty;
  char32_t c = 0;        // kChar
  int index = -1;        // kClass: class index; kGroup: capture group number (-1: non-capturing)
  int min = 0, max = 0;  // kRepeat; max < 0: unbounded
  bool greedy = true;    // kRepeat
  RxAssert assertion = RxAssert::kBegin;
  std::vector<RxNode> kids;
};

/// Recursive-descent parser for the syntax above; every error names `who`, the pattern and the
/// character offset, as Python's re.error does.
class RxParser {
 public:
  RxParser(std::string_view pattern, std::string who, std::vector<RxClass>& classes)
      : who_(std::move(who)),
        shown_(pattern.size() > 80 ? std::string(pattern.substr(0, 80)) + "..." : std::string(pattern)),
        classes_(classes) {
    for (std::size_t i = 0; i < pattern.size();) {
      const auto [cp, len] = rx_decode(pattern, i);
      p_.push_back(cp);
      i += len;
    }
  }

  RxNode parse() {
    RxNode root = alternation(0);
    if (i_ < p_.size()) fail("unbalanced parenthesis");  // only a ')' stops the top level early
    return root;
  }
  int groups() const { return groups_; }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw ConfigError(who_ + ": invalid regular expression \"" + shown_ + "\": " + what + " at position " +
                      std::to_string(i_));
  }
  [[noreturn]] void unsupported(const std::string& what) const {
    throw ConfigError(who_ + ": regular expression \"" + shown_ + "\" uses " + what + " at position " +
                      std::to_string(i_) + ", which peft does not support (it matches in linear time)");
  }
  bool at_end() const { return i_ >= p_.size(); }
  char32_t peek(std::size_t ahead = 0) const { return i_ + ahead < p_.size() ? p_[i_ + ahead] : kRxNoChar; }

  RxNode alternation(int depth) {
    RxNode first = sequence(depth);
    if (peek() != '|') return first;
    RxNode alt;
    alt.kind = RxNode::Kind::kAlt;
    alt.kids.push_back(std::move(first));
    while (peek() == '|') {
      ++i_;
      alt.kids.push_back(sequence(depth));
    }
    return alt;
  }

  RxNode sequence(int depth) {
    RxNode seq;
    seq.kind = RxNode::Kind::kConcat;
    while (!at_end() && peek() != '|' && peek() != ')') {
      RxNode a = atom(depth);
      seq.kids.push_back(quantified(std::move(a)));
    }
    if (seq.kids.size() == 1) return std::move(seq.kids.front());
    if (seq.kids.empty()) seq.kind = RxNode::Kind::kEmpty;
    return seq;
  }

  /// Reads {n}, {n,}, {,m} or {n,m} at i_ into min/max; false (i_ unchanged) when the brace is a
  /// literal, as in Python.
  bool counted(int& min, int& max) {
    std::size_t j = i_ + 1;
    const auto number = [&](long long& v) {
      const std::size_t start = j;
      v = 0;
      while (j < p_.size() && p_[j] >= '0' && p_[j] <= '9') {
        v = v * 10 + static_cast<long long>(p_[j] - '0');
        if (v > 1000000000LL) v = 1000000000LL;  // far past any limit; keeps the arithmetic finite
        ++j;
      }
      return j > start;
    };
    long long lo = 0, hi = -1;
    const bool has_lo = number(lo);
    if (j < p_.size() && p_[j] == ',') {
      ++j;
      if (!number(hi)) hi = -1;
    } else {
      if (!has_lo) return false;
      hi = lo;
    }
    if (j >= p_.size() || p_[j] != '}') return false;
    i_ = j + 1;
    if (hi >= 0 && hi < lo) fail("min repeat greater than max repeat");
    min = static_cast<int>(lo);
    max = static_cast<int>(hi);
    return true;
  }

  RxNode quantified(RxNode a) {
    bool repeated = false;
    for (;;) {
      int min = 0, max = -1;
      const char32_t c = peek();
      const std::size_t at = i_;
      if (c == '*' || c == '+' || c == '?') {
        ++i_;
        min = c == '+' ? 1 : 0;
        max = c == '?' ? 1 : -1;
      } else if (c != '{' || !counted(min, max)) {
        return a;
      }
      if (repeated) {
        i_ = at;
        fail("multiple repeat");
      }
      if (a.kind == RxNode::Kind::kEmpty || a.kind == RxNode::Kind::kAssert) {
        i_ = at;
        fail("nothing to repeat");
      }
      bool greedy = true;
      if (peek() == '?') {
        ++i_;
        greedy = false;
      } else if (peek() == '+') {
        unsupported("a possessive quantifier");
      }
      RxNode r;
      r.kind = RxNode::Kind::kRepeat;
      r.min = min;
      r.max = max;
      r.greedy = greedy;
      r.kids.push_back(std::move(a));
      a = std::move(r);
      repeated = true;
    }
  }

  static RxNode leaf(RxNode::Kind k) {
    RxNode n;
    n.kind = k;
    return n;
  }
  static RxNode literal(char32_t c) {
    RxNode n = leaf(RxNode::Kind::kChar);
    n.c = c;
    return n;
  }
  static RxNode assertion(RxAssert a) {
    RxNode n = leaf(RxNode::Kind::kAssert);
    n.assertion = a;
    return n;
  }
  RxNode class_node(RxClass cls) {
    RxNode n = leaf(RxNode::Kind::kClass);
    n.index = static_cast<int>(classes_.size());
    classes_.push_back(std::move(cls));
    return n;
  }

  RxNode atom(int depth) {
    const char32_t c = p_[i_];
    switch (c) {
      case '(': return group(depth);
      case '[': return char_class();
      case '.': ++i_; return leaf(RxNode::Kind::kAny);
      case '^': ++i_; return assertion(RxAssert::kBegin);
      case '$': ++i_; return assertion(RxAssert::kEnd);
      case '*':
      case '+':
      case '?': fail("nothing to repeat");
      case '{': {
        int lo = 0, hi = 0;
        const std::size_t at = i_;
        if (counted(lo, hi)) {
          i_ = at;
          fail("nothing to repeat");
        }
        ++i_;
        return literal('{');
      }
      case '\\': return escape();
      default: ++i_; return literal(c);
    }
  }

  RxNode group(int depth) {
    if (depth + 1 > kMaxRegexNesting)
      throw ConfigError(who_ + ": regular expression \"" + shown_ + "\" nests groups more than " +
                        std::to_string(kMaxRegexNesting) + " deep");
    const std::size_t open = i_++;
    int number = -1;
    if (peek() == '?') {
      if (peek(1) == ':') {
        i_ += 2;
      } else if (peek(1) == 'P' && peek(2) == '<') {
        i_ += 3;
        const std::size_t start = i_;
        while (!at_end() && (rx_is_word(peek()) || peek() > 0x7F)) ++i_;
        if (i_ == start || peek() != '>' || (p_[start] >= '0' && p_[start] <= '9')) fail("bad group name");
        ++i_;
        number = ++groups_;
      } else if (peek(1) == '=' || peek(1) == '!' || (peek(1) == '<' && (peek(2) == '=' || peek(2) == '!'))) {
        unsupported("a look-around assertion");
      } else if (peek(1) == 'P' && peek(2) == '=') {
        unsupported("a back-reference");
      } else if (peek(1) == '#') {
        unsupported("a comment group");
      } else if (peek(1) == '>') {
        unsupported("an atomic group");
      } else {
        unsupported("an inline flag or extension group");
      }
    } else {
      number = ++groups_;
    }
    RxNode inner = alternation(depth + 1);
    if (peek() != ')') {
      i_ = open;
      fail("missing ), unterminated subpattern");
    }
    ++i_;
    RxNode g = leaf(RxNode::Kind::kGroup);
    g.index = number;
    g.kids.push_back(std::move(inner));
    return g;
  }

  static void add_class_escape(RxClass& cls, char32_t e) {
    using R = std::vector<std::pair<char32_t, char32_t>>;
    const R digit{{'0', '9'}};
    const R word{{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}};
    const R space{{'\t', '\r'}, {' ', ' '}};
    const bool negate = e == 'D' || e == 'W' || e == 'S';
    const char32_t lower = negate ? e + ('a' - 'A') : e;
    const R& set = lower == 'd' ? digit : lower == 'w' ? word : space;
    if (!negate) {
      cls.ranges.insert(cls.ranges.end(), set.begin(), set.end());
      return;
    }
    char32_t next = 0;  // complement over all code points (and the surrogate-escaped bytes)
    for (const auto& [lo, hi] : set) {
      if (lo > next) cls.ranges.emplace_back(next, lo - 1);
      next = hi + 1;
    }
    cls.ranges.emplace_back(next, 0x10FFFF);
  }

  /// Hex digits after \x (2) or \u (4); returns the code point.
  char32_t hex_escape(int digits) {
    char32_t v = 0;
    for (int k = 0; k < digits; ++k) {
      const char32_t h = peek();
      int d = -1;
      if (h >= '0' && h <= '9')
        d = static_cast<int>(h - '0');
      else if (h >= 'a' && h <= 'f')
        d = static_cast<int>(h - 'a') + 10;
      else if (h >= 'A' && h <= 'F')
        d = static_cast<int>(h - 'A') + 10;
      if (d < 0) fail("incomplete escape");
      v = v * 16 + static_cast<char32_t>(d);
      ++i_;
    }
    return v;
  }

  /// The single character of an escape after the backslash (i_ at the letter), or kRxNoChar for a
  /// class escape (\d ...), which the caller handles. `in_class`: \b is a backspace there.
  char32_t escaped_char(bool in_class) {
    const std::size_t start = i_ - 1;  // the backslash: where Python's messages point
    const char32_t e = peek();
    if (e == kRxNoChar) {
      i_ = start;
      fail("bad escape (end of pattern)");
    }
    ++i_;
    switch (e) {
      case 'n': return '\n';
      case 't': return '\t';
      case 'r': return '\r';
      case 'f': return '\f';
      case 'v': return '\v';
      case 'a': return '\a';
      case 'x': return hex_escape(2);
      case 'u': return hex_escape(4);
      case '0': {  // octal: \0, \01, \012
        char32_t v = 0;
        for (int k = 0; k < 2 && peek() >= '0' && peek() <= '7'; ++k, ++i_) v = v * 8 + (peek() - '0');
        return v;
      }
      case 'b':
        if (in_class) return '\b';
        break;
      default: break;
    }
    if (e >= '1' && e <= '9') {
      i_ = start;
      unsupported("a back-reference");
    }
    if ((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z')) {
      if (!(e == 'd' || e == 'D' || e == 'w' || e == 'W' || e == 's' || e == 'S' ||
            (!in_class && (e == 'A' || e == 'Z' || e == 'b' || e == 'B')))) {
        i_ = start;
        fail(std::string("bad escape \\") + static_cast<char>(e));
      }
      return kRxNoChar;
    }
    return e;  // escaped punctuation or a non-ASCII character: itself
  }

  RxNode escape() {
    ++i_;  // the backslash
    const char32_t letter = peek();
    const char32_t c = escaped_char(false);
    if (c != kRxNoChar) return literal(c);
    switch (letter) {
      case 'A': return assertion(RxAssert::kTextBegin);
      case 'Z': return assertion(RxAssert::kTextEnd);
      case 'b': return assertion(RxAssert::kWordBoundary);
      case 'B': return assertion(RxAssert::kNotWordBoundary);
      default: {
        RxClass cls;
        add_class_escape(cls, letter);
        return class_node(std::move(cls));
      }
    }
  }

  RxNode char_class() {
    const std::size_t open = i_++;
    RxClass cls;
    if (peek() == '^') {
      cls.negated = true;
      ++i_;
    }
    bool first = true;
    for (;; first = false) {
      if (at_end()) {
        i_ = open;
        fail("unterminated character set");
      }
      if (peek() == ']' && !first) {
        ++i_;
        break;
      }
      // one member: a character, a class escape, or the start of a range
      char32_t lo = peek();
      ++i_;
      if (lo == '\\') {
        const char32_t letter = peek();
        lo = escaped_char(true);
        if (lo == kRxNoChar) {
          add_class_escape(cls, letter);
          if (peek() == '-' && peek(1) != ']' && peek(1) != kRxNoChar) fail("bad character range");
          continue;
        }
      }
      char32_t hi = lo;
      if (peek() == '-' && peek(1) != ']' && peek(1) != kRxNoChar) {
        ++i_;
        hi = peek();
        ++i_;
        if (hi == '\\') {
          hi = escaped_char(true);
          if (hi == kRxNoChar) fail("bad character range");
        }
        if (hi < lo) fail("bad character range");
      }
      cls.ranges.emplace_back(lo, hi);
    }
    return class_node(std::move(cls));
  }

  std::string who_;
  std::string shown_;
  std::vector<char32_t> p_;
  std::size_t i_ = 0;
  int groups_ = 0;
  std::vector<RxClass>& classes_;
};

/// Instructions a node compiles to (double: counted repeats multiply, and may overflow an int).
inline double rx_size(const RxNode& n) {
  using K = RxNode::Kind;
  switch (n.kind) {
    case K::kEmpty: return 0;
    case K::kChar:
    case K::kAny:
    case K::kClass:
    case K::kAssert: return 1;
    case K::kConcat: {
      double s = 0;
      for (const RxNode& k : n.kids) s += rx_size(k);
      return s;
    }
    case K::kAlt: {
      double s = 0;
      for (const RxNode& k : n.kids) s += rx_size(k) + 2;  // a split and a jump per alternative
      return s;
    }
    case K::kGroup: return rx_size(n.kids[0]) + (n.index >= 0 ? 2 : 0);
    case K::kRepeat: {
      const double k = rx_size(n.kids[0]);
      const double optional = n.max < 0 ? k + 2 : (n.max - n.min) * (k + 1);
      return n.min * k + optional;
    }
  }
  return 0;
}

/// Emits the program of a node (sizes already checked).
class RxEmitter {
 public:
  explicit RxEmitter(std::vector<RxInst>& prog) : prog_(prog) {}

  void emit(const RxNode& n) {
    using K = RxNode::Kind;
    switch (n.kind) {
      case K::kEmpty: return;
      case K::kChar: push(RxOp::kChar).c = n.c; return;
      case K::kAny: push(RxOp::kAny); return;
      case K::kClass: push(RxOp::kClass).x = n.index; return;
      case K::kAssert: push(RxOp::kAssert).assertion = n.assertion; return;
      case K::kConcat:
        for (const RxNode& k : n.kids) emit(k);
        return;
      case K::kAlt: {
        std::vector<int> jumps;
        for (std::size_t i = 0; i < n.kids.size(); ++i) {
          const bool last = i + 1 == n.kids.size();
          const int split = last ? -1 : here();
          if (!last) push(RxOp::kSplit);
          if (split >= 0) prog_[static_cast<std::size_t>(split)].x = here();
          emit(n.kids[i]);
          if (!last) {
            jumps.push_back(here());
            push(RxOp::kJmp);
          }
          if (split >= 0) prog_[static_cast<std::size_t>(split)].y = here();
        }
        for (int j : jumps) prog_[static_cast<std::size_t>(j)].x = here();
        return;
      }
      case K::kGroup:
        if (n.index >= 0) push(RxOp::kSave).x = 2 * n.index;
        emit(n.kids[0]);
        if (n.index >= 0) push(RxOp::kSave).x = 2 * n.index + 1;
        return;
      case K::kRepeat: {
        const RxNode& body = n.kids[0];
        for (int i = 0; i < n.min; ++i) emit(body);
        if (n.max < 0) {  // L: split(body, out); body; jmp L
          const int loop = here();
          push(RxOp::kSplit);
          emit(body);
          push(RxOp::kJmp).x = loop;
          branch(loop, loop + 1, here(), n.greedy);
          return;
        }
        std::vector<int> splits;  // x{0,k}: k nested optionals, each exiting to the end
        for (int i = n.min; i < n.max; ++i) {
          splits.push_back(here());
          push(RxOp::kSplit);
          emit(body);
        }
        for (int s : splits) branch(s, s + 1, here(), n.greedy);
        return;
      }
    }
  }

 private:
  int here() const { return static_cast<int>(prog_.size()); }
  RxInst& push(RxOp op) {
    prog_.push_back(RxInst{});
    prog_.back().op = op;
    return prog_.back();
  }
  /// A split that prefers `body` (greedy) or `out` (lazy).
  void branch(int at, int body, int out, bool greedy) {
    RxInst& s = prog_[static_cast<std::size_t>(at)];
    s.x = greedy ? body : out;
    s.y = greedy ? out : body;
  }
  std::vector<RxInst>& prog_;
};

/// Process-wide counts of pattern compilations and of match runs (full or search), for tests that
/// bound how often a config's patterns are compiled and tried (a config with thousands of
/// rank_pattern keys must compile each once, not once per module). Relaxed atomics: a count, not
/// a synchronisation point.
struct RegexCounters {
  std::atomic<std::uint64_t> compiled{0};
  std::atomic<std::uint64_t> runs{0};
};
inline RegexCounters& regex_counters() {
  static RegexCounters counters;
  return counters;
}

}  // namespace detail

/// The text of capture group i of a search, if it took part in the match.
struct RegexGroup {
  bool matched = false;
  std::string text;
  const std::string& str() const { return text; }
};

/// Capture groups of a successful search: [0] is the whole match.
struct RegexMatch {
  std::vector<RegexGroup> groups;
  const RegexGroup& operator[](std::size_t i) const { return groups.at(i); }
  std::size_t size() const { return groups.size(); }
};

/// A compiled pattern (see the header comment for the syntax and the guarantees).
class Regex {
 public:
  /// Compiles `pattern`; ConfigError naming `who` when it is malformed, unsupported or too large.
  PEFT_SEPARATE_INLINE Regex(const std::string& pattern, const std::string& who);

  const std::string& pattern() const { return pattern_; }
  /// Capture groups, not counting group 0 (std::regex::mark_count, Python's Pattern.groups).
  int group_count() const { return groups_; }

  /// Whether the whole subject matches (Python's re.fullmatch).
  bool full_match(std::string_view subject) const { return run(subject, Mode::kFull, nullptr); }

  /// Whether a prefix of the subject matches (Python's re.match: anchored at the start only).
  bool match(std::string_view subject) const { return run(subject, Mode::kMatch, nullptr); }

  /// Whether some substring matches (Python's re.search); fills `m` with the leftmost-first match.
  bool search(std::string_view subject, RegexMatch* m = nullptr) const {
    std::vector<std::ptrdiff_t> slots;
    if (!run(subject, Mode::kSearch, m ? &slots : nullptr)) return false;
    if (m) {
      m->groups.assign(static_cast<std::size_t>(groups_) + 1, RegexGroup{});
      for (std::size_t g = 0; g < m->groups.size(); ++g) {
        const std::ptrdiff_t b = slots[2 * g], e = slots[2 * g + 1];
        if (b < 0 || e < b) continue;
        m->groups[g].matched = true;
        m->groups[g].text.assign(subject.substr(static_cast<std::size_t>(b), static_cast<std::size_t>(e - b)));
      }
    }
    return true;
  }

 private:
  using Inst = detail::RxInst;
  using Op = detail::RxOp;

  /// Threads waiting at consuming instructions (or Match), in priority order, with their captures.
  struct ThreadList {
    std::vector<int> pcs;
    std::vector<std::ptrdiff_t> caps;  // pcs.size() · slots
  };

  /// Position context for assertions.
  struct Here {
    std::size_t pos;
    char32_t prev, next;
    bool before_final_newline;  // next is a '\n' that ends the text (Python's $ matches there)
  };

  bool assertion_holds(detail::RxAssert a, const Here& h, std::size_t size) const {
    using A = detail::RxAssert;
    const bool word_before = h.prev != detail::kRxNoChar && detail::rx_is_word(h.prev);
    const bool word_after = h.next != detail::kRxNoChar && detail::rx_is_word(h.next);
    switch (a) {
      case A::kBegin:
      case A::kTextBegin: return h.pos == 0;
      case A::kEnd: return h.pos == size || h.before_final_newline;
      case A::kTextEnd: return h.pos == size;
      case A::kWordBoundary: return word_before != word_after;
      case A::kNotWordBoundary: return word_before == word_after;
    }
    return false;
  }

  /// Follows the epsilon closure from `pc0` (splits, jumps, saves, assertions) and appends every
  /// reachable consuming instruction to `list` once, in priority order. Explicit stack: no
  /// recursion however large the program.
  void add_thread(ThreadList& list, int pc0, std::ptrdiff_t* caps, std::size_t nslots, const Here& h, std::size_t size,
                  std::vector<std::uint32_t>& mark, std::uint32_t stamp,
                  std::vector<std::pair<int, std::ptrdiff_t>>& stack) const {
    // (pc, -1): explore pc; (-2 - slot, old): restore caps[slot] = old once its subtree is done
    stack.clear();
    stack.emplace_back(pc0, -1);
    while (!stack.empty()) {
      const auto [pc, old] = stack.back();
      stack.pop_back();
      if (pc <= -2) {
        caps[static_cast<std::size_t>(-2 - pc)] = old;
        continue;
      }
      const auto upc = static_cast<std::size_t>(pc);
      if (mark[upc] == stamp) continue;
      mark[upc] = stamp;
      const Inst& in = prog_[upc];
      switch (in.op) {
        case Op::kJmp: stack.emplace_back(in.x, -1); break;
        case Op::kSplit:
          stack.emplace_back(in.y, -1);
          stack.emplace_back(in.x, -1);  // on top: explored first, higher priority
          break;
        case Op::kSave:
          if (nslots > static_cast<std::size_t>(in.x)) {
            stack.emplace_back(-2 - in.x, caps[static_cast<std::size_t>(in.x)]);
            caps[static_cast<std::size_t>(in.x)] = static_cast<std::ptrdiff_t>(h.pos);
          }
          stack.emplace_back(pc + 1, -1);
          break;
        case Op::kAssert:
          if (assertion_holds(in.assertion, h, size)) stack.emplace_back(pc + 1, -1);
          break;
        default:
          list.pcs.push_back(pc);
          if (nslots) list.caps.insert(list.caps.end(), caps, caps + nslots);
          break;
      }
    }
  }

  bool consumes(const Inst& in, char32_t c) const {
    switch (in.op) {
      case Op::kChar: return in.c == c;
      case Op::kAny: return c != '\n';
      case Op::kClass: return classes_[static_cast<std::size_t>(in.x)].contains(c);
      default: return false;
    }
  }

  Here here_at(std::string_view s, std::size_t pos, char32_t prev) const {
    const char32_t next = pos < s.size() ? detail::rx_decode(s, pos).first : detail::kRxNoChar;
    return Here{pos, prev, next, pos + 1 == s.size() && s[pos] == '\n'};
  }

  /// kFull: a match starts at 0 and ends at the end (fullmatch); kMatch: starts at 0, ends anywhere
  /// (match); kSearch: starts anywhere (search). Leftmost-first in each.
  enum class Mode { kFull, kMatch, kSearch };

  /// The Pike VM for `mode`. `slots`: captures of the match.
  PEFT_SEPARATE_INLINE bool run(std::string_view s, Mode mode, std::vector<std::ptrdiff_t>* slots) const;

  std::string pattern_;
  std::vector<Inst> prog_;
  std::vector<detail::RxClass> classes_;
  int groups_ = 0;
};

#if PEFT_SEPARATE_BODIES  // (peft/core/separate.hpp)
PEFT_SEPARATE_INLINE Regex::Regex(const std::string& pattern, const std::string& who) : pattern_(pattern) {
  const std::string shown = pattern.size() > 80 ? pattern.substr(0, 80) + "..." : pattern;
  if (pattern.size() > kMaxRegexPattern)
    throw ConfigError(who + ": regular expression \"" + shown + "\" has " + std::to_string(pattern.size()) +
                      " characters, expected at most " + std::to_string(kMaxRegexPattern));
  detail::RxParser parser(pattern, who, classes_);
  const detail::RxNode root = parser.parse();
  groups_ = parser.groups();
  const double size = detail::rx_size(root) + 3;
  if (size > kMaxRegexProgram)
    throw ConfigError(who + ": regular expression \"" + shown + "\" expands to more than " +
                      std::to_string(static_cast<long long>(kMaxRegexProgram)) +
                      " states (counted repeats); expected a simpler pattern");
  prog_.reserve(static_cast<std::size_t>(size));
  prog_.push_back(detail::RxInst{detail::RxOp::kSave, {}, 0, 0, 0});  // group 0 spans the match
  detail::RxEmitter(prog_).emit(root);
  prog_.push_back(detail::RxInst{detail::RxOp::kSave, {}, 0, 1, 0});
  prog_.push_back(detail::RxInst{});
  detail::regex_counters().compiled.fetch_add(1, std::memory_order_relaxed);
}

PEFT_SEPARATE_INLINE bool Regex::run(std::string_view s, Mode mode, std::vector<std::ptrdiff_t>* slots) const {
  const bool full = mode == Mode::kFull, search = mode == Mode::kSearch;
  detail::regex_counters().runs.fetch_add(1, std::memory_order_relaxed);
  const std::size_t nslots = slots ? 2 * (static_cast<std::size_t>(groups_) + 1) : 0;
  std::vector<std::uint32_t> mark(prog_.size(), 0);
  std::vector<std::pair<int, std::ptrdiff_t>> stack;
  std::vector<std::ptrdiff_t> fresh(nslots, -1), work(nslots, -1);
  ThreadList cur, next;
  std::uint32_t stamp = 1;
  bool matched = false;
  char32_t prev = detail::kRxNoChar;
  std::size_t pos = 0;
  add_thread(cur, 0, fresh.data(), nslots, here_at(s, 0, prev), s.size(), mark, stamp, stack);
  for (;;) {
    const bool at_end = pos >= s.size();
    const auto [c, len] = at_end ? std::pair<char32_t, std::size_t>{detail::kRxNoChar, 0} : detail::rx_decode(s, pos);
    const Here after = here_at(s, pos + len, c);
    ++stamp;
    next.pcs.clear();
    next.caps.clear();
    for (std::size_t t = 0; t < cur.pcs.size(); ++t) {
      const Inst& in = prog_[static_cast<std::size_t>(cur.pcs[t])];
      std::ptrdiff_t* caps = nslots ? cur.caps.data() + t * nslots : work.data();
      if (in.op == Op::kMatch) {
        if (full && !at_end) continue;  // fullmatch: this path ended early; lower ones may not
        matched = true;
        if (slots) slots->assign(caps, caps + nslots);
        break;  // leftmost-first: threads of lower priority are cut
      }
      if (!at_end && consumes(in, c)) {
        if (nslots) work.assign(caps, caps + nslots);
        add_thread(next, cur.pcs[t] + 1, work.data(), nslots, after, s.size(), mark, stamp, stack);
      }
    }
    if (at_end) break;
    std::swap(cur, next);
    pos += len;
    prev = c;
    if (search && !matched)  // search: a new attempt starting here, below every running thread
      add_thread(cur, 0, fresh.data(), nslots, after, s.size(), mark, stamp, stack);
    if (cur.pcs.empty() && (!search || matched)) break;  // nothing left to run or to try
  }
  return matched;
}
#endif  // PEFT_SEPARATE_BODIES

/// Compiles `pattern`; ConfigError naming `who` when it is malformed, unsupported or too large.
inline Regex compile_name_regex(const std::string& pattern, const std::string& who) { return Regex(pattern, who); }

namespace detail {
inline void check_regex_subject(std::string_view subject, const std::string& who) {
  if (subject.size() > kMaxRegexSubject)
    throw ConfigError(who + ": name \"" + std::string(subject.substr(0, 80)) + "...\" has " +
                      std::to_string(subject.size()) + " characters, expected at most " +
                      std::to_string(kMaxRegexSubject) + " to match a pattern");
}
}  // namespace detail

/// Whether the whole of `subject` matches (Python's re.fullmatch), with the subject length limit.
inline bool regex_full_match(std::string_view subject, const Regex& re, const std::string& who) {
  detail::check_regex_subject(subject, who);
  return re.full_match(subject);
}

/// Python's re.search with the same subject limit; `m` receives the groups of the match.
inline bool regex_search_in(std::string_view subject, RegexMatch& m, const Regex& re, const std::string& who) {
  detail::check_regex_subject(subject, who);
  return re.search(subject, &m);
}

}  // namespace peft
