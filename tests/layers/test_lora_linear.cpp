// LoRALinear: forward formula, hand-written backward against finite differences (double), the
// equivalences (merged == unmerged, disabled == base, zero init == base exactly), adapter
// management, dropout, reward-model style double forward, and every error path.
#include <peft/layers/lora_linear.hpp>
#include <peft/train/gradient_check.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {

/// A layer whose adapters are all non-trivial (B ≠ 0): LoraInit::None draws both factors.
template <class T>
LoRALinear<T> make_layer(Index in, Index out, Rng& rng, const std::string& name = "q") {
  LoRALinear<T> layer(in, out, rng, true, name);
  return layer;
}

LoraConfig cfg(int r, double alpha, double dropout = 0.0, bool rslora = false, LoraInit init = LoraInit::None) {
  LoraConfig c;
  c.r = r;
  c.alpha = alpha;
  c.dropout = dropout;
  c.use_rslora = rslora;
  c.init = init;
  return c;
}

/// Reference forward: x Wᵀ + b + Σ s_i (x̃_i A_iᵀ) B_iᵀ, straight from the formula.
template <class T>
Matrix<T> reference(const LoRALinear<T>& layer, const Matrix<T>& x, const std::vector<std::string>& active) {
  Matrix<T> y = x * layer.weight.value.transpose();
  if (layer.has_bias()) y.rowwise() += layer.bias.value.row(0);
  for (const auto& n : active) {
    const auto& a = layer.adapter(n);
    y += static_cast<T>(a.scaling()) * (x * a.A.value.transpose() * a.B.value.transpose());
  }
  return y;
}

template <class T>
double loss_of(LoRALinear<T>& layer, const Matrix<T>& x, const Matrix<T>& g) {
  typename LoRALinear<T>::Cache c;
  return test::dot(g, layer.forward(x, c));
}

/// Runs forward + backward once and checks every trainable gradient (and dX) against central
/// differences of the same loss  L = Σ g ⊙ y.
void gradcheck_all(LoRALinear<double>& layer, Matrix<double>& x, const Matrix<double>& g) {
  layer.zero_grad();
  typename LoRALinear<double>::Cache cache;
  layer.forward(x, cache);
  Matrix<double> dx;
  layer.backward(cache, g, &dx);
  auto loss = [&] { return loss_of(layer, x, g); };
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  layer.visit_parameters([&](const std::string& name, Parameter<double>& p) {
    if (!p.trainable()) return;
    INFO("parameter " << name);
    CHECK(relative_error(p.grad, numerical_gradient(p.value, loss)) < Tolerances<double>::grad);
  });
}

}  // namespace

TEMPLATE_TEST_CASE("LoRALinear forward is x W^T + b + s (x A^T) B^T", "[lora]", float, double) {
  Rng rng(10);
  LoRALinear<TestType> layer = make_layer<TestType>(6, 5, rng);
  layer.add_adapter("a", cfg(2, 5.0));
  const Matrix<TestType> x = test::random_matrix<TestType>(4, 6, rng);
  typename LoRALinear<TestType>::Cache cache;
  const Matrix<TestType> y = layer.forward(x, cache);
  CHECK(layer.adapter("a").scaling() == 2.5);
  CHECK(test::rel_diff(y, reference(layer, x, {"a"})) < Tolerances<TestType>::rel);
  CHECK(test::rel_diff(y, reference(layer, x, {})) > 1e-3);  // the adapter really contributes

  // rsLoRA: s = alpha / √r.
  layer.add_adapter("rs", cfg(4, 3.0, 0.0, true));
  CHECK(layer.adapter("rs").scaling() == Approx(1.5));
  CHECK(test::rel_diff(layer.forward(x, cache), reference(layer, x, {"rs"})) < Tolerances<TestType>::rel);

  // Two adapters at once are summed.
  layer.set_active({"a", "rs"});
  CHECK(test::rel_diff(layer.forward(x, cache), reference(layer, x, {"a", "rs"})) < Tolerances<TestType>::rel);
  CHECK(layer.active_adapters() == std::vector<std::string>{"a", "rs"});
}

TEST_CASE("LoRALinear backward matches finite differences", "[lora][gradcheck]") {
  Rng rng(11);
  Matrix<double> x = test::random_matrix<double>(5, 7, rng);
  const Matrix<double> g = test::random_matrix<double>(5, 6, rng);

  SECTION("one adapter, alpha != r, trainable base") {
    LoRALinear<double> layer = make_layer<double>(7, 6, rng);
    layer.add_adapter("a", cfg(3, 7.0));
    gradcheck_all(layer, x, g);
  }
  SECTION("rsLoRA") {
    LoRALinear<double> layer = make_layer<double>(7, 6, rng);
    layer.add_adapter("a", cfg(4, 3.0, 0.0, true));
    gradcheck_all(layer, x, g);
  }
  SECTION("two adapters active at once, frozen base") {
    LoRALinear<double> layer = make_layer<double>(7, 6, rng);
    layer.add_adapter("a", cfg(2, 5.0));
    layer.add_adapter("b", cfg(3, 1.5, 0.0, true));
    layer.set_active({"a", "b"});
    layer.freeze_base();
    gradcheck_all(layer, x, g);
    CHECK(layer.weight.grad.size() == 0);
    CHECK(layer.bias.grad.size() == 0);
  }
  SECTION("gradients accumulate over calls") {
    LoRALinear<double> layer = make_layer<double>(7, 6, rng);
    layer.add_adapter("a", cfg(3, 7.0));
    typename LoRALinear<double>::Cache c;
    layer.forward(x, c);
    layer.backward(c, g, nullptr);
    const Matrix<double> once = layer.adapter("a").A.grad;
    layer.backward(c, g, nullptr);
    CHECK(test::rel_diff(layer.adapter("a").A.grad, Matrix<double>(2 * once)) < 1e-14);
  }
}

TEST_CASE("LoRALinear dropout: mask in the cache, gradient against the explicit formula",
          "[lora][dropout][gradcheck]") {
  Rng rng(12);
  LoRALinear<double> layer = make_layer<double>(8, 5, rng);
  const double p = 0.3;
  layer.add_adapter("a", cfg(3, 6.0, p));
  layer.add_adapter("b", cfg(2, 2.0, 0.5));
  layer.set_active({"a", "b"});
  layer.train();
  Matrix<double> x = test::random_matrix<double>(40, 8, rng);
  const Matrix<double> g = test::random_matrix<double>(40, 5, rng);
  typename LoRALinear<double>::Cache cache;
  const Matrix<double> y = layer.forward(x, cache);
  REQUIRE(cache.used == 2);
  const Matrix<double> keep_a = cache.lora(0).keep, keep_b = cache.lora(1).keep;
  REQUIRE(keep_a.rows() == 40);
  REQUIRE(keep_a.cols() == 8);
  // Entries are 0 or 1/(1−p), dropped with probability p; the two adapters draw independent masks.
  const double kept = 1.0 / (1.0 - p);
  CHECK(((keep_a.array() == 0.0) || (keep_a.array() == kept)).all());
  const double dropped = static_cast<double>((keep_a.array() == 0.0).count()) / static_cast<double>(keep_a.size());
  CHECK(std::abs(dropped - p) < 6 * std::sqrt(p * (1 - p) / static_cast<double>(keep_a.size())));
  CHECK(keep_a != keep_b);
  CHECK(cache.x.size() == x.size());  // the base is trainable: dW needs x

  // The same function with the masks fixed, written out.
  auto explicit_forward = [&]() {
    Matrix<double> out = x * layer.weight.value.transpose();
    out.rowwise() += layer.bias.value.row(0);
    for (int k = 0; k < 2; ++k) {
      const auto& a = layer.adapters()[static_cast<std::size_t>(k)];
      const Matrix<double> xd = x.cwiseProduct(k == 0 ? keep_a : keep_b);
      out += a.scaling() * (xd * a.A.value.transpose() * a.B.value.transpose());
    }
    return out;
  };
  CHECK(test::rel_diff(y, explicit_forward()) < 1e-14);

  layer.zero_grad();
  Matrix<double> dx;
  layer.backward(cache, g, &dx);
  auto loss = [&] { return test::dot(g, explicit_forward()); };
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  layer.visit_parameters([&](const std::string& name, Parameter<double>& prm) {
    INFO("parameter " << name);
    CHECK(relative_error(prm.grad, numerical_gradient(prm.value, loss)) < Tolerances<double>::grad);
  });

  // eval() turns dropout off: the output is the plain formula again.
  layer.eval();
  CHECK(test::rel_diff(layer.forward(x, cache), reference(layer, x, {"a", "b"})) < 1e-14);
  CHECK(cache.lora(0).keep.size() == 0);
}

TEST_CASE("LoRALinear with a frozen base keeps no x unless dA needs it", "[lora]") {
  Rng rng(13);
  LoRALinear<double> layer = make_layer<double>(6, 4, rng);
  layer.add_adapter("a", cfg(2, 4.0, 0.25));
  layer.freeze_base();
  CHECK(layer.weight.grad.size() == 0);
  const Matrix<double> x = test::random_matrix<double>(3, 6, rng);
  const Matrix<double> g = test::random_matrix<double>(3, 4, rng);
  typename LoRALinear<double>::Cache cache;

  layer.eval();  // no dropout: dA = s (dY B)ᵀ x needs x
  layer.forward(x, cache);
  CHECK(cache.x.size() == x.size());

  layer.train();  // dropout: dA reads dropout(x) from the adapter cache; x itself is not kept
  layer.forward(x, cache);
  CHECK(cache.x.size() == 0);
  CHECK(cache.lora(0).xd.size() == x.size());
  layer.backward(cache, g, nullptr);
  CHECK(layer.weight.grad.size() == 0);
  CHECK(layer.adapter("a").A.grad.cwiseAbs().maxCoeff() > 0);

  layer.eval();
  layer.adapter("a").A.set_trainable(false);  // only B trains: x is not needed at all
  layer.forward(x, cache);
  CHECK(cache.x.size() == 0);
  Matrix<double> dx;
  layer.backward(cache, g, &dx);
  const auto& a = layer.adapter("a");
  const Matrix<double> expected_dx = g * layer.weight.value + a.scaling() * (g * a.B.value * a.A.value);
  CHECK(test::rel_diff(dx, expected_dx) < 1e-14);

  // Unfreezing after forward is caught instead of reading a missing input.
  layer.weight.set_trainable(true);
  PEFT_REQUIRE_THROWS_WITH(layer.backward(cache, g, nullptr), ShapeError, "cached input");
}

TEST_CASE("LoRALinear forward_shared_input keeps no copy of x; backward with the caller's x is backward()", "[lora]") {
  // Attention's q, k, v and a gated MLP's gate and up read one input: the caller keeps one copy and
  // hands it to each backward. Same output and the same gradients, bit for bit.
  Rng rng(14);
  for (const bool frozen : {false, true}) {
    INFO("frozen base " << frozen);
    LoRALinear<double> layer = make_layer<double>(6, 4, rng);
    layer.add_adapter("a", cfg(2, 3.0));
    if (frozen) layer.freeze_base();
    const Matrix<double> x = test::random_matrix<double>(5, 6, rng);
    const Matrix<double> g = test::random_matrix<double>(5, 4, rng);
    typename LoRALinear<double>::Cache own, shared;
    Matrix<double> y1, y2, dx1, dx2;
    layer.zero_grad();
    layer.forward(x, y1, own);
    layer.backward(own, g, &dx1);
    std::vector<Matrix<double>> want;
    layer.visit_parameters([&](const std::string&, Parameter<double>& p) {
      if (p.trainable()) want.push_back(p.grad);
    });
    layer.zero_grad();
    layer.forward_shared_input(x, y2, shared);
    CHECK(test::rel_diff(y2, y1) == 0.0);
    CHECK(shared.needs_input);
    CHECK(shared.x.size() == 0);
    PEFT_REQUIRE_THROWS_WITH(layer.backward(shared, g, &dx2), ConfigError, "forward_shared_input");
    const Matrix<double> wrong = test::random_matrix<double>(4, 6, rng);
    PEFT_REQUIRE_THROWS_WITH(layer.backward(shared, g, &dx2, wrong), ShapeError, "input handed to backward");
    layer.zero_grad();
    layer.backward(shared, g, &dx2, x);
    CHECK(test::rel_diff(dx2, dx1) == 0.0);
    std::size_t k = 0;
    layer.visit_parameters([&](const std::string& name, Parameter<double>& p) {
      if (!p.trainable()) return;
      INFO(name);
      CHECK(test::rel_diff(p.grad, want.at(k++)) == 0.0);
    });
    CHECK(k == want.size());
    // After forward() the cache's own copy is used, whatever x is passed.
    layer.zero_grad();
    layer.backward(own, g, &dx2, wrong);
    CHECK(test::rel_diff(dx2, dx1) == 0.0);
  }
  // Nothing reads x (frozen base, only B trains): the caller need not keep it.
  LoRALinear<double> layer = make_layer<double>(6, 4, rng);
  layer.add_adapter("a", cfg(2, 3.0));
  layer.freeze_base();
  layer.adapter("a").A.set_trainable(false);
  typename LoRALinear<double>::Cache cache;
  Matrix<double> y, dx;
  layer.forward_shared_input(test::random_matrix<double>(5, 6, rng), y, cache);
  CHECK_FALSE(cache.needs_input);
  layer.backward(cache, test::random_matrix<double>(5, 4, rng), &dx);
  CHECK(dx.rows() == 5);
}

TEMPLATE_TEST_CASE("LoRALinear merge, unmerge, disable and zero init", "[lora][merge]", float, double) {
  Rng rng(14);
  LoRALinear<TestType> layer = make_layer<TestType>(9, 7, rng);
  const Matrix<TestType> w0 = layer.weight.value;
  const Matrix<TestType> x = test::random_matrix<TestType>(5, 9, rng);
  typename LoRALinear<TestType>::Cache cache;
  const Matrix<TestType> base = layer.forward(x, cache);

  SECTION("zero init (kaiming and gaussian) gives the base output exactly") {
    layer.add_adapter("k", cfg(3, 16.0, 0.0, false, LoraInit::KaimingUniform));
    CHECK(layer.adapter("k").B.value.cwiseAbs().maxCoeff() == TestType(0));
    CHECK(layer.adapter("k").A.value.cwiseAbs().maxCoeff() > TestType(0));
    CHECK(layer.adapter("k").A.value.cwiseAbs().maxCoeff() <= TestType(1.0 / 3.0));  // 1/√in
    CHECK(layer.forward(x, cache) == base);
    layer.add_adapter("g", cfg(4, 16.0, 0.0, false, LoraInit::Gaussian));
    CHECK(layer.forward(x, cache) == base);
  }

  SECTION("merged == unmerged, unmerge restores W") {
    layer.add_adapter("a", cfg(3, 5.0));
    const Matrix<TestType> unmerged = layer.forward(x, cache);
    layer.merge();
    CHECK(layer.merged());
    CHECK(layer.merged_adapters() == std::vector<std::string>{"a"});
    const Matrix<TestType> merged = layer.forward(x, cache);
    CHECK(test::rel_diff(merged, unmerged) < Tolerances<TestType>::rel);
    CHECK(test::rel_diff(layer.weight.value, Matrix<TestType>(w0 + layer.delta_weight("a"))) <
          Tolerances<TestType>::rel);
    layer.unmerge();
    CHECK_FALSE(layer.merged());
    CHECK(test::rel_diff(layer.weight.value, w0) < 1e-6);
    CHECK(test::rel_diff(layer.forward(x, cache), unmerged) < Tolerances<TestType>::rel);
  }

  SECTION("two adapters: merge one by name, LIFO unmerge") {
    layer.add_adapter("a", cfg(3, 5.0));
    layer.add_adapter("b", cfg(2, 1.0, 0.0, true));
    layer.set_active({"a", "b"});
    const Matrix<TestType> both = layer.forward(x, cache);
    layer.merge({"b"});
    CHECK(test::rel_diff(layer.forward(x, cache), both) < Tolerances<TestType>::rel);  // a still runs unmerged
    layer.merge();                                                                     // the rest of the active set: a
    CHECK(layer.merged_adapters() == std::vector<std::string>{"b", "a"});
    CHECK(test::rel_diff(layer.forward(x, cache), both) < Tolerances<TestType>::rel);
    PEFT_REQUIRE_THROWS_WITH(layer.merge({"a"}), ConfigError, "adapter \"a\" is already merged");
    PEFT_REQUIRE_THROWS_WITH(layer.delete_adapter("a"), ConfigError, "is merged; unmerge before deleting");
    PEFT_REQUIRE_THROWS_WITH(layer.disable_adapters(), ConfigError, "while some are merged");
    layer.unmerge();
    CHECK(test::rel_diff(layer.weight.value, w0) < 1e-6);
    CHECK(layer.merged_adapters().empty());
  }

  SECTION("disabled adapter == base; enabling again restores the adapter") {
    layer.add_adapter("a", cfg(3, 5.0));
    const Matrix<TestType> with = layer.forward(x, cache);
    layer.disable_adapters();
    CHECK(layer.adapters_disabled());
    CHECK(layer.forward(x, cache) == base);
    PEFT_REQUIRE_THROWS_WITH(layer.merge(), ConfigError, "adapters are disabled");
    PEFT_REQUIRE_THROWS_WITH(layer.merge({"a"}), ConfigError, "adapters are disabled");
    layer.disable_adapters(false);
    CHECK(layer.forward(x, cache) == with);
    layer.set_active(std::vector<std::string>{});  // nothing active: the base alone
    CHECK(layer.forward(x, cache) == base);
  }

  SECTION("safe merge refuses NaN and Inf and leaves W bit-identical") {
    layer.add_adapter("ok", cfg(2, 2.0));
    layer.add_adapter("bad", cfg(2, 2.0));
    layer.set_active({"ok", "bad"});
    for (const TestType poison :
         {std::numeric_limits<TestType>::quiet_NaN(), std::numeric_limits<TestType>::infinity()}) {
      layer.adapter("bad").B.value(1, 1) = poison;
      const Matrix<TestType> before = layer.weight.value;
      PEFT_REQUIRE_THROWS_WITH(layer.safe_merge(), NumericError, "merging adapter \"bad\" gives NaN or Inf");
      CHECK(std::memcmp(before.data(), layer.weight.value.data(),
                        sizeof(TestType) * static_cast<std::size_t>(before.size())) == 0);
      CHECK_FALSE(layer.merged());
    }
    layer.adapter("bad").B.value(1, 1) = TestType(0.5);
    layer.safe_merge();
    CHECK(layer.merged_adapters() == std::vector<std::string>{"ok", "bad"});
  }
}

TEST_CASE("LoRALinear gaussian init draws A ~ N(0, (1/r)^2) as PEFT does", "[lora][init]") {
  Rng rng(15);
  LoRALinear<double> layer = make_layer<double>(400, 300, rng);
  layer.add_adapter("g", cfg(8, 16.0, 0.0, false, LoraInit::Gaussian));
  const Matrix<double>& A = layer.adapter("g").A.value;
  const double n = static_cast<double>(A.size());
  const double mean = A.mean();
  const double sd = std::sqrt((A.array() - mean).square().sum() / n);
  CHECK(std::abs(mean) < 6 * (1.0 / 8) / std::sqrt(n));
  CHECK(std::abs(sd - 1.0 / 8) < 0.02 * (1.0 / 8));
  CHECK(layer.adapter("g").B.value.cwiseAbs().maxCoeff() == 0.0);
}

TEST_CASE("LoRALinear: two forwards with two caches, then two backwards (reward model)", "[lora]") {
  Rng rng(16);
  LoRALinear<double> layer = make_layer<double>(6, 4, rng);
  layer.add_adapter("a", cfg(2, 3.0, 0.2));
  layer.train();
  const Matrix<double> x1 = test::random_matrix<double>(3, 6, rng), x2 = test::random_matrix<double>(2, 6, rng);
  const Matrix<double> g1 = test::random_matrix<double>(3, 4, rng), g2 = test::random_matrix<double>(2, 4, rng);

  // Separate forward/backward pairs, with the dropout generator checkpointed so that the
  // interleaved run below draws the very same masks.
  const Rng::State rs = layer.rng().state();
  typename LoRALinear<double>::Cache c1, c2;
  Matrix<double> dx1, dx2;
  layer.zero_grad();
  layer.forward(x1, c1);
  layer.backward(c1, g1, &dx1);
  layer.forward(x2, c2);
  layer.backward(c2, g2, &dx2);
  Matrix<double> gw = layer.weight.grad, ga = layer.adapter("a").A.grad, gb = layer.adapter("a").B.grad;

  layer.rng().set_state(rs);
  layer.zero_grad();
  typename LoRALinear<double>::Cache d1, d2;
  Matrix<double> ex1, ex2;
  layer.forward(x1, d1);
  layer.forward(x2, d2);
  layer.backward(d2, g2, &ex2);  // any order
  layer.backward(d1, g1, &ex1);
  CHECK(test::rel_diff(ex1, dx1) < 1e-14);
  CHECK(test::rel_diff(ex2, dx2) < 1e-14);
  CHECK(test::rel_diff(layer.weight.grad, gw) < 1e-14);
  CHECK(test::rel_diff(layer.adapter("a").A.grad, ga) < 1e-14);
  CHECK(test::rel_diff(layer.adapter("a").B.grad, gb) < 1e-14);
}

TEST_CASE("LoRALinear refuses stale caches and training while merged", "[lora][errors]") {
  Rng rng(17);
  LoRALinear<float> layer = make_layer<float>(6, 4, rng, "layers.0.q");
  layer.add_adapter("a", cfg(2, 4.0));
  const Matrix<float> x = test::random_matrix<float>(3, 6, rng);
  const Matrix<float> g = test::random_matrix<float>(3, 4, rng);
  typename LoRALinear<float>::Cache cache, never_filled;

  PEFT_REQUIRE_THROWS_WITH(layer.backward(never_filled, g, nullptr), ConfigError, "no forward filled");

  layer.forward(x, cache);
  layer.add_adapter("b", cfg(2, 4.0));
  PEFT_REQUIRE_THROWS_WITH(layer.backward(cache, g, nullptr), ConfigError, "between forward and backward");
  layer.forward(x, cache);
  layer.delete_adapter("b");
  PEFT_REQUIRE_THROWS_WITH(layer.backward(cache, g, nullptr), ConfigError, "between forward and backward");
  layer.forward(x, cache);
  layer.set_active("a");
  PEFT_REQUIRE_THROWS_WITH(layer.backward(cache, g, nullptr), ConfigError, "run forward again");

  layer.merge();
  layer.forward(x, cache);
  PEFT_REQUIRE_THROWS_WITH(layer.backward(cache, g, nullptr), ConfigError,
                           "LoRALinear \"layers.0.q\": cannot train while adapters are merged (a)");
  layer.unmerge();
  layer.forward(x, cache);
  PEFT_REQUIRE_THROWS_WITH(layer.backward(cache, Matrix<float>::Zero(2, 4), nullptr), ShapeError,
                           "output gradient has shape [2, 4], expected [3, 4]");
  layer.backward(cache, g, nullptr);  // and the happy path still works
}

TEST_CASE("LoRALinear: rank above min(in, out) is legal (as in PEFT), warned, and exact", "[lora][gradcheck][merge]") {
  Rng rng(19);
  std::vector<std::string> seen;
  const ScopedWarningHandler guard([&](const std::string& m) { seen.push_back(m); });
  LoRALinear<double> layer = make_layer<double>(7, 4, rng, "layers.0.q");  // [out, in] = [4, 7]
  layer.add_adapter("wide", cfg(6, 5.0));                                  // r = 6 > min(7, 4) = 4
  REQUIRE(seen.size() == 1);
  CHECK(seen[0] ==
        "LoRALinear \"layers.0.q\": rank r = 6 exceeds min(in, out) = min(7, 4) = 4; s·B·A has rank at most 4, so "
        "the extra rank only costs parameters");
  CHECK(layer.adapter("wide").A.value.rows() == 6);
  layer.add_adapter("ok", cfg(4, 2.0));  // r = min(in, out): no warning
  CHECK(seen.size() == 1);
  layer.set_active({"wide", "ok"});

  Matrix<double> x = test::random_matrix<double>(5, 7, rng);
  const Matrix<double> g = test::random_matrix<double>(5, 4, rng);
  auto fwd = [&](LoRALinear<double>& l) {
    typename LoRALinear<double>::Cache c;
    return Matrix<double>(l.forward(x, c));
  };
  CHECK(test::rel_diff(fwd(layer), reference(layer, x, {"wide", "ok"})) < Tolerances<double>::rel);
  gradcheck_all(layer, x, g);  // dX, dW, db, dA, dB of both adapters

  // merged ≡ unmerged, and unmerge restores W₀.
  const Matrix<double> w0 = layer.weight.value;
  const Matrix<double> unmerged = fwd(layer);
  layer.merge();
  CHECK(test::rel_diff(fwd(layer), unmerged) < Tolerances<double>::rel);
  CHECK(test::rel_diff(layer.weight.value, Matrix<double>(w0 + layer.delta_weight("wide") + layer.delta_weight("ok"))) <
        Tolerances<double>::rel);
  layer.unmerge();
  CHECK(test::rel_diff(layer.weight.value, w0) < Tolerances<double>::rel);
  CHECK(test::rel_diff(fwd(layer), unmerged) < Tolerances<double>::rel);

  // DoRA at the same rank: accepted, identity at init.
  LoRALinear<double> dora_layer = make_layer<double>(7, 4, rng, "layers.0.v");
  LoraConfig dora = cfg(5, 3.0, 0.0, false, LoraInit::KaimingUniform);
  dora.use_dora = true;
  const Matrix<double> base = fwd(dora_layer);
  dora_layer.add_adapter("d", dora);
  CHECK(seen.size() == 2);
  CHECK(seen[1].find("LoRALinear \"layers.0.v\": rank r = 5 exceeds min(in, out) = min(7, 4) = 4") == 0);
  CHECK(test::rel_diff(fwd(dora_layer), base) < Tolerances<double>::rel);
}

TEST_CASE("LoRALinear rejects bad configurations with named errors", "[lora][errors]") {
  Rng rng(18);
  LoRALinear<float> layer = make_layer<float>(6, 4, rng, "layers.0.q");
  PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("a", cfg(0, 8.0)), ConfigError,
                           "LoRALinear \"layers.0.q\": rank r must be >= 1, got 0");
  PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("a", cfg(-3, 8.0)), ConfigError, "got -3");
  PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("a", cfg(2, 0.0)), ConfigError,
                           "lora_alpha must be finite and > 0, got 0");
  PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("a", cfg(2, -1.0)), ConfigError, "lora_alpha");
  PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("a", cfg(2, std::nan(""))), ConfigError, "got nan");
  PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("a", cfg(2, 2.0, 1.0)), ConfigError,
                           "lora_dropout must be in [0, 1), got 1");
  PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("a", cfg(2, 2.0, -0.1)), ConfigError, "lora_dropout");
  PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("", cfg(2, 2.0)), ConfigError, "must not be empty");
  PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("a.b", cfg(2, 2.0)), ConfigError, "must not contain '.'");
  CHECK(layer.adapters().empty());  // nothing half-added
  PEFT_REQUIRE_THROWS_WITH(LoRALinear<float>(0, 4, rng, true, "layers.1.q"), ShapeError,
                           "LoRALinear \"layers.1.q\": features must be > 0, got in=0, out=4");

  layer.add_adapter("a", cfg(2, 2.0));
  layer.add_adapter("b", cfg(2, 2.0));
  PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("a", cfg(2, 2.0)), ConfigError, "adapter \"a\" already exists");
  PEFT_REQUIRE_THROWS_WITH(layer.set_active("c"), ConfigError, "unknown adapter \"c\"; available: [a, b]");
  PEFT_REQUIRE_THROWS_WITH(layer.adapter("zz"), ConfigError, "available: [a, b]");
  PEFT_REQUIRE_THROWS_WITH(layer.delete_adapter("zz"), ConfigError, "unknown adapter \"zz\"");
  PEFT_REQUIRE_THROWS_WITH(layer.merge({"zz"}), ConfigError, "unknown adapter");
  PEFT_REQUIRE_THROWS_WITH(layer.delta_weight("zz"), ConfigError, "unknown adapter");

  typename LoRALinear<float>::Cache cache;
  PEFT_REQUIRE_THROWS_WITH(layer.forward(Matrix<float>::Zero(2, 5), cache), ShapeError,
                           "LoRALinear \"layers.0.q\": input has 5 features, expected 6");
  PEFT_REQUIRE_THROWS_WITH(LoRALinear<float>(0, 4, rng, true, "z"), ShapeError, "in=0");

  // delete keeps the remaining bookkeeping consistent.
  layer.set_active({"a", "b"});
  layer.delete_adapter("a");
  CHECK(layer.active_adapters() == std::vector<std::string>{"b"});
  CHECK_FALSE(layer.has_adapter("a"));
  CHECK(layer.has_adapter("b"));
}

TEST_CASE("LoRALinear names parameters like Hugging Face PEFT", "[lora]") {
  Rng rng(19);
  LoRALinear<float> layer = make_layer<float>(6, 4, rng);
  layer.add_adapter("default", cfg(2, 2.0));
  std::vector<std::string> names;
  layer.visit_parameters([&](const std::string& n, Parameter<float>&) { names.push_back(n); });
  CHECK(names == std::vector<std::string>{"weight", "bias", "lora_A.default.weight", "lora_B.default.weight"});
}

TEST_CASE("LoRALinear construction is the same under every compiler for a seed", "[lora]") {
  // The base is drawn before the dropout seed: the same seed gives nn.Linear's draw for the base.
  Rng r1(20), r2(20);
  LoRALinear<double> layer(5, 3, r1, true);
  Linear<double> lin(5, 3, r2, true);
  CHECK(layer.weight.value == lin.weight.value);
  CHECK(layer.bias.value == lin.bias.value);
}

TEST_CASE("LoRALinear: only active adapters train (PEFT's set_adapter), and adding one moves none", "[lora][optim]") {
  Rng rng(90);
  LoRALinear<double> layer(6, 4, rng, true, "q");
  layer.freeze_base();
  LoraConfig cfg;
  cfg.r = 2;
  cfg.init = LoraInit::None;
  layer.add_adapter("a", cfg);
  CHECK(layer.adapter("a").A.trainable());
  const Parameter<double>* a_A = &layer.adapter("a").A;

  // Adding an adapter activates it alone: "a" is frozen (no gradient buffer), "b" trains.
  layer.add_adapter("b", cfg);
  CHECK(&layer.adapter("a").A == a_A);  // adapters live on the heap: no reallocation moved "a"
  CHECK_FALSE(layer.adapter("a").A.trainable());
  CHECK(layer.adapter("a").A.grad.size() == 0);
  CHECK(layer.adapter("b").B.trainable());
  layer.set_active({"a", "b"});
  CHECK(layer.adapter("a").A.trainable());
  CHECK(layer.adapter("b").A.trainable());
  layer.set_active("a");
  CHECK_FALSE(layer.adapter("b").A.trainable());
  CHECK_FALSE(layer.adapter("b").B.trainable());

  // Parameters an optimizer holds survive adding further adapters.
  for (int k = 0; k < 20; ++k) layer.add_adapter("extra" + std::to_string(k), cfg);
  layer.set_active("a");
  CHECK(&layer.adapter("a").A == a_A);
  const LoRALinear<double> copy = layer;  // copies are deep
  CHECK(&copy.adapter("a").A != a_A);
  CHECK(copy.adapter("a").A.value == layer.adapter("a").A.value);
  CHECK(copy.adapters().size() == layer.adapters().size());
}

TEMPLATE_TEST_CASE("forward_inference equals forward and keeps nothing for backward", "[lora]", float, double) {
  Rng rng(91);
  LoRALinear<TestType> layer = make_layer<TestType>(7, 5, rng, "q");
  layer.add_adapter("default", cfg(3, 5.0));
  LoraConfig dora;
  dora.r = 2;
  dora.use_dora = true;
  dora.init = LoraInit::None;
  layer.add_adapter("d", dora);
  layer.set_active({"default", "d"});
  const Matrix<TestType> x = test::random_matrix<TestType>(4, 7, rng);
  typename LoRALinear<TestType>::Cache cache;
  const Matrix<TestType> y = layer.forward(x, cache);
  CHECK(cache.x.size() > 0);  // trainable A: backward reads x
  Matrix<TestType> yi;
  layer.forward_inference(x, yi);
  CHECK(yi == y);
  // The training cache is untouched by inference calls in between.
  Matrix<TestType> dx;
  layer.backward(cache, Matrix<TestType>::Ones(4, 5), &dx);
  CHECK(dx.allFinite());
  Linear<TestType> lin(7, 5, rng, true, "fc");
  typename Linear<TestType>::Cache lc;
  Matrix<TestType> yl;
  lin.forward_inference(x, yl);
  CHECK(yl == lin.forward(x, lc));
}
