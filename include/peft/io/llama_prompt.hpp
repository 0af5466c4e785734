#pragma once
// PEFT's prompt-learning adapter directories on the Llama causal LM (models/llama.hpp):
//
//   PROMPT_TUNING   adapter_model.safetensors: prompt_embeddings [num_virtual_tokens, hidden_size]
//                   → LlamaForCausalLM::prompt_encoder (a SoftPrompt)
//   PREFIX_TUNING   prompt_embeddings [num_virtual_tokens, num_layers · 2 · KV · hd]: PEFT's past key /
//                   values per layer (PeftModel.get_prompt: layer i's keys in columns [2i·w, 2i·w + w),
//                   its values in the next w, w = KV·hd, head-major), token_dim = KV·hd and
//                   num_attention_heads = KV (PEFT's rule for grouped-query attention, with the
//                   config's head_dim) → LlamaForCausalLM::prefix_encoder (a flat PrefixAttention)
//
// PEFT saves a projected prefix (prefix_projection) as its projected table (the MLP's output for the
// virtual tokens: PeftModel.get_prompt_embedding_to_save), and loads it flat (inference_mode); so do
// we: save_llama_prompt_adapter writes the table a projected prefix_encoder computes, and a loaded
// prefix is flat. Checked with PEFT 0.21.2 on tests/data/llama (make_llama_batch_fixtures.py): its
// saved prompt and prefix directories load here to its logits, and PEFT's reload of its own prefix
// directory gives the logits of the trained (projected) prefix.
#include <string>

#include "peft/core/error.hpp"
#include "peft/io/peft_format.hpp"
#include "peft/models/llama.hpp"

namespace peft::io {

/// Replaces any prompt / prefix of `model` by the PEFT PROMPT_TUNING or PREFIX_TUNING adapter in
/// `dir` (its parameters trainable or not as `trainable` says). ConfigError naming the key for an
/// adapter of another model shape or kind; returns the adapter's config.
template <class T>
AdapterConfig load_llama_prompt_adapter(LlamaForCausalLM<T>& model, const std::string& dir, bool trainable = false) {
  PeftAdapter<T> ad = load_peft_adapter<T>(dir);
  const AdapterConfig& c = ad.config;
  const std::string who = "load_llama_prompt_adapter \"" + dir + "\"";
  const LlamaConfig& mc = model.config();
  const Index w = mc.kv_heads() * mc.resolved_head_dim();
  if (!c.is_prompt())
    throw ConfigError(who + ": peft_type is \"" + c.peft_type +
                      "\", expected PROMPT_TUNING or PREFIX_TUNING (LoRA-like adapters: io::load_method_adapter)");
  if (c.num_transformer_submodules != 1)
    throw ConfigError(who + ": num_transformer_submodules is " + std::to_string(c.num_transformer_submodules) +
                      ", expected 1 (a decoder-only model)");
  if (c.num_layers != 0 && c.num_layers != mc.num_hidden_layers)
    throw ConfigError(who + ": num_layers is " + std::to_string(c.num_layers) + ", the model has " +
                      std::to_string(mc.num_hidden_layers));
  const Index n = c.num_virtual_tokens;
  const Matrix<T>& table = ad.prompt_embeddings;
  model.remove_prompt_learning();
  Rng rng(0);  // the tables are overwritten below
  if (c.peft_type == "PROMPT_TUNING") {
    if (c.token_dim != 0 && c.token_dim != mc.hidden_size)
      throw ConfigError(who + ": token_dim is " + std::to_string(c.token_dim) + ", expected hidden_size " +
                        std::to_string(mc.hidden_size));
    check::shape("load_llama_prompt_adapter", dir, "prompt_embeddings", table.rows(), table.cols(), n, mc.hidden_size);
    SoftPrompt<T>& p = model.add_prompt_tuning(n, rng);
    p.embedding.value = table;
    p.embedding.set_trainable(trainable);
  } else {
    if (c.token_dim != 0 && c.token_dim != w)
      throw ConfigError(who + ": token_dim is " + std::to_string(c.token_dim) + ", expected num_key_value_heads · " +
                        "head_dim = " + std::to_string(w) + " (PEFT's prefix width for this model)");
    if (c.num_attention_heads != 0 && c.num_attention_heads != mc.kv_heads())
      throw ConfigError(who + ": num_attention_heads is " + std::to_string(c.num_attention_heads) +
                        ", expected num_key_value_heads " + std::to_string(mc.kv_heads()));
    check::shape("load_llama_prompt_adapter", dir, "prompt_embeddings", table.rows(), table.cols(), n,
                 mc.num_hidden_layers * 2 * w);
    PrefixAttention<T>& p = model.add_prefix_tuning(n, rng);
    p.load_prompt_embeddings(table);
    p.embedding.set_trainable(trainable);
  }
  model.set_name(model.name());
  return c;
}

/// Writes a prompt (`prompt`) or prefix (`prefix`) of a model with config `mc` as a PEFT adapter
/// directory (what PeftModel.save_pretrained writes for a CAUSAL_LM; a projected prefix as its
/// projected table). Exactly one of the two is non-null. `base_model` goes to base_model_name_or_path.
template <class T>
void save_llama_prompt_tables(const std::string& dir, const LlamaConfig& mc, const SoftPrompt<T>* prompt,
                              PrefixAttention<T>* prefix, const std::string& base_model = "",
                              DType dtype = native_dtype<T>()) {
  if ((prompt == nullptr) == (prefix == nullptr))
    throw ConfigError("save_llama_prompt_tables \"" + dir + "\": expected exactly one of a prompt and a prefix");
  PeftAdapter<T> ad;
  AdapterConfig& c = ad.config;
  c.task_type = "CAUSAL_LM";
  c.base_model_name_or_path = base_model;
  c.num_layers = static_cast<int>(mc.num_hidden_layers);
  c.num_transformer_submodules = 1;
  c.raw = Json::object();
  c.raw["inference_mode"] = true;
  if (prompt != nullptr) {
    c.peft_type = "PROMPT_TUNING";
    c.num_virtual_tokens = static_cast<int>(prompt->num_virtual_tokens());
    c.token_dim = static_cast<int>(mc.hidden_size);
    c.num_attention_heads = static_cast<int>(mc.num_attention_heads);
    c.raw["prompt_tuning_init"] = "RANDOM";
    ad.prompt_embeddings = prompt->embedding.value;
  } else {
    PrefixAttention<T>& p = *prefix;
    c.peft_type = "PREFIX_TUNING";
    c.num_virtual_tokens = static_cast<int>(p.num_virtual_tokens());
    c.token_dim = static_cast<int>(p.token_dim());
    c.num_attention_heads = static_cast<int>(mc.kv_heads());
    c.prefix_projection = p.projected();
    c.raw["prefix_projection"] = p.projected();
    c.raw["encoder_hidden_size"] = p.projected() ? p.config().encoder_hidden_size : p.token_dim();
    ad.prompt_embeddings = p.prompt_embeddings();
  }
  save_peft_adapter<T>(dir, ad, dtype);
}

/// Writes `model`'s prompt or prefix as a PEFT adapter directory (save_llama_prompt_tables).
/// ConfigError when the model has neither.
template <class T>
void save_llama_prompt_adapter(const std::string& dir, LlamaForCausalLM<T>& model, const std::string& base_model = "",
                               DType dtype = native_dtype<T>()) {
  if (!model.prompt_encoder && !model.prefix_encoder)
    throw ConfigError("save_llama_prompt_adapter \"" + dir + "\": the model has no prompt_encoder or prefix_encoder");
  save_llama_prompt_tables<T>(dir, model.config(), model.prompt_encoder ? &*model.prompt_encoder : nullptr,
                              model.prefix_encoder ? &*model.prefix_encoder : nullptr, base_model, dtype);
}

}  // namespace peft::io
