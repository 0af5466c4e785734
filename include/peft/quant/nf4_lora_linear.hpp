#pragma once
// NF4LoRALinear: adapters on a frozen 4-bit NF4 base — the QLoRA layer (Dettmers et al. 2023, "QLoRA:
// Efficient Finetuning of Quantized LLMs"; LoRA: Hu et al. 2021). It is the one adapted-linear host
// (layers/adapted_linear.hpp) with an NF4 base, so every method it hosts on a dense base works on a
// 4-bit one: LoRA, DoRA, VeRA, LoHa, LoKr, (IA)³, mixed-adapter batches, merges.
//
//   y = x · deq(Q)ᵀ + b + Σ_active t_i(x; W₀ = deq(Q), b)       Q: NF4Tensor of W [out, in], frozen
//   LoRA:  t = s · (dropout(x) Aᵀ) Bᵀ,   s = alpha/r (or alpha/√r)
//
// The dense weight is never formed on LoRA's (VeRA's, LoHa's, LoKr's, (IA)³-on-outputs') path:
// forward and backward decode `tile_rows` output rows at a time into one reused [tile, in] buffer,
//   y[:, t]  = x · W_tᵀ          (forward, per tile t of output rows)
//   dX      += E[:, t] · W_t     (backward, the input gradient through the frozen base)
// so the extra memory is tile·in scalars whatever the layer size. The base gets no gradient (it is
// quantized and frozen, as in QLoRA); the adapters' gradients are those on a dense base holding
// deq(Q), exactly. DoRA (its row norm ‖W₀ + s·B·A‖) and (IA)³ on inputs read W₀ itself: the host
// then keeps deq(Q) in one reused dense buffer [out, in] while such an adapter is active (PEFT's
// bitsandbytes DoRA dequantizes the same way).
//
// Merging cannot add a dense delta to 4-bit codes exactly: merged_weight() returns the dense
// deq(Q) + Σ C_i; merge() / unmerge() go through the dense algebra and re-quantize in the base's
// layout (lossy, one rounding each: last_requantize()); merge_and_requantize() folds the active
// adapters into Q and deletes them (PEFT's merge_and_unload on a 4-bit base), reporting the error
// the second rounding adds, ‖deq(Q') − (deq(Q) + ΔW)‖_F.
#include <string>
#include <utility>

#include "peft/layers/adapted_linear.hpp"
#include "peft/layers/linear.hpp"
#include "peft/quant/nf4.hpp"

namespace peft {

/// The adapted-linear host; an NF4LoRALinear is one built on a quant::NF4Tensor
/// (`NF4LoRALinear<T>(q, bias, name)`) or by quantize_linear().
template <class T>
using NF4LoRALinear = AdaptedLinear<T>;

/// Quantizes a dense Linear into an NF4-base host (what bitsandbytes' Linear4bit does when a model
/// is loaded in 4 bit); the bias is kept dense and frozen.
template <class T>
AdaptedLinear<T> quantize_linear(const Linear<T>& base, const quant::NF4Options& opt = {}, std::string name = "") {
  RowVector<T> b;
  if (base.has_bias()) b = base.bias.value.row(0);
  return AdaptedLinear<T>(quant::quantize_nf4<T>(base.weight.value, opt), b, std::move(name));
}

}  // namespace peft
