#include <peft/core/parameters.hpp>
#include <peft/layers/prefix_attention.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {

/// Two stacked attention layers sharing one PrefixAttention (layer i reads prefix i).
struct TwoLayers {
  MultiHeadAttention<double> a0, a1;
  PrefixAttention<double> prefix;

  Matrix<double> forward(const Matrix<double>& x, const SequenceLayout& layout) {
    typename PrefixAttention<double>::Cache pc;
    typename MultiHeadAttention<double>::Cache c0, c1;
    prefix.forward(pc);
    const PrefixKV<double> kv0 = prefix.layer(pc, 0), kv1 = prefix.layer(pc, 1);
    const Matrix<double> h = a0.forward(x, layout, c0, &kv0);
    return a1.forward(h, layout, c1, &kv1);
  }
};

}  // namespace

TEST_CASE("Prefix gradients match finite differences through two attention layers (flat and projected)",
          "[prefix][gradcheck]") {
  for (bool projected : {false, true}) {
    INFO("projected = " << projected);
    Rng rng(81);
    TwoLayers m{MultiHeadAttention<double>(6, 2, rng, AttentionOptions{true, true}, "layers.0.attn"),
                MultiHeadAttention<double>(6, 2, rng, AttentionOptions{true, true}, "layers.1.attn"),
                PrefixAttention<double>(PrefixConfig{3, 6, 2, projected, 5}, rng, "prefix")};
    m.a0.freeze_base();
    m.a1.freeze_base();
    const SequenceLayout layout(2, 3, {3, 2});
    Matrix<double> x = test::random_matrix<double>(6, 6, rng);
    const Matrix<double> g = test::random_matrix<double>(6, 6, rng);
    auto loss = [&] { return test::dot(g, m.forward(x, layout)); };

    typename PrefixAttention<double>::Cache pc;
    typename MultiHeadAttention<double>::Cache c0, c1;
    m.prefix.forward(pc);
    const PrefixKV<double> kv0 = m.prefix.layer(pc, 0), kv1 = m.prefix.layer(pc, 1);
    Matrix<double> h, y, dh, dx;
    m.a0.forward(x, layout, h, c0, &kv0);
    m.a1.forward(h, layout, y, c1, &kv1);
    PrefixGrad<double> g1 = m.prefix.layer_grad(pc, 1), g0 = m.prefix.layer_grad(pc, 0);
    m.a1.backward(c1, g, &dh, &g1);
    m.a0.backward(c0, dh, &dx, &g0);
    m.prefix.backward(pc);

    CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
    const auto params = trainable_parameters(m.prefix);
    CHECK(params.size() == (projected ? 5u : 1u));
    for (auto& np : params) {
      INFO(np.name);
      CHECK(relative_error(np.param->grad, numerical_gradient(np.param->value, loss)) < Tolerances<double>::grad);
    }
    // Base weights frozen: the prefix is all that trains.
    CHECK(trainable_parameters(m.a0).empty());
  }
}

TEST_CASE("Prefix layout is Hugging Face PEFT's prompt_embeddings [l, L*2*d]", "[prefix]") {
  const Index l = 3, L = 2, H = 2, d = 4, hd = d / H;
  Matrix<float> table(l, L * 2 * d);
  for (Index j = 0; j < table.rows(); ++j)
    for (Index c = 0; c < table.cols(); ++c) table(j, c) = static_cast<float>(1000 * j + c);
  auto prefix = PrefixAttention<float>::from_prompt_embeddings(table, L, "prefix");
  CHECK(prefix.token_dim() == d);
  CHECK(prefix.num_virtual_tokens() == l);
  typename PrefixAttention<float>::Cache pc;
  prefix.forward(pc);
  // PEFT: view(batch, l, 2L, H, hd).permute(2, 0, 3, 1, 4).split(2): layer i's key is slice 2i,
  // value slice 2i+1, element [h, j, e] = table[j, ((2i + kv)·H + h)·hd + e].
  for (Index i = 0; i < L; ++i) {
    const PrefixKV<float> kv = prefix.layer(pc, i);
    for (Index h = 0; h < H; ++h)
      for (Index j = 0; j < l; ++j)
        for (Index e = 0; e < hd; ++e) {
          CHECK(kv.key(j, h * hd + e) == table(j, ((2 * i + 0) * H + h) * hd + e));
          CHECK(kv.value(j, h * hd + e) == table(j, ((2 * i + 1) * H + h) * hd + e));
        }
  }
  CHECK(prefix.prompt_embeddings() == table);
  std::vector<std::string> names;
  for (auto& np : named_parameters(prefix)) names.push_back(np.name);
  CHECK(names == std::vector<std::string>{"embedding.weight"});
}

TEST_CASE("Prefix parameter counts equal the closed forms", "[prefix]") {
  Rng rng(82);
  const Index l = 10, d = 16, L = 4, h = 32;
  PrefixAttention<float> flat(PrefixConfig{l, d, L, false, 0}, rng, "p");
  CHECK(count_parameters(flat).total == L * 2 * l * d);  // 2·l·d per layer
  CHECK(count_parameters(flat).trainable == L * 2 * l * d);
  PrefixAttention<float> proj(PrefixConfig{l, d, L, true, h}, rng, "p");
  CHECK(count_parameters(proj).total == l * d + (h * d + h) + (h * L * 2 * d + L * 2 * d));
  std::vector<std::string> names;
  for (auto& np : named_parameters(proj)) names.push_back(np.name);
  CHECK(names == std::vector<std::string>{"embedding.weight", "transform.0.weight", "transform.0.bias",
                                          "transform.2.weight", "transform.2.bias"});
}

TEMPLATE_TEST_CASE("Collapsing the reparameterisation keeps outputs; save/load round trip", "[prefix]", float, double) {
  using T = TestType;
  Rng rng(83);
  MultiHeadAttention<T> attn(8, 2, rng, AttentionOptions{true, false}, "attn");
  PrefixAttention<T> prefix(PrefixConfig{4, 8, 1, true, 6}, rng, "prefix");
  const SequenceLayout layout(2, 3, {2, 3});
  const Matrix<T> x = test::random_matrix<T>(6, 8, rng);
  auto run = [&](PrefixAttention<T>& p) {
    typename PrefixAttention<T>::Cache pc;
    typename MultiHeadAttention<T>::Cache c;
    p.forward(pc);
    const PrefixKV<T> kv = p.layer(pc, 0);
    return attn.forward(x, layout, c, &kv);
  };
  const Matrix<T> y = run(prefix);
  typename MultiHeadAttention<T>::Cache c;
  CHECK((y - attn.forward(x, layout, c)).norm() > 1e-3);  // the prefix matters
  const Matrix<T> saved = prefix.prompt_embeddings();
  CHECK(saved.rows() == 4);
  CHECK(saved.cols() == 16);
  prefix.collapse();
  CHECK_FALSE(prefix.projected());
  CHECK(count_parameters(prefix).total == 4 * 16);
  CHECK(test::rel_diff(run(prefix), y) < Tolerances<T>::rel);
  PrefixAttention<T> loaded(PrefixConfig{4, 8, 1, true, 3}, rng, "loaded");
  loaded.load_prompt_embeddings(saved);
  CHECK_FALSE(loaded.projected());
  CHECK(test::rel_diff(run(loaded), y) < Tolerances<T>::rel);
}

TEST_CASE("Prefix errors are named", "[prefix][errors]") {
  Rng rng(84);
  PEFT_REQUIRE_THROWS_WITH(PrefixAttention<double>(PrefixConfig{0, 8, 1, false, 0}, rng, "prefix"), ConfigError,
                           "PrefixAttention \"prefix\": num_virtual_tokens, token_dim and num_layers must be > 0");
  PEFT_REQUIRE_THROWS_WITH(PrefixAttention<double>(PrefixConfig{2, 8, 1, true, 0}, rng, "prefix"), ConfigError,
                           "prefix_projection needs encoder_hidden_size > 0, got 0");
  PEFT_REQUIRE_THROWS_WITH(PrefixAttention<double>::from_prompt_embeddings(Matrix<double>::Zero(2, 10), 2, "p"),
                           ShapeError, "prompt_embeddings of shape [2, 10] do not split into num_layers=2");
  PrefixAttention<double> prefix(PrefixConfig{2, 6, 2, false, 0}, rng, "prefix");
  typename PrefixAttention<double>::Cache pc;
  PEFT_REQUIRE_THROWS_WITH(prefix.layer(pc, 0), ShapeError, "cached table (call forward first) has shape [0, 0]");
  prefix.forward(pc);
  PEFT_REQUIRE_THROWS_WITH(prefix.layer(pc, 2), ShapeError,
                           "PrefixAttention \"prefix\": layer 2 is out of range for num_layers 2");
  PEFT_REQUIRE_THROWS_WITH(prefix.load_prompt_embeddings(Matrix<double>::Zero(2, 12)), ShapeError,
                           "prompt_embeddings has shape [2, 12], expected [2, 24]");
  // token_dim 6 does not fit an attention of dim 8.
  MultiHeadAttention<double> attn(8, 2, rng, AttentionOptions{}, "layers.0.attn");
  typename MultiHeadAttention<double>::Cache c;
  const PrefixKV<double> kv = prefix.layer(pc, 0);
  PEFT_REQUIRE_THROWS_WITH(attn.forward(Matrix<double>::Zero(3, 8), SequenceLayout(1, 3), c, &kv), ShapeError,
                           "MultiHeadAttention \"layers.0.attn\": prefix key has shape [2, 6], expected [2, 8]");
}
