#include <peft/adapters/loha.hpp>
#include <peft/adapters/lokr.hpp>
#include <peft/core/parameters.hpp>
#include <peft/models/peft_config.hpp>
#include <peft/models/transformer.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {

TransformerConfig small_config(NormPlacement norm, Pooling pooling, bool features = true) {
  TransformerConfig c;
  if (features)
    c.input_dim = 5;
  else
    c.vocab_size = 11;
  c.max_seq_len = 6;
  c.dim = 8;
  c.num_heads = 2;
  c.ffn_dim = 12;
  c.num_layers = 2;
  c.num_classes = 3;
  c.norm = norm;
  c.pooling = pooling;
  c.activation = Activation::GELU;
  return c;
}

/// Every method at once: LoRA on all linears, Houlsby (or parallel) adapters, IA3, prefix, prompt.
PeftConfig everything(AdapterPlacement placement, bool projection) {
  PeftConfig pc;
  LoraTargetConfig lc;
  lc.target_modules = ModuleSelector::pattern("all-linear");
  lc.lora.r = 2;
  lc.lora.alpha = 3.0;
  lc.rank_pattern = {{"fc1", 3}};
  pc.lora = lc;
  AdapterTargetConfig ac;
  ac.placement = placement;
  ac.options.bottleneck = 3;
  ac.options.scaling = 0.8;
  ac.options.init = AdapterInit::Bert;
  ac.options.activation = Activation::Tanh;
  pc.adapter = ac;
  pc.ia3.emplace();
  PrefixTargetConfig xc;
  xc.num_virtual_tokens = 2;
  xc.prefix_projection = projection;
  xc.encoder_hidden_size = 4;
  pc.prefix = xc;
  PromptTargetConfig sc;
  sc.num_virtual_tokens = 2;
  pc.prompt = sc;
  pc.modules_to_save = {"classifier"};
  return pc;
}

/// Moves every trainable parameter away from its identity init (zero B, ones IA3, zero adapter up).
void perturb_trainable(TransformerClassifier<double>& m, Rng& rng) {
  m.visit_parameters([&](const std::string&, Parameter<double>& p) {
    if (p.trainable()) p.value += test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.3);
  });
}

/// Relative error below the gradient tolerance — or, for a gradient that is exactly zero in exact
/// arithmetic (the key bias b_k without a prefix: q·b_k shifts a whole softmax row, which softmax
/// ignores), both sides at rounding-noise level.
bool grad_ok(const Matrix<double>& analytic, const Matrix<double>& numeric) {
  return relative_error(analytic, numeric) < Tolerances<double>::grad ||
         (analytic.norm() < 1e-12 && numeric.norm() < 1e-8);
}

void check_gradients(TransformerClassifier<double>& model, Matrix<double>& x, const SequenceLayout& layout, Rng& rng,
                     bool check_input = true) {
  const Matrix<double> g = test::random_matrix<double>(layout.batch, model.num_classes(), rng);
  auto loss = [&] {
    typename TransformerClassifier<double>::Cache c;
    return test::dot(g, model.forward(x, layout, c));
  };
  model.zero_grad();
  typename TransformerClassifier<double>::Cache cache;
  model.forward(x, layout, cache);
  Matrix<double> dx;
  model.backward(cache, g, check_input ? &dx : nullptr);  // without dx: the model decides what is needed below
  if (check_input) CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  std::size_t checked = 0;
  for (auto& np : trainable_parameters(model)) {
    INFO(np.name);
    CHECK(grad_ok(np.param->grad, numerical_gradient(np.param->value, loss)));
    ++checked;
  }
  CHECK(checked > 0);
}

}  // namespace

TEST_CASE("Transformer: full fine-tuning gradients (pre- and post-norm, mean and first pooling)",
          "[transformer][gradcheck]") {
  for (NormPlacement norm : {NormPlacement::Pre, NormPlacement::Post}) {
    for (Pooling pool : {Pooling::Mean, Pooling::First}) {
      Rng rng(31);
      TransformerClassifier<double> model(small_config(norm, pool), rng);
      const SequenceLayout layout(2, 4, {4, 3});
      Matrix<double> x = test::random_matrix<double>(8, 5, rng);
      check_gradients(model, x, layout, rng);
    }
  }
}

TEST_CASE("Transformer: gradients with every PEFT method attached at once", "[transformer][gradcheck]") {
  for (NormPlacement norm : {NormPlacement::Pre, NormPlacement::Post}) {
    for (AdapterPlacement placement : {AdapterPlacement::Houlsby, AdapterPlacement::Parallel}) {
      INFO("norm " << static_cast<int>(norm) << " placement " << static_cast<int>(placement));
      Rng rng(32);
      TransformerClassifier<double> model(small_config(norm, Pooling::Mean), rng);
      apply_peft(model, everything(placement, placement == AdapterPlacement::Parallel), rng);
      perturb_trainable(model, rng);
      const SequenceLayout layout(2, 4, {3, 4});
      Matrix<double> x = test::random_matrix<double>(8, 5, rng);
      check_gradients(model, x, layout, rng);
    }
  }
}

TEST_CASE("Transformer: a LoHa or LoKr adapter on the patch embedding of a frozen model gets its gradients",
          "[transformer][gradcheck]") {
  // The model's backward walks down to the patch embedding only when something there trains; it
  // once asked only LoRA adapters, so any other method on patch_embed got no gradient at all.
  for (int kind : {0, 1}) {
    INFO((kind == 0 ? "LoHa" : "LoKr"));
    Rng rng(33);
    TransformerClassifier<double> model(small_config(NormPlacement::Pre, Pooling::Mean), rng);
    model.visit_parameters([](const std::string&, Parameter<double>& p) { p.set_trainable(false); });
    const Index in = model.patch_embed.in_features(), out = model.patch_embed.out_features();
    if (kind == 0) {
      LohaConfig c;
      c.r = 2;
      c.alpha = 3.0;
      model.patch_embed.add_adapter(make_loha<double>("default", in, out, c, rng, "patch_embed"));
    } else {
      LokrConfig c;
      c.r = 2;
      c.alpha = 3.0;
      model.patch_embed.add_adapter(make_lokr<double>("default", in, out, c, rng, "patch_embed"));
    }
    perturb_trainable(model, rng);
    REQUIRE(trainable_parameters(model).size() >= 2);
    for (auto& np : trainable_parameters(model)) CHECK(np.name.rfind("patch_embed.", 0) == 0);
    const SequenceLayout layout(2, 4, {4, 3});
    Matrix<double> x = test::random_matrix<double>(8, 5, rng);
    check_gradients(model, x, layout, rng, /*check_input=*/false);
  }
}

TEST_CASE("Transformer: token input with soft prompt from token ids, gradients", "[transformer][gradcheck]") {
  Rng rng(33);
  TransformerClassifier<double> model(small_config(NormPlacement::Pre, Pooling::First, false), rng);
  PeftConfig pc;
  PromptTargetConfig sc;
  sc.num_virtual_tokens = 3;
  sc.init = PromptInit::FromTokens;
  sc.init_token_ids = {4, 9};
  pc.prompt = sc;
  pc.modules_to_save = {"classifier", "embed_positions"};
  apply_peft(model, pc, rng);
  REQUIRE(model.prompt_encoder.has_value());
  CHECK(model.prompt_encoder->embedding.value.row(2) == model.embed_tokens.weight.value.row(4));
  const SequenceLayout layout(3, 4, {2, 4, 1});
  const std::vector<Index> ids{1, 2, 0, 0, 3, 4, 5, 6, 7, 0, 0, 0};
  const Matrix<double> g = test::random_matrix<double>(3, 3, rng);
  auto loss = [&] {
    typename TransformerClassifier<double>::Cache c;
    return test::dot(g, model.forward(ids, layout, c));
  };
  typename TransformerClassifier<double>::Cache cache;
  model.forward(ids, layout, cache);
  model.backward(cache, g);
  const auto trainable = trainable_parameters(model);
  REQUIRE(trainable.size() == 4);  // prompt, positions, classifier weight + bias
  for (auto& np : trainable) {
    INFO(np.name);
    CHECK(relative_error(np.param->grad, numerical_gradient(np.param->value, loss)) < Tolerances<double>::grad);
  }
  // full fine-tuning of the token model, including the (sparse) token embedding
  unfreeze(model);
  model.zero_grad();
  model.forward(ids, layout, cache);
  model.backward(cache, g);
  CHECK(relative_error(model.embed_tokens.weight.grad, numerical_gradient(model.embed_tokens.weight.value, loss)) <
        Tolerances<double>::grad);
}

TEST_CASE("Transformer: soft-prompt rows are never pooled", "[transformer]") {
  // Causal attention + first-token pooling: the first *real* token sees the prompt and itself, so
  // the logits depend on input row 0 and on no later row. Pooling a prompt row instead would make
  // them independent of the input altogether.
  Rng rng(36);
  TransformerConfig cfg = small_config(NormPlacement::Pre, Pooling::First);
  cfg.causal = true;
  TransformerClassifier<double> model(cfg, rng);
  PeftConfig pc;
  PromptTargetConfig sc;
  sc.num_virtual_tokens = 3;
  pc.prompt = sc;
  apply_peft(model, pc, rng);
  REQUIRE(model.prompt_encoder.has_value());
  const SequenceLayout layout(2, 4);
  Matrix<double> x = test::random_matrix<double>(8, 5, rng);
  typename TransformerClassifier<double>::Cache c;
  const Matrix<double> base = model.forward(x, layout, c);
  Matrix<double> later = x;
  later.row(1).array() += 1.0;  // token 1 of sequence 0: invisible to token 0
  later.row(7).array() += 1.0;  // token 3 of sequence 1
  CHECK(test::rel_diff(model.forward(later, layout, c), base) < 1e-14);
  Matrix<double> first = x;
  first.row(4).array() += 1.0;  // token 0 of sequence 1: the pooled token
  const Matrix<double> moved = model.forward(first, layout, c);
  CHECK(moved.row(0) == base.row(0));
  CHECK((moved.row(1) - base.row(1)).norm() > 1e-6);
}

TEMPLATE_TEST_CASE("Transformer: identity at init (LoRA B = 0, zero adapters, IA3 = 1) is exact", "[transformer]",
                   float, double) {
  using T = TestType;
  for (NormPlacement norm : {NormPlacement::Pre, NormPlacement::Post}) {
    for (AdapterPlacement placement :
         {AdapterPlacement::Houlsby, AdapterPlacement::Pfeiffer, AdapterPlacement::Parallel}) {
      Rng rng(34);
      TransformerClassifier<T> bare(small_config(norm, Pooling::Mean), rng);
      TransformerClassifier<T> peft_model = bare;
      PeftConfig pc;
      LoraTargetConfig lc;
      lc.target_modules = ModuleSelector::pattern("all-linear");
      lc.lora.r = 2;
      pc.lora = lc;
      AdapterTargetConfig ac;
      ac.placement = placement;
      ac.options.bottleneck = 2;  // zero init (default)
      pc.adapter = ac;
      pc.ia3.emplace();
      apply_peft(peft_model, pc, rng);
      const SequenceLayout layout(3, 5, {5, 2, 4});
      const Matrix<T> x = test::random_matrix<T>(15, 5, rng);
      typename TransformerClassifier<T>::Cache c1, c2;
      const Matrix<T> y0 = bare.forward(x, layout, c1);
      const Matrix<T> y1 = peft_model.forward(x, layout, c2);
      CHECK(y0 == y1);
      // and the methods do change the output once trained
      peft_model.visit_parameters([&](const std::string&, Parameter<T>& p) {
        if (p.trainable()) p.value.array() += T(0.05);
      });
      CHECK(peft_model.forward(x, layout, c2) != y0);
    }
  }
}

TEMPLATE_TEST_CASE("Transformer: padding never changes the outputs of real sequences", "[transformer]", float, double) {
  using T = TestType;
  Rng rng(35);
  TransformerClassifier<T> model(small_config(NormPlacement::Pre, Pooling::Mean), rng);
  PeftConfig pc = everything(AdapterPlacement::Houlsby, false);
  apply_peft(model, pc, rng);
  model.visit_parameters([&](const std::string&, Parameter<T>& p) {
    if (p.trainable()) p.value += test::random_matrix<T>(p.value.rows(), p.value.cols(), rng, 0.2);
  });
  const SequenceLayout layout(3, 5, {2, 5, 3});
  Matrix<T> x = test::random_matrix<T>(15, 5, rng);
  typename TransformerClassifier<T>::Cache cache;
  const Matrix<T> y = model.forward(x, layout, cache);
  // different padding content: identical logits
  for (Index b = 0; b < 3; ++b)
    for (Index t = layout.length(b); t < 5; ++t) x.row(layout.row(b, t)).setConstant(T(100));
  const Matrix<T> y_pad = model.forward(x, layout, cache);
  CHECK(test::rel_diff(y_pad, y) < Tolerances<T>::rel);
  // each sequence alone, unpadded: the same logits
  for (Index b = 0; b < 3; ++b) {
    const Index len = layout.length(b);
    const Matrix<T> xb = x.middleRows(layout.row(b, 0), len);
    const Matrix<T> yb = model.forward(xb, SequenceLayout(1, len), cache);
    CHECK(test::rel_diff(yb.row(0), y.row(b)) < 100 * Tolerances<T>::rel);
  }
}

TEST_CASE("Transformer: two forwards with separate caches, then two backwards", "[transformer]") {
  Rng rng(36);
  TransformerClassifier<double> model(small_config(NormPlacement::Post, Pooling::Mean), rng);
  apply_peft(model, everything(AdapterPlacement::Pfeiffer, true), rng);
  perturb_trainable(model, rng);
  const SequenceLayout l1(2, 4, {4, 2}), l2(1, 3);
  const Matrix<double> x1 = test::random_matrix<double>(8, 5, rng), x2 = test::random_matrix<double>(3, 5, rng);
  const Matrix<double> g1 = test::random_matrix<double>(2, 3, rng), g2 = test::random_matrix<double>(1, 3, rng);
  typename TransformerClassifier<double>::Cache c1, c2;
  model.forward(x1, l1, c1);
  model.forward(x2, l2, c2);
  Matrix<double> d1, d2;
  model.backward(c1, g1, &d1);
  model.backward(c2, g2, &d2);
  std::vector<Matrix<double>> both;
  for (auto& np : trainable_parameters(model)) both.push_back(np.param->grad);
  model.zero_grad();
  typename TransformerClassifier<double>::Cache c;
  Matrix<double> d;
  model.forward(x1, l1, c);
  model.backward(c, g1, &d);
  CHECK(test::rel_diff(d, d1) < 1e-13);
  model.forward(x2, l2, c);
  model.backward(c, g2, &d);
  CHECK(test::rel_diff(d, d2) < 1e-13);
  std::size_t i = 0;
  for (auto& np : trainable_parameters(model)) {
    INFO(np.name);
    CHECK(test::rel_diff(np.param->grad, both[i++]) < 1e-13);
  }
}

TEST_CASE("Transformer: prefix tuning changes the outputs; causal masking keeps the prefix visible", "[transformer]") {
  Rng rng(37);
  TransformerConfig cfg = small_config(NormPlacement::Pre, Pooling::First);
  cfg.causal = true;
  TransformerClassifier<double> bare(cfg, rng);
  TransformerClassifier<double> prefixed = bare;
  PeftConfig pc;
  pc.prefix = PrefixTargetConfig{3, false, 0};
  apply_peft(prefixed, pc, rng);
  const SequenceLayout layout(2, 4);
  const Matrix<double> x = test::random_matrix<double>(8, 5, rng);
  typename TransformerClassifier<double>::Cache c;
  const Matrix<double> y0 = bare.forward(x, layout, c);
  const Matrix<double> y1 = prefixed.forward(x, layout, c);
  // First-token pooling under a causal mask: token 0 sees only itself — and the prefix.
  CHECK(test::rel_diff(y1, y0) > 1e-3);
  // Tokens after the first cannot change the pooled first token under the causal mask.
  Matrix<double> x2 = x;
  x2.row(2) *= -3.0;
  CHECK(test::rel_diff(prefixed.forward(x2, layout, c), y1) < 1e-14);
}

TEST_CASE("Transformer: names of parameters and linears", "[transformer]") {
  Rng rng(38);
  TransformerClassifier<float> model(small_config(NormPlacement::Pre, Pooling::Mean), rng);
  const auto lin = model.linear_names();
  REQUIRE(lin.size() == 1 + 2 * 6 + 1);
  CHECK(lin.front().first == "patch_embed");
  CHECK(lin[1].first == "layers.0.attn.q_proj");
  CHECK(lin[5].first == "layers.0.ffn.fc1");
  CHECK(lin.back().first == "classifier");
  CHECK_FALSE(lin.back().second);  // the head is not "linear non-head"
  CHECK(&model.linear("layers.1.ffn.fc2") == &model.layers[1].ffn.fc2);
  CHECK(model.layers[1].ffn.fc2.name() == "layers.1.ffn.fc2");
  std::vector<std::string> names;
  for (auto& np : named_parameters(model)) names.push_back(np.name);
  CHECK(names.front() == "patch_embed.weight");
  CHECK(std::find(names.begin(), names.end(), "layers.0.norm1.weight") != names.end());
  CHECK(std::find(names.begin(), names.end(), "embed_positions.weight") != names.end());
  CHECK(names.back() == "classifier.bias");
}

TEST_CASE("Transformer rejects bad configs and inputs with named errors", "[transformer][errors]") {
  Rng rng(39);
  TransformerConfig both = small_config(NormPlacement::Pre, Pooling::Mean);
  both.vocab_size = 10;
  PEFT_REQUIRE_THROWS_WITH(
      TransformerClassifier<float>(both, rng), ConfigError,
      "exactly one of vocab_size (token input) and input_dim (feature input) must be > 0, got 10 and 5");
  TransformerConfig bad_layers = small_config(NormPlacement::Pre, Pooling::Mean);
  bad_layers.num_layers = 0;
  PEFT_REQUIRE_THROWS_WITH(TransformerClassifier<float>(bad_layers, rng), ConfigError,
                           "num_layers and num_classes must be > 0");
  TransformerClassifier<float> model(small_config(NormPlacement::Pre, Pooling::Mean), rng, "vit");
  typename TransformerClassifier<float>::Cache cache;
  PEFT_REQUIRE_THROWS_WITH(model.forward(std::vector<Index>{1, 2}, SequenceLayout(1, 2), cache), ConfigError,
                           "TransformerClassifier \"vit\": model takes feature input");
  PEFT_REQUIRE_THROWS_WITH(model.forward(Matrix<float>::Zero(4, 6), SequenceLayout(2, 2), cache), ShapeError,
                           "input has 6 features, expected 5");
  PEFT_REQUIRE_THROWS_WITH(model.forward(Matrix<float>::Zero(5, 5), SequenceLayout(2, 2), cache), ShapeError,
                           "sequence data has 5 rows, expected batch*seq");
  PEFT_REQUIRE_THROWS_WITH(model.forward(Matrix<float>::Zero(14, 5), SequenceLayout(2, 7), cache), ShapeError,
                           "sequence length 7 exceeds max_len 6");
  model.forward(Matrix<float>::Zero(4, 5), SequenceLayout(2, 2), cache);
  PEFT_REQUIRE_THROWS_WITH(model.backward(cache, Matrix<float>::Zero(3, 3)), ShapeError,
                           "logits gradient has shape [3, 3], expected [2, 3]");
  typename TransformerClassifier<float>::Cache empty;
  PEFT_REQUIRE_THROWS_WITH(model.backward(empty, Matrix<float>::Zero(0, 3)), ConfigError,
                           "cache does not come from a forward of this model");
  TransformerClassifier<float> tokens(small_config(NormPlacement::Pre, Pooling::Mean, false), rng);
  PEFT_REQUIRE_THROWS_WITH(tokens.forward(Matrix<float>::Zero(4, 5), SequenceLayout(2, 2), cache), ConfigError,
                           "model takes token ids");
  PEFT_REQUIRE_THROWS_WITH(tokens.forward(std::vector<Index>{1, 2, 3, 11}, SequenceLayout(2, 2), cache), ShapeError,
                           "token id 11 at position 3 is out of range for vocabulary size 11");
  tokens.forward(std::vector<Index>{1, 2, 3, 4}, SequenceLayout(2, 2), cache);
  Matrix<float> dx;
  PEFT_REQUIRE_THROWS_WITH(tokens.backward(cache, Matrix<float>::Zero(2, 3), &dx), ConfigError,
                           "token ids have no input gradient");
  PEFT_REQUIRE_THROWS_WITH(model.linear("layers.0.attn.qproj"), ConfigError,
                           "no linear named \"layers.0.attn.qproj\"; available: patch_embed, layers.0.attn.q_proj");
  model.add_soft_prompt(2, rng);
  PEFT_REQUIRE_THROWS_WITH(model.add_soft_prompt(2, rng), ConfigError, "already has a soft prompt");
  model.add_prefix(2, rng);
  PEFT_REQUIRE_THROWS_WITH(model.add_prefix(2, rng), ConfigError, "already has a prefix");
  model.add_adapters(AdapterPlacement::Pfeiffer, AdapterOptions{4, 16.0, 1.0, Activation::ReLU, AdapterInit::Zero},
                     rng);
  PEFT_REQUIRE_THROWS_WITH(model.add_adapters(AdapterPlacement::Pfeiffer,
                                              AdapterOptions{4, 16.0, 1.0, Activation::ReLU, AdapterInit::Zero}, rng),
                           ConfigError, "TransformerBlock \"vit.layers.0\": already has adapters");
}

TEST_CASE("patchify splits images into row-major patches", "[transformer]") {
  Matrix<float> images(2, 16);
  for (Index n = 0; n < 2; ++n)
    for (Index k = 0; k < 16; ++k) images(n, k) = static_cast<float>(100 * n + k);  // pixel (y, x) = 4y + x
  Matrix<float> patches;
  patchify<float>(images, 4, 4, 2, 2, patches);
  REQUIRE(patches.rows() == 8);
  REQUIRE(patches.cols() == 4);
  CHECK(patches.row(0) == (Eigen::RowVector4f() << 0, 1, 4, 5).finished());
  CHECK(patches.row(1) == (Eigen::RowVector4f() << 2, 3, 6, 7).finished());
  CHECK(patches.row(3) == (Eigen::RowVector4f() << 10, 11, 14, 15).finished());
  CHECK(patches.row(6) == (Eigen::RowVector4f() << 108, 109, 112, 113).finished());
  patchify<float>(images, 4, 4, 4, 4, patches);  // one patch = the whole image
  CHECK(patches == images);
  PEFT_REQUIRE_THROWS_WITH(patchify<float>(images, 4, 4, 3, 3, patches), ShapeError,
                           "patchify: image 4x4 does not split into whole 3x3 patches");
  PEFT_REQUIRE_THROWS_WITH(patchify<float>(images, 5, 4, 5, 4, patches), ShapeError,
                           "images have 16 pixels, expected 5x4 = 20");
}

// ---- forward_inference ---------------------------------------------------------------------------

namespace {

/// forward() in eval mode, for comparison with forward_inference().
template <class T, class Input>
Matrix<T> eval_forward(TransformerClassifier<T>& model, const Input& x, const SequenceLayout& layout) {
  const bool was_training = model.training();
  model.eval();
  typename TransformerClassifier<T>::Cache cache;
  Matrix<T> y = model.forward(x, layout, cache);
  if (was_training) model.train();
  return y;
}

/// LoRA on every linear, (IA)³ and a modules_to_save head: the methods that live in the adapted
/// linears and the head, which the model can disable and merge.
PeftConfig linear_methods() {
  PeftConfig pc;
  LoraTargetConfig lc;
  lc.target_modules = ModuleSelector::pattern("all-linear");
  lc.lora.r = 2;
  lc.lora.alpha = 3.0;
  pc.lora = lc;
  pc.ia3.emplace();
  pc.modules_to_save = {"classifier"};
  return pc;
}

}  // namespace

TEST_CASE("Transformer: forward_inference equals forward in eval mode, bit for bit", "[transformer][inference]") {
  for (NormPlacement norm : {NormPlacement::Pre, NormPlacement::Post})
    for (Pooling pool : {Pooling::Mean, Pooling::First})
      for (AdapterPlacement placement : {AdapterPlacement::Houlsby, AdapterPlacement::Parallel}) {
        INFO("norm " << static_cast<int>(norm) << " pooling " << static_cast<int>(pool) << " placement "
                     << static_cast<int>(placement));
        Rng rng(41);
        TransformerClassifier<double> model(small_config(norm, pool), rng);
        const SequenceLayout layout(3, 4, {3, 4, 1});
        const Matrix<double> x = test::random_matrix<double>(12, 5, rng);
        Matrix<double> y;
        model.forward_inference(x, layout, y);  // the bare model
        CHECK(y == eval_forward(model, x, layout));
        // every method at once (prefix through its projection with the parallel adapter)
        apply_peft(model, everything(placement, placement == AdapterPlacement::Parallel), rng);
        perturb_trainable(model, rng);
        model.forward_inference(x, layout, y);
        const Matrix<double> reference = eval_forward(model, x, layout);
        CHECK(y == reference);
        CHECK(y.rows() == 3);
        // a second call with another shape, then the first again: the same values
        Matrix<double> y2;
        model.forward_inference(x.topRows(4), SequenceLayout(1, 4), y2);
        CHECK(y2 == eval_forward(model, Matrix<double>(x.topRows(4)), SequenceLayout(1, 4)));
        model.forward_inference(x, layout, y);
        CHECK(y == reference);
      }
  // token input with a soft prompt and the positions as a module to save
  Rng rng(42);
  TransformerClassifier<double> tokens(small_config(NormPlacement::Pre, Pooling::Mean, false), rng);
  PeftConfig pc = linear_methods();
  PromptTargetConfig sc;
  sc.num_virtual_tokens = 2;
  pc.prompt = sc;
  pc.modules_to_save = {"classifier", "embed_positions"};
  apply_peft(tokens, pc, rng);
  perturb_trainable(tokens, rng);
  const SequenceLayout layout(3, 4, {2, 4, 1});
  const std::vector<Index> ids{1, 2, 0, 0, 3, 4, 5, 6, 7, 0, 0, 0};
  Matrix<double> y;
  tokens.forward_inference(ids, layout, y);
  CHECK(y == eval_forward(tokens, ids, layout));
}

TEST_CASE("Transformer: forward_inference with adapters disabled is the base model; merged equals unmerged",
          "[transformer][inference]") {
  Rng rng(43);
  TransformerClassifier<double> base(small_config(NormPlacement::Pre, Pooling::Mean), rng);
  TransformerClassifier<double> model = base;
  apply_peft(model, linear_methods(), rng);
  perturb_trainable(model, rng);
  const SequenceLayout layout(2, 4, {4, 2});
  const Matrix<double> x = test::random_matrix<double>(8, 5, rng);
  Matrix<double> active, y, y_base;
  model.forward_inference(x, layout, active);
  base.forward_inference(x, layout, y_base);
  CHECK(test::rel_diff(active, y_base) > 1e-3);  // the adapters change the logits
  // disabled: LoRA and (IA)³ in every linear, the head's copy
  model.for_each_linear([](const std::string&, LoRALinear<double>& l, bool) { l.disable_adapters(true); });
  model.classifier.disable(true);
  model.forward_inference(x, layout, y);
  CHECK(y == y_base);
  CHECK(y == eval_forward(model, x, layout));
  model.for_each_linear([](const std::string&, LoRALinear<double>& l, bool) { l.disable_adapters(false); });
  model.classifier.disable(false);
  model.forward_inference(x, layout, y);
  CHECK(y == active);
  // merged: the same function up to rounding; bit for bit what forward computes while merged
  model.for_each_linear([](const std::string&, LoRALinear<double>& l, bool) { l.merge(); });
  model.forward_inference(x, layout, y);
  CHECK(test::rel_diff(y, active) < 1e-12);
  CHECK(y == eval_forward(model, x, layout));
  model.for_each_linear([](const std::string&, LoRALinear<double>& l, bool) { l.unmerge(); });
  model.forward_inference(x, layout, y);
  CHECK(test::rel_diff(y, active) < 1e-12);
}

TEST_CASE("Transformer: forward_inference leaves the training cache, the gradients and the mode alone",
          "[transformer][inference]") {
  Rng rng(44);
  TransformerClassifier<double> model(small_config(NormPlacement::Post, Pooling::Mean), rng);
  apply_peft(model, everything(AdapterPlacement::Houlsby, true), rng);
  perturb_trainable(model, rng);
  const SequenceLayout l1(2, 4, {4, 3}), l2(3, 3, {3, 1, 2});
  const Matrix<double> x1 = test::random_matrix<double>(8, 5, rng), x2 = test::random_matrix<double>(9, 5, rng);
  const Matrix<double> g = test::random_matrix<double>(2, 3, rng);
  typename TransformerClassifier<double>::Cache cache;
  Matrix<double> dx_ref, dx, logits;
  model.zero_grad();
  model.forward(x1, l1, cache);
  model.backward(cache, g, &dx_ref);
  std::vector<Matrix<double>> grads;
  for (auto& np : trainable_parameters(model)) grads.push_back(np.param->grad);
  // the same step with an evaluation of another batch between forward and backward
  model.zero_grad();
  model.forward(x1, l1, cache);
  model.forward_inference(x2, l2, logits);
  model.backward(cache, g, &dx);
  CHECK(dx == dx_ref);
  std::size_t i = 0;
  for (auto& np : trainable_parameters(model)) {
    INFO(np.name);
    CHECK(np.param->grad == grads[i++]);
  }
  // in training mode with LoRA dropout: no dropout in inference, and the mode is kept
  Rng rng2(45);
  TransformerClassifier<double> drop(small_config(NormPlacement::Pre, Pooling::Mean), rng2);
  PeftConfig pc = linear_methods();
  pc.lora->lora.dropout = 0.5;
  apply_peft(drop, pc, rng2);
  perturb_trainable(drop, rng2);
  drop.train();
  Matrix<double> y;
  drop.forward_inference(x1, l1, y);
  CHECK(drop.training());
  CHECK(y == eval_forward(drop, x1, l1));
  CHECK(drop.training());
}

TEST_CASE("Transformer: forward_inference rejects bad inputs with named errors", "[transformer][inference][errors]") {
  Rng rng(46);
  TransformerClassifier<float> model(small_config(NormPlacement::Pre, Pooling::Mean), rng, "vit");
  Matrix<float> y;
  PEFT_REQUIRE_THROWS_WITH(model.forward_inference(std::vector<Index>{1, 2}, SequenceLayout(1, 2), y), ConfigError,
                           "TransformerClassifier \"vit\": model takes feature input");
  PEFT_REQUIRE_THROWS_WITH(model.forward_inference(Matrix<float>::Zero(4, 6), SequenceLayout(2, 2), y), ShapeError,
                           "input has 6 features, expected 5");
  PEFT_REQUIRE_THROWS_WITH(model.forward_inference(Matrix<float>::Zero(5, 5), SequenceLayout(2, 2), y), ShapeError,
                           "sequence data has 5 rows, expected batch*seq");
  PEFT_REQUIRE_THROWS_WITH(model.forward_inference(Matrix<float>::Zero(14, 5), SequenceLayout(2, 7), y), ShapeError,
                           "sequence length 7 exceeds max_len 6");
  TransformerClassifier<float> tokens(small_config(NormPlacement::Pre, Pooling::Mean, false), rng);
  PEFT_REQUIRE_THROWS_WITH(tokens.forward_inference(Matrix<float>::Zero(4, 5), SequenceLayout(2, 2), y), ConfigError,
                           "model takes token ids");
  PEFT_REQUIRE_THROWS_WITH(tokens.forward_inference(std::vector<Index>{1, 2, 3, 11}, SequenceLayout(2, 2), y),
                           ShapeError, "token id 11 at position 3 is out of range for vocabulary size 11");
}

TEST_CASE("Transformer: forward_inference routes each sequence through its own adapter", "[transformer][inference]") {
  Rng rng(47);
  TransformerClassifier<double> model(small_config(NormPlacement::Pre, Pooling::Mean), rng);
  PeftConfig pc;
  pc.lora.emplace();
  pc.lora->target_modules = ModuleSelector::pattern("all-linear");
  pc.lora->lora.r = 2;
  pc.modules_to_save = {"classifier"};
  pc.adapter_name = "a";
  apply_peft(model, pc, rng);
  pc.adapter_name = "b";
  pc.lora->target_modules = ModuleSelector::list({"q_proj", "fc2"});  // b targets fewer linears
  apply_peft(model, pc, rng);
  model.visit_parameters([&](const std::string& name, Parameter<double>& p) {  // every adapter away from identity
    if (name.find("lora_") != std::string::npos || name.find("modules_to_save") != std::string::npos)
      p.value += test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.3);
  });
  const auto use = [&](const std::string& name) {  // `name` active everywhere, or the base model
    const bool base = name == "__base__";
    model.for_each_linear([&](const std::string&, LoRALinear<double>& l, bool) {
      if (!base && l.has_adapter(name)) l.set_active(name);
      l.disable_adapters(base || !l.has_adapter(name));
    });
    model.classifier.set_active(base ? "" : name);
  };
  const SequenceLayout layout(4, 4, {4, 2, 3, 4});
  const Matrix<double> x = test::random_matrix<double>(16, 5, rng);
  const std::vector<std::string> names{"a", "__base__", "b", "a"};
  Matrix<double> y, alone;
  model.forward_inference(x, layout, y, names);
  REQUIRE(y.rows() == 4);
  for (Index b = 0; b < 4; ++b) {
    INFO("sequence " << b << " through " << names[static_cast<std::size_t>(b)]);
    use(names[static_cast<std::size_t>(b)]);
    const Index len = layout.length(b);
    model.forward_inference(x.middleRows(b * 4, len), SequenceLayout(1, len), alone);
    CHECK(test::rel_diff(y.row(b), alone.row(0)) < 1e-12);
  }
  use("a");
  Matrix<double> active;
  model.forward_inference(x, layout, active);
  CHECK(test::rel_diff(y.row(0), active.row(0)) < 1e-12);
  CHECK(test::rel_diff(y.row(1), active.row(1)) > 1e-6);  // the base model differs from "a"
  // errors name what is wrong
  PEFT_REQUIRE_THROWS_WITH(model.forward_inference(x, layout, y, {"a", "b"}), ShapeError,
                           "2 adapter names for 4 sequences");
  PEFT_REQUIRE_THROWS_WITH(model.forward_inference(x, layout, y, {"a", "c", "b", "a"}), ConfigError,
                           "no linear and no head copy holds adapter \"c\" (adapters: \"a\", \"b\"");
  model.layers[0].attn.q_proj.merge();
  PEFT_REQUIRE_THROWS_WITH(model.forward_inference(x, layout, y, names), ConfigError,
                           "mixed-adapter batches need an unmerged layer");
  model.layers[0].attn.q_proj.unmerge();
  model.add_prefix(2, rng);
  PEFT_REQUIRE_THROWS_WITH(model.forward_inference(x, layout, y, names), ConfigError,
                           "cannot leave out this model's prefix");
}
