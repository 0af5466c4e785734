#pragma once
// Shared fixture for the optimizer tests: a module with W [2, 2] and b [2] (a [1, 2] vector) and
// the loss L = Σ θ⁴/4 − c·θ, whose gradient θ³ − c is elementwise but depends on the current θ,
// so every step's gradient depends on the previous update. Reference trajectories come from
// torch 1.13 via benchmarks/peer/optim_reference.py (same W0, B0, CW, CB).
#include <peft/core/module.hpp>
#include <peft/core/parameters.hpp>

#include <cstddef>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include <peft/optim/optimizer.hpp>

#include "support/test_utils.hpp"

namespace peft::test {

template <class T>
Matrix<T> from_list(Index rows, Index cols, std::initializer_list<double> values) {
  Matrix<T> m(rows, cols);
  Index k = 0;
  for (double v : values) {
    m(k / cols, k % cols) = static_cast<T>(v);
    ++k;
  }
  return m;
}

template <class T>
struct TwoParams : Module<T> {
  Parameter<T> weight{2, 2, true};
  Parameter<T> bias{1, 2, true, true};

  TwoParams() {
    weight.value = from_list<T>(2, 2, {0.5, -1.0, 1.5, 0.25});  // W0
    bias.value = from_list<T>(1, 2, {-0.75, 2.0});              // B0
  }

  /// grad = θ³ − c for every trainable parameter (overwrites, like zero_grad + backward).
  void compute_grads() {
    const Matrix<T> cw = from_list<T>(2, 2, {0.1, -0.2, 0.3, 0.4});
    const Matrix<T> cb = from_list<T>(1, 2, {0.5, -0.6});
    if (weight.trainable()) weight.grad = (weight.value.array().cube() - cw.array()).matrix();
    if (bias.trainable()) bias.grad = (bias.value.array().cube() - cb.array()).matrix();
  }

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    fn("weight", weight);
    fn("bias", bias);
  }
};

/// Tolerance for a trajectory of a few steps against float64 torch values.
template <class T>
constexpr double trajectory_tol() {
  return std::is_same<T, float>::value ? 2e-5 : 1e-12;
}

/// Runs w.size() steps and checks W and b after each against torch's trajectory.
template <class T>
void check_trajectory(TwoParams<T>& m, Optimizer<T>& opt, const std::vector<std::vector<double>>& w,
                      const std::vector<std::vector<double>>& b) {
  for (std::size_t s = 0; s < w.size(); ++s) {
    m.compute_grads();
    opt.step();
    INFO("step " << s + 1);
    CHECK(rel_diff(m.weight.value, from_list<T>(2, 2, {w[s][0], w[s][1], w[s][2], w[s][3]})) < trajectory_tol<T>());
    CHECK(rel_diff(m.bias.value, from_list<T>(1, 2, {b[s][0], b[s][1]})) < trajectory_tol<T>());
  }
}

}  // namespace peft::test
