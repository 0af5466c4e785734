#pragma once
// (IA)³ on the linears of a block (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
// Better and Cheaper than In-Context Learning"): helpers for layers that place (IA)³ adapters on
// their own linears, as MultiHeadAttention (k_proj, v_proj: output scaling) and FeedForward (fc2:
// input scaling) do. The adapter itself is a kind of adapter of the host (adapters/ia3.hpp); its
// parameter is `<linear>.ia3_l.<adapter>` and it merges into the linear like any other adapter.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "peft/adapters/ia3.hpp"
#include "peft/layers/adapted_linear.hpp"

namespace peft {

/// The (IA)³ adapter of `linear` (the first one, in insertion order), or nullptr.
template <class T>
IA3Method<T>* ia3_adapter_of(AdaptedLinear<T>& linear) {
  for (std::size_t i = 0; i < linear.num_adapters(); ++i)  // no list built: called on every step
    if (auto* p = dynamic_cast<IA3Method<T>*>(&linear.method_at(i))) return p;
  return nullptr;
}
template <class T>
const IA3Method<T>* ia3_adapter_of(const AdaptedLinear<T>& linear) {
  for (std::size_t i = 0; i < linear.num_adapters(); ++i)
    if (auto* p = dynamic_cast<const IA3Method<T>*>(&linear.method_at(i))) return p;
  return nullptr;
}

/// Adds an (IA)³ adapter (ones: the identity) to `linear` next to the adapters already active there
/// (they stay active; add_adapter alone would make the new one the only active adapter).
template <class T>
IA3Method<T>& add_ia3_adapter(AdaptedLinear<T>& linear, const std::string& adapter_name, bool feedforward) {
  std::vector<std::string> active = linear.active_adapters();
  IA3Config config;
  config.feedforward = feedforward;
  auto& m = static_cast<IA3Method<T>&>(linear.add_adapter(
      std::make_unique<IA3Method<T>>(adapter_name, config, linear.in_features(), linear.out_features())));
  active.push_back(adapter_name);
  linear.set_active(active);
  return m;
}

/// Whether the named adapter of `linear` is merged.
template <class T>
bool adapter_merged(const AdaptedLinear<T>& linear, const std::string& adapter_name) {
  for (const auto& n : linear.merged_adapters())
    if (n == adapter_name) return true;
  return false;
}

/// Whether `linear`'s (IA)³ adapter is merged (not a LoRA adapter of the same name).
template <class T>
bool ia3_merged_in(const AdaptedLinear<T>& linear) {
  const IA3Method<T>* m = ia3_adapter_of(linear);
  if (m == nullptr) return false;
  const auto merged = linear.merged_methods();
  return std::find(merged.begin(), merged.end(), static_cast<const AdapterMethod<T>*>(m)) != merged.end();
}

}  // namespace peft
