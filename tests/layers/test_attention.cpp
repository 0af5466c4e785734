#include <peft/core/parameters.hpp>
#include <peft/layers/attention.hpp>
#include <peft/layers/dropout.hpp>
#include <peft/layers/embedding.hpp>
#include <peft/layers/feed_forward.hpp>
#include <peft/layers/layer_norm.hpp>
#include <peft/layers/prefix_attention.hpp>
#include <peft/train/gradient_check.hpp>

#include <cmath>
#include <limits>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {

/// Straightforward reference: per (b, h, query) scores with −∞ masks, std::exp softmax.
/// Projections come from the layer's own (separately tested) LoRALinear children.
template <class T>
Matrix<T> reference_attention(MultiHeadAttention<T>& attn, const Matrix<T>& x, const SequenceLayout& layout,
                              const Matrix<T>* pk, const Matrix<T>* pv) {
  typename LoRALinear<T>::Cache c;
  Matrix<T> Q = attn.q_proj.forward(x, c), K = attn.k_proj.forward(x, c), V = attn.v_proj.forward(x, c);
  const Index H = attn.num_heads(), hd = attn.head_dim(), S = layout.seq, l = pk ? pk->rows() : 0;
  Matrix<T> ctx = Matrix<T>::Zero(x.rows(), attn.dim());
  for (Index b = 0; b < layout.batch; ++b)
    for (Index h = 0; h < H; ++h)
      for (Index t = 0; t < layout.length(b); ++t) {
        std::vector<double> s;
        std::vector<const T*> vals;
        const RowVector<T> qrow = Q.row(b * S + t).segment(h * hd, hd);
        for (Index j = 0; j < l; ++j) {
          s.push_back(static_cast<double>(qrow.dot(pk->row(j).segment(h * hd, hd))) / std::sqrt(double(hd)));
          vals.push_back(&(*pv)(j, h * hd));
        }
        for (Index j = 0; j < S; ++j) {
          const bool masked = j >= layout.length(b) || (attn.causal() && j > t);
          s.push_back(masked ? -std::numeric_limits<double>::infinity()
                             : static_cast<double>(qrow.dot(K.row(b * S + j).segment(h * hd, hd))) /
                                   std::sqrt(double(hd)));
          vals.push_back(&V(b * S + j, h * hd));
        }
        double m = -std::numeric_limits<double>::infinity();
        for (double v : s) m = std::max(m, v);
        double z = 0;
        for (double& v : s) z += (v = std::exp(v - m));
        for (std::size_t j = 0; j < s.size(); ++j)
          for (Index e = 0; e < hd; ++e) ctx(b * S + t, h * hd + e) += static_cast<T>(s[j] / z) * vals[j][e];
      }
  Matrix<T> y = attn.out_proj.forward(ctx, c);
  for (Index b = 0; b < layout.batch; ++b)
    for (Index t = layout.length(b); t < S; ++t) y.row(b * S + t).setZero();
  return y;
}

template <class T>
void add_lora(LoRALinear<T>& lin, Rng& rng) {
  LoraConfig cfg;
  cfg.r = 2;
  cfg.alpha = 3.0;
  lin.add_adapter("default", cfg, rng);
  lin.adapter("default").B.value = test::random_matrix<T>(lin.out_features(), 2, rng, 0.3);
}

template <class T>
void randomize_ia3(MultiHeadAttention<T>& attn, Rng& rng) {
  attn.ia3_k()->l.value.array() += test::random_matrix<T>(attn.dim(), 1, rng, 0.3).array();
  attn.ia3_v()->l.value.array() += test::random_matrix<T>(attn.dim(), 1, rng, 0.3).array();
}

}  // namespace

TEMPLATE_TEST_CASE("Attention forward matches a direct reference (masks, prefix, IA3, LoRA)", "[attention]", float,
                   double) {
  using T = TestType;
  Rng rng(31);
  for (bool causal : {false, true}) {
    MultiHeadAttention<T> attn(8, 2, rng, AttentionOptions{true, causal}, "attn");
    add_lora(attn.q_proj, rng);
    attn.add_ia3();
    randomize_ia3(attn, rng);
    const SequenceLayout layout(3, 5, {5, 2, 4});
    const Matrix<T> x = test::random_matrix<T>(15, 8, rng);
    const Matrix<T> pk = test::random_matrix<T>(3, 8, rng), pv = test::random_matrix<T>(3, 8, rng);
    const PrefixKV<T> prefix{pk, pv};
    typename MultiHeadAttention<T>::Cache cache;
    const Matrix<T> y = attn.forward(x, layout, cache, &prefix);
    CHECK(test::rel_diff(y, reference_attention(attn, x, layout, &pk, &pv)) < 10 * Tolerances<T>::rel);
    const Matrix<T> y0 = attn.forward(x, layout, cache);
    CHECK(test::rel_diff(y0, reference_attention<T>(attn, x, layout, nullptr, nullptr)) < 10 * Tolerances<T>::rel);
    // The prefix changes the output of every valid row.
    for (Index b = 0; b < 3; ++b)
      for (Index t = 0; t < layout.length(b); ++t) CHECK((y.row(b * 5 + t) - y0.row(b * 5 + t)).norm() > 1e-3);
  }
}

TEST_CASE("Attention backward matches finite differences with causal + padding + prefix + IA3 + LoRA",
          "[attention][gradcheck]") {
  Rng rng(32);
  MultiHeadAttention<double> attn(6, 2, rng, AttentionOptions{true, true}, "layers.0.attn");
  add_lora(attn.q_proj, rng);
  add_lora(attn.v_proj, rng);
  attn.add_ia3();
  randomize_ia3(attn, rng);
  const SequenceLayout layout(2, 4, {4, 3});
  Matrix<double> x = test::random_matrix<double>(8, 6, rng);
  Matrix<double> pk = test::random_matrix<double>(2, 6, rng), pv = test::random_matrix<double>(2, 6, rng);
  const Matrix<double> g = test::random_matrix<double>(8, 6, rng);  // non-zero on padding rows too
  auto loss = [&] {
    typename MultiHeadAttention<double>::Cache c;
    const PrefixKV<double> p{pk, pv};
    return test::dot(g, attn.forward(x, layout, c, &p));
  };
  attn.zero_grad();
  typename MultiHeadAttention<double>::Cache cache;
  const PrefixKV<double> prefix{pk, pv};
  attn.forward(x, layout, cache, &prefix);
  Matrix<double> dx, dpk = Matrix<double>::Zero(2, 6), dpv = Matrix<double>::Zero(2, 6);
  PrefixGrad<double> dprefix{dpk, dpv};
  attn.backward(cache, g, &dx, &dprefix);
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(dpk, numerical_gradient(pk, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(dpv, numerical_gradient(pv, loss)) < Tolerances<double>::grad);
  int checked = 0;
  for (auto& np : trainable_parameters(attn)) {
    INFO(np.name);
    CHECK(relative_error(np.param->grad, numerical_gradient(np.param->value, loss)) < Tolerances<double>::grad);
    ++checked;
  }
  // 4 × (weight, bias) + 2 × (lora_A, lora_B) + 2 IA3 vectors
  CHECK(checked == 14);

  // Prefix gradients accumulate (+=).
  attn.backward(cache, g, nullptr, &dprefix);
  CHECK(relative_error(dpk, Matrix<double>(2.0 * numerical_gradient(pk, loss))) < Tolerances<double>::grad);
}

TEST_CASE("Attention backward without prefix, frozen base and no dx", "[attention][gradcheck]") {
  Rng rng(33);
  MultiHeadAttention<double> attn(4, 1, rng, AttentionOptions{false, false}, "attn");
  attn.freeze_base();
  add_lora(attn.k_proj, rng);
  const SequenceLayout layout(2, 3, {2, 3});
  Matrix<double> x = test::random_matrix<double>(6, 4, rng);
  const Matrix<double> g = test::random_matrix<double>(6, 4, rng);
  auto loss = [&] {
    typename MultiHeadAttention<double>::Cache c;
    return test::dot(g, attn.forward(x, layout, c));
  };
  typename MultiHeadAttention<double>::Cache cache;
  attn.forward(x, layout, cache);
  Matrix<double> dx;
  attn.backward(cache, g, &dx);
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  auto& A = attn.k_proj.adapter("default").A;
  CHECK(relative_error(A.grad, numerical_gradient(A.value, loss)) < Tolerances<double>::grad);
  CHECK(attn.q_proj.weight.grad.size() == 0);
  // One copy of the input for q, k and v (k's LoRA reads it), none in the projections' caches.
  CHECK(test::rel_diff(cache.x, x) == 0.0);
  CHECK(cache.q.x.size() + cache.k.x.size() + cache.v.x.size() == 0);
  CHECK(trainable_parameters(attn).size() == 2);
  attn.zero_grad();
  attn.backward(cache, g, nullptr);
  CHECK(relative_error(A.grad, numerical_gradient(A.value, loss)) < Tolerances<double>::grad);
}

TEMPLATE_TEST_CASE("Attention softmax is stable with huge logits", "[attention]", float, double) {
  using T = TestType;
  Rng rng(34);
  MultiHeadAttention<T> attn(4, 1, rng, AttentionOptions{false, true}, "attn");
  const SequenceLayout layout(1, 6);
  const Matrix<T> x = test::random_matrix<T>(6, 4, rng, 1e3);  // logits of order 1e6..1e7
  const Matrix<T> pk = test::random_matrix<T>(2, 4, rng, 1e3), pv = test::random_matrix<T>(2, 4, rng);
  const PrefixKV<T> prefix{pk, pv};
  typename MultiHeadAttention<T>::Cache cache;
  const Matrix<T> y = attn.forward(x, layout, cache, &prefix);
  CHECK(y.allFinite());
  const Matrix<T> probs = attn.attention_probs(cache, 0, 0);
  REQUIRE(probs.rows() == 6);
  REQUIRE(probs.cols() == 2 + 6);
  CHECK(probs.allFinite());
  for (Index t = 0; t < 6; ++t) {
    CHECK(std::abs(static_cast<double>(probs.row(t).sum()) - 1.0) < 10 * Tolerances<T>::rel);
    CHECK(probs.row(t).maxCoeff() <= T(1));
    CHECK(probs.row(t).minCoeff() >= T(0));
  }
  Matrix<T> dx;
  attn.backward(cache, Matrix<T>::Ones(6, 4), &dx);
  CHECK(dx.allFinite());
}

TEMPLATE_TEST_CASE("Causal attention: the prefix is visible to every query, future keys are not", "[attention]", float,
                   double) {
  using T = TestType;
  Rng rng(35);
  MultiHeadAttention<T> attn(6, 3, rng, AttentionOptions{true, true}, "attn");
  const SequenceLayout layout(2, 4, {4, 2});
  Matrix<T> x = test::random_matrix<T>(8, 6, rng);
  const Matrix<T> pk = test::random_matrix<T>(3, 6, rng), pv = test::random_matrix<T>(3, 6, rng);
  const PrefixKV<T> prefix{pk, pv};
  typename MultiHeadAttention<T>::Cache cache;
  const Matrix<T> y = attn.forward(x, layout, cache, &prefix);
  const Index l = 3, S = 4, H = 3;
  for (Index b = 0; b < 2; ++b)
    for (Index h = 0; h < H; ++h) {
      const Matrix<T> probs = attn.attention_probs(cache, b, h);
      REQUIRE(probs.cols() == l + layout.length(b));
      for (Index t = 0; t < layout.length(b); ++t) {
        const auto row = probs.row(t);
        for (Index j = 0; j < l; ++j) CHECK(row(j) > T(0));  // prefix always visible, including to query 0
        for (Index j = 0; j < layout.length(b); ++j) CHECK((row(l + j) > T(0)) == (j <= t));
        CHECK(std::abs(static_cast<double>(row.sum()) - 1.0) < 10 * Tolerances<T>::rel);
      }
    }
  CHECK(S == layout.seq);
  // Without prefix, query 0 sees only itself: y_0 = out_proj(v_0).
  typename MultiHeadAttention<T>::Cache c0;
  const Matrix<T> y0 = attn.forward(x, layout, c0);
  typename LoRALinear<T>::Cache lc;
  const Matrix<T> v0 = attn.v_proj.forward(x.topRows(1), lc);
  const Matrix<T> expected = attn.out_proj.forward(v0, lc);
  CHECK(test::rel_diff(y0.topRows(1), expected) < 10 * Tolerances<T>::rel);
  // With the prefix, query 0 is different (it attends to the prefix too).
  CHECK((y.row(0) - y0.row(0)).norm() > 1e-3);
  // Changing a future token does not change earlier outputs.
  x.row(3).setConstant(T(5));
  typename MultiHeadAttention<T>::Cache c2;
  const Matrix<T> y2 = attn.forward(x, layout, c2, &prefix);
  CHECK(test::rel_diff(y2.topRows(3), y.topRows(3)) < Tolerances<T>::rel);
  CHECK((y2.row(3) - y.row(3)).norm() > 1e-3);
}

TEMPLATE_TEST_CASE("Padding never changes valid rows; batched equals separate runs", "[attention]", float, double) {
  using T = TestType;
  Rng rng(36);
  for (bool causal : {false, true}) {
    MultiHeadAttention<T> attn(8, 4, rng, AttentionOptions{true, causal}, "attn");
    attn.add_ia3();
    randomize_ia3(attn, rng);
    const SequenceLayout layout(3, 5, {3, 5, 1});
    Matrix<T> x = test::random_matrix<T>(15, 8, rng);
    const Matrix<T> pk = test::random_matrix<T>(2, 8, rng), pv = test::random_matrix<T>(2, 8, rng);
    const PrefixKV<T> prefix{pk, pv};
    typename MultiHeadAttention<T>::Cache cache;
    const Matrix<T> y = attn.forward(x, layout, cache, &prefix);
    // Padding rows of the output are exactly zero.
    CHECK(y.middleRows(3, 2).isZero(0));
    CHECK(y.middleRows(11, 4).isZero(0));
    // Change every padding row: valid rows are bit-identical.
    Matrix<T> x2 = x;
    x2.middleRows(3, 2).setConstant(T(100));
    x2.middleRows(11, 4) = test::random_matrix<T>(4, 8, rng, 50.0);
    typename MultiHeadAttention<T>::Cache cache2;
    const Matrix<T> y2 = attn.forward(x2, layout, cache2, &prefix);
    CHECK(y2 == y);
    // Each sequence alone (no padding) gives the same rows.
    for (Index b = 0; b < 3; ++b) {
      const Index L = layout.length(b);
      typename MultiHeadAttention<T>::Cache cs;
      const Matrix<T> ys = attn.forward(x.middleRows(b * 5, L), SequenceLayout(1, L), cs, &prefix);
      CHECK(test::rel_diff(ys, Matrix<T>(y.middleRows(b * 5, L))) < 10 * Tolerances<T>::rel);
    }
    // The input gradient of padding rows is zero, and dy on padding rows is ignored.
    Matrix<T> g = test::random_matrix<T>(15, 8, rng), dx, dx2;
    attn.backward(cache, g, &dx);
    g.middleRows(3, 2).setConstant(T(7));
    attn.backward(cache, g, &dx2);
    CHECK(dx == dx2);
    CHECK(dx.middleRows(3, 2).isZero(0));
    CHECK(dx.middleRows(11, 4).isZero(0));
  }
}

TEST_CASE("Attention: two forwards with two caches, then two backwards", "[attention]") {
  Rng rng(37);
  MultiHeadAttention<double> attn(4, 2, rng, AttentionOptions{}, "attn");
  const SequenceLayout la(1, 3), lb(2, 2, {1, 2});
  const Matrix<double> xa = test::random_matrix<double>(3, 4, rng), xb = test::random_matrix<double>(4, 4, rng);
  const Matrix<double> ga = test::random_matrix<double>(3, 4, rng), gb = test::random_matrix<double>(4, 4, rng);
  typename MultiHeadAttention<double>::Cache ca, cb;
  attn.forward(xa, la, ca);
  attn.forward(xb, lb, cb);
  Matrix<double> dxa, dxb;
  attn.backward(ca, ga, &dxa);
  attn.backward(cb, gb, &dxb);
  const Matrix<double> acc = attn.q_proj.weight.grad;
  attn.zero_grad();
  typename MultiHeadAttention<double>::Cache c;
  Matrix<double> d;
  attn.forward(xa, la, c);
  attn.backward(c, ga, &d);
  CHECK(test::rel_diff(d, dxa) < 1e-12);
  attn.forward(xb, lb, c);
  attn.backward(c, gb, &d);
  CHECK(test::rel_diff(d, dxb) < 1e-12);
  CHECK(test::rel_diff(attn.q_proj.weight.grad, acc) < 1e-12);
}

TEST_CASE("Attention keeps softmax statistics, not score blocks, for backward", "[attention][memory]") {
  // B·H·S·(l + S) probabilities would be the largest tensor of a long sequence; the cache holds two
  // scalars per query row and backward recomputes each [L_b, l + L_b] block from Q and K̃.
  Rng rng(38);
  const Index B = 3, H = 2, S = 24, d = 8, l = 5;
  MultiHeadAttention<double> attn(d, H, rng, AttentionOptions{true, true}, "attn");
  const SequenceLayout layout(B, S, {24, 7, 16});
  const Matrix<double> x = test::random_matrix<double>(B * S, d, rng);
  const Matrix<double> pk = test::random_matrix<double>(l, d, rng), pv = test::random_matrix<double>(l, d, rng);
  const PrefixKV<double> prefix{pk, pv};
  typename MultiHeadAttention<double>::Cache cache;
  const Matrix<double> y = attn.forward(x, layout, cache, &prefix);
  CHECK(cache.row_max.size() == B * H * S);
  CHECK(cache.row_sum.size() == B * H * S);
  // The recomputed blocks reproduce the forward output exactly: C = A Ṽ per (b, h), then out_proj.
  Matrix<double> context = Matrix<double>::Zero(B * S, d);
  const Index hd = d / H;
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < H; ++h) {
      const Matrix<double> A = attn.attention_probs(cache, b, h);
      const Index Lb = layout.length(b);
      context.block(b * S, h * hd, Lb, hd) =
          A.leftCols(l) * pv.middleCols(h * hd, hd) + A.rightCols(Lb) * cache.V.block(b * S, h * hd, Lb, hd);
    }
  typename LoRALinear<double>::Cache oc;
  Matrix<double> expected = attn.out_proj.forward(context, oc);
  for (Index b = 0; b < B; ++b) expected.middleRows(b * S + layout.length(b), S - layout.length(b)).setZero();
  CHECK(test::rel_diff(y, expected) < 1e-13);
  PEFT_REQUIRE_THROWS_WITH(attn.attention_probs(cache, 3, 0), ShapeError, "attention_probs(b = 3, h = 0) is outside");
}

TEST_CASE("Attention parameters are named like PyTorch / PEFT", "[attention]") {
  Rng rng(38);
  MultiHeadAttention<float> attn(8, 2, rng, AttentionOptions{}, "encoder.layers.0.attn");
  attn.add_ia3("task");
  std::vector<std::string> names;
  for (auto& np : named_parameters(attn)) names.push_back(np.name);
  const std::vector<std::string> expected = {"q_proj.weight",     "q_proj.bias",   "k_proj.weight", "k_proj.bias",
                                             "k_proj.ia3_l.task", "v_proj.weight", "v_proj.bias",   "v_proj.ia3_l.task",
                                             "out_proj.weight",   "out_proj.bias"};
  CHECK(names == expected);
  CHECK(attn.k_proj.name() == "encoder.layers.0.attn.k_proj");
  CHECK(attn.ia3_k()->l.shape() == std::vector<std::int64_t>{8, 1});
  CHECK(count_parameters(attn).total == 4 * (8 * 8 + 8) + 2 * 8);
}

TEST_CASE("Attention rejects bad configurations and inputs with named errors", "[attention][errors]") {
  Rng rng(39);
  PEFT_REQUIRE_THROWS_WITH(MultiHeadAttention<double>(10, 3, rng, AttentionOptions{}, "blk.attn"), ConfigError,
                           "MultiHeadAttention \"blk.attn\": dim 10 is not divisible by num_heads 3");
  PEFT_REQUIRE_THROWS_WITH(MultiHeadAttention<double>(8, 0, rng), ConfigError, "num_heads=0");
  MultiHeadAttention<double> attn(8, 2, rng, AttentionOptions{}, "attn");
  typename MultiHeadAttention<double>::Cache c;
  const Matrix<double> x = Matrix<double>::Zero(6, 8);
  PEFT_REQUIRE_THROWS_WITH(attn.forward(x, SequenceLayout(2, 3, {3, 4}), c), ShapeError,
                           "MultiHeadAttention \"attn\": sequence 1 has length 4, expected 1 <= length <= seq=3");
  PEFT_REQUIRE_THROWS_WITH(attn.forward(x, SequenceLayout(2, 3, {0, 3}), c), ShapeError, "sequence 0 has length 0");
  PEFT_REQUIRE_THROWS_WITH(attn.forward(x, SequenceLayout(2, 3, {3}), c), ShapeError,
                           "has 1 lengths, expected batch=2");
  PEFT_REQUIRE_THROWS_WITH(attn.forward(x, SequenceLayout(2, 4), c), ShapeError,
                           "sequence data has 6 rows, expected batch*seq = 2*4 = 8");
  PEFT_REQUIRE_THROWS_WITH(attn.forward(Matrix<double>::Zero(6, 7), SequenceLayout(2, 3), c), ShapeError,
                           "input has 7 features, expected 8");
  const Matrix<double> pk = Matrix<double>::Zero(2, 6), pv = Matrix<double>::Zero(2, 8);
  const PrefixKV<double> bad{pk, pv};
  PEFT_REQUIRE_THROWS_WITH(attn.forward(x, SequenceLayout(2, 3), c, &bad), ShapeError,
                           "MultiHeadAttention \"attn\": prefix key has shape [2, 6], expected [2, 8]");
  const Matrix<double> pk8 = Matrix<double>::Zero(2, 8), pv3 = Matrix<double>::Zero(3, 8);
  const PrefixKV<double> bad_rows{pk8, pv3};
  PEFT_REQUIRE_THROWS_WITH(attn.forward(x, SequenceLayout(2, 3), c, &bad_rows), ShapeError,
                           "prefix value has shape [3, 8], expected [2, 8]");
  attn.forward(x, SequenceLayout(2, 3), c);
  Matrix<double> gk = Matrix<double>::Zero(2, 8), gv = gk;
  PrefixGrad<double> grad{gk, gv};
  PEFT_REQUIRE_THROWS_WITH(attn.backward(c, x, nullptr, &grad), ConfigError, "the forward pass had no prefix");
  PEFT_REQUIRE_THROWS_WITH(attn.backward(c, Matrix<double>::Zero(5, 8), nullptr), ShapeError,
                           "output gradient has shape [5, 8], expected [6, 8]");
  const PrefixKV<double> good{pk8, pk8};
  attn.forward(x, SequenceLayout(2, 3), c, &good);
  Matrix<double> gk3 = Matrix<double>::Zero(3, 8);
  PrefixGrad<double> bad_grad{gk3, gv};
  PEFT_REQUIRE_THROWS_WITH(attn.backward(c, x, nullptr, &bad_grad), ShapeError,
                           "prefix key gradient has shape [3, 8], expected [2, 8]");
  attn.add_ia3();
  PEFT_REQUIRE_THROWS_WITH(attn.add_ia3(), ConfigError, "already has an (IA)^3 adapter \"default\"");
  attn.merge_ia3();
  attn.forward(x, SequenceLayout(2, 3), c);
  PEFT_REQUIRE_THROWS_WITH(attn.backward(c, x, nullptr), ConfigError, "cannot train while (IA)^3 is merged");
}
