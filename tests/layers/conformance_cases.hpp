#pragma once
// The conformance table: every adapter method × its important config variants, as rows that the
// same checks run through (test_conformance.cpp: identity at init, merged ≡ unmerged, gradient
// check, mixed batch ≡ separate runs, disable, delete / re-add, copy, effective_delta;
// test_conformance_no_malloc.cpp: no allocation after warm-up). In the spirit of Hugging Face
// PEFT's TEST_CASES run through one common tester: adding a method = one header + rows here.
//
// Every row adds its adapter to an AdaptedLinear [out, in] = [8, 12] with bias (LoKr needs
// factorisable dims: 12 = 3·4, 8 = 2·4), with the method's default (identity) init; perturb()
// then makes its term non-zero.
#include <memory>
#include <string>
#include <vector>

#include <peft/adapters/ia3.hpp>
#include <peft/adapters/loha.hpp>
#include <peft/adapters/lokr.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/adapters/vera.hpp>
#include <peft/layers/adapted_linear.hpp>

#include "support/test_utils.hpp"

namespace conformance {

using peft::AdaptedLinear;
using peft::AdapterMethod;
using peft::Index;
using peft::Matrix;
using peft::Parameter;
using peft::Rng;

enum class Method { LoRA, DoRA, IA3, VeRA, LoHa, LoKr };

constexpr Index kIn = 12, kOut = 8, kRows = 5;

/// One row: a method, one config variant, and what the checks may expect of it.
struct Case {
  std::string name;  ///< "LoRA/rslora", ...
  Method method = Method::LoRA;
  peft::LoraConfig lora{};  ///< LoRA and DoRA
  peft::IA3Config ia3{};
  peft::VeraConfig vera{};
  peft::LohaConfig loha{};
  peft::LokrConfig lokr{};
  /// The default init promises forward == base, bit for bit (before perturb()).
  bool identity_at_init = true;
  /// Train mode draws random masks or skips (dropout, rank / module dropout): train ≠ eval.
  bool dropout = false;
  /// DoRA: backward treats n = ‖W₀ + s·B·A‖_row as a constant (PEFT's detach()).
  bool detached_norm = false;

  /// The factory: adds this row's adapter, named `name`, to `layer` (it becomes the only active one).
  template <class T>
  AdapterMethod<T>& add(AdaptedLinear<T>& layer, const std::string& adapter_name, Rng& rng) const {
    const Index in = layer.in_features(), out = layer.out_features();
    switch (method) {
      case Method::LoRA:
      case Method::DoRA: layer.add_adapter(adapter_name, lora, rng); return layer.method(adapter_name);
      case Method::IA3:
        return layer.add_adapter(std::make_unique<peft::IA3Method<T>>(adapter_name, ia3, in, out, &rng));
      case Method::VeRA:
        // Projections wider than the layer: A_l, B_l are proper slices of the shared pair.
        return layer.add_adapter(peft::make_vera<T>(
            adapter_name, in, out, vera, peft::VeraProjections<T>::generate(vera.r, in + 4, out + 3, rng), rng));
      case Method::LoHa: return layer.add_adapter(peft::make_loha<T>(adapter_name, in, out, loha, rng));
      case Method::LoKr: return layer.add_adapter(peft::make_lokr<T>(adapter_name, in, out, lokr, rng));
    }
    throw peft::ConfigError("conformance: unknown method in case " + this->name);
  }
};

inline Case lora_case(std::string name, int r, double alpha, double dropout = 0.0, bool rslora = false,
                      peft::LoraInit init = peft::LoraInit::KaimingUniform, bool dora = false) {
  Case c;
  c.name = std::move(name);
  c.method = dora ? Method::DoRA : Method::LoRA;
  c.lora.r = r;
  c.lora.alpha = alpha;
  c.lora.dropout = dropout;
  c.lora.use_rslora = rslora;
  c.lora.init = init;
  c.lora.use_dora = dora;
  c.dropout = dropout > 0.0;
  c.detached_norm = dora;
  return c;
}

inline Case ia3_case(std::string name, bool feedforward) {
  Case c;
  c.name = std::move(name);
  c.method = Method::IA3;
  c.ia3.feedforward = feedforward;
  return c;
}

inline Case vera_case(std::string name, int r, double dropout) {
  Case c;
  c.name = std::move(name);
  c.method = Method::VeRA;
  c.vera.r = r;
  c.vera.vera_dropout = dropout;
  c.dropout = dropout > 0.0;
  return c;
}

inline Case loha_case(std::string name, int r, double alpha, double rank_dropout = 0.0, double module_dropout = 0.0) {
  Case c;
  c.name = std::move(name);
  c.method = Method::LoHa;
  c.loha.r = r;
  c.loha.alpha = alpha;
  c.loha.rank_dropout = rank_dropout;
  c.loha.module_dropout = module_dropout;
  c.dropout = rank_dropout > 0.0 || module_dropout > 0.0;
  return c;
}

inline Case lokr_case(std::string name, int r, double alpha, bool decompose_both = false, int factor = -1,
                      peft::LokrInit init = peft::LokrInit::Default, double rank_dropout = 0.0,
                      double module_dropout = 0.0) {
  Case c;
  c.name = std::move(name);
  c.method = Method::LoKr;
  c.lokr.r = r;
  c.lokr.alpha = alpha;
  c.lokr.decompose_both = decompose_both;
  c.lokr.decompose_factor = factor;
  c.lokr.init_weights = init;
  c.lokr.rank_dropout = rank_dropout;
  c.lokr.module_dropout = module_dropout;
  c.lokr.rank_dropout_scale = rank_dropout > 0.0;
  c.dropout = rank_dropout > 0.0 || module_dropout > 0.0;
  return c;
}

/// The table. Ranks and alphas differ (s ≠ 1) so that a forgotten scaling shows.
inline const std::vector<Case>& cases() {
  using peft::LokrInit;
  using peft::LoraInit;
  static const std::vector<Case> table = {
      lora_case("LoRA/plain", 4, 6.0),
      lora_case("LoRA/rslora", 4, 6.0, 0.0, true),
      lora_case("LoRA/gaussian", 3, 5.0, 0.0, false, LoraInit::Gaussian),
      lora_case("LoRA/dropout", 4, 6.0, 0.25),
      lora_case("DoRA/plain", 4, 6.0, 0.0, false, LoraInit::KaimingUniform, true),
      lora_case("DoRA/dropout", 4, 6.0, 0.25, false, LoraInit::KaimingUniform, true),
      // r = 10 > min(in, out) = 8: legal as in PEFT (a warning through the sink), exact all the same.
      lora_case("LoRA/r > min(in, out)", 10, 6.0),
      lora_case("DoRA/r > min(in, out)", 10, 6.0, 0.0, false, LoraInit::KaimingUniform, true),
      ia3_case("IA3/output", false),
      ia3_case("IA3/input (feedforward)", true),
      vera_case("VeRA/plain", 4, 0.0),
      vera_case("VeRA/dropout", 4, 0.25),
      loha_case("LoHa/plain", 3, 5.0),
      loha_case("LoHa/rank+module dropout", 3, 5.0, 0.3, 0.3),
      // Layout for in = 12 = 3·4, out = 8 = 2·4: w1 [2, 3], w2 [4, 4].
      lokr_case("LoKr/default (w1, w2 full)", 4, 6.0),
      lokr_case("LoKr/decompose_both (w1, w2 factored)", 1, 2.0, true),
      // factor 2: 12 = 2·6, 8 = 2·4: w1 [2, 2] full, w2 [4, 6] factored at r = 2.
      lokr_case("LoKr/decompose_factor=2", 2, 3.0, false, 2),
      lokr_case("LoKr/lycoris init", 4, 6.0, false, -1, LokrInit::Lycoris),
      lokr_case("LoKr/rank+module dropout", 1, 2.0, true, -1, LokrInit::Default, 0.3, 0.3),
  };
  return table;
}

/// Makes the adapter's term non-zero: additive N(0, 0.3²) noise on factors, multiplicative
/// 1 + N(0, 0.2²) on scale vectors ((IA)³'s l starts at 1, DoRA's m at ‖W₀ + s·B·A‖_row), so
/// scales stay away from 0 and merges stay invertible.
template <class T>
void perturb(AdaptedLinear<T>& layer, const std::string& adapter_name, Rng& rng) {
  layer.method(adapter_name).visit_parameters([&](const std::string& n, Parameter<T>& p) {
    const Matrix<T> noise = peft::test::random_matrix<T>(p.value.rows(), p.value.cols(), rng);
    if (n.rfind("ia3_l.", 0) == 0 || n.rfind("lora_magnitude_vector.", 0) == 0)
      p.value.array() *= T(1) + T(0.2) * noise.array();
    else
      p.value.array() += T(0.3) * noise.array();
  });
}

/// A base layer [8, 12] with bias and no adapter.
template <class T>
AdaptedLinear<T> make_base(Rng& rng) {
  return AdaptedLinear<T>(kIn, kOut, rng, true, "layers.0.q");
}

/// The plain LoRA adapter that the two-adapter checks add next to the row's adapter.
inline peft::LoraConfig second_lora() {
  peft::LoraConfig c;
  c.r = 2;
  c.alpha = 3.0;
  return c;
}

}  // namespace conformance
