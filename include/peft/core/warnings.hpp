#pragma once
// The library's one warning sink. Library code reports things that are legal but probably not what
// the user meant (a LoRA rank above min(in, out), a config value replaced on save, a module a file's
// target_modules does not select) through peft::warn(message); what happens to the message is the
// program's choice:
//   - by default nothing: the library prints nothing unless asked (DESIGN.md);
//   - peft::set_warning_handler(fn) installs fn(message) for the whole program and returns the
//     previous handler; peft::ScopedWarningHandler does the same for a scope and restores the
//     previous handler on exit (tests use it to collect messages);
//   - peft::stderr_warning_handler() prints "warning: <message>" to stderr (the `peft` tool and the
//     examples install it).
// Messages name the object they are about, as error messages do, and carry no "warning:" prefix.
// Thread-safe: the handler is swapped and copied under a mutex and called outside it, so a handler
// may itself call set_warning_handler or warn.
#include <cstdio>
#include <functional>
#include <mutex>
#include <string>
#include <utility>

namespace peft {

using WarningHandler = std::function<void(const std::string& message)>;

namespace detail {
struct WarningSink {
  std::mutex mutex;
  WarningHandler handler;  ///< empty: warnings are dropped
};
inline WarningSink& warning_sink() {
  static WarningSink sink;
  return sink;
}
}  // namespace detail

/// Installs `handler` (empty: drop warnings) for the whole program; returns the previous one.
inline WarningHandler set_warning_handler(WarningHandler handler) {
  detail::WarningSink& s = detail::warning_sink();
  std::lock_guard<std::mutex> lock(s.mutex);
  std::swap(s.handler, handler);
  return handler;
}

/// The handler now installed (empty when warnings are dropped).
inline WarningHandler warning_handler() {
  detail::WarningSink& s = detail::warning_sink();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.handler;
}

/// Reports `message` to the installed handler; does nothing when none is installed.
inline void warn(const std::string& message) {
  WarningHandler h = warning_handler();
  if (h) h(message);
}

/// A handler printing "warning: <message>" on its own line to stderr.
inline WarningHandler stderr_warning_handler() {
  return [](const std::string& message) { std::fprintf(stderr, "warning: %s\n", message.c_str()); };
}

/// Installs a handler for the lifetime of the guard, then puts the previous one back.
class ScopedWarningHandler {
 public:
  explicit ScopedWarningHandler(WarningHandler handler) : previous_(set_warning_handler(std::move(handler))) {}
  ~ScopedWarningHandler() { set_warning_handler(std::move(previous_)); }
  ScopedWarningHandler(const ScopedWarningHandler&) = delete;
  ScopedWarningHandler& operator=(const ScopedWarningHandler&) = delete;
  ScopedWarningHandler(ScopedWarningHandler&&) = delete;
  ScopedWarningHandler& operator=(ScopedWarningHandler&&) = delete;

 private:
  WarningHandler previous_;
};

}  // namespace peft
