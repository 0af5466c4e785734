#include <peft/core/parameters.hpp>
#include <peft/layers/embedding.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

TEMPLATE_TEST_CASE("Embedding looks up rows", "[embedding]", float, double) {
  using T = TestType;
  Rng rng(41);
  Embedding<T> emb(10, 4, rng, "embeddings.word");
  typename Embedding<T>::Cache cache;
  const std::vector<Index> ids = {3, 0, 9, 3};
  const Matrix<T> y = emb.forward(ids, cache);
  REQUIRE(y.rows() == 4);
  for (Index r = 0; r < 4; ++r) CHECK(y.row(r) == emb.weight.value.row(ids[static_cast<std::size_t>(r)]));
  // N(0, 1) init: the sample standard deviation of 40 entries is within a loose band.
  const double sd = std::sqrt(emb.weight.value.template cast<double>().array().square().mean());
  CHECK(sd > 0.5);
  CHECK(sd < 1.5);
}

TEST_CASE("Embedding gradient lands only in the used rows and matches finite differences", "[embedding][gradcheck]") {
  Rng rng(42);
  Embedding<double> emb(7, 3, rng, "emb");
  const std::vector<Index> ids = {2, 5, 2, 0};  // row 2 used twice
  const Matrix<double> g = test::random_matrix<double>(4, 3, rng);
  auto loss = [&] {
    typename Embedding<double>::Cache c;
    return test::dot(g, emb.forward(ids, c));
  };
  typename Embedding<double>::Cache cache;
  emb.forward(ids, cache);
  emb.backward(cache, g);
  CHECK(relative_error(emb.weight.grad, numerical_gradient(emb.weight.value, loss)) < Tolerances<double>::grad);
  CHECK(test::rel_diff(Matrix<double>(emb.weight.grad.row(2)), Matrix<double>(g.row(0) + g.row(2))) < 1e-15);
  for (Index unused : {1, 3, 4, 6}) CHECK(emb.weight.grad.row(unused).isZero(0));
  // Frozen: nothing accumulated, no buffer.
  emb.weight.set_trainable(false);
  emb.backward(cache, g);
  CHECK(emb.weight.grad.size() == 0);
}

TEST_CASE("Positional embedding adds positions and accumulates over the batch", "[embedding][gradcheck]") {
  Rng rng(43);
  PositionalEmbedding<double> pos(6, 3, rng, "embeddings.position");
  const SequenceLayout layout(2, 4, {4, 2});
  Matrix<double> x = test::random_matrix<double>(8, 3, rng);
  typename PositionalEmbedding<double>::Cache cache;
  Matrix<double> y;
  pos.forward(x, layout, y, cache);
  for (Index b = 0; b < 2; ++b)
    for (Index t = 0; t < 4; ++t)
      CHECK(test::rel_diff(Matrix<double>(y.row(b * 4 + t)),
                           Matrix<double>(x.row(b * 4 + t) + pos.weight.value.row(t))) < 1e-15);
  const Matrix<double> g = test::random_matrix<double>(8, 3, rng);
  auto loss = [&] {
    typename PositionalEmbedding<double>::Cache c;
    Matrix<double> out;
    pos.forward(x, layout, out, c);
    return test::dot(g, out);
  };
  pos.backward(cache, g);
  CHECK(relative_error(pos.weight.grad, numerical_gradient(pos.weight.value, loss)) < Tolerances<double>::grad);
  CHECK(pos.weight.grad.bottomRows(2).isZero(0));  // positions 4, 5 unused
  // In-place form gives the same result.
  Matrix<double> z = x;
  pos.forward_inplace(z, layout, cache);
  CHECK(z == y);
}

TEST_CASE("Embedding errors name the id, the vocabulary size and max_len", "[embedding][errors]") {
  Rng rng(44);
  Embedding<float> emb(5, 2, rng, "embeddings.word");
  typename Embedding<float>::Cache cache;
  PEFT_REQUIRE_THROWS_WITH(
      emb.forward(std::vector<Index>{1, 5}, cache), ShapeError,
      "Embedding \"embeddings.word\": token id 5 at position 1 is out of range for vocabulary size 5");
  PEFT_REQUIRE_THROWS_WITH(emb.forward(std::vector<Index>{-1}, cache), ShapeError, "token id -1");
  emb.forward(std::vector<Index>{1, 2}, cache);
  PEFT_REQUIRE_THROWS_WITH(emb.backward(cache, Matrix<float>::Zero(3, 2)), ShapeError, "expected [2, 2]");
  PEFT_REQUIRE_THROWS_WITH(Embedding<float>(0, 2, rng, "e"), ShapeError, "num_embeddings and dim must be > 0");
  PEFT_REQUIRE_THROWS_WITH(Embedding<float>(-3, 2, rng, "e"), ShapeError, "got -3 and 2");
  PEFT_REQUIRE_THROWS_WITH(PositionalEmbedding<float>(4, -1, rng, "p"), ShapeError,
                           "max_len and dim must be > 0, got 4 and -1");
  PositionalEmbedding<float> pos(3, 2, rng, "pos");
  typename PositionalEmbedding<float>::Cache pc;
  Matrix<float> x = Matrix<float>::Zero(4, 2);
  PEFT_REQUIRE_THROWS_WITH(pos.forward_inplace(x, SequenceLayout(1, 4), pc), ShapeError,
                           "PositionalEmbedding \"pos\": sequence length 4 exceeds max_len 3");
  Matrix<float> x3 = Matrix<float>::Zero(4, 3);
  PEFT_REQUIRE_THROWS_WITH(pos.forward_inplace(x3, SequenceLayout(2, 2), pc), ShapeError,
                           "input has 3 features, expected 2");
  CHECK(named_parameters(pos).front().name == "weight");
}
