#pragma once
// Early stopping on a validation metric (Prechelt, 1998, "Early Stopping — But When?"): stop when
// the metric has not improved by more than `min_delta` for `patience` consecutive evaluations.
//
//   improved(v)  ⇔  v > best + min_delta   (maximize, e.g. accuracy)
//                ⇔  v < best − min_delta   (minimize, e.g. loss)
//
// A NaN metric never counts as an improvement, so a diverged run stops after `patience` more
// evaluations instead of being kept forever. The caller decides what to restore (best weights are
// a model concern, not this object's).
#include <cmath>
#include <limits>
#include <string>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"

namespace peft {

struct EarlyStoppingOptions {
  int patience = 5;        ///< evaluations without improvement before stopping (≥ 1)
  double min_delta = 0.0;  ///< smallest change that counts as an improvement (≥ 0)
  bool maximize = false;   ///< true for accuracy-like metrics, false for losses
};

class EarlyStopping {
 public:
  explicit EarlyStopping(EarlyStoppingOptions options = {}) : opt_(options) {
    if (opt_.patience < 1)
      throw ConfigError("EarlyStopping: patience must be >= 1, got " + std::to_string(opt_.patience));
    check::non_negative("EarlyStopping", "", "min_delta", opt_.min_delta);
    reset();
  }

  /// Records one evaluation; returns true when it is the new best.
  bool update(double metric) {
    ++evaluations_;
    const bool better =
        !std::isnan(metric) && (opt_.maximize ? metric > best_ + opt_.min_delta : metric < best_ - opt_.min_delta);
    if (better) {
      best_ = metric;
      best_evaluation_ = evaluations_;
      since_best_ = 0;
    } else {
      ++since_best_;
    }
    return better;
  }

  /// True once `patience` evaluations in a row brought no improvement.
  bool should_stop() const { return since_best_ >= opt_.patience; }

  /// Best metric so far (−∞ / +∞ before any finite evaluation).
  double best() const { return best_; }
  /// 1-based index of the best evaluation (0 before any improvement).
  int best_evaluation() const { return best_evaluation_; }
  int evaluations() const { return evaluations_; }
  int evaluations_since_best() const { return since_best_; }
  const EarlyStoppingOptions& options() const { return opt_; }

  void reset() {
    best_ = opt_.maximize ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
    best_evaluation_ = 0;
    evaluations_ = 0;
    since_best_ = 0;
  }

 private:
  EarlyStoppingOptions opt_;
  double best_ = 0.0;
  int best_evaluation_ = 0;
  int evaluations_ = 0;
  int since_best_ = 0;
};

}  // namespace peft
