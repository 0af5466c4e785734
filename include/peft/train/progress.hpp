#pragma once
// Live training progress: steps, smoothed loss, elapsed time and ETA.
//
// On a terminal the display redraws one line in place (carriage return + "erase to end of line"),
// at most every `min_interval_s` seconds so printing never slows training. When the stream is not
// a terminal (a CI log, a pipe, a file) it degrades to plain, complete lines at evenly spaced
// milestones (every 1/plain_lines of the run) plus the last step, so logs stay readable.
//
//   loss shown  = bias-corrected exponential moving average of the losses passed to update():
//                 m_t = β m_{t−1} + (1 − β) ℓ_t,  shown m_t / (1 − β^t)   (β = `smoothing`)
//   ETA         = elapsed / done · (total − done), the mean step time so far times the steps left.
//
// The library prints nothing unless asked: a Progress only writes to the stream it was given.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"

namespace peft {

/// True when `out` is std::cout or std::cerr/clog and that file descriptor is a terminal (and
/// TERM is not "dumb"). Any other stream (files, string streams) is not a terminal.
inline bool is_terminal(const std::ostream& out) {
#if defined(__unix__) || defined(__APPLE__)
  int fd = -1;
  if (&out == &std::cout)
    fd = STDOUT_FILENO;
  else if (&out == &std::cerr || &out == &std::clog)
    fd = STDERR_FILENO;
  if (fd < 0 || isatty(fd) == 0) return false;
  const char* term = std::getenv("TERM");
  return term == nullptr || std::string(term) != "dumb";
#else
  (void)out;
  return false;
#endif
}

/// Seconds as "0.4s", "12.3s", "2m05s" or "1h02m".
inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  char buf[32];
  if (seconds < 60.0) {
    std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  } else if (seconds < 3600.0) {
    const long s = std::lround(seconds);
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  } else {
    const long m = std::lround(seconds / 60.0);
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", m / 60, m % 60);
  }
  return buf;
}

struct ProgressOptions {
  enum class Mode {
    Auto,         ///< Interactive on a terminal, Plain otherwise
    Interactive,  ///< one line redrawn in place
    Plain,        ///< complete lines at milestones
    Silent,       ///< nothing
  };
  Mode mode = Mode::Auto;
  double min_interval_s = 0.1;  ///< interactive redraw throttle
  int plain_lines = 10;         ///< lines printed per run in plain mode; the last one is the final step
  int bar_width = 24;           ///< characters of the interactive bar
  double smoothing = 0.9;       ///< β of the loss moving average, in [0, 1)
};

class Progress {
 public:
  using Clock = std::function<double()>;  ///< seconds from any fixed origin

  /// A run of `total_steps` steps labelled `label`. `clock` is for tests; by default a steady clock.
  Progress(std::string label, Index total_steps, std::ostream& out = std::cout, ProgressOptions options = {},
           Clock clock = {})
      : label_(std::move(label)), total_(total_steps), out_(&out), opt_(options), clock_(std::move(clock)) {
    if (total_steps <= 0)
      throw ConfigError(describe("Progress", label_) + ": total steps must be > 0, got " + std::to_string(total_steps));
    if (!(opt_.smoothing >= 0.0 && opt_.smoothing < 1.0))
      throw ConfigError(describe("Progress", label_) + ": smoothing must be in [0, 1), got " +
                        std::to_string(opt_.smoothing));
    if (opt_.plain_lines <= 0)
      throw ConfigError(describe("Progress", label_) + ": plain_lines must be > 0, got " +
                        std::to_string(opt_.plain_lines));
    if (!clock_) {
      clock_ = [] {
        return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
      };
    }
    if (opt_.mode == ProgressOptions::Mode::Auto)
      opt_.mode = is_terminal(out) ? ProgressOptions::Mode::Interactive : ProgressOptions::Mode::Plain;
    start_ = clock_();
  }

  ProgressOptions::Mode mode() const { return opt_.mode; }
  bool interactive() const { return opt_.mode == ProgressOptions::Mode::Interactive; }
  Index total() const { return total_; }
  Index done() const { return done_; }

  /// Seconds since construction.
  double elapsed() const { return clock_() - start_; }

  /// Estimated seconds left after `done()` steps (NaN before the first step).
  double eta() const {
    if (done_ == 0) return std::nan("");
    return elapsed() / static_cast<double>(done_) * static_cast<double>(total_ - done_);
  }

  /// The smoothed loss (NaN before the first update with a loss).
  double smoothed_loss() const {
    if (loss_updates_ == 0) return std::nan("");
    return ema_ / (1.0 - std::pow(opt_.smoothing, static_cast<double>(loss_updates_)));
  }

  /// Records that `step` steps (1-based, ≤ total) are done, with the latest loss (NaN: none).
  void update(Index step, double loss = std::nan("")) {
    if (step < done_ || step > total_)
      throw ConfigError(describe("Progress", label_) + ": step " + std::to_string(step) + " is outside [" +
                        std::to_string(done_) + ", " + std::to_string(total_) + "]");
    done_ = step;
    if (!std::isnan(loss)) {
      ema_ = opt_.smoothing * ema_ + (1.0 - opt_.smoothing) * loss;
      ++loss_updates_;
    }
    switch (opt_.mode) {
      case ProgressOptions::Mode::Interactive: {
        const double now = clock_();
        if (step == total_ || last_draw_ < 0 || now - last_draw_ >= opt_.min_interval_s) {
          last_draw_ = now;
          *out_ << '\r' << line(true) << "\x1b[K" << std::flush;
          drawn_ = true;
        }
        break;
      }
      case ProgressOptions::Mode::Plain: {
        // Milestone k is reached when step ≥ k·total / plain_lines.
        const Index milestone = step * opt_.plain_lines / total_;
        if (milestone > last_milestone_) {
          last_milestone_ = milestone;
          *out_ << line(false) << '\n' << std::flush;
        }
        break;
      }
      default: break;
    }
  }

  /// Ends the display: a newline after the interactive line, then `summary` (if any) on its own line.
  void finish(const std::string& summary = "") {
    if (opt_.mode == ProgressOptions::Mode::Silent) return;
    if (interactive() && drawn_) *out_ << '\n';
    drawn_ = false;
    if (!summary.empty()) *out_ << label_ << ": " << summary << '\n';
    out_->flush();
  }

  /// The status text for the current state, as drawn (bar = with the interactive bar).
  std::string line(bool bar) const {
    std::ostringstream s;
    s << label_ << (bar ? " " : ": ");
    if (bar) {
      const int filled = static_cast<int>(static_cast<double>(opt_.bar_width) * static_cast<double>(done_) /
                                          static_cast<double>(total_));
      s << '[' << std::string(static_cast<std::size_t>(filled), '#')
        << std::string(static_cast<std::size_t>(opt_.bar_width - filled), '.') << "] ";
    }
    const int percent = static_cast<int>(100 * done_ / total_);
    s << "step " << done_ << '/' << total_ << " (" << percent << "%)";
    if (loss_updates_ > 0) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.4f", smoothed_loss());
      s << " loss " << buf;
    }
    s << " elapsed " << format_duration(elapsed());
    if (done_ < total_) s << " eta " << format_duration(eta());
    return s.str();
  }

 private:
  std::string label_;
  Index total_;
  std::ostream* out_;
  ProgressOptions opt_;
  Clock clock_;
  double start_ = 0.0;
  double last_draw_ = -1.0;
  Index done_ = 0;
  Index last_milestone_ = 0;
  double ema_ = 0.0;
  long loss_updates_ = 0;
  bool drawn_ = false;
};

}  // namespace peft
