#include <peft/core/parameters.hpp>
#include <peft/layers/attention.hpp>
#include <peft/layers/feed_forward.hpp>
#include <peft/layers/ia3.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

TEMPLATE_TEST_CASE("(IA)^3 is the identity at init, exactly", "[ia3]", float, double) {
  using T = TestType;
  Rng rng(71);
  MultiHeadAttention<T> attn(8, 2, rng, AttentionOptions{true, true}, "attn");
  FeedForward<T> ffn(8, 16, Activation::GELU, rng, true, "ffn");
  const SequenceLayout layout(2, 3, {3, 2});
  const Matrix<T> x = test::random_matrix<T>(6, 8, rng);
  typename MultiHeadAttention<T>::Cache ca;
  typename FeedForward<T>::Cache cf;
  const Matrix<T> ya = attn.forward(x, layout, ca);
  const Matrix<T> yf = ffn.forward(x, cf);
  attn.add_ia3();
  ffn.add_ia3();
  CHECK(attn.ia3_k.ia3_l.value.isOnes(0));
  CHECK(ffn.ia3.ia3_l.value.isOnes(0));
  CHECK(attn.forward(x, layout, ca) == ya);
  CHECK(ffn.forward(x, cf) == yf);
  // Parameter counts: 2·d on attention (k, v), inner on the feed-forward.
  Index ia3_params = 0;
  for (auto& np : named_parameters(attn))
    if (np.name.find("ia3_l") != std::string::npos) ia3_params += np.param->size();
  CHECK(ia3_params == 2 * 8);
  CHECK(count_parameters(ffn).total == (8 * 16 + 16) + (16 * 8 + 8) + 16);
}

TEMPLATE_TEST_CASE("(IA)^3 merged equals unmerged; unmerge restores the weights", "[ia3]", float, double) {
  using T = TestType;
  Rng rng(72);
  MultiHeadAttention<T> attn(8, 4, rng, AttentionOptions{true, false}, "attn");
  FeedForward<T> ffn(8, 12, Activation::SiLU, rng, true, "ffn");
  attn.add_ia3();
  ffn.add_ia3();
  attn.ia3_k.ia3_l.value = test::random_matrix<T>(8, 1, rng);
  attn.ia3_v.ia3_l.value = test::random_matrix<T>(8, 1, rng);
  ffn.ia3.ia3_l.value = test::random_matrix<T>(1, 12, rng);
  const SequenceLayout layout(2, 4, {4, 3});
  const Matrix<T> x = test::random_matrix<T>(8, 8, rng);
  const Matrix<T> pk = test::random_matrix<T>(2, 8, rng), pv = test::random_matrix<T>(2, 8, rng);
  const PrefixKV<T> prefix{pk, pv};
  typename MultiHeadAttention<T>::Cache ca;
  typename FeedForward<T>::Cache cf;
  const Matrix<T> ya = attn.forward(x, layout, ca, &prefix);
  const Matrix<T> yf = ffn.forward(x, cf);
  const Matrix<T> wk = attn.k_proj.weight.value, bk = attn.k_proj.bias.value, w2 = ffn.fc2.weight.value,
                  b2 = ffn.fc2.bias.value;
  attn.merge_ia3();
  ffn.merge_ia3();
  CHECK(attn.ia3_merged());
  // Row scaling of W_k and b_k; column scaling of W_2, bias untouched.
  for (Index i = 0; i < 8; ++i) {
    CHECK(test::rel_diff(Matrix<T>(attn.k_proj.weight.value.row(i)),
                         Matrix<T>(wk.row(i) * attn.ia3_k.ia3_l.value(i, 0))) < Tolerances<T>::rel);
    CHECK(std::abs(static_cast<double>(attn.k_proj.bias.value(0, i) - bk(0, i) * attn.ia3_k.ia3_l.value(i, 0))) <
          Tolerances<T>::rel);
  }
  for (Index j = 0; j < 12; ++j)
    CHECK(test::rel_diff(Matrix<T>(ffn.fc2.weight.value.col(j)), Matrix<T>(w2.col(j) * ffn.ia3.ia3_l.value(0, j))) <
          Tolerances<T>::rel);
  CHECK(ffn.fc2.bias.value == b2);
  CHECK(test::rel_diff(attn.forward(x, layout, ca, &prefix), ya) < 10 * Tolerances<T>::rel);
  CHECK(test::rel_diff(ffn.forward(x, cf), yf) < 10 * Tolerances<T>::rel);
  attn.unmerge_ia3();
  ffn.unmerge_ia3();
  CHECK_FALSE(attn.ia3_merged());
  CHECK(test::rel_diff(attn.k_proj.weight.value, wk) < 10 * Tolerances<T>::rel);
  CHECK(test::rel_diff(ffn.fc2.weight.value, w2) < 10 * Tolerances<T>::rel);
  CHECK(test::rel_diff(attn.forward(x, layout, ca, &prefix), ya) < 10 * Tolerances<T>::rel);
  CHECK(test::rel_diff(ffn.forward(x, cf), yf) < 10 * Tolerances<T>::rel);
}

TEST_CASE("IA3Vector backward matches finite differences in both placements", "[ia3][gradcheck]") {
  Rng rng(73);
  for (IA3Placement placement : {IA3Placement::Output, IA3Placement::Input}) {
    IA3Vector<double> v(placement, 5, "default");
    v.ia3_l.value = test::random_matrix<double>(v.ia3_l.value.rows(), v.ia3_l.value.cols(), rng);
    Matrix<double> u = test::random_matrix<double>(3, 5, rng);
    const Matrix<double> g = test::random_matrix<double>(3, 5, rng);
    auto loss = [&] {
      Matrix<double> y = u;
      v.apply(y);
      return test::dot(g, y);
    };
    Matrix<double> du = g;
    v.backward(u, du);
    CHECK(relative_error(du, numerical_gradient(u, loss)) < Tolerances<double>::grad);
    CHECK(relative_error(v.ia3_l.grad, numerical_gradient(v.ia3_l.value, loss)) < Tolerances<double>::grad);
  }
  // Frozen vectors need no cached activation and accumulate nothing.
  IA3Vector<double> frozen(IA3Placement::Input, 3);
  frozen.ia3_l.set_trainable(false);
  Matrix<double> g = Matrix<double>::Ones(2, 3);
  frozen.backward(Matrix<double>(), g);
  CHECK(g.isOnes(0));
}

TEST_CASE("(IA)^3 refuses unsafe merges and bad shapes with named errors", "[ia3][errors]") {
  Rng rng(74);
  LoRALinear<double> lin(4, 6, rng, true, "blk.attn.k_proj");
  IA3Vector<double> out(IA3Placement::Output, 6, "default");
  LoraConfig cfg;
  cfg.r = 2;
  lin.add_adapter("default", cfg);
  PEFT_REQUIRE_THROWS_WITH(
      out.merge_into(lin), ConfigError,
      "IA3 \"blk.attn.k_proj\": cannot merge (IA)^3 into a linear with active or merged LoRA adapters");
  lin.set_active(std::vector<std::string>{});
  out.merge_into(lin);
  PEFT_REQUIRE_THROWS_WITH(out.merge_into(lin), ConfigError, "adapter \"default\" is already merged");
  out.unmerge_from(lin);
  PEFT_REQUIRE_THROWS_WITH(out.unmerge_from(lin), ConfigError, "is not merged");
  out.ia3_l.value(2, 0) = 0.0;
  out.merge_into(lin);
  PEFT_REQUIRE_THROWS_WITH(out.unmerge_from(lin), NumericError, "ia3_l[2] is 0, the scaling is not invertible");
  IA3Vector<double> in(IA3Placement::Input, 6, "default");
  PEFT_REQUIRE_THROWS_WITH(in.merge_into(lin), ShapeError, "ia3_l has 6 entries, the linear's in_features is 4");
  Matrix<double> y = Matrix<double>::Zero(2, 5);
  PEFT_REQUIRE_THROWS_WITH(in.apply(y), ShapeError, "activation has 5 features, expected 6");
  PEFT_REQUIRE_THROWS_WITH(IA3Vector<double>(IA3Placement::Input, 0), ShapeError, "features must be > 0, got 0");
  PEFT_REQUIRE_THROWS_WITH(IA3Vector<double>(IA3Placement::Input, 3, ""), ConfigError,
                           "adapter name must not be empty");
}
