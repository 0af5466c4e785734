#pragma once
// peft's own GEMM kernel (core/gemm_kernel.hpp) through detail::gemm_impl<true>, against the
// product computed in double. Shared by the core tests (the test build's packets: SSE2 on x86-64)
// and tests/native (compiled with -march=native: AVX-512 or AVX2 where the machine has them), so
// both register tiles are checked. The shapes are chosen around the kernel's sizes: whole and
// partial register tiles (MR rows, NR columns), several depth blocks (k > kKcMax, uneven), several
// column blocks of B (n > kNcMax), and shapes below one tile (Eigen's path).
#include <peft/core/gemm.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "support/test_utils.hpp"

namespace peft::test {

template <class T>
double own_kernel_tol(Index k) {
  // float: the error of a k-term sum grows like √k · ε; double as tight as Eigen's
  return std::is_same_v<T, float> ? 2e-6 * (1.0 + std::sqrt(static_cast<double>(k)) / 8.0) : 1e-14;
}

struct KernelShape {
  Index m, k, n;
};

template <class T>
std::vector<KernelShape> own_kernel_shapes() {
  using S = detail::kernel::Shape<T>;
  const Index mr = S::MR, nr = S::NR, kc = S::kKcMax, nc = S::kNcMax;
  return {{mr, 1, nr},           {mr, 7, nr},         {mr + 1, 5, nr + 1},     {3 * mr - 1, 33, 2 * nr + 3},
          {64, 64, 64},          {mr, kc + 1, nr},    {2 * mr + 5, 2 * kc + 17, nr + 2},
          {37, 19, nc + nr + 5}, {mr - 1, 40, 3 * nr}, {3 * mr, 40, nr - 1}, {129, 300, 70},
          {S::kMcMax + mr + 3, 5, nr + 1}};
}

inline std::string shape_name(const KernelShape& s) {
  return std::to_string(s.m) + "x" + std::to_string(s.k) + "x" + std::to_string(s.n);
}

/// Every operand form peft's layers pass (NN, NT, TN, TT, a block as lhs, a column-major and a
/// strided destination), plain and accumulating, alpha and a scalar factor folded into it.
template <class T>
void check_own_kernel(std::uint64_t seed) {
#if defined(EIGEN_USE_BLAS)
  WARN("EIGEN_USE_BLAS: every product goes to the BLAS; peft's own kernel is not used or checked");
  return;
#endif
  if (!detail::kernel::Shape<T>::kVectorized) {
    WARN("no SIMD packets for this scalar: peft::gemm uses Eigen's kernels; nothing to check");
    return;
  }
  Rng rng(seed);
  using ColMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  for (const KernelShape& s : own_kernel_shapes<T>()) {
    INFO(shape_name(s));
    const double tol = own_kernel_tol<T>(s.k);
    const Matrix<T> a = random_matrix<T>(s.m, s.k, rng), b = random_matrix<T>(s.k, s.n, rng);
    const Matrix<T> at = a.transpose(), bt = b.transpose();
    const Matrix<double> ref = a.template cast<double>() * b.template cast<double>();
    const Matrix<T> c0 = random_matrix<T>(s.m, s.n, rng);
    const T alpha = T(-0.75);
    const Matrix<double> want = c0.template cast<double>() + double(alpha) * ref;

    Matrix<T> y(s.m, s.n);
    detail::gemm_impl<true>(y, a, b, T(1), false);
    CHECK(rel_diff(y.template cast<double>(), ref) <= tol);
    y.setConstant(T(1e3));  // overwritten, not added to
    detail::gemm_impl<true>(y, a, bt.transpose(), T(1), false);
    CHECK(rel_diff(y.template cast<double>(), ref) <= tol);
    detail::gemm_impl<true>(y, at.transpose(), b, alpha, false);
    CHECK(rel_diff(y.template cast<double>(), double(alpha) * ref) <= tol);
    detail::gemm_impl<true>(y, at.transpose(), bt.transpose(), T(1), false);
    CHECK(rel_diff(y.template cast<double>(), ref) <= tol);
    detail::gemm_impl<true>(y, T(2) * a, b, T(1), false);
    CHECK(rel_diff(y.template cast<double>(), 2.0 * ref) <= tol);

    Matrix<T> acc = c0;
    detail::gemm_impl<true>(acc, a, bt.transpose(), alpha, true);
    CHECK(rel_diff(acc.template cast<double>(), want) <= tol);
    acc = c0;
    detail::gemm_impl<true>(acc, at.transpose(), b, alpha, true);
    CHECK(rel_diff(acc.template cast<double>(), want) <= tol);

    ColMajor cm = c0;  // column-major destination: computed as its transpose
    detail::gemm_impl<true>(cm, a, b, alpha, true);
    CHECK(rel_diff(Matrix<double>(cm.template cast<double>()), want) <= tol);
    cm = c0;
    detail::gemm_impl<true>(cm, at.transpose(), bt.transpose(), alpha, true);
    CHECK(rel_diff(Matrix<double>(cm.template cast<double>()), want) <= tol);

    // Strided operands and destination: blocks of wider matrices (row stride ≠ width).
    Matrix<T> wide_a = random_matrix<T>(s.m + 2, s.k + 3, rng);
    wide_a.block(1, 2, s.m, s.k) = a;
    Matrix<T> big = Matrix<T>::Zero(s.m + 3, s.n + 5);
    big.block(2, 1, s.m, s.n) = c0;
    detail::gemm_impl<true>(big.block(2, 1, s.m, s.n), wide_a.block(1, 2, s.m, s.k), b, alpha, true);
    CHECK(rel_diff(big.block(2, 1, s.m, s.n).template cast<double>(), want) <= tol);
    CHECK(big.topRows(2).isZero(0));
    CHECK(big.bottomRows(1).isZero(0));
    CHECK(big.col(0).isZero(0));
    CHECK(big.rightCols(4).isZero(0));
  }
  // A vector operand with an inner stride (a column of a row-major matrix: an outer product) goes
  // to Eigen's product code on both paths, which reads it through its stride.
  using S = detail::kernel::Shape<T>;
  const Index m = 3 * S::MR + 1, n = 2 * S::NR + 3;
  const Matrix<T> x = random_matrix<T>(m, 5, rng), y = random_matrix<T>(1, n, rng);
  const Matrix<double> outer_ref = x.col(2).template cast<double>() * y.template cast<double>();
  Matrix<T> outer(m, n);
  detail::gemm_impl<true>(outer, x.col(2), y, T(1), false);
  CHECK(rel_diff(outer.template cast<double>(), outer_ref) <= own_kernel_tol<T>(1));
  outer.setZero();
  detail::gemm_impl<false>(outer, x.col(2), y, T(1), false);
  CHECK(rel_diff(outer.template cast<double>(), outer_ref) <= own_kernel_tol<T>(1));
}

}  // namespace peft::test
