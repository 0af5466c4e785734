#include <peft/loss/kl.hpp>
#include <peft/train/gradient_check.hpp>

#include <limits>

#include "kl_fixture.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {
template <class T>
Matrix<T> kl_fixture_matrix(const double* data) {
  Matrix<T> m(kl_fixture::kRows, kl_fixture::kCols);
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<T>(data[i * m.cols() + j]);
  return m;
}
}  // namespace

TEMPLATE_TEST_CASE("kl: log_softmax, kl_div and distillation match torch float64", "[loss][kl]", float, double) {
  using T = TestType;
  const Matrix<T> s = kl_fixture_matrix<T>(kl_fixture::kStudent);
  const Matrix<T> t = kl_fixture_matrix<T>(kl_fixture::kTeacher);
  Matrix<T> lq, lp;
  log_softmax<T>(s, lq);
  log_softmax<T>(t, lp);
  CHECK(test::rel_diff(lq, kl_fixture_matrix<T>(kl_fixture::kLogSoftmaxStudent)) < Tolerances<T>::rel);

  Matrix<T> dq, dp;
  CHECK(static_cast<double>(kl_div<T>(lq, lp, &dq, &dp)) == Approx(kl_fixture::kKlDiv).epsilon(Tolerances<T>::rel));
  CHECK(test::rel_diff(dq, kl_fixture_matrix<T>(kl_fixture::kKlDivGradQ)) < Tolerances<T>::rel);
  CHECK(test::rel_diff(dp, kl_fixture_matrix<T>(kl_fixture::kKlDivGradP)) < Tolerances<T>::rel);

  const double kl_ref[] = {kl_fixture::kDistillKL1, kl_fixture::kDistillKL2, kl_fixture::kDistillKL4};
  const double ce_ref[] = {kl_fixture::kSoftCE1, kl_fixture::kSoftCE2, kl_fixture::kSoftCE4};
  const double* kl_grad[] = {kl_fixture::kDistillGrad1, kl_fixture::kDistillGrad2, kl_fixture::kDistillGrad4};
  const double* ce_grad[] = {kl_fixture::kSoftCEGrad1, kl_fixture::kSoftCEGrad2, kl_fixture::kSoftCEGrad4};
  const double taus[] = {1.0, 2.0, 4.0};
  DistillationWorkspace<T> ws;
  for (int k = 0; k < 3; ++k) {
    INFO("temperature " << taus[k]);
    Matrix<T> ds;
    DistillationOptions opt{taus[k], DistillationLoss::kKL};
    CHECK(static_cast<double>(distillation_loss<T>(s, t, &ds, opt, ws)) ==
          Approx(kl_ref[k]).epsilon(Tolerances<T>::rel));
    CHECK(test::rel_diff(ds, kl_fixture_matrix<T>(kl_grad[k])) < Tolerances<T>::rel);
    opt.kind = DistillationLoss::kSoftCrossEntropy;
    CHECK(static_cast<double>(distillation_loss<T>(s, t, &ds, opt, ws)) ==
          Approx(ce_ref[k]).epsilon(Tolerances<T>::rel));
    CHECK(test::rel_diff(ds, kl_fixture_matrix<T>(ce_grad[k])) < Tolerances<T>::rel);
  }
}

TEMPLATE_TEST_CASE("kl: label_log_probs and its backward match torch float64", "[loss][kl]", float, double) {
  using T = TestType;
  const Matrix<T> s = kl_fixture_matrix<T>(kl_fixture::kStudent);
  const std::vector<std::int64_t> labels(std::begin(kl_fixture::kLabels), std::end(kl_fixture::kLabels));
  Matrix<T> lp, w(kl_fixture::kRows, 1), ref(kl_fixture::kRows, 1), ds;
  for (Index i = 0; i < kl_fixture::kRows; ++i) {
    w(i, 0) = static_cast<T>(kl_fixture::kLabelWeights[i]);
    ref(i, 0) = static_cast<T>(kl_fixture::kLabelLogProbs[i]);
  }
  label_log_probs<T>(s, labels, lp);
  CHECK(test::rel_diff(lp, ref) < Tolerances<T>::rel);
  CHECK(lp(2, 0) == T(0));  // ignore_index row
  label_log_probs_backward<T>(s, labels, w, ds);
  CHECK(test::rel_diff(ds, kl_fixture_matrix<T>(kl_fixture::kLabelLogProbsGrad)) < Tolerances<T>::rel);
}

TEST_CASE("kl: gradients match finite differences in double", "[loss][kl][gradcheck]") {
  Rng rng(141);
  Matrix<double> s = test::random_matrix<double>(3, 6, rng, 2.0);
  Matrix<double> t = test::random_matrix<double>(3, 6, rng, 2.0);
  for (double tau : {1.0, 3.0}) {
    for (DistillationLoss kind : {DistillationLoss::kKL, DistillationLoss::kSoftCrossEntropy}) {
      Matrix<double> ds;
      const DistillationOptions opt{tau, kind};
      distillation_loss<double>(s, t, &ds, opt);
      auto loss = [&] { return distillation_loss<double>(s, t, nullptr, opt); };
      CHECK(relative_error(ds, numerical_gradient(s, loss)) < Tolerances<double>::grad);
    }
  }
  // kl_div on arbitrary (unnormalised) log-values: both sides.
  Matrix<double> lq = test::random_matrix<double>(3, 6, rng);
  Matrix<double> lp = test::random_matrix<double>(3, 6, rng);
  Matrix<double> dq, dp;
  kl_div<double>(lq, lp, &dq, &dp);
  auto kl = [&] { return kl_div<double>(lq, lp, nullptr, nullptr); };
  CHECK(relative_error(dq, numerical_gradient(lq, kl)) < Tolerances<double>::grad);
  CHECK(relative_error(dp, numerical_gradient(lp, kl)) < Tolerances<double>::grad);
  // log_softmax backward through a weighted sum L = Σ w ⊙ log_softmax(z / τ).
  Matrix<double> z = test::random_matrix<double>(3, 6, rng, 2.0);
  const Matrix<double> w = test::random_matrix<double>(3, 6, rng);
  Matrix<double> out, dz;
  log_softmax<double>(z, out, 2.5);
  log_softmax_backward<double>(out, w, dz, 2.5);
  auto ls = [&] {
    Matrix<double> o;
    log_softmax<double>(z, o, 2.5);
    return (o.array() * w.array()).sum();
  };
  CHECK(relative_error(dz, numerical_gradient(z, ls)) < Tolerances<double>::grad);
  // label_log_probs through L = Σ w_i log p_{i, y_i}, one row ignored.
  const std::vector<std::int64_t> ys{4, -100, 0};
  Matrix<double> wl = test::random_matrix<double>(3, 1, rng), lpl, dzl;
  label_log_probs<double>(z, ys, lpl);
  label_log_probs_backward<double>(z, ys, wl, dzl);
  auto lab = [&] {
    Matrix<double> o;
    label_log_probs<double>(z, ys, o);
    return (o.array() * wl.array()).sum();
  };
  CHECK(relative_error(dzl, numerical_gradient(z, lab)) < Tolerances<double>::grad);
}

TEST_CASE("kl: identities (zero at the teacher, soft CE = KL + tau^2 H, zero-mass classes, huge logits)",
          "[loss][kl]") {
  Rng rng(142);
  const Matrix<double> t = test::random_matrix<double>(4, 5, rng, 3.0);
  Matrix<double> ds;
  CHECK(distillation_loss<double>(t, t, &ds, {2.0, DistillationLoss::kKL}) == Approx(0.0).margin(1e-15));
  CHECK(ds.cwiseAbs().maxCoeff() < 1e-15);
  const Matrix<double> s = test::random_matrix<double>(4, 5, rng, 3.0);
  Matrix<double> lp;
  log_softmax<double>(t, lp, 2.0);
  const double entropy = -(lp.array().exp() * lp.array()).sum() / 4.0;
  CHECK(distillation_loss<double>(s, t, nullptr, {2.0, DistillationLoss::kSoftCrossEntropy}) ==
        Approx(distillation_loss<double>(s, t, nullptr, {2.0, DistillationLoss::kKL}) + 4.0 * entropy).epsilon(1e-12));
  // A one-hot target in log space: KL = −log q_y, and no NaN from 0 · log 0.
  Matrix<double> onehot = Matrix<double>::Constant(1, 3, -std::numeric_limits<double>::infinity());
  onehot(0, 1) = 0.0;
  Matrix<double> lq(1, 3);
  lq << std::log(0.2), std::log(0.5), std::log(0.3);
  Matrix<double> dq;
  CHECK(kl_div<double>(lq, onehot, &dq) == Approx(-std::log(0.5)));
  CHECK(dq(0, 0) == 0.0);
  CHECK(dq(0, 1) == -1.0);
  // Logits of 1e4 stay finite.
  Matrix<float> big(1, 3);
  big << 1e4f, -1e4f, 0.f;
  Matrix<float> lbig;
  log_softmax<float>(big, lbig);
  CHECK(lbig.allFinite());
  CHECK(lbig(0, 0) == Approx(0.0f).margin(1e-6));
}

TEST_CASE("kl: bad input is refused with named errors", "[loss][kl][errors]") {
  Matrix<double> out;
  PEFT_REQUIRE_THROWS_WITH(log_softmax<double>(Matrix<double>::Zero(2, 0), out), ShapeError, "have no classes");
  PEFT_REQUIRE_THROWS_WITH(log_softmax<double>(Matrix<double>::Zero(2, 3), out, 0.0), ConfigError,
                           "temperature must be finite and > 0, got 0");
  PEFT_REQUIRE_THROWS_WITH(distillation_loss<double>(Matrix<double>::Zero(2, 3), Matrix<double>::Zero(2, 4), nullptr),
                           ShapeError,
                           "distillation_loss: student logits have shape [2, 3], teacher logits have shape [2, 4]");
  Matrix<double> bad = Matrix<double>::Zero(2, 3);
  bad(1, 2) = std::numeric_limits<double>::quiet_NaN();
  PEFT_REQUIRE_THROWS_WITH(distillation_loss<double>(Matrix<double>::Zero(2, 3), bad, nullptr), NumericError,
                           "teacher logits row 1");
  Matrix<double> lq = Matrix<double>::Zero(1, 2);
  lq(0, 0) = -std::numeric_limits<double>::infinity();
  PEFT_REQUIRE_THROWS_WITH(kl_div<double>(lq, Matrix<double>::Zero(1, 2), nullptr), NumericError,
                           "infinite divergence");
  PEFT_REQUIRE_THROWS_WITH(label_log_probs<double>(Matrix<double>::Zero(2, 3), {0, 3}, out), ShapeError,
                           "label at row 1 is 3, expected a class in [0, 3) or ignore_index -100");
  Matrix<double> g;
  PEFT_REQUIRE_THROWS_WITH(log_softmax_backward<double>(Matrix<double>::Zero(2, 3), Matrix<double>::Zero(3, 3), g),
                           ShapeError, "log_softmax_backward");
}
