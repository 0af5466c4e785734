#include <peft/core/parameters.hpp>
#include <peft/layers/feed_forward.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

TEMPLATE_TEST_CASE("FeedForward forward is fc2(f(fc1 x) ⊙ l)", "[feed_forward]", float, double) {
  using T = TestType;
  Rng rng(61);
  FeedForward<T> ffn(4, 10, Activation::GELU, rng, true, "layers.0.ffn");
  ffn.add_ia3();
  ffn.ia3()->l.value = test::random_matrix<T>(1, 10, rng);
  const Matrix<T> x = test::random_matrix<T>(5, 4, rng);
  typename FeedForward<T>::Cache cache;
  const Matrix<T> y = ffn.forward(x, cache);
  Matrix<T> z = x * ffn.fc1.weight.value.transpose();
  z.rowwise() += ffn.fc1.bias.value.row(0);
  Matrix<T> h(5, 10);
  for (Index i = 0; i < 5; ++i)
    for (Index j = 0; j < 10; ++j) h(i, j) = activation_value<T>(Activation::GELU, z(i, j)) * ffn.ia3()->l.value(0, j);
  Matrix<T> expected = h * ffn.fc2.weight.value.transpose();
  expected.rowwise() += ffn.fc2.bias.value.row(0);
  CHECK(test::rel_diff(y, expected) < 10 * Tolerances<T>::rel);
  CHECK(ffn.fc1.name() == "layers.0.ffn.fc1");
}

TEST_CASE("FeedForward backward matches finite differences for every activation, with LoRA and IA3",
          "[feed_forward][gradcheck]") {
  for (Activation act : {Activation::GELU, Activation::GELUTanh, Activation::SiLU, Activation::Tanh, Activation::ReLU,
                         Activation::Identity}) {
    INFO(activation_name(act));
    Rng rng(62);
    FeedForward<double> ffn(5, 7, act, rng, true, "ffn");
    LoraConfig cfg;
    cfg.r = 2;
    cfg.alpha = 5.0;
    ffn.fc1.add_adapter("default", cfg, rng);
    ffn.fc2.add_adapter("default", cfg, rng);
    ffn.fc1.adapter("default").B.value = test::random_matrix<double>(7, 2, rng, 0.5);
    ffn.fc2.adapter("default").B.value = test::random_matrix<double>(5, 2, rng, 0.5);
    ffn.add_ia3();
    ffn.ia3()->l.value.array() += test::random_matrix<double>(1, 7, rng, 0.3).array();
    Matrix<double> x = test::random_matrix<double>(4, 5, rng);
    const Matrix<double> g = test::random_matrix<double>(4, 5, rng);
    auto loss = [&] {
      typename FeedForward<double>::Cache c;
      return test::dot(g, ffn.forward(x, c));
    };
    typename FeedForward<double>::Cache cache;
    ffn.forward(x, cache);
    if (act == Activation::ReLU) {  // keep finite differences away from the kink
      bool near_kink = (cache.z.array().abs() < 1e-4).any();
      REQUIRE_FALSE(near_kink);
    }
    Matrix<double> dx;
    ffn.backward(cache, g, &dx);
    CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
    int n = 0;
    for (auto& np : trainable_parameters(ffn)) {
      INFO(np.name);
      CHECK(relative_error(np.param->grad, numerical_gradient(np.param->value, loss)) < Tolerances<double>::grad);
      ++n;
    }
    CHECK(n == 9);  // 2 × (weight, bias, lora_A, lora_B) + ia3_l
  }
}

TEST_CASE("FeedForward naming, counts and errors", "[feed_forward][errors]") {
  Rng rng(63);
  FeedForward<float> ffn(8, 32, Activation::ReLU, rng, true, "ffn");
  ffn.add_ia3("task");
  std::vector<std::string> names;
  for (auto& np : named_parameters(ffn)) names.push_back(np.name);
  CHECK(names == std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc2.ia3_l.task"});
  CHECK(ffn.ia3()->l.shape() == std::vector<std::int64_t>{1, 32});
  CHECK(count_parameters(ffn).total == 8 * 32 + 32 + 32 * 8 + 8 + 32);
  PEFT_REQUIRE_THROWS_WITH(ffn.add_ia3(), ConfigError, "FeedForward \"ffn\": already has an (IA)^3 adapter \"task\"");
  PEFT_REQUIRE_THROWS_WITH(FeedForward<float>(0, 4, Activation::ReLU, rng, true, "f"), ConfigError,
                           "FeedForward \"f\": dim and inner must be > 0, got dim=0, inner=4");
  typename FeedForward<float>::Cache c;
  PEFT_REQUIRE_THROWS_WITH(ffn.forward(Matrix<float>::Zero(2, 7), c), ShapeError,
                           "LoRALinear \"ffn.fc1\": input has 7 features, expected 8");
  ffn.merge_ia3();
  ffn.forward(Matrix<float>::Zero(2, 8), c);
  Matrix<float> dx;
  PEFT_REQUIRE_THROWS_WITH(ffn.backward(c, Matrix<float>::Zero(2, 8), &dx), ConfigError,
                           "cannot train while (IA)^3 is merged");
  PEFT_REQUIRE_THROWS_WITH(ffn.remove_ia3(), ConfigError, "unmerge (IA)^3 before removing it");
  ffn.unmerge_ia3();
  ffn.remove_ia3();
  CHECK_FALSE(ffn.has_ia3());
  PEFT_REQUIRE_THROWS_WITH(ffn.merge_ia3(), ConfigError, "has no (IA)^3 adapter to merge");
}
