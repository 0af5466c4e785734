// libFuzzer target: a Llama-family config.json (io/llama_checkpoint.hpp: llama_config_from_json).
// Any input must either yield a config or throw a peft::Error subclass; a valid config small enough
// to build is built and run on three tokens (forward and KV-cached forward).
#include <peft/io/llama_checkpoint.hpp>

#include <cstdint>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const char* text = reinterpret_cast<const char*>(data);
  try {
    const peft::LlamaConfig c =
        peft::io::llama_config_from_json(peft::io::parse_json_strict(text, text + size, "fuzz"), "fuzz");
    const double hd = static_cast<double>(c.resolved_head_dim());
    const double params =
        static_cast<double>(c.vocab_size) * c.hidden_size * 2 +
        static_cast<double>(c.num_hidden_layers) * (3.0 * c.hidden_size * c.intermediate_size +
                                                    2.0 * c.hidden_size * hd * (c.num_attention_heads + c.kv_heads()));
    if (params > 2e5) return 0;
    peft::LlamaForCausalLM<float> model(c);
    peft::LlamaForCausalLM<float>::Cache cache;
    const std::vector<peft::Index> ids = {0, 0, 0};
    const peft::Matrix<float> logits = model.forward(ids, peft::SequenceLayout(1, 3), cache);
    peft::LlamaKVCache<float> kv = model.make_kv_cache(3);
    peft::Matrix<float> step;
    model.forward_cached(ids, kv, step);
  } catch (const peft::Error&) {
  }
  return 0;
}
