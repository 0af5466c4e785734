#pragma once
// Classification helpers: row-wise argmax and accuracy.
// argmax follows torch.argmax: the first index of the maximum, and a NaN counts as the maximum
// (so a diverged model is never reported as accurate by accident).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"

namespace peft {

/// Index of the largest entry of each row of `scores` [rows, classes], written into `out`
/// (resized; reuses its capacity).
template <class T>
void argmax_rows(const ConstMatrixRef<T>& scores, std::vector<std::int64_t>& out) {
  if (scores.cols() == 0 && scores.rows() > 0)
    throw ShapeError("argmax_rows: scores of shape " + shape_str(scores.rows(), scores.cols()) +
                     " have no columns, expected >= 1");
  out.resize(static_cast<std::size_t>(scores.rows()));
  for (Index i = 0; i < scores.rows(); ++i) {
    Index best = 0;
    T best_value = scores(i, 0);
    if (!std::isnan(best_value)) {
      for (Index j = 1; j < scores.cols(); ++j) {
        const T v = scores(i, j);
        if (std::isnan(v)) {
          best = j;
          break;
        }
        if (v > best_value) {
          best = j;
          best_value = v;
        }
      }
    }
    out[static_cast<std::size_t>(i)] = static_cast<std::int64_t>(best);
  }
}

template <class T>
std::vector<std::int64_t> argmax_rows(const ConstMatrixRef<T>& scores) {
  std::vector<std::int64_t> out;
  argmax_rows<T>(scores, out);
  return out;
}

/// Fraction of rows (labels ≠ ignore_index) whose argmax equals the label; 0 when no row counts.
template <class T>
double accuracy(const ConstMatrixRef<T>& scores, const std::vector<std::int64_t>& labels,
                std::int64_t ignore_index = -100) {
  if (static_cast<Index>(labels.size()) != scores.rows())
    throw ShapeError("accuracy: " + std::to_string(labels.size()) + " labels for scores of shape " +
                     shape_str(scores.rows(), scores.cols()) + ", expected " + std::to_string(scores.rows()));
  std::vector<std::int64_t> pred;
  argmax_rows<T>(scores, pred);
  std::size_t correct = 0;
  std::size_t counted = 0;
  for (std::size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] == ignore_index) continue;
    ++counted;
    if (pred[i] == labels[i]) ++correct;
  }
  return counted == 0 ? 0.0 : static_cast<double>(correct) / static_cast<double>(counted);
}

}  // namespace peft
