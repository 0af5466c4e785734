#pragma once
// Mixed-adapter batches: serving many adapters of one layer in a single batch, each row routed to
// its own adapter (or to none), as multi-tenant LoRA servers do (S-LoRA, Sheng et al., 2023; Punica,
// Chen et al., 2023; PEFT's `adapter_names=` forward argument).
//
//   y_i = x_i Wᵀ + b + t_{a(i)}(x_i)      (no adapter term when a(i) = none)
//
// One base GEMM covers all rows; then, per adapter a with rows R_a, its term runs on the gathered
// rows X_a = x[R_a] and is scatter-added: for LoRA Σ_a |R_a| r_a (in + out) flops, the same as one
// adapter on all rows. Every method works (AdaptedLinear::forward_routed): LoRA, DoRA (its norm is
// per adapter, its scale per output column), VeRA, LoHa, LoKr, (IA)³. This is an inference path:
// no dropout, no cache, no backward. Routing is explicit per row and ignores the layer's active set
// and its disable flag. Merged layers are refused (W already holds some adapter's delta, so "none"
// rows would be wrong).
//
// All buffers live in a MixedBatchWorkspace that grows to the largest batch seen and is then
// reused: after warm-up a call with the same or fewer rows allocates nothing on our side.
#include <algorithm>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/layers/lora_linear.hpp"

namespace peft {

/// Row routing value meaning "base layer only".
inline constexpr int kNoAdapter = -1;
/// Row routing name meaning "base layer only" (an adapter literally named "none" cannot be routed
/// by name; use integer routing for it).
inline const char* const kNoAdapterName = "none";

template <class T>
using MixedBatchWorkspace = RoutedWorkspace<T>;

/// Adapter index (into layer.methods()) per row, kNoAdapter for "none"; ConfigError for an unknown
/// name (lists the available ones). Writes into `routing` (reused, no allocation once large enough).
template <class T>
void route_rows(const AdaptedLinear<T>& layer, const std::vector<std::string>& row_adapter, std::vector<int>& routing) {
  routing.resize(row_adapter.size());
  for (std::size_t r = 0; r < row_adapter.size(); ++r) {
    const std::string& n = row_adapter[r];
    if (n == kNoAdapterName) {
      routing[r] = kNoAdapter;
      continue;
    }
    const int found = layer.adapter_index(n);
    if (found < 0) {
      std::string have;
      for (const auto& a : layer.methods()) have += (have.empty() ? "" : ", ") + a.name();
      throw ConfigError(describe("LoRALinear", layer.name()) + ": row " + std::to_string(r) +
                        " asks for unknown adapter \"" + n + "\"; available: [" + have + "] or \"none\"");
    }
    routing[r] = found;
  }
}

template <class T>
std::vector<int> route_rows(const AdaptedLinear<T>& layer, const std::vector<std::string>& row_adapter) {
  std::vector<int> routing;
  route_rows(layer, row_adapter, routing);
  return routing;
}

namespace detail {
/// Keeps T out of deduction for the input, so a Matrix, Map or block binds to the Ref.
template <class T>
struct same_type {
  using type = T;
};
}  // namespace detail

/// y = base(x) plus, on each row, that row's adapter (by name, or "none").
template <class T>
void forward_mixed(AdaptedLinear<T>& layer, const ConstMatrixRef<typename detail::same_type<T>::type>& x,
                   const std::vector<std::string>& row_adapter, Matrix<T>& y, MixedBatchWorkspace<T>& ws) {
  if (static_cast<Index>(row_adapter.size()) != x.rows())
    throw ShapeError(describe("LoRALinear", layer.name()) + ": mixed batch has " + std::to_string(x.rows()) +
                     " rows but " + std::to_string(row_adapter.size()) + " row adapter entries");
  route_rows(layer, row_adapter, ws.routing);
  layer.forward_routed(x, ws.routing, y, ws);
}

/// Per-sequence adapters of a routed model forward (Hugging Face PEFT's `adapter_names=`): the
/// rows_per_seq consecutive rows of sequence b use the adapter names[b] in every adapted linear;
/// "none" or "__base__" (PEFT's name) use the base layer only.
struct SequenceAdapters {
  const std::vector<std::string>* names = nullptr;
  Index rows_per_seq = 0;
};

/// Whether a per-sequence adapter name means the base layer only ("none", or PEFT's "__base__").
inline bool is_base_adapter_name(const std::string& n) { return n == kNoAdapterName || n == "__base__"; }

/// y = layer(x) through its inference path: the active adapters when `seqs` is null; else on the
/// rows of sequence b the adapter named names[b], where a layer that holds no adapter of that name
/// gives its base output (the adapter does not target this layer). `ws` is reused across calls.
template <class T>
void forward_inference_routed(AdaptedLinear<T>& layer, const ConstMatrixRef<typename detail::same_type<T>::type>& x,
                              Matrix<T>& y, const SequenceAdapters* seqs, RoutedWorkspace<T>& ws) {
  if (seqs == nullptr) {
    layer.forward_inference(x, y);
    return;
  }
  const std::size_t per = static_cast<std::size_t>(seqs->rows_per_seq);
  if (static_cast<Index>(seqs->names->size() * per) != x.rows())
    throw ShapeError(describe("LoRALinear", layer.name()) + ": " + std::to_string(seqs->names->size()) +
                     " sequence adapter names of " + std::to_string(per) + " rows each for " +
                     std::to_string(x.rows()) + " rows");
  ws.routing.resize(static_cast<std::size_t>(x.rows()));
  for (std::size_t b = 0; b < seqs->names->size(); ++b) {
    const std::string& n = (*seqs->names)[b];
    const int a = is_base_adapter_name(n) ? kNoAdapter : layer.adapter_index(n);
    std::fill_n(ws.routing.begin() + static_cast<std::ptrdiff_t>(b * per), per, a);
  }
  layer.forward_routed(x, ws.routing, y, ws);
}

/// Same with precomputed routing (route_rows): adapter index into layer.methods() or kNoAdapter.
template <class T>
void forward_mixed(AdaptedLinear<T>& layer, const ConstMatrixRef<typename detail::same_type<T>::type>& x,
                   const std::vector<int>& routing, Matrix<T>& y, MixedBatchWorkspace<T>& ws) {
  layer.forward_routed(x, routing, y, ws);
}

}  // namespace peft
