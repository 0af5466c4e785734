// Preference-tuning losses (loss/preference.hpp): sequence log-probs, DPO / cDPO / IPO and the
// per-token KL estimators against torch float64 (benchmarks/peer/make_preference_fixture.py) and
// against finite differences in double.
#include <peft/loss/preference.hpp>
#include <peft/train/gradient_check.hpp>

#include <iterator>

#include "preference_fixture.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {
namespace pf = preference_fixture;

template <class T>
Matrix<T> pref_matrix(const double* data, Index rows, Index cols) {
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<T>(data[i * cols + j]);
  return m;
}

struct PrefBatch {
  SequenceLayout layout;
  std::vector<std::int64_t> labels;
  PrefBatch()
      : layout(pf::kBatch, pf::kSeq, std::vector<Index>(std::begin(pf::kLengths), std::end(pf::kLengths))),
        labels(std::begin(pf::kLabels), std::end(pf::kLabels)) {}
};

/// DPO of the fixture's 2 pairs (sequences 0, 1 chosen; 2, 3 rejected) as a function of the policy
/// logits, with its gradient.
template <class T>
struct PrefDPO {
  PrefBatch batch;
  Matrix<T> ref_logits = pref_matrix<T>(pf::kReferenceLogits, pf::kBatch* pf::kSeq, pf::kVocab);
  SequenceLogProbWorkspace<T> ws, ref_ws;
  Matrix<T> lp, ref_lp, dc, dr, dseq, dlogits;
  DPOStats stats;

  T operator()(const Matrix<T>& logits, const DPOOptions& opt, bool average, bool grad) {
    sequence_log_probs<T>(ref_logits, batch.labels, batch.layout, ref_lp, ref_ws, average);
    sequence_log_probs<T>(logits, batch.labels, batch.layout, lp, ws, average);
    const T loss = dpo_loss<T>(lp.topRows(2), lp.bottomRows(2), ref_lp.topRows(2), ref_lp.bottomRows(2),
                               grad ? &dc : nullptr, grad ? &dr : nullptr, opt, &stats);
    if (grad) {
      dseq.resize(4, 1);
      dseq.topRows(2) = dc;
      dseq.bottomRows(2) = dr;
      sequence_log_probs_backward<T>(logits, batch.layout, dseq, dlogits, ws);
    }
    return loss;
  }
};
}  // namespace

TEMPLATE_TEST_CASE("preference: sequence log-probs (sum, mean) and their backward match torch float64",
                   "[loss][preference]", float, double) {
  using T = TestType;
  const PrefBatch b;
  const Matrix<T> z = pref_matrix<T>(pf::kPolicyLogits, pf::kBatch * pf::kSeq, pf::kVocab);
  const Matrix<T> w = pref_matrix<T>(pf::kSeqWeights, pf::kBatch, 1);
  SequenceLogProbWorkspace<T> ws;
  Matrix<T> lp, dz;
  for (const bool average : {false, true}) {
    INFO("average " << average);
    sequence_log_probs<T>(z, b.labels, b.layout, lp, ws, average);
    CHECK(test::rel_diff(lp, pref_matrix<T>(average ? pf::kSeqLogProbsMean : pf::kSeqLogProbsSum, pf::kBatch, 1)) <
          Tolerances<T>::rel);
    sequence_log_probs_backward<T>(z, b.layout, w, dz, ws);
    CHECK(test::rel_diff(dz, pref_matrix<T>(average ? pf::kSeqLogProbsMeanGrad : pf::kSeqLogProbsSumGrad,
                                            pf::kBatch * pf::kSeq, pf::kVocab)) < Tolerances<T>::rel);
  }
  CHECK(ws.counts == std::vector<Index>{3, 3, 4, 2});  // the prompt (2 tokens in sequence 0) and padding masked
  // Padding rows (beyond a sequence's length) get no gradient, whatever their label.
  CHECK(dz.row(3 * pf::kSeq + 2).cwiseAbs().maxCoeff() == T(0));
}

TEMPLATE_TEST_CASE("preference: DPO, conservative DPO and IPO losses and gradients match TRL's in torch float64",
                   "[loss][preference]", float, double) {
  using T = TestType;
  PrefDPO<T> f;
  const Matrix<T> z = pref_matrix<T>(pf::kPolicyLogits, pf::kBatch * pf::kSeq, pf::kVocab);
  struct Case {
    const char* name;
    DPOOptions opt;
    bool average;
    double loss, margin;
    const double* grad;
  };
  const Case cases[] = {
      {"sigmoid",
       {pf::kSigmoidBeta, PreferenceLoss::kSigmoid, pf::kSigmoidSmoothing},
       false,
       pf::kSigmoidLoss,
       pf::kSigmoidMargin,
       pf::kSigmoidGrad},
      {"conservative",
       {pf::kConservativeBeta, PreferenceLoss::kSigmoid, pf::kConservativeSmoothing},
       false,
       pf::kConservativeLoss,
       pf::kConservativeMargin,
       pf::kConservativeGrad},
      {"ipo",
       {pf::kIPOBeta, PreferenceLoss::kIPO, pf::kIPOSmoothing},
       true,
       pf::kIPOLoss,
       pf::kIPOMargin,
       pf::kIPOGrad},
  };
  for (const Case& c : cases) {
    INFO(c.name);
    const double loss = static_cast<double>(f(z, c.opt, c.average, true));
    CHECK(loss == Approx(c.loss).epsilon(Tolerances<T>::rel));
    CHECK(f.stats.margin == Approx(c.margin).epsilon(Tolerances<T>::rel));
    CHECK(f.stats.margin == Approx(f.stats.reward_chosen - f.stats.reward_rejected).epsilon(1e-12));
    CHECK(f.stats.pairs == 2);
    CHECK(test::rel_diff(f.dlogits, pref_matrix<T>(c.grad, pf::kBatch * pf::kSeq, pf::kVocab)) < Tolerances<T>::rel);
  }
}

TEST_CASE("preference: DPO family and KL estimator gradients match finite differences in double",
          "[loss][preference]") {
  PrefDPO<double> f;
  Matrix<double> z = pref_matrix<double>(pf::kPolicyLogits, pf::kBatch * pf::kSeq, pf::kVocab);
  const DPOOptions opts[] = {
      {0.1, PreferenceLoss::kSigmoid, 0.0}, {0.7, PreferenceLoss::kSigmoid, 0.3}, {0.5, PreferenceLoss::kIPO, 0.0}};
  for (const DPOOptions& opt : opts)
    for (const bool average : {false, true}) {
      INFO("loss " << static_cast<int>(opt.loss) << ", eps " << opt.label_smoothing << ", average " << average);
      f(z, opt, average, true);
      const Matrix<double> analytic = f.dlogits;
      const Matrix<double> num = numerical_gradient(z, [&]() { return f(z, opt, average, false); });
      CHECK(relative_error(analytic, num) < Tolerances<double>::grad);
    }
  // Per-token estimators through label log-probs: Σ_t k(log π_t, log π_ref,t).
  SequenceLogProbWorkspace<double> ws, ref_ws;
  Matrix<double> lp, ref_lp, est, dest, dz;
  sequence_log_probs<double>(f.ref_logits, f.batch.labels, f.batch.layout, ref_lp, ref_ws);
  for (const KLEstimator k : {KLEstimator::kK1, KLEstimator::kK2, KLEstimator::kK3}) {
    INFO("estimator k" << static_cast<int>(k) + 1);
    auto total = [&]() {
      sequence_log_probs<double>(z, f.batch.labels, f.batch.layout, lp, ws);
      kl_estimate<double>(ws.token_log_probs, ref_ws.token_log_probs, k, est, &dest);
      return est.sum();
    };
    total();
    label_log_probs_backward<double>(z, ws.targets, dest, dz);
    const Matrix<double> num = numerical_gradient(z, total);
    CHECK(relative_error(dz, num) < Tolerances<double>::grad);
  }
}

TEMPLATE_TEST_CASE("preference: k1, k2, k3 KL estimators match torch float64", "[loss][preference]", float, double) {
  using T = TestType;
  const PrefBatch b;
  const Matrix<T> z = pref_matrix<T>(pf::kPolicyLogits, pf::kBatch * pf::kSeq, pf::kVocab);
  const Matrix<T> zr = pref_matrix<T>(pf::kReferenceLogits, pf::kBatch * pf::kSeq, pf::kVocab);
  SequenceLogProbWorkspace<T> ws, ref_ws;
  Matrix<T> lp, ref_lp, est, dest, dz;
  sequence_log_probs<T>(zr, b.labels, b.layout, ref_lp, ref_ws);
  sequence_log_probs<T>(z, b.labels, b.layout, lp, ws);
  const double* want[] = {pf::kKL1, pf::kKL2, pf::kKL3};
  const double* want_grad[] = {pf::kKL1Grad, pf::kKL2Grad, pf::kKL3Grad};
  const KLEstimator kinds[] = {KLEstimator::kK1, KLEstimator::kK2, KLEstimator::kK3};
  for (int k = 0; k < 3; ++k) {
    INFO("estimator k" << k + 1);
    kl_estimate<T>(ws.token_log_probs, ref_ws.token_log_probs, kinds[k], est, &dest);
    // torch's per-token terms are [B, S-1] (shifted); ours are [B·S, 1] with row (b, t) predicting t + 1.
    Matrix<T> shifted(pf::kBatch, pf::kSeq - 1);
    for (Index bb = 0; bb < pf::kBatch; ++bb)
      for (Index t = 0; t + 1 < pf::kSeq; ++t) shifted(bb, t) = est(bb * pf::kSeq + t, 0);
    CHECK(test::rel_diff(shifted, pref_matrix<T>(want[k], pf::kBatch, pf::kSeq - 1)) < Tolerances<T>::rel);
    label_log_probs_backward<T>(z, ws.targets, dest, dz);
    CHECK(test::rel_diff(dz, pref_matrix<T>(want_grad[k], pf::kBatch * pf::kSeq, pf::kVocab)) < Tolerances<T>::rel);
    if (k > 0) CHECK(est.minCoeff() >= T(0));  // k2 and k3 are non-negative
  }
  // Equal distributions: every estimator is 0.
  kl_estimate<T>(ws.token_log_probs, ws.token_log_probs, KLEstimator::kK3, est, &dest);
  CHECK(est.cwiseAbs().maxCoeff() == T(0));
}

TEST_CASE("preference: refusals name the argument", "[loss][preference]") {
  const Matrix<double> a = Matrix<double>::Zero(2, 1), b = Matrix<double>::Zero(3, 1);
  Matrix<double> d1, d2;
  PEFT_REQUIRE_THROWS_WITH(dpo_loss<double>(a, a, a, a, &d1, &d2, DPOOptions{0.0}), ConfigError, "beta");
  PEFT_REQUIRE_THROWS_WITH(dpo_loss<double>(a, a, a, a, &d1, &d2, DPOOptions{0.1, PreferenceLoss::kSigmoid, 0.5}),
                           ConfigError, "label_smoothing");
  PEFT_REQUIRE_THROWS_WITH(dpo_loss<double>(a, a, a, a, &d1, &d2, DPOOptions{0.1, PreferenceLoss::kIPO, 0.1}),
                           ConfigError, "IPO");
  PEFT_REQUIRE_THROWS_WITH(dpo_loss<double>(a, a, b, a, &d1, &d2), ShapeError, "reference chosen");
  PEFT_REQUIRE_THROWS_WITH(kl_estimate<double>(a, b, KLEstimator::kK1, d1), ShapeError, "reference");
  const Matrix<double> big = Matrix<double>::Constant(1, 1, 1000.0), zero = Matrix<double>::Zero(1, 1);
  PEFT_REQUIRE_THROWS_WITH(kl_estimate<double>(zero, big, KLEstimator::kK3, d1), NumericError, "overflows");
  SequenceLogProbWorkspace<double> ws;
  PEFT_REQUIRE_THROWS_WITH(
      sequence_log_probs<double>(Matrix<double>::Zero(4, 3), {0, 1, 7, 0}, SequenceLayout(1, 4), d1, ws), ShapeError,
      "label at row 1");
  PEFT_REQUIRE_THROWS_WITH(
      sequence_log_probs_backward<double>(Matrix<double>::Zero(6, 3), SequenceLayout(2, 3), a, d2, ws), ShapeError,
      "workspace");
  // Zero policy-vs-reference log-ratio: loss log 2, gradient −β/2 per pair / N.
  dpo_loss<double>(a, a, a, a, &d1, &d2, DPOOptions{0.2});
  CHECK(d1(0, 0) == Approx(-0.05));
  CHECK(d2(0, 0) == Approx(0.05));
}

TEST_CASE("preference: Bradley-Terry with a margin per pair (Llama 2) is the shifted loss; finite differences",
          "[loss][preference][bradley_terry]") {
  Rng rng(32);
  Matrix<double> chosen = test::random_matrix<double>(5, 1, rng, 2.0);
  Matrix<double> rejected = test::random_matrix<double>(5, 1, rng, 2.0);
  const Matrix<double> margin = test::random_matrix<double>(5, 1, rng, 1.0).cwiseAbs();
  Matrix<double> dc, dr, dc0, dr0;
  const double with = bradley_terry<double>(chosen, rejected, margin, &dc, &dr);
  const Matrix<double> shifted = rejected + margin;
  CHECK(with == Approx(bradley_terry<double>(chosen, shifted, &dc0, &dr0)).epsilon(1e-14));
  CHECK(test::rel_diff(dc, dc0) < 1e-14);
  CHECK(with > bradley_terry<double>(chosen, rejected, nullptr, nullptr));  // a positive margin costs more
  auto loss = [&] { return bradley_terry<double>(chosen, rejected, margin, nullptr, nullptr); };
  CHECK(relative_error(dc, numerical_gradient(chosen, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(dr, numerical_gradient(rejected, loss)) < Tolerances<double>::grad);
  PEFT_REQUIRE_THROWS_WITH(bradley_terry<double>(chosen, rejected, Matrix<double>::Zero(4, 1), nullptr, nullptr),
                           ShapeError, "margins have shape [4, 1]");
}
