#include <peft/core/parameters.hpp>
#include <peft/layers/soft_prompt.hpp>
#include <peft/train/gradient_check.hpp>

#include <cmath>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

TEMPLATE_TEST_CASE("SoftPrompt prepends the prompt to every sequence and extends the layout", "[soft_prompt]", float,
                   double) {
  using T = TestType;
  Rng rng(21);
  SoftPrompt<T> sp(3, 4, rng, 0.5, "prompt_encoder");
  const SequenceLayout layout(2, 5, {5, 2});
  const Matrix<T> x = test::random_matrix<T>(10, 4, rng);
  typename SoftPrompt<T>::Cache cache;
  SequenceLayout out_layout;
  const Matrix<T> y = sp.forward(x, layout, out_layout, cache);
  REQUIRE(y.rows() == 16);
  CHECK(out_layout.seq == 8);
  CHECK(out_layout.lengths == std::vector<Index>{8, 5});
  CHECK(sp.extend_layout(layout).lengths == out_layout.lengths);
  for (Index b = 0; b < 2; ++b) {
    CHECK(y.middleRows(b * 8, 3) == sp.embedding.value);
    CHECK(y.middleRows(b * 8 + 3, 5) == x.middleRows(b * 5, 5));
  }
  CHECK(count_parameters(sp).total == 3 * 4);  // n·d
  CHECK(named_parameters(sp)[0].name == "embedding.weight");
  CHECK(std::string(SoftPrompt<T>::kHfSaveKey) == "prompt_embeddings");
}

TEST_CASE("SoftPrompt backward sums the prompt gradient over sequences", "[soft_prompt][gradcheck]") {
  Rng rng(22);
  SoftPrompt<double> sp(2, 3, rng);
  const SequenceLayout layout(3, 4, {4, 1, 3});
  Matrix<double> x = test::random_matrix<double>(12, 3, rng);
  const Matrix<double> g = test::random_matrix<double>(18, 3, rng);
  auto loss = [&] {
    typename SoftPrompt<double>::Cache c;
    SequenceLayout ol;
    Matrix<double> y = sp.forward(x, layout, ol, c);
    return test::dot(g, y);
  };
  typename SoftPrompt<double>::Cache cache;
  SequenceLayout ol;
  sp.forward(x, layout, ol, cache);
  Matrix<double> dx;
  sp.backward(cache, g, &dx);
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(sp.embedding.grad, numerical_gradient(sp.embedding.value, loss)) < Tolerances<double>::grad);
  // frozen: no gradient storage, dx still flows
  sp.embedding.set_trainable(false);
  Matrix<double> dx2;
  sp.backward(cache, g, &dx2);
  CHECK(dx2 == dx);
}

TEST_CASE("SoftPrompt inits: random scale, token copies (cyclic), vocabulary samples", "[soft_prompt]") {
  Rng rng(23);
  SoftPrompt<double> sp(5, 16, rng, 0.01);
  CHECK(sp.embedding.value.cwiseAbs().maxCoeff() < 0.1);
  const double sd = std::sqrt(sp.embedding.value.array().square().mean());  // N(0, 1)·0.01, 80 draws
  CHECK(std::abs(sd - 0.01) < 0.0025);
  CHECK(std::abs(sp.embedding.value.mean()) < 0.003);
  Matrix<double> vocab = test::random_matrix<double>(10, 16, rng);
  sp.init_from_tokens(vocab, {7, 2});
  CHECK(sp.embedding.value.row(0) == vocab.row(7));
  CHECK(sp.embedding.value.row(1) == vocab.row(2));
  CHECK(sp.embedding.value.row(4) == vocab.row(7));
  sp.init_from_tokens(vocab, {1, 2, 3, 4, 5, 6, 7});  // truncated to n
  CHECK(sp.embedding.value.row(4) == vocab.row(5));
  sp.init_from_vocab_sample(vocab, rng);
  for (Index i = 0; i < 5; ++i) {
    bool found = false;
    for (Index v = 0; v < 10; ++v) found = found || sp.embedding.value.row(i) == vocab.row(v);
    CHECK(found);
  }
}

TEST_CASE("SoftPrompt extends labels with ignore_index at prompt positions", "[soft_prompt]") {
  Rng rng(24);
  SoftPrompt<float> sp(2, 4, rng);
  const SequenceLayout layout(2, 3, {3, 2});
  const std::vector<Index> labels{1, 2, 3, 4, 5, -100};
  CHECK(sp.extend_labels(labels, layout) == std::vector<Index>{-100, -100, 1, 2, 3, -100, -100, 4, 5, -100});
}

TEST_CASE("SoftPrompt rejects bad inputs with named errors", "[soft_prompt][errors]") {
  Rng rng(25);
  PEFT_REQUIRE_THROWS_WITH(SoftPrompt<float>(0, 4, rng, 1.0, "p"), ConfigError,
                           "SoftPrompt \"p\": num_virtual_tokens and token_dim must be > 0, got 0 and 4");
  SoftPrompt<float> sp(2, 4, rng, 1.0, "p");
  typename SoftPrompt<float>::Cache cache;
  SequenceLayout ol;
  PEFT_REQUIRE_THROWS_WITH(sp.forward(Matrix<float>::Zero(6, 3), SequenceLayout(2, 3), ol, cache), ShapeError,
                           "SoftPrompt \"p\": input has 3 features, expected 4");
  PEFT_REQUIRE_THROWS_WITH(sp.forward(Matrix<float>::Zero(5, 4), SequenceLayout(2, 3), ol, cache), ShapeError,
                           "sequence data has 5 rows, expected batch*seq");
  PEFT_REQUIRE_THROWS_WITH(sp.init_from_tokens(Matrix<float>::Zero(3, 4), {3}), ConfigError,
                           "init token id 3 is outside the vocabulary [0, 3)");
  PEFT_REQUIRE_THROWS_WITH(sp.init_from_tokens(Matrix<float>::Zero(3, 4), {}), ConfigError,
                           "init token id list is empty");
  PEFT_REQUIRE_THROWS_WITH(sp.init_from_tokens(Matrix<float>::Zero(3, 5), {0}), ShapeError,
                           "vocabulary table has shape [3, 5], expected [vocab > 0, 4]");
  PEFT_REQUIRE_THROWS_WITH(sp.init_random(rng, -1.0), ConfigError, "init scale must be finite and > 0");
  sp.forward(Matrix<float>::Zero(6, 4), SequenceLayout(2, 3), ol, cache);
  PEFT_REQUIRE_THROWS_WITH(sp.backward(cache, Matrix<float>::Zero(6, 4), nullptr), ShapeError, "expected [10, 4]");
  PEFT_REQUIRE_THROWS_WITH(sp.extend_labels({1, 2, 3}, SequenceLayout(2, 3)), ShapeError,
                           "sequence data has 3 rows, expected batch*seq");
}
