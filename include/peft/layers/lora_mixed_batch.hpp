#pragma once
// Mixed-adapter batches: serving many LoRA adapters of one LoRALinear in a single batch, each row
// routed to its own adapter (or to none), as multi-tenant LoRA servers do (S-LoRA, Sheng et al., 2023;
// Punica, Chen et al., 2023; PEFT's `adapter_names=` forward argument).
//
//   y_i = x_i Wᵀ + b + s_{a(i)} (x_i A_{a(i)}ᵀ) B_{a(i)}ᵀ      (no adapter term when a(i) = none)
//
// One base GEMM covers all rows; then, per adapter a with rows R_a:
//   X_a = x[R_a]  (gather),  U_a = s_a (X_a A_aᵀ) B_aᵀ   [|R_a|, out],  y[R_a] += U_a  (scatter-add)
// so the adapter work is Σ_a |R_a| r_a (in + out) flops: the same as one adapter on all rows.
// This is an inference path: no dropout, no cache, no backward. Routing is explicit per row and
// ignores the layer's active set and its disable flag. Merged layers are refused (W already holds
// some adapter's delta, so "none" rows would be wrong). DoRA adapters are refused for now (their
// output is rescaled per output column by a norm that needs its own path).
//
// All buffers live in a MixedBatchWorkspace that grows to the largest batch seen and is then
// reused: after warm-up a call with the same or fewer rows allocates nothing on our side.
#include <algorithm>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/layers/lora_linear.hpp"

namespace peft {

/// Row routing value meaning "base layer only".
inline constexpr int kNoAdapter = -1;
/// Row routing name meaning "base layer only" (an adapter literally named "none" cannot be routed
/// by name; use integer routing for it).
inline const char* const kNoAdapterName = "none";

template <class T>
struct MixedBatchWorkspace {
  std::vector<int> routing;  ///< per row: adapter index or kNoAdapter (filled from names)
  std::vector<Index> count;  ///< rows per adapter
  std::vector<Index> start;  ///< first slot of each adapter in `order`
  std::vector<Index> order;  ///< row indices grouped by adapter
  Matrix<T> xg;              ///< gathered inputs [rows, in]
  Matrix<T> xa;              ///< X_a A_aᵀ [rows, r_max]
  Matrix<T> up;              ///< s_a (X_a A_aᵀ) B_aᵀ [rows, out]
};

/// Adapter index per row (kNoAdapter for "none"); ConfigError for an unknown name (lists the
/// available ones). Writes into `routing` (reused, no allocation once large enough).
template <class T>
void route_rows(const LoRALinear<T>& layer, const std::vector<std::string>& row_adapter, std::vector<int>& routing) {
  const auto& adapters = layer.adapters();
  routing.resize(row_adapter.size());
  for (std::size_t r = 0; r < row_adapter.size(); ++r) {
    const std::string& n = row_adapter[r];
    if (n == kNoAdapterName) {
      routing[r] = kNoAdapter;
      continue;
    }
    int found = kNoAdapter;
    for (std::size_t a = 0; a < adapters.size(); ++a)
      if (adapters[a].name == n) {
        found = static_cast<int>(a);
        break;
      }
    if (found == kNoAdapter) {
      std::string have;
      for (const auto& a : adapters) have += (have.empty() ? "" : ", ") + a.name;
      throw ConfigError(describe("LoRALinear", layer.name()) + ": row " + std::to_string(r) +
                        " asks for unknown adapter \"" + n + "\"; available: [" + have + "] or \"none\"");
    }
    routing[r] = found;
  }
}

template <class T>
std::vector<int> route_rows(const LoRALinear<T>& layer, const std::vector<std::string>& row_adapter) {
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

template <class T>
void forward_mixed_impl(const LoRALinear<T>& layer, const ConstMatrixRef<T>& x, const std::vector<int>& routing,
                        Matrix<T>& y, MixedBatchWorkspace<T>& ws) {
  const auto& adapters = layer.adapters();
  const Index rows = x.rows(), in = layer.in_features(), out = layer.out_features();
  const Index n = static_cast<Index>(adapters.size());

  // Group rows by adapter (counting sort: stable, O(rows + n)).
  ws.count.assign(static_cast<std::size_t>(n), 0);
  for (Index r = 0; r < rows; ++r) {
    const int a = routing[static_cast<std::size_t>(r)];
    if (a != kNoAdapter) ++ws.count[static_cast<std::size_t>(a)];
  }
  ws.start.resize(static_cast<std::size_t>(n) + 1);
  ws.start[0] = 0;
  Index r_max = 0;
  for (Index a = 0; a < n; ++a) {
    const std::size_t ua = static_cast<std::size_t>(a);
    ws.start[ua + 1] = ws.start[ua] + ws.count[ua];
    if (ws.count[ua] > 0) {
      const LoraAdapter<T>& ad = adapters[ua];
      if (ad.config.use_dora)
        throw ConfigError(describe("LoRALinear", layer.name()) + ": adapter \"" + ad.name +
                          "\" uses DoRA, which mixed batches do not support yet");
      r_max = std::max<Index>(r_max, ad.rank());
    }
  }
  const Index routed = ws.start[static_cast<std::size_t>(n)];
  ws.order.resize(static_cast<std::size_t>(routed));
  for (Index a = 0; a < n; ++a) ws.count[static_cast<std::size_t>(a)] = 0;  // reused as fill cursor
  for (Index r = 0; r < rows; ++r) {
    const int a = routing[static_cast<std::size_t>(r)];
    if (a == kNoAdapter) continue;
    const std::size_t ua = static_cast<std::size_t>(a);
    ws.order[static_cast<std::size_t>(ws.start[ua] + ws.count[ua]++)] = r;
  }

  // Buffers grow to the largest batch / rank seen, never shrink.
  if (ws.xg.rows() < routed || ws.xg.cols() != in) ws.xg.resize(std::max(routed, ws.xg.rows()), in);
  if (ws.up.rows() < routed || ws.up.cols() != out) ws.up.resize(std::max(routed, ws.up.rows()), out);
  if (ws.xa.rows() < routed || ws.xa.cols() < r_max)
    ws.xa.resize(std::max(routed, ws.xa.rows()), std::max(r_max, ws.xa.cols()));

  // Base for every row: y = x Wᵀ + b   [rows, out]
  y.resize(rows, out);
  y.noalias() = x * layer.weight.value.transpose();
  if (layer.has_bias()) y.rowwise() += layer.bias.value.row(0);

  for (Index a = 0; a < n; ++a) {
    const std::size_t ua = static_cast<std::size_t>(a);
    const Index m = ws.start[ua + 1] - ws.start[ua];
    if (m == 0) continue;
    const LoraAdapter<T>& ad = adapters[ua];
    const Index r = ad.rank();
    const Index* rows_a = ws.order.data() + ws.start[ua];
    for (Index j = 0; j < m; ++j) ws.xg.row(j) = x.row(rows_a[j]);  // X_a = x[R_a]   [m, in]
    auto xa = ws.xa.topLeftCorner(m, r);
    auto up = ws.up.topRows(m);
    xa.noalias() = ws.xg.topRows(m) * ad.A.value.transpose();                   // X_a Aᵀ   [m, r]
    up.noalias() = static_cast<T>(ad.scaling()) * xa * ad.B.value.transpose();  // s (X_a Aᵀ) Bᵀ   [m, out]
    for (Index j = 0; j < m; ++j) y.row(rows_a[j]) += up.row(j);                // y[R_a] += U_a
  }
}

template <class T>
void check_mixed(const LoRALinear<T>& layer, const ConstMatrixRef<T>& x, std::size_t routing_size) {
  if (layer.merged())
    throw ConfigError(describe("LoRALinear", layer.name()) +
                      ": mixed-adapter batches need an unmerged layer (merged: " +
                      [&] {
                        std::string s;
                        for (const auto& n : layer.merged_adapters()) s += (s.empty() ? "" : ", ") + n;
                        return s;
                      }() +
                      "); unmerge first");
  check::input_features("LoRALinear", layer.name(), x.cols(), layer.in_features());
  if (static_cast<Index>(routing_size) != x.rows())
    throw ShapeError(describe("LoRALinear", layer.name()) + ": mixed batch has " + std::to_string(x.rows()) +
                     " rows but " + std::to_string(routing_size) + " row adapter entries");
}

}  // namespace detail

/// y = base(x) plus, on each row, that row's adapter (by name, or "none").
template <class T>
void forward_mixed(const LoRALinear<T>& layer, const ConstMatrixRef<typename detail::same_type<T>::type>& x,
                   const std::vector<std::string>& row_adapter, Matrix<T>& y, MixedBatchWorkspace<T>& ws) {
  detail::check_mixed(layer, x, row_adapter.size());
  route_rows(layer, row_adapter, ws.routing);
  detail::forward_mixed_impl(layer, x, ws.routing, y, ws);
}

/// Same with precomputed routing (route_rows): adapter index into layer.adapters() or kNoAdapter.
template <class T>
void forward_mixed(const LoRALinear<T>& layer, const ConstMatrixRef<typename detail::same_type<T>::type>& x,
                   const std::vector<int>& routing, Matrix<T>& y, MixedBatchWorkspace<T>& ws) {
  detail::check_mixed(layer, x, routing.size());
  const std::size_t n = layer.adapters().size();
  for (std::size_t r = 0; r < routing.size(); ++r)
    if (routing[r] != kNoAdapter && (routing[r] < 0 || static_cast<std::size_t>(routing[r]) >= n))
      throw ConfigError(describe("LoRALinear", layer.name()) + ": row " + std::to_string(r) + " is routed to adapter " +
                        std::to_string(routing[r]) + ", expected -1 (none) or an index in [0, " + std::to_string(n) +
                        ")");
  detail::forward_mixed_impl(layer, x, routing, y, ws);
}

}  // namespace peft
