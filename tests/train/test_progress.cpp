#include <peft/train/progress.hpp>

#include <cmath>
#include <sstream>
#include <string>

#include "support/test_utils.hpp"

using namespace peft;

namespace {
/// A clock the test advances by hand.
struct FakeClock {
  double now = 100.0;
  Progress::Clock fn() {
    return [this] { return now; };
  }
};

int count(const std::string& s, const std::string& needle) {
  int n = 0;
  for (std::size_t p = s.find(needle); p != std::string::npos; p = s.find(needle, p + needle.size())) ++n;
  return n;
}
}  // namespace

TEST_CASE("format_duration picks seconds, minutes or hours", "[train][progress]") {
  CHECK(format_duration(0.44) == "0.4s");
  CHECK(format_duration(12.34) == "12.3s");
  CHECK(format_duration(125.0) == "2m05s");
  CHECK(format_duration(3720.0) == "1h02m");
  CHECK(format_duration(-1.0) == "?");
  CHECK(format_duration(std::nan("")) == "?");
}

TEST_CASE("Plain progress prints evenly spaced complete lines with ETA", "[train][progress]") {
  std::ostringstream out;
  FakeClock clock;
  ProgressOptions opt;
  opt.mode = ProgressOptions::Mode::Plain;
  opt.plain_lines = 4;
  opt.smoothing = 0.0;  // shown loss = latest loss
  Progress p("pretrain", 100, out, opt, clock.fn());
  CHECK_FALSE(p.interactive());
  for (Index s = 1; s <= 100; ++s) {
    clock.now += 0.5;  // 0.5 s per step
    p.update(s, 1.0 / static_cast<double>(s));
    if (s == 50) {
      CHECK(std::abs(p.elapsed() - (25.0)) < 1e-9);
      CHECK(std::abs(p.eta() - (25.0)) < 1e-9);  // 50 steps left at 0.5 s
    }
  }
  p.finish("done");
  const std::string text = out.str();
  CHECK(count(text, "\n") == 5);  // 4 milestones + summary
  CHECK(count(text, "\r") == 0);
  CHECK(text.find("pretrain: step 25/100 (25%) loss 0.0400 elapsed 12.5s eta 37.5s\n") != std::string::npos);
  CHECK(text.find("pretrain: step 100/100 (100%) loss 0.0100 elapsed 50.0s\n") != std::string::npos);
  CHECK(text.find("pretrain: done\n") != std::string::npos);
}

TEST_CASE("Interactive progress redraws one line, throttled", "[train][progress]") {
  std::ostringstream out;
  FakeClock clock;
  ProgressOptions opt;
  opt.mode = ProgressOptions::Mode::Interactive;
  opt.min_interval_s = 1.0;
  opt.bar_width = 10;
  Progress p("lora", 10, out, opt, clock.fn());
  for (Index s = 1; s <= 10; ++s) {
    clock.now += 0.3;
    p.update(s, 2.0);
  }
  p.finish();
  const std::string text = out.str();
  // Draws at steps 1, 5 (1.2 s later), 9 (1.2 s later) and the final step 10.
  CHECK(count(text, "\r") == 4);
  CHECK(count(text, "\n") == 1);
  CHECK(text.find("\rlora [##########] step 10/10 (100%) loss 2.0000 elapsed 3.0s\x1b[K\n") != std::string::npos);
  CHECK(text.find("lora [#####.....] step 5/10 (50%)") != std::string::npos);
}

TEST_CASE("Progress smooths the loss with a bias-corrected moving average", "[train][progress]") {
  std::ostringstream out;
  ProgressOptions opt;
  opt.mode = ProgressOptions::Mode::Silent;
  opt.smoothing = 0.5;
  Progress p("x", 3, out, opt);
  CHECK(std::isnan(p.smoothed_loss()));
  p.update(1, 4.0);
  CHECK(std::abs(p.smoothed_loss() - (4.0)) < 1e-9);  // bias correction: exact first value
  p.update(2, 2.0);
  CHECK(std::abs(p.smoothed_loss() - ((0.5 * 0.5 * 4.0 + 0.5 * 2.0) / 0.75)) < 1e-9);
  p.update(3);  // no loss this step: the average is unchanged
  CHECK(std::abs(p.smoothed_loss() - ((0.5 * 0.5 * 4.0 + 0.5 * 2.0) / 0.75)) < 1e-9);
  p.finish("silent");
  CHECK(out.str().empty());
}

TEST_CASE("Progress on a string stream is never a terminal", "[train][progress]") {
  std::ostringstream out;
  CHECK_FALSE(is_terminal(out));
  Progress p("auto", 5, out);
  CHECK(p.mode() == ProgressOptions::Mode::Plain);
}

TEST_CASE("Progress rejects bad arguments with named errors", "[train][progress][errors]") {
  std::ostringstream out;
  PEFT_REQUIRE_THROWS_WITH(Progress("run", 0, out), ConfigError, "Progress \"run\": total steps must be > 0, got 0");
  ProgressOptions opt;
  opt.smoothing = 1.0;
  PEFT_REQUIRE_THROWS_WITH(Progress("run", 5, out, opt), ConfigError, "smoothing must be in [0, 1), got 1");
  opt.smoothing = 0.9;
  opt.plain_lines = 0;
  PEFT_REQUIRE_THROWS_WITH(Progress("run", 5, out, opt), ConfigError, "plain_lines must be > 0, got 0");
  Progress p("run", 5, out);
  p.update(3);
  PEFT_REQUIRE_THROWS_WITH(p.update(6), ConfigError, "Progress \"run\": step 6 is outside [3, 5]");
  PEFT_REQUIRE_THROWS_WITH(p.update(2), ConfigError, "step 2 is outside [3, 5]");
}
