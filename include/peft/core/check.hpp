#pragma once
// Argument checks shared by the public entry points. Each throws with the object's kind and name,
// the expected and the actual value. Messages are built only on failure, so the checks cost no
// allocation on hot paths.
#include <cmath>
#include <cstdio>
#include <string>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"

namespace peft::check {

/// A number as a message shows it: shortest round-trip-ish form ("0.1", "-1", "nan", "inf"),
/// not std::to_string's fixed six decimals (which prints 1e-9 as "0.000000").
inline std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.10g", v);
  return buf;
}

/// x must have `expected` columns.
inline void input_features(const char* kind, const std::string& name, Index actual, Index expected) {
  if (actual != expected)
    throw ShapeError(describe(kind, name) + ": input has " + std::to_string(actual) + " features, expected " +
                     std::to_string(expected));
}

/// A tensor must have exactly the given shape.
inline void shape(const char* kind, const std::string& name, const char* what, Index rows, Index cols,
                  Index expected_rows, Index expected_cols) {
  if (rows != expected_rows || cols != expected_cols)
    throw ShapeError(describe(kind, name) + ": " + what + " has shape " + shape_str(rows, cols) + ", expected " +
                     shape_str(expected_rows, expected_cols));
}

/// A hyper-parameter must be finite and > 0.
inline void positive(const char* kind, const std::string& name, const char* what, double value) {
  if (!std::isfinite(value) || value <= 0.0)
    throw ConfigError(describe(kind, name) + ": " + what + " must be finite and > 0, got " + num(value));
}

/// A hyper-parameter must be finite and >= 0.
inline void non_negative(const char* kind, const std::string& name, const char* what, double value) {
  if (!std::isfinite(value) || value < 0.0)
    throw ConfigError(describe(kind, name) + ": " + what + " must be finite and >= 0, got " + num(value));
}

/// A probability-like value in [0, 1).
inline void unit_interval_open(const char* kind, const std::string& name, const char* what, double value) {
  if (!std::isfinite(value) || value < 0.0 || value >= 1.0)
    throw ConfigError(describe(kind, name) + ": " + what + " must be in [0, 1), got " + num(value));
}

}  // namespace peft::check
