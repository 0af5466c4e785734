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
  CHECK(attn.ia3_k()->l.value.isOnes(0));
  CHECK(ffn.ia3()->l.value.isOnes(0));
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
  attn.ia3_k()->l.value = test::random_matrix<T>(8, 1, rng);
  attn.ia3_v()->l.value = test::random_matrix<T>(8, 1, rng);
  ffn.ia3()->l.value = test::random_matrix<T>(1, 12, rng);
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
                         Matrix<T>(wk.row(i) * attn.ia3_k()->l.value(i, 0))) < Tolerances<T>::rel);
    CHECK(std::abs(static_cast<double>(attn.k_proj.bias.value(0, i) - bk(0, i) * attn.ia3_k()->l.value(i, 0))) <
          Tolerances<T>::rel);
  }
  for (Index j = 0; j < 12; ++j)
    CHECK(test::rel_diff(Matrix<T>(ffn.fc2.weight.value.col(j)), Matrix<T>(w2.col(j) * ffn.ia3()->l.value(0, j))) <
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

TEST_CASE("(IA)^3 on a linear: PEFT's formulas, gradients against finite differences", "[ia3][gradcheck]") {
  Rng rng(73);
  for (bool feedforward : {false, true}) {
    for (bool train_base : {false, true}) {
      INFO("feedforward " << feedforward << ", trainable base " << train_base);
      LoRALinear<double> lin(5, 4, rng, true, "blk.k_proj");
      if (!train_base) lin.freeze_base();
      IA3Config config;
      config.feedforward = feedforward;
      auto& m = static_cast<IA3Method<double>&>(
          lin.add_adapter(std::make_unique<IA3Method<double>>("default", config, 5, 4)));
      CHECK(m.l.shape() == (feedforward ? std::vector<std::int64_t>{1, 5} : std::vector<std::int64_t>{4, 1}));
      m.l.value = test::random_matrix<double>(m.l.value.rows(), m.l.value.cols(), rng);
      Matrix<double> x = test::random_matrix<double>(3, 5, rng);
      const Matrix<double> g = test::random_matrix<double>(3, 4, rng);
      // PEFT's IA3 Linear: output scaling (x Wᵀ + b) ⊙ l, input scaling (x ⊙ l) Wᵀ + b.
      const RowVector<double> l = Eigen::Map<const RowVector<double>>(m.l.value.data(), m.l.size());
      Matrix<double> expected;
      if (feedforward) {
        expected = (x.array().rowwise() * l.array()).matrix() * lin.weight.value.transpose();
        expected.rowwise() += lin.bias.value.row(0);
      } else {
        Matrix<double> base = x * lin.weight.value.transpose();
        base.rowwise() += lin.bias.value.row(0);
        expected = base.array().rowwise() * l.array();
      }
      typename LoRALinear<double>::Cache cache;
      CHECK(test::rel_diff(lin.forward(x, cache), expected) < 1e-14);
      auto loss = [&] {
        typename LoRALinear<double>::Cache c;
        return test::dot(g, lin.forward(x, c));
      };
      lin.zero_grad();
      Matrix<double> dx;
      lin.forward(x, cache);
      lin.backward(cache, g, &dx);
      CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
      for (auto& np : trainable_parameters(lin)) {
        INFO(np.name);
        CHECK(relative_error(np.param->grad, numerical_gradient(np.param->value, loss)) < Tolerances<double>::grad);
      }
    }
  }
}

TEST_CASE("(IA)^3 merges next to LoRA and refuses a zero scale with a named error", "[ia3][errors]") {
  Rng rng(74);
  LoRALinear<double> lin(4, 6, rng, true, "blk.attn.k_proj");
  LoraConfig cfg;
  cfg.r = 2;
  cfg.init = LoraInit::None;
  lin.add_adapter("lora", cfg);
  auto& m = add_ia3_adapter(lin, "ia3", false);
  m.l.value = test::random_matrix<double>(6, 1, rng);
  CHECK(lin.active_adapters() == std::vector<std::string>{"lora", "ia3"});
  const Matrix<double> x = test::random_matrix<double>(3, 4, rng);
  const Matrix<double> w = lin.weight.value, b = lin.bias.value;
  typename LoRALinear<double>::Cache cache;
  const Matrix<double> y = lin.forward(x, cache);
  lin.merge({"ia3"});  // W ← diag(l) W₀, b ← l ⊙ b₀ (PEFT's IA3 merge), LoRA still unmerged
  for (Index i = 0; i < 6; ++i) CHECK(std::abs(lin.bias.value(0, i) - b(0, i) * m.l.value(i, 0)) < 1e-15);
  CHECK(test::rel_diff(lin.forward(x, cache), y) < 1e-14);
  lin.merge({"lora"});
  CHECK(test::rel_diff(lin.forward(x, cache), y) < 1e-14);
  lin.unmerge();
  CHECK(test::rel_diff(lin.weight.value, w) < 1e-15);
  CHECK(test::rel_diff(lin.bias.value, b) < 1e-15);
  const Matrix<double> w_unmerged = lin.weight.value;  // W₀ to rounding
  m.l.value(2, 0) = 0.0;                               // W₀'s row 2 could not be recovered from the merged weight
  PEFT_REQUIRE_THROWS_WITH(lin.merge({"ia3"}), NumericError,
                           "LoRALinear \"blk.attn.k_proj\": (IA)^3 adapter \"ia3\" has a zero or non-finite scale");
  CHECK_FALSE(lin.merged());
  CHECK(lin.weight.value == w_unmerged);
  PEFT_REQUIRE_THROWS_WITH(add_ia3_adapter(lin, "ia3", true), ConfigError, "adapter \"ia3\" already exists");
  // A name is unique per method: an (IA)³ "lora" next to the LoRA "lora" (PEFT keeps one dict per method).
  add_ia3_adapter(lin, "lora", true);
  CHECK(lin.adapter("lora").rank() == 2);
  CHECK(std::string(lin.method("lora").kind()) == "LoRA");
  PEFT_REQUIRE_THROWS_WITH(IA3Method<double>("x", IA3Config{}, 0, 3), ShapeError, "base shape [3, 0] is empty");
}

TEST_CASE("(IA)^3 on inputs folds into the base product; next to DoRA it runs its own; both exact",
          "[ia3][gradcheck]") {
  // Folded: one base product on x ⊙ (1 + Σ (l − 1)) (no adapter reads x W₀ᵀ). Unfolded: a DoRA
  // adapter without dropout reads x W₀ᵀ, so each (IA)³ term is its own product. Both are the sum
  // x W₀ᵀ + b₀ + Σ (x ⊙ (l − 1)) W₀ᵀ + the other adapter's term, with exact gradients.
  Rng rng(75);
  for (bool dora : {false, true}) {
    for (bool train_base : {false, true}) {
      INFO("next to " << (dora ? "DoRA" : "LoRA") << ", trainable base " << train_base);
      LoRALinear<double> lin(5, 4, rng, true, "mlp.down_proj");
      if (!train_base) lin.freeze_base();
      LoraConfig cfg;
      cfg.r = 2;
      cfg.use_dora = dora;
      auto& lora = lin.add_adapter("lora", cfg, rng);
      lora.B.value = test::random_matrix<double>(4, 2, rng);
      auto& i1 = add_ia3_adapter(lin, "i1", true);
      auto& i2 = add_ia3_adapter(lin, "i2", true);
      i1.l.value = test::random_matrix<double>(1, 5, rng);
      i2.l.value = test::random_matrix<double>(1, 5, rng);
      i2.l.set_trainable(false);  // a frozen gain still scales the product and the input gradient
      Matrix<double> x = test::random_matrix<double>(3, 5, rng);
      const Matrix<double> g = test::random_matrix<double>(3, 4, rng);

      lin.set_active({"lora"});
      typename LoRALinear<double>::Cache cache;
      Matrix<double> expected = lin.forward(x, cache);  // x W₀ᵀ + b₀ + the LoRA/DoRA term
      for (const auto* m : {&i1, &i2}) {
        const RowVector<double> lm1 = m->scales().array() - 1.0;
        expected += (x.array().rowwise() * lm1.array()).matrix() * lin.weight.value.transpose();
      }
      lin.set_active({"lora", "i1", "i2"});
      i2.l.set_trainable(false);  // set_active made every active adapter trainable again
      CHECK(test::rel_diff(lin.forward(x, cache), expected) < 1e-14);
      CHECK(cache.folded == !dora);

      lin.zero_grad();
      Matrix<double> dx;
      lin.forward(x, cache);
      // DoRA's backward treats the row norm n = ‖W + s B A‖ as a constant (paper §4.3, PEFT's
      // detach()), so its finite differences hold the norm of this forward fixed.
      RowVector<double> norm;
      for (std::size_t k = 0; k < cache.used; ++k)
        if (const auto* d = dynamic_cast<const DoraCache<double>*>(cache.slots[k].state.get())) norm = d->norm;
      CHECK(norm.size() == (dora ? 4 : 0));
      auto loss = [&] {
        Matrix<double> y = x * lin.weight.value.transpose();
        y.rowwise() += lin.bias.value.row(0);
        for (const auto* m : {&i1, &i2}) {
          const RowVector<double> lm1 = m->scales().array() - 1.0;
          y += (x.array().rowwise() * lm1.array()).matrix() * lin.weight.value.transpose();
        }
        const Matrix<double> term = lora.scaling() * (x * lora.A.value.transpose() * lora.B.value.transpose());
        if (!dora) return test::dot(g, Matrix<double>(y + term));
        const RowVector<double> f = lora.magnitude.value.row(0).array() / norm.array();
        const Matrix<double> z = x * lin.weight.value.transpose();
        y.array() += z.array().rowwise() * (f.array() - 1.0) + term.array().rowwise() * f.array();
        return test::dot(g, y);
      };
      CHECK(test::rel_diff(lin.forward(x, cache), expected) < 1e-14);  // the explicit loss's forward, too:
      CHECK(std::abs(loss() - test::dot(g, expected)) < 1e-12 * (1.0 + std::abs(loss())));
      lin.backward(cache, g, &dx);
      CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
      std::vector<Matrix<double>> with_dx;
      for (auto& np : trainable_parameters(lin)) {
        INFO(np.name);
        CHECK(np.name.find("i2") == std::string::npos);
        CHECK(relative_error(np.param->grad, numerical_gradient(np.param->value, loss)) < Tolerances<double>::grad);
        with_dx.push_back(np.param->grad);
      }
      // A first layer (no input gradient asked for) gets the same parameter gradients.
      lin.zero_grad();
      lin.forward(x, cache);
      lin.backward(cache, g, nullptr);
      std::size_t k = 0;
      for (auto& np : trainable_parameters(lin)) CHECK(test::rel_diff(np.param->grad, with_dx[k++]) < 1e-14);
    }
  }
}
