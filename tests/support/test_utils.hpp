#pragma once
// Shared test helpers: per-scalar tolerances and random data with fixed seeds.
#include <peft/core/rng.hpp>
#include <peft/core/types.hpp>

#include <string>

#include "support/catch.hpp"

namespace peft::test {

/// Tolerances per scalar type: "rel" for equivalences (merged == unmerged), "grad" for
/// finite-difference gradient checks (run in double only).
template <class T>
struct Tolerances;

template <>
struct Tolerances<float> {
  static constexpr double rel = 1e-5;
  static constexpr double grad = 1e-2;
};

template <>
struct Tolerances<double> {
  static constexpr double rel = 1e-12;
  static constexpr double grad = 1e-7;
};

/// Matrix with N(0, stddev²) entries from a seeded generator.
template <class T>
Matrix<T> random_matrix(Index rows, Index cols, Rng& rng, double stddev = 1.0) {
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<T>(rng.normal(0.0, stddev));
  return m;
}

/// ‖a − b‖ / ‖b‖ (b is the reference).
template <class A, class B>
double rel_diff(const A& a, const B& b) {
  const double nb = b.template cast<double>().norm();
  const double d = (a - b).template cast<double>().norm();
  return nb == 0.0 ? d : d / nb;
}

/// Sum of g ⊙ y: a scalar "loss" whose gradient with respect to y is g.
template <class T>
double dot(const Matrix<T>& g, const Matrix<T>& y) {
  return static_cast<double>((g.array() * y.array()).sum());
}

}  // namespace peft::test

/// REQUIRE that `expr` throws `Type` and that its message contains `needle`.
#define PEFT_REQUIRE_THROWS_WITH(expr, Type, needle)                  \
  do {                                                                \
    bool peft_thrown_ = false;                                        \
    try {                                                             \
      (void)(expr);                                                   \
    } catch (const Type& e) {                                         \
      peft_thrown_ = true;                                            \
      INFO("message: " << e.what());                                  \
      CHECK(std::string(e.what()).find(needle) != std::string::npos); \
    }                                                                 \
    if (!peft_thrown_) FAIL("expected " #Type " from " #expr);        \
  } while (0)
