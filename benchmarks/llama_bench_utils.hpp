#pragma once
// Shared by the Llama benchmark programs (bench_llama, llama_train_memory): the LoRA set-up.
#include <string>

#include <peft/models/llama.hpp>

namespace peft::bench {

/// Freezes the model and adds a LoRA "default" (r, alpha) on every linear of every layer (PEFT's
/// all-linear: all but lm_head), on the hosts directly, as PeftModel::add_adapter would (this keeps
/// the io layer and its JSON out of the benchmarks' builds).
template <class T>
void add_all_linear_lora(LlamaForCausalLM<T>& model, Rng& rng, int r = 8, double alpha = 16.0) {
  model.visit_parameters([](const std::string&, Parameter<T>& p) { p.set_trainable(false); });
  LoraConfig lc;
  lc.r = r;
  lc.alpha = alpha;
  for (auto& layer : model.model.layers)
    for (AdaptedLinear<T>* host :
         {&layer.self_attn.q_proj, &layer.self_attn.k_proj, &layer.self_attn.v_proj, &layer.self_attn.o_proj,
          &layer.mlp.gate_proj, &layer.mlp.up_proj, &layer.mlp.down_proj})
      host->add_adapter("default", lc, rng);
  model.set_name(model.name());
}

}  // namespace peft::bench
