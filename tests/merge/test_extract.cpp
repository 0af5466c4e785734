#include <peft/merge/extract.hpp>

#include <Eigen/QR>

#include <cmath>
#include <limits>
#include <vector>

#include "merge_test_utils.hpp"

using namespace peft;
using peft::test::SvdTolerances;

namespace {

// ΔW = U diag(σ) Vᵀ with orthonormal U, V from QR of Gaussian matrices: the spectrum is known.
Eigen::MatrixXd with_spectrum(Index out, Index in, const std::vector<double>& sigma, Rng& rng) {
  const Index m = static_cast<Index>(sigma.size());
  const Eigen::MatrixXd gu = test::random_matrix<double>(out, m, rng);
  const Eigen::MatrixXd gv = test::random_matrix<double>(in, m, rng);
  const Eigen::MatrixXd u =
      Eigen::HouseholderQR<Eigen::MatrixXd>(gu).householderQ() * Eigen::MatrixXd::Identity(out, m);
  const Eigen::MatrixXd v = Eigen::HouseholderQR<Eigen::MatrixXd>(gv).householderQ() * Eigen::MatrixXd::Identity(in, m);
  Eigen::VectorXd s(m);
  for (Index j = 0; j < m; ++j) s(j) = sigma[static_cast<std::size_t>(j)];
  return u * s.asDiagonal() * v.transpose();
}

const std::vector<double> kSigma = {6.0, 4.0, 3.0, 1.5, 1.0, 0.5, 0.25, 0.1};

}  // namespace

TEMPLATE_TEST_CASE("extract_lora error equals sigma_{k+1} and the Frobenius tail", "[merge][extract]", float, double) {
  Rng rng(21);
  const Index out = 12, in = 8;
  const Eigen::MatrixXd w0 = test::random_matrix<double>(out, in, rng);
  const Eigen::MatrixXd dw = with_spectrum(out, in, kSigma, rng);
  const Matrix<TestType> base = w0.cast<TestType>();
  const Matrix<TestType> ft = (w0 + dw).cast<TestType>();
  const Eigen::MatrixXd dw_t = (ft.template cast<double>() - base.template cast<double>());  // ΔW as stored in T
  const double tol = SvdTolerances<TestType>::rel * dw.norm() * 10;

  for (Index k = 1; k <= in; ++k) {
    ExtractOptions opt;
    opt.rank = k;
    const ExtractResult<TestType> r = extract_lora<TestType>(ft, base, opt);
    INFO("k = " << k);
    CHECK(r.factors.rank() == k);
    CHECK(r.config.r == k);
    CHECK(r.config.scaling() == 1.0);
    const Eigen::MatrixXd err = dw_t - test::product_d(r.factors);
    double tail = 0.0;
    for (std::size_t j = static_cast<std::size_t>(k); j < kSigma.size(); ++j) tail += kSigma[j] * kSigma[j];
    const double sigma_next = k < in ? kSigma[static_cast<std::size_t>(k)] : 0.0;
    CHECK(std::abs(r.sigma_next - sigma_next) < tol);
    CHECK(std::abs(r.frobenius_error - std::sqrt(tail)) < tol);
    CHECK(std::abs(err.norm() - std::sqrt(tail)) < tol);
    // Spectral norm of the residual (largest singular value) is σ_{k+1}.
    CHECK(std::abs(test::ref_singular_values(err)(0) - sigma_next) < tol);
    for (std::size_t j = 0; j < kSigma.size(); ++j) CHECK(std::abs(r.singular_values[j] - kSigma[j]) < tol);
  }
}

TEST_CASE("extract_lora energy threshold picks the smallest sufficient rank", "[merge][extract]") {
  Rng rng(22);
  const Index out = 10, in = 8;
  const Eigen::MatrixXd w0 = test::random_matrix<double>(out, in, rng);
  const Eigen::MatrixXd ft = w0 + with_spectrum(out, in, kSigma, rng);
  double total = 0.0;
  for (double s : kSigma) total += s * s;
  double cum = 0.0;
  for (std::size_t k = 1; k <= kSigma.size(); ++k) {
    const double before = cum / total;
    cum += kSigma[k - 1] * kSigma[k - 1];
    const double after = cum / total;
    // Any τ in (before, after] needs exactly k components; test just above `before` and at the middle.
    for (double tau : {before + 1e-9, 0.5 * (before + after)}) {
      if (tau > 1.0) continue;
      ExtractOptions opt;
      opt.energy = tau;
      const ExtractResult<double> r = extract_lora<double>(ft, w0, opt);
      INFO("tau = " << tau);
      CHECK(r.factors.rank() == static_cast<Index>(k));
      CHECK(r.energy_kept >= tau);
      CHECK(std::abs(r.energy_kept - after) < 1e-12);
    }
  }
}

TEST_CASE("extract_lora of identical weights gives a zero rank-1 adapter", "[merge][extract]") {
  Rng rng(23);
  const Matrix<double> w = test::random_matrix<double>(5, 4, rng);
  ExtractOptions opt;
  opt.energy = 0.9;
  const ExtractResult<double> r = extract_lora<double>(w, w, opt);
  CHECK(r.factors.rank() == 1);
  CHECK(r.factors.delta().norm() == 0.0);
  CHECK(r.frobenius_error == 0.0);
  CHECK(r.energy_kept == 1.0);
}

TEST_CASE("extract_lora rejects bad inputs", "[merge][extract][errors]") {
  Rng rng(24);
  const Matrix<double> w = test::random_matrix<double>(5, 4, rng);
  ExtractOptions opt;
  opt.rank = 2;
  PEFT_REQUIRE_THROWS_WITH(extract_lora<double>(w, Matrix<double>::Zero(5, 3), opt), ShapeError,
                           "fine-tuned weight has shape [5, 4] but base weight has shape [5, 3]");
  Matrix<double> bad = w;
  bad(1, 1) = std::numeric_limits<double>::quiet_NaN();
  PEFT_REQUIRE_THROWS_WITH(extract_lora<double>(bad, w, opt), NumericError, "fine-tuned weight contains NaN");
  PEFT_REQUIRE_THROWS_WITH(extract_lora<double>(w, bad, opt), NumericError, "base weight contains NaN");
  opt.rank = 5;
  PEFT_REQUIRE_THROWS_WITH(extract_lora<double>(w, w, opt), ConfigError, "rank must be in [1, 4]");
  opt.energy = 0.5;
  PEFT_REQUIRE_THROWS_WITH(extract_lora<double>(w, w, opt), ConfigError, "set exactly one of rank");
  opt.rank = 0;
  opt.energy = 0.0;
  PEFT_REQUIRE_THROWS_WITH(extract_lora<double>(w, w, opt), ConfigError, "set exactly one of rank");
  opt.energy = 1.5;
  PEFT_REQUIRE_THROWS_WITH(extract_lora<double>(w, w, opt), ConfigError, "energy threshold must be in (0, 1], got 1.5");
  opt.energy = -0.1;
  PEFT_REQUIRE_THROWS_WITH(extract_lora<double>(w, w, opt), ConfigError, "energy threshold must be in (0, 1]");
}

TEMPLATE_TEST_CASE("extract_lora refuses a difference that overflows T, naming the tensor", "[merge][extract][errors]",
                   float, double) {
  // Both weights are finite, their difference is not: W_ft − W_0 = 2·(0.9·max) at (2, 1).
  Rng rng(25);
  const Matrix<TestType> w0 = test::random_matrix<TestType>(5, 4, rng);
  Matrix<TestType> w0b = w0, w1 = w0;
  const TestType big = TestType(0.9) * std::numeric_limits<TestType>::max();
  w1(2, 1) = big;
  w0b(2, 1) = -big;
  w1(0, 0) += TestType(1);  // other entries differ normally
  ExtractOptions opt;
  opt.rank = 2;
  PEFT_REQUIRE_THROWS_WITH(extract_lora<TestType>(w1, w0b, opt, "layers.0.q.weight"), NumericError,
                           "extract_lora (tensor \"layers.0.q.weight\"): the difference W_ft − W_0 overflows");
  PEFT_REQUIRE_THROWS_WITH(extract_lora<TestType>(w1, w0b, opt), NumericError, "at (2, 1)");
  opt.rank = 0;
  opt.energy = 0.9;
  PEFT_REQUIRE_THROWS_WITH(extract_lora<TestType>(w0b, w1, opt), NumericError, "is not finite");
}

TEST_CASE("extract_lora refuses a finite difference whose SVD or energy overflows (double)",
          "[merge][extract][errors]") {
  // Entries ≈ ±1e200: ΔW is finite but Σ σ² = ‖ΔW‖_F² is not; no adapter with a zero error comes out.
  Rng rng(26);
  const Matrix<double> w0 = Matrix<double>::Zero(6, 5);
  const Matrix<double> w1 = 1e200 * test::random_matrix<double>(6, 5, rng);
  ExtractOptions opt;
  opt.rank = 2;
  PEFT_REQUIRE_THROWS_WITH(extract_lora<double>(w1, w0, opt, "fc.weight"), NumericError,
                           "extract_lora (tensor \"fc.weight\")");
  opt.rank = 0;
  opt.energy = 0.5;
  PEFT_REQUIRE_THROWS_WITH(extract_lora<double>(w1, w0, opt), NumericError, "not finite");
  // The same matrix scaled into range is extracted normally (the refusal is about overflow only).
  const ExtractResult<double> ok = extract_lora<double>(Matrix<double>(1e-200 * w1), w0, opt);
  CHECK(ok.factors.A.allFinite());
  CHECK(std::isfinite(ok.frobenius_error));
  CHECK(ok.energy_kept >= 0.5);
}
