// DoRA adapters of LoRALinear (Liu et al., 2024), with Hugging Face PEFT's semantics:
//   y = x Wᵀ + b + (f − 1) ⊙ x̃ Wᵀ + f ⊙ s (x̃ Aᵀ) Bᵀ,   f = m / n,   n = ‖W + s B A‖_row (detached)
// which without dropout is  y = f ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b.
//
// Gradient checks: the layer's backward treats n as a constant (paper §4.3, PEFT's detach()).
// Finite differences of the layer's own forward would differentiate through n, so the numerical
// reference here is an explicit forward in which n is frozen at its value for the current
// parameters (taken from the cache of the analytic forward). The magnitude m does not enter n, so
// dm is additionally checked against differences of the layer's real forward.
#include <peft/layers/lora_linear.hpp>
#include <peft/train/gradient_check.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {

LoraConfig dora_cfg(int r, double alpha, double dropout = 0.0, LoraInit init = LoraInit::None, bool rslora = false) {
  LoraConfig c;
  c.r = r;
  c.alpha = alpha;
  c.dropout = dropout;
  c.init = init;
  c.use_rslora = rslora;
  c.use_dora = true;
  return c;
}

/// Row norms of the dense W + s·B·A (the definition, for reference).
template <class T>
RowVector<T> dense_norm(const LoRALinear<T>& layer, const std::string& name) {
  const auto& a = layer.adapter(name);
  const Matrix<T> wd = layer.weight.value + static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
  return wd.rowwise().norm().transpose();
}

/// Row norms of the dense w0 + s·B·A for a given base w0.
template <class T>
RowVector<T> dense_norm_on(const Matrix<T>& w0, const LoRALinear<T>& layer, const std::string& name) {
  const auto& a = layer.adapter(name);
  const Matrix<T> wd = w0 + static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
  return wd.rowwise().norm().transpose();
}

/// Moves m away from its init (m = n makes f = 1 and hides mistakes in the f terms).
template <class T>
void perturb_magnitude(LoRALinear<T>& layer, const std::string& name, Rng& rng) {
  auto& m = layer.adapter(name).magnitude.value;
  for (Index j = 0; j < m.cols(); ++j) m(0, j) *= static_cast<T>(rng.uniform(0.5, 1.5));
}

/// The explicit forward with fixed norms n_k (one per DoRA adapter in `names`, in order) and fixed
/// dropout masks (empty: no dropout).
template <class T>
Matrix<T> explicit_forward(const LoRALinear<T>& layer, const Matrix<T>& x, const std::vector<std::string>& names,
                           const std::vector<RowVector<T>>& norms, const std::vector<Matrix<T>>& keeps) {
  Matrix<T> y = x * layer.weight.value.transpose();
  if (layer.has_bias()) y.rowwise() += layer.bias.value.row(0);
  for (std::size_t k = 0; k < names.size(); ++k) {
    const auto& a = layer.adapter(names[k]);
    const Matrix<T> xt = keeps[k].size() ? Matrix<T>(x.cwiseProduct(keeps[k])) : x;
    const T s = static_cast<T>(a.scaling());
    const Matrix<T> lora = s * (xt * a.A.value.transpose() * a.B.value.transpose());
    if (!a.dora()) {
      y += lora;
      continue;
    }
    const RowVector<T> f = a.magnitude.value.row(0).array() / norms[k].array();
    const Matrix<T> zt = xt * layer.weight.value.transpose();
    y.array() += zt.array().rowwise() * (f.array() - T(1)) + lora.array().rowwise() * f.array();
  }
  return y;
}

/// Analytic forward + backward once, then every trainable gradient and dX against central
/// differences of the explicit forward with the norms (and masks) of that forward held fixed.
void gradcheck_detached(LoRALinear<double>& layer, Matrix<double>& x, const Matrix<double>& g,
                        const std::vector<std::string>& names) {
  layer.zero_grad();
  typename LoRALinear<double>::Cache cache;
  const Matrix<double> y = layer.forward(x, cache);
  REQUIRE(cache.used == names.size());
  std::vector<RowVector<double>> norms;
  std::vector<Matrix<double>> keeps;
  for (std::size_t k = 0; k < cache.used; ++k) {
    const auto* d = dynamic_cast<const DoraCache<double>*>(cache.slots[k].state.get());
    norms.push_back(d != nullptr ? d->norm : RowVector<double>());
    keeps.push_back(cache.lora(k).keep);
  }
  CHECK(test::rel_diff(y, explicit_forward(layer, x, names, norms, keeps)) < 1e-13);
  Matrix<double> dx;
  layer.backward(cache, g, &dx);
  auto loss = [&] { return test::dot(g, explicit_forward(layer, x, names, norms, keeps)); };
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  std::size_t checked = 0;
  layer.visit_parameters([&](const std::string& name, Parameter<double>& p) {
    if (!p.trainable()) return;
    INFO("parameter " << name);
    CHECK(relative_error(p.grad, numerical_gradient(p.value, loss)) < Tolerances<double>::grad);
    ++checked;
  });
  CHECK(checked > 0);
}

}  // namespace

TEMPLATE_TEST_CASE("DoRA forward is f * (x W^T + s x A^T B^T) + b with f = m / ||W + sBA||", "[dora]", float, double) {
  Rng rng(30);
  LoRALinear<TestType> layer(7, 6, rng, true, "v");
  auto& a = layer.add_adapter("d", dora_cfg(3, 5.0));
  CHECK(a.dora());
  // Init: m = ‖W + s·B·A‖_row, so DoRA starts as plain LoRA.
  CHECK(test::rel_diff(a.magnitude.value, dense_norm(layer, "d")) < Tolerances<TestType>::rel);
  CHECK(test::rel_diff(layer.dora_weight_norm("d"), dense_norm(layer, "d")) < Tolerances<TestType>::rel);
  const Matrix<TestType> x = test::random_matrix<TestType>(5, 7, rng);
  typename LoRALinear<TestType>::Cache cache;
  Matrix<TestType> lora = x * layer.weight.value.transpose() + x * layer.delta_weight("d").transpose();
  lora.rowwise() += layer.bias.value.row(0);
  CHECK(test::rel_diff(layer.forward(x, cache), lora) < 10 * Tolerances<TestType>::rel);

  perturb_magnitude(layer, "d", rng);
  const RowVector<TestType> f = layer.adapter("d").magnitude.value.row(0).array() / dense_norm(layer, "d").array();
  Matrix<TestType> expected =
      (x * (layer.weight.value + layer.delta_weight("d")).transpose()).array().rowwise() * f.array();
  expected.rowwise() += layer.bias.value.row(0);
  const Matrix<TestType> y = layer.forward(x, cache);
  CHECK(test::rel_diff(y, expected) < 10 * Tolerances<TestType>::rel);
  CHECK(test::rel_diff(cache.dora(0).scale, f) < Tolerances<TestType>::rel);
  CHECK(test::rel_diff(y, lora) > 1e-3);  // the magnitude really acts
}

TEMPLATE_TEST_CASE("DoRA row norms from the factors equal the dense norms", "[dora]", float, double) {
  Rng rng(31);
  LoRALinear<TestType> layer(64, 48, rng, false, "big");
  layer.add_adapter("d", dora_cfg(8, 16.0, 0.0, LoraInit::None, true));
  layer.adapter("d").B.value *= TestType(3);  // a large update, so the cross terms matter
  CHECK(test::rel_diff(layer.dora_weight_norm("d"), dense_norm(layer, "d")) < 10 * Tolerances<TestType>::rel);
}

TEMPLATE_TEST_CASE("DoRA with B = 0 gives the base output exactly", "[dora]", float, double) {
  Rng rng(32);
  LoRALinear<TestType> layer(9, 5, rng, true, "o");
  const Matrix<TestType> x = test::random_matrix<TestType>(4, 9, rng);
  typename LoRALinear<TestType>::Cache cache;
  const Matrix<TestType> base = layer.forward(x, cache);
  layer.add_adapter("k", dora_cfg(2, 8.0, 0.0, LoraInit::KaimingUniform));
  CHECK(test::rel_diff(layer.adapter("k").magnitude.value,
                       Matrix<TestType>(layer.weight.value.rowwise().norm().transpose())) < Tolerances<TestType>::rel);
  CHECK(layer.forward(x, cache) == base);
  layer.add_adapter("g", dora_cfg(3, 2.0, 0.0, LoraInit::Gaussian));
  layer.set_active({"k", "g"});
  CHECK(layer.forward(x, cache) == base);
}

TEST_CASE("DoRA backward matches finite differences with the norm detached", "[dora][gradcheck]") {
  Rng rng(33);
  Matrix<double> x = test::random_matrix<double>(5, 7, rng);
  const Matrix<double> g = test::random_matrix<double>(5, 6, rng);

  SECTION("one DoRA adapter, trainable base, alpha != r") {
    LoRALinear<double> layer(7, 6, rng, true, "q");
    layer.add_adapter("d", dora_cfg(3, 7.0));
    perturb_magnitude(layer, "d", rng);
    gradcheck_detached(layer, x, g, {"d"});
  }
  SECTION("rsLoRA DoRA next to a plain LoRA adapter, frozen base") {
    LoRALinear<double> layer(7, 6, rng, true, "q");
    layer.add_adapter("d", dora_cfg(4, 3.0, 0.0, LoraInit::None, true));
    LoraConfig plain = dora_cfg(2, 5.0);
    plain.use_dora = false;
    layer.add_adapter("l", plain);
    layer.set_active({"d", "l"});
    layer.freeze_base();
    perturb_magnitude(layer, "d", rng);
    gradcheck_detached(layer, x, g, {"d", "l"});
    CHECK(layer.weight.grad.size() == 0);
  }
  SECTION("two DoRA adapters") {
    LoRALinear<double> layer(7, 6, rng, true, "q");
    layer.add_adapter("d1", dora_cfg(3, 7.0));
    layer.add_adapter("d2", dora_cfg(2, 1.0));
    layer.set_active({"d1", "d2"});
    perturb_magnitude(layer, "d1", rng);
    perturb_magnitude(layer, "d2", rng);
    gradcheck_detached(layer, x, g, {"d1", "d2"});
  }
  SECTION("dropout (train mode, masks from the cache), with and without a trainable base") {
    LoRALinear<double> layer(7, 6, rng, true, "q");
    layer.add_adapter("d", dora_cfg(3, 7.0, 0.3));
    LoraConfig plain = dora_cfg(2, 5.0, 0.2);
    plain.use_dora = false;
    layer.add_adapter("l", plain);
    layer.set_active({"d", "l"});
    perturb_magnitude(layer, "d", rng);
    layer.train();
    gradcheck_detached(layer, x, g, {"d", "l"});
    layer.freeze_base();
    gradcheck_detached(layer, x, g, {"d", "l"});
  }
  SECTION("only m trainable: x is not kept") {
    LoRALinear<double> layer(7, 6, rng, true, "q");
    layer.add_adapter("d", dora_cfg(3, 7.0));
    perturb_magnitude(layer, "d", rng);
    layer.freeze_base();
    layer.adapter("d").A.set_trainable(false);
    layer.adapter("d").B.set_trainable(false);
    typename LoRALinear<double>::Cache cache;
    layer.forward(x, cache);
    CHECK(cache.x.size() == 0);
    CHECK(cache.z.size() == 30);  // dm needs x Wᵀ
    gradcheck_detached(layer, x, g, {"d"});
  }
}

TEST_CASE("DoRA: dm equals the true derivative; dA differs from it (the norm is detached)", "[dora][gradcheck]") {
  Rng rng(34);
  LoRALinear<double> layer(6, 5, rng, true, "q");
  layer.add_adapter("d", dora_cfg(2, 3.0));
  perturb_magnitude(layer, "d", rng);
  Matrix<double> x = test::random_matrix<double>(4, 6, rng);
  const Matrix<double> g = test::random_matrix<double>(4, 5, rng);
  typename LoRALinear<double>::Cache cache;
  layer.forward(x, cache);
  layer.backward(cache, g, nullptr);
  auto true_loss = [&] {
    typename LoRALinear<double>::Cache c;
    return test::dot(g, layer.forward(x, c));
  };
  auto& a = layer.adapter("d");
  CHECK(relative_error(a.magnitude.grad, numerical_gradient(a.magnitude.value, true_loss)) < Tolerances<double>::grad);
  CHECK(relative_error(a.A.grad, numerical_gradient(a.A.value, true_loss)) > 1e-4);
}

TEMPLATE_TEST_CASE("DoRA merge == unmerged, unmerge restores W, safe merge refuses", "[dora][merge]", float, double) {
  Rng rng(35);
  LoRALinear<TestType> layer(9, 7, rng, true, "k");
  const Matrix<TestType> w0 = layer.weight.value;
  const Matrix<TestType> x = test::random_matrix<TestType>(5, 9, rng);
  typename LoRALinear<TestType>::Cache cache;

  SECTION("single DoRA adapter, plain and safe merge") {
    layer.add_adapter("d", dora_cfg(3, 5.0));
    perturb_magnitude(layer, "d", rng);
    const Matrix<TestType> unmerged = layer.forward(x, cache);
    for (bool safe : {false, true}) {
      if (safe)
        layer.safe_merge();
      else
        layer.merge();
      CHECK(layer.merged_adapters() == std::vector<std::string>{"d"});
      CHECK(test::rel_diff(layer.forward(x, cache), unmerged) < Tolerances<TestType>::rel);
      PEFT_REQUIRE_THROWS_WITH(layer.backward(cache, unmerged, nullptr), ConfigError, "while adapters are merged");
      layer.unmerge();
      CHECK(test::rel_diff(layer.weight.value, w0) < 1e-6);
      CHECK(test::rel_diff(layer.forward(x, cache), unmerged) < Tolerances<TestType>::rel);
    }
  }

  SECTION("LoRA merged first: the DoRA norm stays on W, unmerge restores W") {
    LoraConfig plain = dora_cfg(2, 4.0);
    plain.use_dora = false;
    layer.add_adapter("l", plain);
    layer.add_adapter("d", dora_cfg(3, 5.0));
    perturb_magnitude(layer, "d", rng);
    layer.set_active({"l", "d"});
    const Matrix<TestType> unmerged = layer.forward(x, cache);
    const RowVector<TestType> n = dense_norm(layer, "d");  // on W, nothing merged
    layer.merge({"l"});
    PEFT_REQUIRE_THROWS_WITH(layer.add_adapter("d2", dora_cfg(2, 1.0)), ConfigError,
                             "cannot add DoRA adapter \"d2\" while adapters are merged (l)");
    // d still runs unmerged, and its norm is still ‖W + s_d B_d A_d‖, not taken on W + s_l B_l A_l.
    CHECK(test::rel_diff(layer.dora_weight_norm("d"), n) < 10 * Tolerances<TestType>::rel);
    CHECK(test::rel_diff(layer.forward(x, cache), unmerged) < 10 * Tolerances<TestType>::rel);
    CHECK(test::rel_diff(cache.dora(0).norm, n) < 10 * Tolerances<TestType>::rel);
    layer.merge({"d"});
    CHECK(test::rel_diff(layer.forward(x, cache), unmerged) < 10 * Tolerances<TestType>::rel);
    layer.unmerge();
    CHECK(test::rel_diff(layer.weight.value, w0) < 10 * Tolerances<TestType>::rel);
  }

  SECTION("a zero magnitude or a poisoned factor is refused and W stays bit-identical") {
    layer.add_adapter("d", dora_cfg(3, 5.0));
    const Matrix<TestType> before = layer.weight.value;
    auto same = [&] {
      return std::memcmp(before.data(), layer.weight.value.data(),
                         sizeof(TestType) * static_cast<std::size_t>(before.size())) == 0;
    };
    layer.adapter("d").magnitude.value(0, 2) = TestType(0);
    PEFT_REQUIRE_THROWS_WITH(layer.safe_merge(), NumericError, "DoRA adapter \"d\" has a zero or non-finite scale");
    CHECK(same());
    PEFT_REQUIRE_THROWS_WITH(layer.merge(), NumericError, "nothing was merged");
    CHECK(same());
    CHECK_FALSE(layer.merged());
    layer.adapter("d").magnitude.value(0, 2) = TestType(1);
    layer.adapter("d").A.value(1, 1) = std::numeric_limits<TestType>::infinity();
    PEFT_REQUIRE_THROWS_WITH(layer.safe_merge(), NumericError, "\"d\"");
    CHECK(same());
    CHECK_FALSE(layer.merged());
  }

  SECTION("a failed plain merge undoes the merges done in the same call") {
    LoraConfig plain = dora_cfg(2, 4.0);
    plain.use_dora = false;
    layer.add_adapter("l", plain);
    layer.add_adapter("d", dora_cfg(3, 5.0));
    layer.adapter("d").magnitude.value(0, 0) = TestType(0);
    layer.set_active({"l", "d"});
    PEFT_REQUIRE_THROWS_WITH(layer.merge(), NumericError, "DoRA adapter \"d\"");
    CHECK_FALSE(layer.merged());
    CHECK(test::rel_diff(layer.weight.value, w0) < 1e-6);
  }
}

namespace {

/// The unmerged forward by its definition (see lora_linear.hpp): every DoRA norm on W₀,
///   y = x W₀ᵀ + b + Σ_LoRA s x Aᵀ Bᵀ + Σ_DoRA [(f − 1) ⊙ x W₀ᵀ + f ⊙ s x Aᵀ Bᵀ],  f = m / ‖W₀ + sBA‖.
template <class T>
Matrix<T> reference_forward(const LoRALinear<T>& layer, const Matrix<T>& w0, const Matrix<T>& x,
                            const std::vector<std::string>& names) {
  Matrix<T> y = x * w0.transpose();
  y.rowwise() += layer.bias.value.row(0);
  for (const auto& name : names) {
    const auto& a = layer.adapter(name);
    const Matrix<T> d = static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
    if (!a.dora()) {
      y += x * d.transpose();
      continue;
    }
    const RowVector<T> f = a.magnitude.value.row(0).array() / dense_norm_on(w0, layer, name).array();
    const Matrix<T> z = x * w0.transpose();
    const Matrix<T> u = z + x * d.transpose();
    y.array() += u.array().rowwise() * f.array() - z.array();
  }
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("DoRA merged == unmerged for every order and sequence of merges of {lora, dora1, dora2}",
                   "[dora][merge]", float, double) {
  Rng rng(38);
  LoRALinear<TestType> layer(9, 7, rng, true, "k");
  const Matrix<TestType> w0 = layer.weight.value;
  const Matrix<TestType> x = test::random_matrix<TestType>(5, 9, rng);
  LoraConfig plain = dora_cfg(2, 4.0);
  plain.use_dora = false;
  layer.add_adapter("l", plain);
  layer.add_adapter("d1", dora_cfg(3, 5.0));
  layer.add_adapter("d2", dora_cfg(2, 3.0, 0.0, LoraInit::None, true));
  perturb_magnitude(layer, "d1", rng);
  perturb_magnitude(layer, "d2", rng);
  layer.adapter("d2").B.value *= TestType(2);  // a large update: norms on W₀ and on W₀ + Δ differ a lot
  const std::vector<std::string> all{"l", "d1", "d2"};
  layer.set_active(all);
  typename LoRALinear<TestType>::Cache cache;
  const Matrix<TestType> unmerged = layer.forward(x, cache);
  REQUIRE(test::rel_diff(unmerged, reference_forward(layer, w0, x, all)) < 10 * Tolerances<TestType>::rel);
  // The merged weight by its definition: W₀ + Σ C_i, C = Δ (LoRA), f ⊙ (W₀ + Δ) − W₀ (DoRA).
  Matrix<TestType> w_eff = w0;
  for (const auto& name : all) {
    const auto& a = layer.adapter(name);
    const Matrix<TestType> d = layer.delta_weight(name);
    if (!a.dora()) {
      w_eff += d;
      continue;
    }
    const RowVector<TestType> f = a.magnitude.value.row(0).array() / dense_norm_on(w0, layer, name).array();
    w_eff.array() += (w0 + d).array().colwise() * f.transpose().array() - w0.array();
  }
  // The old rule (each DoRA norm on the weight with the earlier merges in it) is far from this.
  CHECK(test::rel_diff(reference_forward(layer, Matrix<TestType>(w0 + layer.delta_weight("l")), x, {"d1"}),
                       reference_forward(layer, w0, x, {"l", "d1"})) > 1e-3);
  const double tol = 100 * Tolerances<TestType>::rel;

  std::vector<std::string> order = all;
  std::sort(order.begin(), order.end());
  int orders = 0;
  do {
    INFO("order " << order[0] << ", " << order[1] << ", " << order[2]);
    for (bool safe : {false, true}) {
      INFO("safe " << safe);
      // One merge call with the adapters in this order.
      if (safe)
        layer.safe_merge(order);
      else
        layer.merge(order);
      CHECK(layer.merged_adapters() == order);
      CHECK(test::rel_diff(layer.weight.value, w_eff) < tol);
      CHECK(test::rel_diff(layer.forward(x, cache), unmerged) < tol);
      layer.unmerge();
      CHECK(test::rel_diff(layer.weight.value, w0) < tol);
      CHECK(test::rel_diff(layer.forward(x, cache), unmerged) < tol);
      // The same order as a sequence of single merge calls: every partial state equals unmerged.
      for (std::size_t k = 0; k < order.size(); ++k) {
        if (safe)
          layer.safe_merge({order[k]});
        else
          layer.merge({order[k]});
        CHECK(layer.merged_adapters() ==
              std::vector<std::string>(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k + 1)));
        CHECK(test::rel_diff(layer.forward(x, cache), unmerged) < tol);
        for (const char* d : {"d1", "d2"})
          CHECK(test::rel_diff(layer.dora_weight_norm(d), dense_norm_on(w0, layer, d)) < tol);
      }
      CHECK(test::rel_diff(layer.weight.value, w_eff) < tol);
      layer.unmerge();
      CHECK(test::rel_diff(layer.weight.value, w0) < tol);
      // One adapter first, then the rest of the active set in one call.
      layer.merge({order[0]});
      layer.merge();
      CHECK(test::rel_diff(layer.forward(x, cache), unmerged) < tol);
      CHECK(test::rel_diff(layer.weight.value, w_eff) < tol);
      layer.unmerge();
      CHECK(test::rel_diff(layer.weight.value, w0) < tol);
    }
    ++orders;
  } while (std::next_permutation(order.begin(), order.end()));
  CHECK(orders == 6);
  CHECK(test::rel_diff(layer.forward(x, cache), unmerged) < tol);
}

TEMPLATE_TEST_CASE("DoRA: a merge whose row scale 1 + sum(f - 1) is zero is refused, W unchanged", "[dora][merge]",
                   float, double) {
  Rng rng(39);
  LoRALinear<TestType> layer(6, 4, rng, true, "k");
  layer.add_adapter("d1", dora_cfg(2, 3.0));
  layer.add_adapter("d2", dora_cfg(2, 2.0));
  layer.set_active({"d1", "d2"});
  // f1 = f2 = 1/2 in row 1: g = 1 + (f1 − 1) + (f2 − 1) = 0 there, so the merged row would no
  // longer depend on W₀ and unmerge could not restore it.
  layer.adapter("d1").magnitude.value(0, 1) = layer.dora_weight_norm("d1")(1) / TestType(2);
  layer.adapter("d2").magnitude.value(0, 1) = layer.dora_weight_norm("d2")(1) / TestType(2);
  const Matrix<TestType> before = layer.weight.value;
  PEFT_REQUIRE_THROWS_WITH(layer.merge(), NumericError, "DoRA adapters \"d1\", \"d2\" have a zero or non-finite scale");
  CHECK(layer.weight.value == before);
  CHECK_FALSE(layer.merged());
  layer.merge({"d1"});  // alone: g = f1 = 1/2, invertible
  PEFT_REQUIRE_THROWS_WITH(layer.safe_merge({"d2"}), NumericError, "in row 1");
  PEFT_REQUIRE_THROWS_WITH(layer.merge({"d2"}), NumericError, "nothing was merged");
  CHECK(layer.merged_adapters() == std::vector<std::string>{"d1"});
  layer.unmerge();
  CHECK(test::rel_diff(layer.weight.value, before) < 10 * Tolerances<TestType>::rel);
}

TEST_CASE("DoRA parameters are named like PEFT's files", "[dora]") {
  Rng rng(36);
  LoRALinear<float> layer(6, 4, rng, false, "q");
  layer.add_adapter("default", dora_cfg(2, 2.0));
  std::vector<std::string> names;
  std::vector<std::vector<std::int64_t>> shapes;
  layer.visit_parameters([&](const std::string& n, Parameter<float>& p) {
    names.push_back(n);
    shapes.push_back(p.shape());
  });
  CHECK(names == std::vector<std::string>{"weight", "lora_A.default.weight", "lora_B.default.weight",
                                          "lora_magnitude_vector.default"});
  CHECK(shapes.back() == std::vector<std::int64_t>{4});
  CHECK(layer.adapter("default").magnitude.trainable());
}

TEST_CASE("DoRA: two forwards with two caches, then two backwards", "[dora]") {
  Rng rng(37);
  LoRALinear<double> layer(6, 4, rng, true, "q");
  layer.add_adapter("d", dora_cfg(2, 3.0));
  perturb_magnitude(layer, "d", rng);
  const Matrix<double> x1 = test::random_matrix<double>(3, 6, rng), x2 = test::random_matrix<double>(2, 6, rng);
  const Matrix<double> g1 = test::random_matrix<double>(3, 4, rng), g2 = test::random_matrix<double>(2, 4, rng);
  typename LoRALinear<double>::Cache c1, c2;
  Matrix<double> dx1, dx2, ex1, ex2;
  layer.zero_grad();
  layer.forward(x1, c1);
  layer.backward(c1, g1, &dx1);
  layer.forward(x2, c2);
  layer.backward(c2, g2, &dx2);
  const Matrix<double> gm = layer.adapter("d").magnitude.grad, ga = layer.adapter("d").A.grad;
  layer.zero_grad();
  layer.forward(x1, c1);
  layer.forward(x2, c2);
  layer.backward(c2, g2, &ex2);
  layer.backward(c1, g1, &ex1);
  CHECK(test::rel_diff(ex1, dx1) < 1e-14);
  CHECK(test::rel_diff(ex2, dx2) < 1e-14);
  CHECK(test::rel_diff(layer.adapter("d").magnitude.grad, gm) < 1e-14);
  CHECK(test::rel_diff(layer.adapter("d").A.grad, ga) < 1e-14);
}
