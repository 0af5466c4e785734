// peft's own GEMM kernel (core/gemm_kernel.hpp) on the widest packets of the machine that builds
// the tests: this executable alone is compiled with -march=native (tests/CMakeLists.txt), so where
// the CPU has AVX-512 it checks the 8 × 32 register tile peft::gemm runs by default there, and where
// it has AVX2 the 6 × 16 one. It links no instantiations (they are compiled for the baseline ISA):
// what it uses is instantiated here.
#include <peft/core/gemm.hpp>
#include <peft/core/parallel.hpp>

#include <cstdio>

#include "core/gemm_kernel_checks.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::random_matrix;

TEMPLATE_TEST_CASE("peft's own GEMM kernel equals the product on every operand form", "[gemm]", float,
                   double) {
  using S = detail::kernel::Shape<TestType>;
  std::printf("native kernel for %s: %d-wide packets, %d x %d register tile, peft::gemm uses it: %s\n",
              sizeof(TestType) == 4 ? "float" : "double", S::P, S::MR, S::NR,
              detail::kOwnGemmKernel ? "yes" : "no (Eigen's GEBP)");
  peft::test::check_own_kernel<TestType>(11);
}

TEST_CASE("peft's own GEMM kernel gives the same bits on one and two threads", "[gemm]") {
  // Each thread computes whole register tiles of its slab of C, and the k blocking depends on k
  // alone: the split changes who computes an element, never the order of its sum.
#if !defined(_OPENMP) || defined(EIGEN_USE_BLAS)
  WARN("no OpenMP in this build, or EIGEN_USE_BLAS: nothing to split");
  return;
#endif
  Rng rng(12);
  const Index m = 300, k = 900, n = 260;
  const Matrix<float> a = random_matrix<float>(m, k, rng), b = random_matrix<float>(k, n, rng);
  const Matrix<float> wt = random_matrix<float>(n, k, rng), bt = b.transpose();
  const int before = Eigen::nbThreads();
  Matrix<float> one(m, n), two(m, n), one_t(m, n), two_t(m, n), wide_one(n, m), wide_two(n, m);
  using detail::gemm_impl;
  Eigen::setNbThreads(1);
  gemm_impl<true>(one, a, b, 1.0f, false);
  gemm_impl<true>(one_t, a, wt.transpose(), 1.0f, false);
  gemm_impl<true>(wide_one, wt, a.transpose(), 1.0f, false);  // split by columns (more columns than rows)
  Eigen::setNbThreads(2);
  REQUIRE(parallel_threads(m / 8, 2.0 * m * n * k) == 2);  // the split below really runs on two threads
  gemm_impl<true>(two, a, b, 1.0f, false);
  gemm_impl<true>(two_t, a, wt.transpose(), 1.0f, false);
  gemm_impl<true>(wide_two, wt, a.transpose(), 1.0f, false);
  Eigen::setNbThreads(before);
  CHECK((one.array() == two.array()).all());
  CHECK((one_t.array() == two_t.array()).all());
  CHECK((wide_one.array() == wide_two.array()).all());
  CHECK(peft::test::rel_diff(one.cast<double>(), Matrix<double>(a.cast<double>() * b.cast<double>())) <= 1e-5);
}
