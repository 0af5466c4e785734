// peft::gemm (core/gemm.hpp) against Eigen's own product, computed in double: every branch of its
// dispatch (coefficient-based small products, one-row and one-column results, an empty inner
// dimension, the kept-packing GEMM), plain and accumulating, with alpha, and the operand forms the
// layers pass (transposes, Refs, blocks, scalar multiples, a block as the destination); and peft's
// own kernel (core/gemm_kernel.hpp) on this build's packets.
#include <peft/core/gemm.hpp>

#include <string>

#include "core/gemm_kernel_checks.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::random_matrix;
using peft::test::rel_diff;

namespace {

template <class T>
constexpr double tol() {
  return std::is_same_v<T, float> ? 2e-6 : 1e-14;
}

// (m, k, n): dst [m, n] = a [m, k] · b [k, n]. The sum m + k + n below 20 is Eigen's small path.
struct Shape {
  Index m, k, n;
};
const Shape kShapes[] = {{2, 3, 4},   {1, 37, 29},  {1, 1, 64},      {33, 41, 1}, {1, 50, 1},
                         {24, 0, 17}, {64, 48, 40}, {150, 260, 130}, {7, 300, 5}};

std::string name(const Shape& s) { return std::to_string(s.m) + "x" + std::to_string(s.k) + "x" + std::to_string(s.n); }

}  // namespace

TEMPLATE_TEST_CASE("gemm equals Eigen's product on every path", "[gemm]", float, double) {
  using T = TestType;
  Rng rng(5);
  for (const Shape& s : kShapes) {
    INFO(name(s));
    const Matrix<T> a = random_matrix<T>(s.m, s.k, rng), b = random_matrix<T>(s.k, s.n, rng);
    const Matrix<T> at = a.transpose(), bt = b.transpose();
    const Matrix<double> ref = a.template cast<double>() * b.template cast<double>();
    const Matrix<T> c0 = random_matrix<T>(s.m, s.n, rng);
    const T alpha = T(-0.75);

    Matrix<T> y;
    gemm(y, a, b);  // resized by gemm
    CHECK(rel_diff(y.template cast<double>(), ref) <= tol<T>());
    gemm(y, at.transpose(), bt.transpose());  // transposed operands
    CHECK(rel_diff(y.template cast<double>(), ref) <= tol<T>());
    const ConstMatrixRef<T> ra(a), rb(b);
    gemm(y, ra, rb, alpha);  // Refs, alpha
    CHECK(rel_diff(y.template cast<double>(), double(alpha) * ref) <= tol<T>());
    gemm(y, T(2) * a, b);  // a scalar multiple, folded into alpha
    CHECK(rel_diff(y.template cast<double>(), 2.0 * ref) <= tol<T>());

    Matrix<T> acc = c0;  // accumulate: dst += alpha a b
    gemm(acc, a, b, alpha, true);
    const Matrix<double> want = c0.template cast<double>() + double(alpha) * ref;
    CHECK(rel_diff(acc.template cast<double>(), want) <= tol<T>());
    acc = c0;
    gemm(acc, ra.transpose().transpose(), bt.transpose(), alpha, true);
    CHECK(rel_diff(acc.template cast<double>(), want) <= tol<T>());

    Matrix<T> big = Matrix<T>::Zero(s.m + 3, s.n);  // a block of rows as the destination
    big.middleRows(2, s.m) = c0;
    gemm(big.middleRows(2, s.m), a, b, alpha, true);
    CHECK(rel_diff(big.middleRows(2, s.m).template cast<double>(), want) <= tol<T>());
    CHECK(big.topRows(2).isZero(0));
    CHECK(big.bottomRows(1).isZero(0));
  }
}

TEST_CASE("gemm overwrites a destination that held other values", "[gemm]") {
  Rng rng(6);
  for (const Shape& s : kShapes) {
    INFO(name(s));
    const Matrix<double> a = random_matrix<double>(s.m, s.k, rng), b = random_matrix<double>(s.k, s.n, rng);
    Matrix<double> y = Matrix<double>::Constant(s.m, s.n, 1e3);
    gemm(y, a, b);
    CHECK(rel_diff(y, Matrix<double>(a * b)) <= 1e-14);
  }
}

TEMPLATE_TEST_CASE("peft's own GEMM kernel equals the product on every operand form", "[gemm]", float, double) {
  // on this build's packets (SSE2 on x86-64 unless the build sets -m flags); tests/native checks
  // the AVX-512 / AVX2 register tiles
  peft::test::check_own_kernel<TestType>(7);
}

TEST_CASE("peft's own GEMM kernel sums in an order that depends on k alone", "[gemm]") {
  // The k blocking is a function of k (so a thread's slab of C sums like the whole product):
  // rows computed on their own equal the same rows of the whole product, bit for bit (rows 17-29
  // sit in two full tiles of the whole product; alone they are a full and a partial one).
#if defined(EIGEN_USE_BLAS)
  WARN("EIGEN_USE_BLAS: products go to the BLAS; peft's own kernel is not used or checked");
  return;
#endif
  Rng rng(8);
  const Index m = 40, k = 2 * detail::kernel::Shape<float>::kKcMax + 9, n = 70;
  const Matrix<float> a = random_matrix<float>(m, k, rng), b = random_matrix<float>(k, n, rng);
  Matrix<float> whole(m, n), part(13, n);
  detail::gemm_impl<true>(whole, a, b, 1.0f, false);
  detail::gemm_impl<true>(part, a.middleRows(17, 13), b, 1.0f, false);
  CHECK((part.array() == whole.middleRows(17, 13).array()).all());
  const Matrix<float> c0 = random_matrix<float>(m, n, rng);  // accumulating: the same
  whole = c0;
  part = c0.middleRows(17, 13);
  detail::gemm_impl<true>(whole, a, b, -0.5f, true);
  detail::gemm_impl<true>(part, a.middleRows(17, 13), b, -0.5f, true);
  CHECK((part.array() == whole.middleRows(17, 13).array()).all());
}
