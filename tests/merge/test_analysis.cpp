#include <peft/merge/analysis.hpp>
#include <peft/merge/low_rank_svd.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "merge_test_utils.hpp"

using namespace peft;
using peft::test::SvdTolerances;

TEMPLATE_TEST_CASE("factored_svd equals the dense SVD of the product", "[merge][svd]", float, double) {
  Rng rng(31);
  for (Index r : {1, 3, 7, 12}) {  // 12 > in: the core is wide, the product rank-limited by in
    const Matrix<TestType> B = test::random_matrix<TestType>(15, r, rng);
    const Matrix<TestType> A = test::random_matrix<TestType>(r, 9, rng);
    const Eigen::MatrixXd dense = B.template cast<double>() * A.template cast<double>();
    const Eigen::VectorXd ref = test::ref_singular_values(dense);
    const ThinSvd<TestType> s = factored_svd<TestType>(B, A);
    const double tol = SvdTolerances<TestType>::rel * dense.norm();
    INFO("r = " << r);
    REQUIRE(static_cast<Index>(s.sigma.size()) == std::min<Index>(r, 9));
    for (std::size_t j = 0; j < s.sigma.size(); ++j) CHECK(std::abs(s.sigma[j] - ref(static_cast<Index>(j))) < tol);
    // U, V orthonormal and U Σ Vᵀ reproduces the product.
    const Eigen::MatrixXd u = s.U.template cast<double>(), v = s.V.template cast<double>();
    const Index m = u.cols();
    CHECK((u.transpose() * u - Eigen::MatrixXd::Identity(m, m)).norm() < SvdTolerances<TestType>::rel * 10);
    CHECK((v.transpose() * v - Eigen::MatrixXd::Identity(m, m)).norm() < SvdTolerances<TestType>::rel * 10);
    Eigen::VectorXd sig(m);
    for (Index j = 0; j < m; ++j) sig(j) = s.sigma[static_cast<std::size_t>(j)];
    CHECK((u * sig.asDiagonal() * v.transpose() - dense).norm() < tol);
  }
  PEFT_REQUIRE_THROWS_WITH(factored_svd<TestType>(Matrix<TestType>::Zero(4, 2), Matrix<TestType>::Zero(3, 5)),
                           ShapeError, "B has shape [4, 2] and A has shape [3, 5]");
}

TEST_CASE("truncate pads beyond the available rank and rank_for_energy validates", "[merge][svd]") {
  Rng rng(32);
  const Matrix<double> B = test::random_matrix<double>(8, 2, rng);
  const Matrix<double> A = test::random_matrix<double>(2, 6, rng);
  const Truncation<double> t = truncate(factored_svd<double>(B, A), 4);
  CHECK(t.factors.rank() == 4);
  CHECK(t.factors.A.bottomRows(2).norm() == 0.0);
  CHECK(t.factors.B.rightCols(2).norm() == 0.0);
  CHECK(test::rel_diff(t.factors.delta(), Matrix<double>(B * A)) < 1e-12);
  CHECK(t.discarded_energy == 0.0);
  CHECK(t.spectral_error == 0.0);
  PEFT_REQUIRE_THROWS_WITH(truncate(factored_svd<double>(B, A), 0), ConfigError, "rank must be >= 1, got 0");
  PEFT_REQUIRE_THROWS_WITH(rank_for_energy({1.0, 0.5}, 0.0), ConfigError, "energy threshold must be in (0, 1]");
  CHECK(rank_for_energy({2.0, 1.0, 1.0}, 4.0 / 6.0) == 1);
  CHECK(rank_for_energy({2.0, 1.0, 1.0}, 4.5 / 6.0) == 2);
  CHECK(rank_for_energy({2.0, 1.0, 1.0}, 1.0) == 3);
  CHECK(rank_for_energy({}, 1.0) == 1);
}

TEMPLATE_TEST_CASE("analyze_adapter matches dense computations", "[merge][analysis]", float, double) {
  Rng rng(33);
  const auto fs = test::make_sources<TestType>(20, 13, rng);
  for (std::size_t i = 0; i < fs.size(); ++i) {
    const LoraFactors<TestType>& f = fs[i];
    const Eigen::MatrixXd d = test::product_d(f);
    const Eigen::VectorXd ref = test::ref_singular_values(d);
    const double tol = SvdTolerances<TestType>::rel * d.norm();
    const AdapterStats st = analyze_adapter(f);
    INFO("adapter " << i);
    REQUIRE(static_cast<Index>(st.singular_values.size()) == f.rank());
    for (Index j = 0; j < f.rank(); ++j)
      CHECK(std::abs(st.singular_values[static_cast<std::size_t>(j)] - ref(j)) < tol);
    CHECK(std::abs(st.frobenius_norm - d.norm()) < tol);
    CHECK(std::abs(delta_frobenius_norm(f) - d.norm()) < tol);
    CHECK(std::abs(st.spectral_norm - ref(0)) < tol);
    CHECK(std::abs(st.nuclear_norm - ref.sum()) < tol * f.rank());
    CHECK(st.rank == f.rank());
    CHECK(st.numerical_rank == f.rank());
    double h = 0.0;
    for (Index j = 0; j < f.rank(); ++j) {
      const double p = ref(j) / ref.sum();
      h -= p * std::log(p);
    }
    CHECK(std::abs(st.effective_rank - std::exp(h)) < 1e3 * SvdTolerances<TestType>::rel);
    CHECK(std::abs(st.stable_rank - d.squaredNorm() / (ref(0) * ref(0))) < 1e3 * SvdTolerances<TestType>::rel);
    CHECK(st.parameters == f.rank() * (20 + 13));
    CHECK(st.dense_parameters == 20 * 13);
    CHECK(st.compression_ratio == Approx(260.0 / static_cast<double>(f.rank() * 33)));
  }
}

TEST_CASE("analyze_adapter sees a rank-deficient adapter", "[merge][analysis]") {
  Rng rng(34);
  LoraFactors<double> f;
  f.A = test::random_matrix<double>(4, 10, rng);
  f.A.row(3) = 2.0 * f.A.row(0) - f.A.row(1);  // rank 3 stored at r = 4
  f.B = test::random_matrix<double>(9, 4, rng);
  f.scaling = 0.5;
  const AdapterStats st = analyze_adapter(f);
  CHECK(st.rank == 4);
  CHECK(st.numerical_rank == 3);
  CHECK(st.singular_values[3] < 1e-12 * st.singular_values[0]);
  CHECK(st.effective_rank < 3.0 + 1e-9);
  CHECK(st.effective_rank > 1.0);
  CHECK(analyze_adapter(f, 0.5).numerical_rank <= 3);
  PEFT_REQUIRE_THROWS_WITH(analyze_adapter(f, std::nan("")), ConfigError, "rtol must be in [0, 1]");
  PEFT_REQUIRE_THROWS_WITH(analyze_adapter(f, 2.0), ConfigError, "got 2");
}

TEMPLATE_TEST_CASE("inverse-variance weights are normalized inverse squared delta norms", "[merge][analysis]", float,
                   double) {
  Rng rng(35);
  auto fs = test::make_sources<TestType>(16, 12, rng);
  const std::vector<double> lambda = inverse_variance_weights(fs);
  std::vector<double> ref;
  double total = 0.0;
  for (const auto& f : fs) {
    ref.push_back(1.0 / test::product_d(f).squaredNorm());
    total += ref.back();
  }
  double sum = 0.0;
  for (std::size_t i = 0; i < fs.size(); ++i) {
    CHECK(std::abs(lambda[i] - ref[i] / total) < SvdTolerances<TestType>::rel);
    sum += lambda[i];
  }
  CHECK(std::abs(sum - 1.0) < 1e-12);

  fs[1].B.setZero();
  PEFT_REQUIRE_THROWS_WITH(inverse_variance_weights(fs), ConfigError, "adapter 1 has a zero delta");
  fs[1].B(0, 0) = std::numeric_limits<TestType>::quiet_NaN();
  PEFT_REQUIRE_THROWS_WITH(inverse_variance_weights(fs), NumericError, "adapter 1: B contains NaN or Inf");
  LoraFactors<TestType> bad{Matrix<TestType>::Zero(2, 3), Matrix<TestType>::Zero(4, 3), 1.0, "odd"};
  PEFT_REQUIRE_THROWS_WITH(analyze_adapter(bad), ShapeError,
                           "adapter 0 (\"odd\"): A has shape [2, 3] but B has shape [4, 3]");
}
