#pragma once
// Learning-rate schedules: small objects queried by step that return a multiplier of each group's
// initial learning rate, lr_g(step) = initial_lr_g · multiplier(step), exactly as torch's LambdaLR
// with the Hugging Face transformers lambdas (optimization.py):
//   warmup (step < W):  step / max(1, W)
//   constant:           1
//   linear:             max(0, (N − step) / max(1, N − W))
//   cosine:             progress = (step − W) / max(1, N − W)
//                       max(0, ½ (1 + cos(π · 2·num_cycles · progress)))      (num_cycles = 0.5: half a cosine)
// W = warmup steps, N = total training steps. Past N, linear stays at 0 and cosine keeps
// following the cosine (it rises again), both as HF does.
// min_lr_ratio r (default 0) lifts the decay floor the way HF's
// get_cosine_with_min_lr_schedule_with_warmup does: factor ← factor·(1 − r) + r after warmup
// (we apply the same rule to the linear decay; HF has no min-lr variant for linear). With r = 0
// the values are exactly HF's.
//
// Usage matching `optimizer.step(); scheduler.step()` in torch: before the k-th optimizer step
// (k = 0, 1, ...) call apply_schedule(opt, schedule, k).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/optim/optimizer.hpp"

namespace peft {

class Schedule {
 public:
  virtual ~Schedule() = default;
  /// Multiplier of the initial lr at `step` (>= 0).
  virtual double multiplier(std::int64_t step) const = 0;

 protected:
  static void check_step(const char* kind, std::int64_t step) {
    if (step < 0) throw ConfigError(std::string(kind) + ": step must be >= 0, got " + std::to_string(step));
  }
  static void check_warmup(const char* kind, std::int64_t warmup, std::int64_t total) {
    if (warmup < 0) throw ConfigError(std::string(kind) + ": warmup_steps must be >= 0, got " + std::to_string(warmup));
    if (total <= 0) throw ConfigError(std::string(kind) + ": total_steps must be > 0, got " + std::to_string(total));
    if (warmup > total)
      throw ConfigError(std::string(kind) + ": warmup_steps " + std::to_string(warmup) + " exceeds total_steps " +
                        std::to_string(total));
  }
  static void check_ratio(const char* kind, double r) {
    if (!std::isfinite(r) || r < 0.0 || r > 1.0)
      throw ConfigError(std::string(kind) + ": min_lr_ratio must be in [0, 1], got " + check::num(r));
  }
  /// HF: float(step) / float(max(1, W))
  static double warmup_factor(std::int64_t step, std::int64_t warmup) {
    return static_cast<double>(step) / static_cast<double>(std::max<std::int64_t>(1, warmup));
  }
};

/// lr = initial lr at every step (HF get_constant_schedule), optionally after a linear warmup
/// (HF get_constant_schedule_with_warmup).
class ConstantSchedule : public Schedule {
 public:
  explicit ConstantSchedule(std::int64_t warmup_steps = 0) : warmup_(warmup_steps) {
    if (warmup_ < 0) throw ConfigError("ConstantSchedule: warmup_steps must be >= 0, got " + std::to_string(warmup_));
  }
  double multiplier(std::int64_t step) const override {
    check_step("ConstantSchedule", step);
    return step < warmup_ ? warmup_factor(step, warmup_) : 1.0;
  }

 private:
  std::int64_t warmup_;
};

/// Linear warmup to the initial lr, then linear decay to 0 (or min_lr_ratio) at total_steps
/// (HF get_linear_schedule_with_warmup).
class LinearSchedule : public Schedule {
 public:
  LinearSchedule(std::int64_t warmup_steps, std::int64_t total_steps, double min_lr_ratio = 0.0)
      : warmup_(warmup_steps), total_(total_steps), min_ratio_(min_lr_ratio) {
    check_warmup("LinearSchedule", warmup_, total_);
    check_ratio("LinearSchedule", min_ratio_);
  }
  double multiplier(std::int64_t step) const override {
    check_step("LinearSchedule", step);
    if (step < warmup_) return warmup_factor(step, warmup_);
    const double f = std::max(
        0.0, static_cast<double>(total_ - step) / static_cast<double>(std::max<std::int64_t>(1, total_ - warmup_)));
    return min_ratio_ == 0.0 ? f : f * (1.0 - min_ratio_) + min_ratio_;
  }

 private:
  std::int64_t warmup_;
  std::int64_t total_;
  double min_ratio_;
};

/// Linear warmup, then cosine decay over num_cycles periods (0.5: from 1 down to 0 at total_steps)
/// (HF get_cosine_schedule_with_warmup; with min_lr_ratio, get_cosine_with_min_lr_schedule_with_warmup).
class CosineSchedule : public Schedule {
 public:
  CosineSchedule(std::int64_t warmup_steps, std::int64_t total_steps, double num_cycles = 0.5,
                 double min_lr_ratio = 0.0)
      : warmup_(warmup_steps), total_(total_steps), cycles_(num_cycles), min_ratio_(min_lr_ratio) {
    check_warmup("CosineSchedule", warmup_, total_);
    check_ratio("CosineSchedule", min_ratio_);
    if (!std::isfinite(cycles_) || cycles_ <= 0.0)
      throw ConfigError("CosineSchedule: num_cycles must be finite and > 0, got " + check::num(cycles_));
  }
  double multiplier(std::int64_t step) const override {
    check_step("CosineSchedule", step);
    if (step < warmup_) return warmup_factor(step, warmup_);
    constexpr double kPi = 3.14159265358979323846;
    const double progress =
        static_cast<double>(step - warmup_) / static_cast<double>(std::max<std::int64_t>(1, total_ - warmup_));
    double f = 0.5 * (1.0 + std::cos(kPi * cycles_ * 2.0 * progress));
    if (min_ratio_ != 0.0) f = f * (1.0 - min_ratio_) + min_ratio_;
    return std::max(0.0, f);
  }

 private:
  std::int64_t warmup_;
  std::int64_t total_;
  double cycles_;
  double min_ratio_;
};

/// Sets every group's lr to initial_lr · schedule.multiplier(step).
template <class T>
void apply_schedule(Optimizer<T>& optimizer, const Schedule& schedule, std::int64_t step) {
  const double m = schedule.multiplier(step);
  for (std::size_t g = 0; g < optimizer.num_groups(); ++g) optimizer.set_lr(g, optimizer.initial_lr(g) * m);
}

}  // namespace peft
