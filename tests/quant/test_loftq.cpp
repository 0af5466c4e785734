// LoftQ (Li et al. 2023): alternating NF4 quantization and rank-r SVD of the residual.
#include <peft/quant/loftq.hpp>

#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::quant;

TEMPLATE_TEST_CASE("LoftQ lowers ||W - (deq(Q) + sBA)|| below the QLoRA init", "[quant][loftq]", float, double) {
  Rng rng(41);
  // A weight with a strong low-rank part plus noise, like trained layers.
  const Matrix<TestType> u = test::random_matrix<TestType>(48, 4, rng);
  const Matrix<TestType> v = test::random_matrix<TestType>(4, 80, rng);
  const Matrix<TestType> w = (0.05 * u * v + test::random_matrix<TestType>(48, 80, rng, 0.02)).eval();
  for (double s : {0.5, 2.0}) {  // the scaling must be folded into B and A for any s
    const LoftQResult<TestType> res = loftq_init<TestType>(w, 4, s, 5);
    REQUIRE(res.errors.size() == 5);
    CHECK(res.A.rows() == 4);
    CHECK(res.A.cols() == 80);
    CHECK(res.B.rows() == 48);
    CHECK(res.B.cols() == 4);
    // The QLoRA init (B = 0) keeps the whole quantization error.
    const Matrix<double> q0 = dequantize_nf4<double>(quantize_nf4<TestType>(w));
    CHECK(res.qlora_error == Approx((w.template cast<double>() - q0).norm()).epsilon(1e-9));
    // The reported error is the real one for the returned (Q, B, A).
    const Matrix<double> approx =
        dequantize_nf4<double>(res.weight) + s * res.B.template cast<double>() * res.A.template cast<double>();
    CHECK(res.errors.back() == Approx((w.template cast<double>() - approx).norm()).epsilon(1e-4));
    CHECK(res.errors.front() < res.qlora_error);
    CHECK(res.errors.back() < 0.9 * res.qlora_error);
    for (std::size_t t = 1; t < res.errors.size(); ++t)
      CHECK(res.errors[t] <= res.errors[t - 1] * 1.05);  // "monotonically-ish": quantization is not smooth
    INFO("s " << s << " qlora " << res.qlora_error << " loftq " << res.errors.back());
  }
}

TEST_CASE("LoftQ rejects bad arguments", "[quant][loftq][errors]") {
  const Matrix<double> w = Matrix<double>::Ones(8, 64);
  PEFT_REQUIRE_THROWS_WITH(loftq_init<double>(w, 0, 1.0, 1), ConfigError, "rank r must be in [1, 8], got 0");
  PEFT_REQUIRE_THROWS_WITH(loftq_init<double>(w, 2, 0.0, 1), ConfigError, "scaling must be finite and > 0");
  PEFT_REQUIRE_THROWS_WITH(loftq_init<double>(w, 2, 1.0, 0), ConfigError, "steps must be >= 1, got 0");
  PEFT_REQUIRE_THROWS_WITH(loftq_init<double>(w, 2, 1.0, 1, {100, true}), ConfigError, "blocksize");
}
