// The conformance table (conformance_cases.hpp) run through one set of checks, every method and
// variant alike (Hugging Face PEFT's TEST_CASES + common tester):
//   1. identity at init: forward == base, bit for bit, in eval and train mode
//   2. merged ≡ unmerged (one adapter, two adapters in both orders, partial and stacked merges,
//      safe_merge), unmerge restores W and b
//   3. gradient check in double (central differences) for dX and every trainable parameter, with a
//      frozen and with a trainable base, in eval mode and in train mode with the masks fixed
//   4. mixed batch ≡ one adapter per row run separately
//   5. disable gives the base bit for bit, re-enable the adapted output again
//   6. delete gives the base; re-adding the name works; delete is refused while merged
//   7. a copy gives identical outputs (train mode too: same dropout draws) and is independent
//   8. effective_delta(name) = W_merged − W₀ after merging that adapter alone
//
// Train-mode gradient checks with dropout: no method exposes a way to inject masks, but every mask
// is drawn from a generator that the layer owns (the host's for LoRA / DoRA, the kernel's for VeRA,
// LoHa, LoKr) and that a copy of the layer copies. So each loss evaluation runs on a fresh copy of
// one snapshot: every evaluation, and the analytic forward + backward, draw the same masks (and
// the same module-dropout skips).
//
// DoRA detaches its norm n = ‖W₀ + s·B·A‖_row in backward (paper §4.3, PEFT). Central differences
// of the true forward would see n move with A, B and W; the check holds n at its unperturbed value
// n₀ instead by rescaling the magnitude of each evaluated copy, m' = m ⊙ n(θ) / n₀, so that
// f = m' / n(θ) = m / n₀: the forward then is exactly the function whose gradient backward computes.
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <peft/layers/lora_mixed_batch.hpp>
#include <peft/train/gradient_check.hpp>

#include "layers/conformance_cases.hpp"

namespace conformance {

using peft::ConfigError;
using peft::test::Tolerances;
using Layer = AdaptedLinear<double>;
using Mat = Matrix<double>;

constexpr const char* kName = "case";   // the row's adapter
constexpr const char* kLora = "lora2";  // the plain LoRA next to it

/// Relative difference, 0 when both are exactly zero.
inline double rel(const Mat& a, const Mat& b) { return peft::test::rel_diff(a, b); }

inline Mat infer(Layer& layer, const Mat& x) {
  Mat y;
  layer.forward_inference(x, y);
  return y;
}

inline Mat train_forward(Layer& layer, const Mat& x) {
  typename Layer::Cache cache;
  Mat y;
  layer.forward(x, y, cache);
  return y;
}

/// A base, the same base with the row's adapter (perturbed unless `fresh`) and a plain LoRA
/// (perturbed) when `with_lora`; the row's adapter is active.
struct Fixture {
  Layer base;
  Layer layer;
  Mat x;
  Fixture(const Case& c, std::uint64_t seed, bool with_lora, bool fresh = false) {
    Rng rng(seed);
    base = make_base<double>(rng);
    base.eval();
    layer = base;
    if (with_lora) {
      layer.add_adapter(kLora, second_lora(), rng);
      perturb(layer, kLora, rng);
    }
    c.add(layer, kName, rng);
    if (!fresh) perturb(layer, kName, rng);
    x = peft::test::random_matrix<double>(kRows, kIn, rng);
  }
};

/// Trainable parameters by name (visit order).
inline std::vector<std::pair<std::string, Parameter<double>*>> trainable_parameters(Layer& layer) {
  std::vector<std::pair<std::string, Parameter<double>*>> v;
  layer.visit_parameters([&](const std::string& n, Parameter<double>& p) {
    if (p.trainable()) v.emplace_back(n, &p);
  });
  return v;
}

/// Finite differences of L = Σ g ⊙ y against backward, every evaluation on a copy of `snapshot`
/// (same masks, see the file comment). Checks dX and every trainable parameter.
inline void gradcheck(const Case& c, Layer& snapshot, Mat& x, const Mat& g, bool expect_nonzero) {
  peft::RowVector<double> n0;
  if (c.detached_norm) n0 = snapshot.dora_weight_norm(kName);
  auto evaluate = [&]() {
    Layer layer = snapshot;
    if (c.detached_norm) {  // hold n at n₀: m' = m ⊙ n(θ) / n₀
      const peft::RowVector<double> n = layer.dora_weight_norm(kName);
      Parameter<double>& m = layer.adapter(kName).magnitude;
      m.value.row(0).array() *= n.array() / n0.array();
    }
    return peft::test::dot(g, train_forward(layer, x));
  };

  // Analytic: forward + backward on a copy.
  Layer layer = snapshot;
  layer.zero_grad();
  typename Layer::Cache cache;
  Mat y, dx;
  layer.forward(x, y, cache);
  layer.backward(cache, g, &dx);
  std::map<std::string, Mat> grads;
  for (auto& [n, p] : trainable_parameters(layer)) grads[n] = p->grad;

  {
    INFO("dX");
    CHECK(peft::relative_error(dx, peft::numerical_gradient(x, evaluate)) < Tolerances<double>::grad);
  }
  const auto params = trainable_parameters(snapshot);
  REQUIRE(params.size() == grads.size());
  for (auto& [n, p] : params) {
    INFO("parameter " << n);
    REQUIRE(grads.count(n) == 1);
    const Mat numeric = peft::numerical_gradient(p->value, evaluate);
    CHECK(peft::relative_error(grads[n], numeric) < Tolerances<double>::grad);
    if (expect_nonzero) CHECK(grads[n].norm() > 1e-6);  // not vacuous
  }
}

// The checks: TEST_CASEs inside the namespace (no using-directive leaks into the unity batch).

TEST_CASE("conformance: identity at init", "[conformance]") {
  for (const Case& c : cases()) {
    INFO("case " << c.name);
    if (!c.identity_at_init) continue;
    Fixture f(c, 101, false, /*fresh=*/true);
    const Mat y_base = infer(f.base, f.x);
    f.layer.eval();
    CHECK(infer(f.layer, f.x) == y_base);
    CHECK(train_forward(f.layer, f.x) == y_base);
    f.layer.train();  // dropout draws: a zero term stays exactly zero
    CHECK(train_forward(f.layer, f.x) == y_base);
    CHECK(infer(f.layer, f.x) == y_base);
    // And the perturbed term is not zero (the checks below are not vacuous).
    Rng rng(7);
    perturb(f.layer, kName, rng);
    f.layer.eval();
    CHECK(rel(infer(f.layer, f.x), y_base) > 1e-3);
  }
}

TEST_CASE("conformance: merged equals unmerged; unmerge restores the base", "[conformance]") {
  const double tol = Tolerances<double>::rel;
  for (const Case& c : cases()) {
    INFO("case " << c.name);
    Fixture f(c, 202, true);
    Layer& layer = f.layer;
    layer.eval();
    const Mat w0 = layer.weight.value, b0 = layer.bias.value;
    auto restored = [&] {
      CHECK(!layer.merged());
      CHECK(rel(layer.weight.value, w0) < tol);
      CHECK(rel(layer.bias.value, b0) < tol);
    };

    // One adapter.
    layer.set_active(kName);
    const Mat y1 = infer(layer, f.x);
    layer.merge();
    CHECK(layer.merged_adapters() == std::vector<std::string>{kName});
    CHECK(rel(infer(layer, f.x), y1) < tol);
    CHECK(rel(train_forward(layer, f.x), y1) < tol);
    layer.unmerge();
    restored();
    CHECK(rel(infer(layer, f.x), y1) < tol);

    // Two adapters: both orders, partial and stacked merges.
    layer.set_active({kName, kLora});
    const Mat y2 = infer(layer, f.x);
    CHECK(rel(y2, y1) > 1e-6);
    const std::vector<std::vector<std::vector<std::string>>> plans = {
        {{kName, kLora}}, {{kLora, kName}}, {{kName}}, {{kLora}}, {{kName}, {kLora}}, {{kLora}, {kName}}};
    for (const auto& plan : plans) {
      std::string what;
      for (const auto& step : plan) {
        what += "[";
        for (const auto& n : step) what += n + " ";
        what += "]";
      }
      INFO("merge plan " << what);
      for (const auto& step : plan) {
        layer.merge(step);
        CHECK(rel(infer(layer, f.x), y2) < tol);
      }
      layer.unmerge();
      restored();
    }

    // safe_merge is merge.
    layer.merge({kName, kLora});
    const Mat w_merge = layer.weight.value, b_merge = layer.bias.value;
    layer.unmerge();
    layer.safe_merge({kName, kLora});
    CHECK(rel(layer.weight.value, w_merge) < tol);
    CHECK(rel(layer.bias.value, b_merge) < tol);
    CHECK(rel(infer(layer, f.x), y2) < tol);
    layer.unmerge();
    restored();
    layer.safe_merge({kLora});
    layer.safe_merge({kName});
    CHECK(rel(layer.weight.value, w_merge) < tol);
    CHECK(rel(infer(layer, f.x), y2) < tol);
    layer.unmerge();
    restored();
  }
}

TEST_CASE("conformance: backward matches finite differences", "[conformance][gradcheck]") {
  for (const Case& c : cases()) {
    INFO("case " << c.name);
    Fixture f(c, 303, false);
    Rng rng(33);
    const Mat g = peft::test::random_matrix<double>(kRows, kOut, rng);
    for (const bool train : {false, true}) {
      INFO((train ? "train mode" : "eval mode"));
      for (const bool base_trainable : {false, true}) {
        INFO((base_trainable ? "trainable base (weight, bias)" : "frozen base"));
        Layer snapshot = f.layer;
        snapshot.train(train);
        if (base_trainable) {
          snapshot.weight.set_trainable(true);
          snapshot.bias.set_trainable(true);
        } else {
          snapshot.freeze_base();
        }
        // With dropout, a few successive draws (module dropout may skip the term in one of them).
        const bool random = train && c.dropout;
        const int rounds = random ? 3 : 1;
        bool drawn = false;  // some round's forward differs from eval mode's
        Layer eval_twin = snapshot;
        eval_twin.eval();
        const Mat y_eval = infer(eval_twin, f.x);
        for (int k = 0; k < rounds; ++k) {
          INFO("draw " << k);
          Layer probe = snapshot;
          drawn = drawn || train_forward(probe, f.x) != y_eval;
          gradcheck(c, snapshot, f.x, g, !random);
          train_forward(snapshot, f.x);  // advances the generators: the next round draws anew
        }
        if (random) CHECK(drawn);
      }
    }
  }
}

TEST_CASE("conformance: mixed batch equals separate runs", "[conformance][mixed]") {
  const double tol = Tolerances<double>::rel;
  for (const Case& c : cases()) {
    INFO("case " << c.name);
    Fixture f(c, 404, true);
    Layer& layer = f.layer;
    layer.train();  // routing is inference: no dropout whatever the mode
    const std::vector<std::string> rows = {kName, kLora, "none", kName, kLora};
    peft::MixedBatchWorkspace<double> ws;
    Mat y;
    peft::forward_mixed(layer, f.x, rows, y, ws);

    layer.eval();
    Mat ref(kRows, kOut);
    for (Index r = 0; r < kRows; ++r) {
      const std::string& n = rows[static_cast<std::size_t>(r)];
      if (n == "none")
        layer.set_active(std::vector<std::string>{});
      else
        layer.set_active(n);
      ref.row(r) = infer(layer, f.x.row(r));
    }
    CHECK(rel(y, ref) < tol);
    CHECK(y.row(2) == infer(f.base, f.x).row(2));  // a "none" row is the base exactly

    // Again with reused buffers, a disabled layer (routing ignores the flag) and another routing.
    layer.disable_adapters();
    Mat y_again;
    peft::forward_mixed(layer, f.x, rows, y_again, ws);
    CHECK(y_again == y);
    layer.disable_adapters(false);
    const std::vector<std::string> all_case(kRows, kName);
    peft::forward_mixed(layer, f.x, all_case, y_again, ws);
    layer.set_active(kName);
    CHECK(rel(y_again, infer(layer, f.x)) < tol);
  }
}

TEST_CASE("conformance: disable gives the base, re-enable the adapter", "[conformance]") {
  for (const Case& c : cases()) {
    INFO("case " << c.name);
    Fixture f(c, 505, false);
    Layer& layer = f.layer;
    const Mat y_base = infer(f.base, f.x);
    layer.eval();
    const Mat y_on = infer(layer, f.x);
    REQUIRE(y_on != y_base);
    layer.disable_adapters();
    CHECK(layer.adapters_disabled());
    CHECK(infer(layer, f.x) == y_base);
    CHECK(train_forward(layer, f.x) == y_base);
    layer.train();  // no dropout draw reaches a disabled layer
    CHECK(train_forward(layer, f.x) == y_base);
    layer.eval();
    layer.disable_adapters(false);
    CHECK(infer(layer, f.x) == y_on);
    CHECK(train_forward(layer, f.x) == y_on);
    // Refused while merged; merging is refused while disabled.
    layer.merge();
    PEFT_REQUIRE_THROWS_WITH(layer.disable_adapters(), ConfigError, "merged");
    layer.unmerge();
    layer.disable_adapters();
    PEFT_REQUIRE_THROWS_WITH(layer.merge(), ConfigError, "disabled");
  }
}

TEST_CASE("conformance: delete and re-add", "[conformance]") {
  for (const Case& c : cases()) {
    INFO("case " << c.name);
    Fixture f(c, 606, true);
    Layer& layer = f.layer;
    layer.eval();
    const Mat y_base = infer(f.base, f.x);
    layer.set_active(kLora);
    const Mat y_lora = infer(layer, f.x);

    // Refused while merged, nothing changed. On a copy: unmerge restores W only to rounding
    // (W₀ is recovered by subtraction and division), and the checks below compare bit for bit.
    layer.set_active({kName, kLora});
    {
      Layer merged = layer;
      const Mat y_both = infer(merged, f.x);
      merged.merge({kName});
      PEFT_REQUIRE_THROWS_WITH(merged.delete_adapter(kName), ConfigError, "is merged");
      CHECK(merged.num_adapters() == 2);
      CHECK(merged.merged_adapters() == std::vector<std::string>{kName});
      CHECK(rel(infer(merged, f.x), y_both) < Tolerances<double>::rel);
      merged.unmerge();
      merged.delete_adapter(kName);
      CHECK(merged.num_adapters() == 1);
    }

    // Delete: the other adapter (its index shifted) still works, its output alone remains.
    layer.delete_adapter(kName);
    CHECK(layer.num_adapters() == 1);
    CHECK(!layer.has_adapter(kName));
    CHECK(layer.adapter_index(kLora) == 0);
    CHECK(layer.active_adapters() == std::vector<std::string>{kLora});
    CHECK(infer(layer, f.x) == y_lora);
    layer.visit_parameters([&](const std::string& n, Parameter<double>&) {
      INFO("parameter " << n);
      CHECK(n.find(std::string(".") + kName) == std::string::npos);
    });
    layer.delete_adapter(kLora);
    CHECK(layer.num_adapters() == 0);
    CHECK(infer(layer, f.x) == y_base);
    CHECK(train_forward(layer, f.x) == y_base);

    // Re-add under the same name: identity at init again, and a working adapter once perturbed.
    Rng rng(66);
    c.add(layer, kName, rng);
    CHECK(layer.active_adapters() == std::vector<std::string>{kName});
    if (c.identity_at_init) CHECK(infer(layer, f.x) == y_base);
    perturb(layer, kName, rng);
    CHECK(rel(infer(layer, f.x), y_base) > 1e-3);
    PEFT_REQUIRE_THROWS_WITH(c.add(layer, kName, rng), ConfigError, "already exists");
  }
}

TEST_CASE("conformance: a copy is identical and independent", "[conformance]") {
  for (const Case& c : cases()) {
    INFO("case " << c.name);
    Fixture f(c, 707, true);
    Layer& layer = f.layer;
    layer.set_active({kName, kLora});
    layer.eval();
    const Mat y = infer(layer, f.x);

    Layer copy = layer;
    CHECK(infer(copy, f.x) == y);
    Layer assigned;
    assigned = layer;
    CHECK(infer(assigned, f.x) == y);

    // Train mode: the copy carries the generators' state, so it draws the same masks.
    layer.train();
    Layer twin = layer;
    CHECK(train_forward(twin, f.x) == train_forward(layer, f.x));
    CHECK(train_forward(twin, f.x) == train_forward(layer, f.x));
    layer.eval();

    // VeRA: the frozen projections are shared (one pair per model), not duplicated.
    if (c.method == Method::VeRA) {
      using Vera = peft::KernelMethod<double, peft::VeraAdapter<double>>;
      const auto* a = dynamic_cast<const Vera*>(&layer.method(kName));
      const auto* b = dynamic_cast<const Vera*>(&copy.method(kName));
      REQUIRE(a != nullptr);
      REQUIRE(b != nullptr);
      CHECK(a->kernel().projections().get() == b->kernel().projections().get());
    }

    // Changing the copy (its adapters and its base) leaves the original alone, and back.
    Rng rng(77);
    perturb(copy, kName, rng);
    perturb(copy, kLora, rng);
    CHECK(rel(infer(copy, f.x), y) > 1e-3);
    CHECK(infer(layer, f.x) == y);
    copy.weight.value.array() += 0.5;
    copy.bias.value.array() += 0.5;
    copy.delete_adapter(kLora);
    CHECK(infer(layer, f.x) == y);
    CHECK(layer.num_adapters() == 2);
    // Gradients accumulate into the copy's parameters only.
    copy.weight.set_trainable(true);
    typename Layer::Cache cache;
    Mat yc, dx;
    copy.forward(f.x, yc, cache);
    copy.backward(cache, Mat::Ones(kRows, kOut), &dx);
    layer.visit_parameters([&](const std::string& n, Parameter<double>& p) {
      INFO("parameter " << n);
      if (p.trainable()) CHECK(p.grad.isZero(0.0));
    });
    const Mat y_copy = infer(copy, f.x);
    perturb(layer, kName, rng);
    CHECK(infer(copy, f.x) == y_copy);
  }
}

TEST_CASE("conformance: effective_delta is what merging adds", "[conformance]") {
  const double tol = Tolerances<double>::rel;
  for (const Case& c : cases()) {
    INFO("case " << c.name);
    Fixture f(c, 808, true);
    Layer& layer = f.layer;
    const Mat w0 = layer.weight.value;
    const Mat delta = layer.effective_delta(kName);
    CHECK(delta.norm() > 1e-3);
    layer.merge({kName});
    CHECK(rel(Mat(layer.weight.value - w0), delta) < tol);
    // Also while merged (computed on the recovered W₀).
    CHECK(rel(layer.effective_delta(kName), delta) < tol);
    layer.unmerge();

    // With another adapter merged first: still on W₀, and still what merging it adds.
    layer.merge({kLora});
    const Mat w_lora = layer.weight.value;
    CHECK(rel(layer.effective_delta(kName), delta) < tol);
    layer.merge({kName});
    CHECK(rel(Mat(layer.weight.value - w_lora), delta) < tol);
    layer.unmerge();
    CHECK(rel(layer.weight.value, w0) < tol);
  }
}

}  // namespace conformance
