// NF4LoRALinear (the adapted-linear host on an NF4 base) against LoRALinear built on the
// dequantized weight (the equivalence that defines QLoRA's layer), finite-difference gradients,
// merge/re-quantize and error paths; then every method of the conformance table on an NF4 base.
#include <map>

#include <peft/core/parameters.hpp>
#include <peft/layers/lora_linear.hpp>
#include <peft/quant/nf4_lora_linear.hpp>
#include <peft/train/gradient_check.hpp>

#include "layers/conformance_cases.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {

LoraConfig config(int r, double alpha, double dropout = 0.0) {
  LoraConfig c;
  c.r = r;
  c.alpha = alpha;
  c.dropout = dropout;
  c.init = LoraInit::None;  // non-zero B so the adapter path is exercised
  return c;
}

// The NF4 layer and a dense LoRALinear on deq(Q) with identical adapters.
template <class T>
struct Pair {
  NF4LoRALinear<T> q;
  LoRALinear<T> dense;
};

template <class T>
Pair<T> make_pair(Index in, Index out, Index tile, bool with_bias, std::uint64_t seed, bool dq = true) {
  Rng rng(seed);
  const Linear<T> base(in, out, rng, with_bias);
  quant::NF4Options opt;
  opt.double_quant = dq;
  NF4LoRALinear<T> q = quantize_linear(base, opt, "layers.0.q");
  q.set_tile_rows(tile);
  q.add_adapter("default", config(3, 5.0), rng);
  q.add_adapter("other", config(2, 2.0), rng);
  q.set_active(std::vector<std::string>{"default", "other"});
  RowVector<T> b;
  if (with_bias) b = base.bias.value.row(0);
  LoRALinear<T> dense(Linear<T>(q.dequantized_weight(), b), "dense");
  dense.freeze_base();
  for (const auto& a : q.adapters()) {
    LoraAdapter<T>& d = dense.add_adapter(a.name, a.config, rng);
    d.A.value = a.A.value;
    d.B.value = a.B.value;
  }
  dense.set_active(std::vector<std::string>{"default", "other"});
  return {std::move(q), std::move(dense)};
}

}  // namespace

TEMPLATE_TEST_CASE("NF4LoRALinear equals LoRALinear on the dequantized weight", "[quant][nf4_lora]", float, double) {
  for (Index tile : {3, 4, 128}) {  // ragged tiles, exact tiles, one tile
    Pair<TestType> p = make_pair<TestType>(70, 12, tile, true, 21);
    Rng rng(22);
    const Matrix<TestType> x = test::random_matrix<TestType>(5, 70, rng);
    const Matrix<TestType> g = test::random_matrix<TestType>(5, 12, rng);
    typename NF4LoRALinear<TestType>::Cache cq;
    typename LoRALinear<TestType>::Cache cd;
    const Matrix<TestType> yq = p.q.forward(x, cq);
    const Matrix<TestType> yd = p.dense.forward(x, cd);
    INFO("tile " << tile);
    CHECK(test::rel_diff(yq, yd) < Tolerances<TestType>::rel);
    Matrix<TestType> dxq, dxd;
    p.q.backward(cq, g, &dxq);
    p.dense.backward(cd, g, &dxd);
    CHECK(test::rel_diff(dxq, dxd) < Tolerances<TestType>::rel);
    for (const std::string n : {"default", "other"}) {
      CHECK(test::rel_diff(p.q.adapter(n).A.grad, p.dense.adapter(n).A.grad) < Tolerances<TestType>::rel);
      CHECK(test::rel_diff(p.q.adapter(n).B.grad, p.dense.adapter(n).B.grad) < Tolerances<TestType>::rel);
    }
  }
}

TEST_CASE("NF4LoRALinear backward matches finite differences", "[quant][nf4_lora][gradcheck]") {
  Pair<double> p = make_pair<double>(9, 7, 2, true, 23, false);
  p.q.bias.set_trainable(true);
  Rng rng(24);
  Matrix<double> x = test::random_matrix<double>(4, 9, rng);
  const Matrix<double> g = test::random_matrix<double>(4, 7, rng);
  auto loss = [&] {
    typename NF4LoRALinear<double>::Cache c;
    return test::dot(g, p.q.forward(x, c));
  };
  typename NF4LoRALinear<double>::Cache cache;
  p.q.forward(x, cache);
  Matrix<double> dx;
  p.q.backward(cache, g, &dx);
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(p.q.bias.grad, numerical_gradient(p.q.bias.value, loss)) < Tolerances<double>::grad);
  for (const std::string n : {"default", "other"}) {
    LoraAdapter<double>& a = p.q.adapter(n);
    CHECK(relative_error(a.A.grad, numerical_gradient(a.A.value, loss)) < Tolerances<double>::grad);
    CHECK(relative_error(a.B.grad, numerical_gradient(a.B.value, loss)) < Tolerances<double>::grad);
  }
}

TEST_CASE("NF4LoRALinear with dropout: gradients are those of the masked forward", "[quant][nf4_lora][gradcheck]") {
  Rng rng(25);
  const Linear<double> base(8, 6, rng, false);
  NF4LoRALinear<double> q = quantize_linear(base);
  q.add_adapter("d", config(2, 3.0, 0.5), rng);
  Matrix<double> x = test::random_matrix<double>(3, 8, rng);
  const Matrix<double> g = test::random_matrix<double>(3, 6, rng);
  typename NF4LoRALinear<double>::Cache cache;
  q.forward(x, cache);
  REQUIRE(cache.lora(0).keep.size() == 24);
  Matrix<double> dx;
  q.backward(cache, g, &dx);
  // The same mask, applied by hand: y = x Wᵀ + s ((x ⊙ M) Aᵀ) Bᵀ.
  const Matrix<double> w = q.dequantized_weight();
  const Matrix<double> mask = cache.lora(0).keep;
  const LoraAdapter<double>& a = q.adapter("d");
  auto loss = [&] {
    const Matrix<double> xm = x.cwiseProduct(mask);
    const Matrix<double> y = x * w.transpose() + a.scaling() * (xm * a.A.value.transpose()) * a.B.value.transpose();
    return test::dot(g, y);
  };
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(a.A.grad, numerical_gradient(q.adapter("d").A.value, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(a.B.grad, numerical_gradient(q.adapter("d").B.value, loss)) < Tolerances<double>::grad);
}

TEST_CASE("NF4LoRALinear: rank above min(in, out) is legal, warned, and exact", "[quant][nf4_lora][gradcheck]") {
  Pair<double> p = make_pair<double>(9, 7, 2, true, 23, false);
  std::vector<std::string> seen;
  const ScopedWarningHandler guard([&](const std::string& w) { seen.push_back(w); });
  Rng rng(31);
  const LoraAdapter<double>& w = p.q.add_adapter("wide", config(9, 4.0), rng);  // r = 9 > min(9, 7) = 7
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].find("\"layers.0.q\": rank r = 9 exceeds min(in, out) = min(9, 7) = 7") != std::string::npos);
  LoraAdapter<double>& d = p.dense.add_adapter("wide", w.config, rng);
  d.A.value = w.A.value;
  d.B.value = w.B.value;
  p.q.set_active(std::vector<std::string>{"default", "wide"});
  p.dense.set_active(std::vector<std::string>{"default", "wide"});
  Matrix<double> x = test::random_matrix<double>(4, 9, rng);
  const Matrix<double> g = test::random_matrix<double>(4, 7, rng);
  auto loss = [&] {
    typename NF4LoRALinear<double>::Cache c;
    return test::dot(g, p.q.forward(x, c));
  };
  typename NF4LoRALinear<double>::Cache cache;
  typename LoRALinear<double>::Cache cd;
  CHECK(test::rel_diff(p.q.forward(x, cache), p.dense.forward(x, cd)) < Tolerances<double>::rel);
  Matrix<double> dx;
  p.q.backward(cache, g, &dx);
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  LoraAdapter<double>& a = p.q.adapter("wide");
  CHECK(relative_error(a.A.grad, numerical_gradient(a.A.value, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(a.B.grad, numerical_gradient(a.B.value, loss)) < Tolerances<double>::grad);
  // The dense merge of deq(Q) + Σ s·B·A is the forward's weight.
  CHECK(test::rel_diff(p.q.merged_weight(), Matrix<double>(p.dense.weight.value + p.dense.delta_weight("default") +
                                                           p.dense.delta_weight("wide"))) < Tolerances<double>::rel);
}

TEST_CASE("NF4LoRALinear exposes only trainable tensors and accumulates gradients", "[quant][nf4_lora]") {
  Pair<double> p = make_pair<double>(16, 8, 8, true, 26);
  std::vector<std::string> names;
  for (const auto& np : named_parameters(p.q)) names.push_back(np.name);
  CHECK(names == std::vector<std::string>{"bias", "lora_A.default.weight", "lora_B.default.weight",
                                          "lora_A.other.weight", "lora_B.other.weight"});
  CHECK(count_parameters(p.q).trainable == 3 * 16 + 8 * 3 + 2 * 16 + 8 * 2);
  CHECK(p.q.quantized_weight().shape == std::vector<std::int64_t>{8, 16});
  CHECK(p.q.bias.grad.size() == 0);  // frozen bias: no gradient buffer
  Rng rng(27);
  const Matrix<double> x = test::random_matrix<double>(2, 16, rng);
  const Matrix<double> g = test::random_matrix<double>(2, 8, rng);
  typename NF4LoRALinear<double>::Cache c1, c2;
  p.q.forward(x, c1);
  p.q.forward(2.0 * x, c2);  // two caches over shared weights
  p.q.backward(c1, g, nullptr);
  const Matrix<double> once = p.q.adapter("default").B.grad;
  p.q.backward(c2, g, nullptr);
  CHECK(test::rel_diff(p.q.adapter("default").B.grad, Matrix<double>(3.0 * once)) < 1e-12);  // += and linear in x
}

TEMPLATE_TEST_CASE("NF4LoRALinear merge: dense deq(Q) + sBA, or re-quantized with the added error", "[quant][nf4_lora]",
                   float, double) {
  Pair<TestType> p = make_pair<TestType>(64, 10, 4, false, 28);
  Matrix<TestType> expected = p.q.dequantized_weight();
  for (const auto& a : p.q.adapters()) expected += static_cast<TestType>(a.scaling()) * (a.B.value * a.A.value);
  const Matrix<TestType> merged = p.q.merged_weight();
  CHECK(test::rel_diff(merged, expected) < Tolerances<TestType>::rel);

  Rng rng(29);
  const Matrix<TestType> x = test::random_matrix<TestType>(3, 64, rng);
  typename NF4LoRALinear<TestType>::Cache c;
  const Matrix<TestType> before = p.q.forward(x, c);
  const quant::NF4Options layout = p.q.quant_options();
  const auto rep = p.q.merge_and_requantize();
  CHECK(rep.merged == std::vector<std::string>{"default", "other"});
  CHECK(p.q.quantized_weight().blocksize == layout.blocksize);  // the base's layout is kept
  CHECK(p.q.quantized_weight().nested == layout.double_quant);
  CHECK(p.q.adapters().empty());
  const Matrix<TestType> requant = p.q.dequantized_weight();
  CHECK(rep.added_error == Approx((requant - merged).template cast<double>().norm()).epsilon(1e-5));
  CHECK(rep.relative_error == Approx(rep.added_error / merged.template cast<double>().norm()).epsilon(1e-9));
  CHECK(rep.added_error > 0.0);
  CHECK(rep.relative_error < 0.2);  // one NF4 rounding of the merged weight
  const Matrix<TestType> after = p.q.forward(x, c);
  CHECK(test::rel_diff(after, Matrix<TestType>(x * requant.transpose())) < Tolerances<TestType>::rel);
  CHECK(test::rel_diff(after, before) < 0.2);
  PEFT_REQUIRE_THROWS_WITH(p.q.merge_and_requantize(), ConfigError, "no active adapter to merge");
}

TEST_CASE("NF4LoRALinear rejects bad input with named errors", "[quant][nf4_lora][errors]") {
  Pair<float> p = make_pair<float>(16, 8, 4, true, 30);
  typename NF4LoRALinear<float>::Cache c;
  PEFT_REQUIRE_THROWS_WITH(p.q.forward(Matrix<float>::Zero(2, 15), c), ShapeError,
                           "NF4LoRALinear \"layers.0.q\": input has 15 features, expected 16");
  p.q.forward(Matrix<float>::Zero(2, 16), c);
  PEFT_REQUIRE_THROWS_WITH(p.q.backward(c, Matrix<float>::Zero(2, 7), nullptr), ShapeError, "expected [2, 8]");
  p.q.set_active("default");
  PEFT_REQUIRE_THROWS_WITH(p.q.backward(c, Matrix<float>::Zero(2, 8), nullptr), ConfigError, "run forward again");
  PEFT_REQUIRE_THROWS_WITH(p.q.set_tile_rows(0), ConfigError, "tile_rows must be > 0, got 0");
  LoraConfig dora{4, 8.0};
  dora.use_dora = true;
  CHECK(std::string(p.q.add_adapter("dora", dora).config.use_dora ? "DoRA" : "LoRA") == "DoRA");  // now hosted
  CHECK(std::string(p.q.method("dora").kind()) == "DoRA");
  p.q.delete_adapter("dora");
  p.q.set_active("default");
  p.q.forward(Matrix<float>::Zero(2, 16), c);
  p.q.weight.set_trainable(true);  // the empty dense weight: training it is refused, not crashed on
  PEFT_REQUIRE_THROWS_WITH(p.q.forward(Matrix<float>::Zero(2, 16), c), ConfigError,
                           "NF4LoRALinear \"layers.0.q\": the NF4 base is frozen");
  p.q.weight.set_trainable(false);
  PEFT_REQUIRE_THROWS_WITH(LoRALinear<float>().quant_options(), ConfigError, "the base is dense, not NF4");
  PEFT_REQUIRE_THROWS_WITH(
      LoRALinear<float>(Linear<float>(Matrix<float>::Ones(2, 3), RowVector<float>())).merge_and_requantize(),
      ConfigError, "merge_and_requantize needs an NF4 base");
  PEFT_REQUIRE_THROWS_WITH(p.q.add_adapter("default"), ConfigError, "adapter \"default\" already exists");
  PEFT_REQUIRE_THROWS_WITH(p.q.add_adapter("zero", config(0, 1.0)), ConfigError, "rank r must be >= 1, got 0");
  PEFT_REQUIRE_THROWS_WITH(p.q.adapter("nope"), ConfigError, "unknown adapter \"nope\"; available: [default, other]");
  std::vector<float> v(64, 0.25f);
  PEFT_REQUIRE_THROWS_WITH(NF4LoRALinear<float>(quant::quantize_nf4(v.data(), {64})), ShapeError, "must be 2-D");
  quant::NF4Tensor broken = p.q.quantized_weight();
  broken.packed.resize(10);
  PEFT_REQUIRE_THROWS_WITH(NF4LoRALinear<float>(broken, RowVector<float>(), "l"), ShapeError,
                           "NF4LoRALinear \"l\": packed weight has 10 bytes, expected 64");
  PEFT_REQUIRE_THROWS_WITH(NF4LoRALinear<float>(p.q.quantized_weight(), RowVector<float>::Zero(5)), ShapeError,
                           "bias has shape [1, 5], expected [1, 8]");
  typename NF4LoRALinear<float>::Cache never_filled;
  PEFT_REQUIRE_THROWS_WITH(p.q.backward(never_filled, Matrix<float>::Zero(2, 8), nullptr), ConfigError,
                           "no forward filled");
  // A frozen during forward keeps no input; unfreezing it before backward must not reuse a stale
  // input of the same shape from an earlier call.
  p.q.forward(Matrix<float>::Ones(2, 16), c);
  p.q.adapter("default").A.set_trainable(false);
  p.q.forward(Matrix<float>::Zero(2, 16), c);
  p.q.adapter("default").A.set_trainable(true);
  PEFT_REQUIRE_THROWS_WITH(p.q.backward(c, Matrix<float>::Zero(2, 8), nullptr), ShapeError,
                           "cached input (was a parameter unfrozen after forward?)");
  NF4LoRALinear<float> empty;  // no weight: nothing to read, a clear error instead
  CHECK(empty.in_features() == 0);
  CHECK(empty.out_features() == 0);
  PEFT_REQUIRE_THROWS_WITH(empty.forward(Matrix<float>::Zero(2, 1), c), ConfigError, "has no weight");
}

// ---- every method on an NF4 base (the conformance table's rows) ----------------------------------

namespace nf4_methods {

using conformance::Case;
using conformance::kIn;
using conformance::kOut;
using conformance::kRows;

constexpr std::uint64_t kSeed = 0x4f4;  // both hosts' dropout generator: the same masks

/// An NF4 host [8, 12] with bias (tile of 3 rows: ragged tiles), a perturbed plain LoRA "lora2" and
/// the row's adapter "case" (perturbed), both active; and the dense host on deq(Q) with clones of
/// both adapters (same values, same generators).
template <class T>
struct Hosts {
  AdaptedLinear<T> q, dense;
  Matrix<T> x;
  Hosts(const Case& c, std::uint64_t seed) {
    Rng rng(seed);
    const Linear<T> base(kIn, kOut, rng, true);
    q = quantize_linear(base, quant::NF4Options{}, "layers.0.q");
    q.set_tile_rows(3);
    q.add_adapter("lora2", conformance::second_lora(), rng);
    conformance::perturb(q, "lora2", rng);
    c.add(q, "case", rng);
    conformance::perturb(q, "case", rng);
    q.set_active({"case", "lora2"});
    dense = AdaptedLinear<T>(Linear<T>(q.dequantized_weight(), base.bias.value.row(0)), "dense", kSeed);
    dense.freeze_base();
    for (const auto& m : q.methods()) dense.add_adapter(m.clone());
    dense.set_active({"case", "lora2"});
    x = test::random_matrix<T>(kRows, kIn, rng);
  }
};

/// Gradients of every trainable parameter, by name.
template <class T>
std::map<std::string, Matrix<T>> nf4_grads(AdaptedLinear<T>& layer) {
  std::map<std::string, Matrix<T>> g;
  layer.visit_parameters([&](const std::string& n, Parameter<T>& p) {
    if (p.trainable()) g[n] = p.grad;
  });
  return g;
}

}  // namespace nf4_methods

TEMPLATE_TEST_CASE("NF4 base: every method's forward and gradients equal the dense host's on deq(Q)",
                   "[quant][nf4_lora][conformance]", float, double) {
  using T = TestType;
  for (const conformance::Case& c : conformance::cases()) {
    for (const bool train : {false, true}) {
      INFO("case " << c.name << (train ? ", train mode" : ", eval mode"));
      nf4_methods::Hosts<T> h(c, 41);
      h.q.train(train);
      h.dense.train(train);
      Rng grng(42);
      const Matrix<T> g = test::random_matrix<T>(nf4_methods::kRows, nf4_methods::kOut, grng);
      typename AdaptedLinear<T>::Cache cq, cd;
      Matrix<T> yq, yd, dxq, dxd;
      h.q.forward(h.x, yq, cq);
      h.dense.forward(h.x, yd, cd);
      CHECK(test::rel_diff(yq, yd) < 10 * Tolerances<T>::rel);
      h.q.backward(cq, g, &dxq);
      h.dense.backward(cd, g, &dxd);
      CHECK(test::rel_diff(dxq, dxd) < 10 * Tolerances<T>::rel);
      const auto gq = nf4_methods::nf4_grads(h.q);
      const auto gd = nf4_methods::nf4_grads(h.dense);
      REQUIRE(gq.size() == gd.size());
      for (const auto& kv : gq) {
        INFO("parameter " << kv.first);
        REQUIRE(gd.count(kv.first) == 1);
        CHECK(test::rel_diff(kv.second, gd.at(kv.first)) < 10 * Tolerances<T>::rel);
      }
      // Inference path too.
      Matrix<T> yi;
      h.q.forward_inference(h.x, yi);
      if (!train) CHECK(test::rel_diff(yi, yd) < 10 * Tolerances<T>::rel);
    }
  }
}

TEST_CASE("NF4 base: every method's backward matches finite differences", "[quant][nf4_lora][conformance][gradcheck]") {
  for (const conformance::Case& c : conformance::cases()) {
    INFO("case " << c.name);
    nf4_methods::Hosts<double> h(c, 43);
    AdaptedLinear<double>& snapshot = h.q;
    snapshot.eval();  // deterministic (dropout off); the masked paths are compared with the dense host above
    Rng rng(44);
    Matrix<double> x = test::random_matrix<double>(nf4_methods::kRows, nf4_methods::kIn, rng);
    const Matrix<double> g = test::random_matrix<double>(nf4_methods::kRows, nf4_methods::kOut, rng);
    RowVector<double> n0;
    if (c.detached_norm) n0 = snapshot.dora_weight_norm("case");
    auto evaluate = [&]() {
      AdaptedLinear<double> layer = snapshot;
      if (c.detached_norm) {  // DoRA's norm is a constant in backward (PEFT's detach): hold it at n₀
        const RowVector<double> n = layer.dora_weight_norm("case");
        layer.adapter("case").magnitude.value.row(0).array() *= n.array() / n0.array();
      }
      typename AdaptedLinear<double>::Cache cc;
      return test::dot(g, layer.forward(x, cc));
    };
    AdaptedLinear<double> layer = snapshot;
    layer.zero_grad();
    typename AdaptedLinear<double>::Cache cache;
    Matrix<double> y, dx;
    layer.forward(x, y, cache);
    layer.backward(cache, g, &dx);
    CHECK(relative_error(dx, numerical_gradient(x, evaluate)) < Tolerances<double>::grad);
    const auto grads = nf4_methods::nf4_grads(layer);
    snapshot.visit_parameters([&](const std::string& n, Parameter<double>& p) {
      if (!p.trainable()) return;
      INFO("parameter " << n);
      REQUIRE(grads.count(n) == 1);
      CHECK(relative_error(grads.at(n), numerical_gradient(p.value, evaluate)) < Tolerances<double>::grad);
      CHECK(grads.at(n).norm() > 1e-6);  // not vacuous
    });
  }
}

TEMPLATE_TEST_CASE("NF4 base: merge and unmerge re-quantize within the measured rounding error",
                   "[quant][nf4_lora][conformance][merge]", float, double) {
  using T = TestType;
  for (const conformance::Case& c : conformance::cases()) {
    INFO("case " << c.name);
    nf4_methods::Hosts<T> h(c, 45);
    h.q.eval();
    const Matrix<T> q0 = h.q.dequantized_weight(), b0 = h.q.bias.value;
    Matrix<T> y_unmerged, y_merged, y_back;
    h.q.forward_inference(h.x, y_unmerged);
    const Matrix<T> expect = h.q.merged_weight();  // W₀ + Σ C_i, what the dense host merges to
    h.dense.merge();
    CHECK(test::rel_diff(expect, h.dense.weight.value) < 10 * Tolerances<T>::rel);

    h.q.merge();
    CHECK(h.q.merged_adapters() == std::vector<std::string>{"case", "lora2"});
    const double merge_err = h.q.last_requantize().added_error;
    CHECK(merge_err == Approx((h.q.dequantized_weight() - expect).template cast<double>().norm()).epsilon(1e-4));
    CHECK(h.q.last_requantize().relative_error < 0.2);
    // y_merged − y_unmerged = x (deq(Q') − W)ᵀ: bounded by ‖x‖_F · added_error.
    h.q.forward_inference(h.x, y_merged);
    const double bound = h.x.template cast<double>().norm() * merge_err +
                         10 * Tolerances<T>::rel * y_unmerged.template cast<double>().norm();
    CHECK((y_merged - y_unmerged).template cast<double>().norm() <= bound);
    // The bias is dense: merged exactly as on the dense host.
    CHECK(test::rel_diff(h.q.bias.value, h.dense.bias.value) < 10 * Tolerances<T>::rel);

    h.q.unmerge();
    CHECK(!h.q.merged());
    const double unmerge_err = h.q.last_requantize().added_error;
    // Back to deq(Q₀) within the two roundings (each divided by at most the gains' divisor).
    const double back = (h.q.dequantized_weight() - q0).template cast<double>().norm();
    CHECK(back <= 3.0 * (merge_err + unmerge_err) + 10 * Tolerances<T>::rel * q0.template cast<double>().norm());
    CHECK(test::rel_diff(h.q.bias.value, b0) < 10 * Tolerances<T>::rel);
    h.q.forward_inference(h.x, y_back);
    CHECK((y_back - y_unmerged).template cast<double>().norm() <=
          h.x.template cast<double>().norm() * back +
              10 * Tolerances<T>::rel * y_unmerged.template cast<double>().norm());
    // Training on the (re-quantized) unmerged base works again.
    typename AdaptedLinear<T>::Cache cache;
    Matrix<T> y, dx;
    h.q.forward(h.x, y, cache);
    h.q.backward(cache, y, &dx);
    CHECK(dx.allFinite());
  }
}

TEST_CASE("NF4 base: one adapter merged while another runs unmerged reads the recovered W0",
          "[quant][nf4_lora][conformance][merge]") {
  for (const conformance::Case& c : conformance::cases()) {
    INFO("case " << c.name);
    nf4_methods::Hosts<double> h(c, 46);
    h.q.eval();
    Matrix<double> y0, y1;
    h.q.forward_inference(h.x, y0);
    h.q.merge({"lora2"});
    const double err = h.q.last_requantize().added_error;
    h.q.forward_inference(h.x, y1);  // "case" unmerged on W₀ recovered from deq(Q')
    // Both terms see W₀ off by the rounding: a loose, measured bound (DoRA's and (IA)³'s gains ~1).
    CHECK((y1 - y0).norm() <= 3.0 * h.x.norm() * err + 1e-9 * y0.norm());
    h.q.unmerge();
  }
}

TEMPLATE_TEST_CASE("NF4 base: merge_and_requantize folds any method into the base",
                   "[quant][nf4_lora][conformance][merge]", float, double) {
  using T = TestType;
  for (const conformance::Case& c : conformance::cases()) {
    INFO("case " << c.name);
    nf4_methods::Hosts<T> h(c, 47);
    h.q.eval();
    Matrix<T> before, after;
    h.q.forward_inference(h.x, before);
    const Matrix<T> w = h.q.merged_weight();
    const auto rep = h.q.merge_and_requantize();
    CHECK(rep.merged == std::vector<std::string>{"lora2", "case"});  // insertion order
    CHECK(h.q.num_adapters() == 0);
    CHECK(!h.q.merged());
    CHECK(rep.added_error == Approx((h.q.dequantized_weight() - w).template cast<double>().norm()).epsilon(1e-4));
    h.q.forward_inference(h.x, after);
    CHECK((after - before).template cast<double>().norm() <=
          h.x.template cast<double>().norm() * rep.added_error +
              10 * Tolerances<T>::rel * before.template cast<double>().norm());
  }
}

TEMPLATE_TEST_CASE("NF4 base: mixed-adapter batches equal the dense host's", "[quant][nf4_lora][conformance][mixed]",
                   float, double) {
  using T = TestType;
  for (const conformance::Case& c : conformance::cases()) {
    INFO("case " << c.name);
    nf4_methods::Hosts<T> h(c, 48);
    const std::vector<int> routing = {h.q.adapter_index("case"), -1, h.q.adapter_index("lora2"),
                                      h.q.adapter_index("case"), -1};
    RoutedWorkspace<T> wq, wd;
    Matrix<T> yq, yd;
    h.q.forward_routed(h.x, routing, yq, wq);
    h.dense.forward_routed(h.x, routing, yd, wd);
    CHECK(test::rel_diff(yq, yd) < 10 * Tolerances<T>::rel);
  }
}
