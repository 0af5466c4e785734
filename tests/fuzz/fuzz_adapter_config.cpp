// libFuzzer target: adapter_config.json parsing (strict JSON + PEFT field validation) and the
// pattern lookups a loaded config serves. Any input must either yield a config or throw a
// peft::Error subclass (IoError for malformed input, ConfigError for unsupported features).
#include <peft/io/peft_format.hpp>

#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const char* text = reinterpret_cast<const char*>(data);
  try {
    const peft::io::AdapterConfig c =
        peft::io::parse_adapter_config(peft::io::parse_json_strict(text, text + size, "fuzz"), "fuzz");
    (void)c.rank_for("model.layers.0.self_attn.q_proj");
    (void)c.scaling_for("model.layers.0.self_attn.q_proj");
    (void)c.targets("model.layers.0.self_attn.q_proj");
    const peft::io::Json back = peft::io::to_json(c);
    (void)peft::io::parse_adapter_config(back, "fuzz round trip");
  } catch (const peft::Error&) {
  }
  return 0;
}
