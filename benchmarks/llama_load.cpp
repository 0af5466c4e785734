// Load time and peak memory of io::load_llama on a synthetic SmolLM-135M-shaped checkpoint
// (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads, vocab 49152, tied embeddings:
// 134.5 M parameters), so the number needs no download:
//
//   llama_load write DIR [BF16|F32]   writes DIR/config.json + DIR/model.safetensors (streamed)
//   llama_load load DIR [float|double] loads it, prints the wall time and the process's peak RSS
//
// Run the two in separate processes: peak RSS then belongs to the load alone. The bound the loader
// keeps: peak ≤ (file size + parameters · sizeof(T)) · 1.1.
#include <peft/io/llama_checkpoint.hpp>
#include <peft/io/safetensors.hpp>

#include <sys/resource.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

using peft::Index;

const char* kConfig = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
  "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
  "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-05, "max_position_embeddings": 8192,
  "rope_theta": 100000, "tie_word_embeddings": true, "attention_bias": false, "mlp_bias": false
})";

int write(const std::string& dir, peft::io::DType dtype) {
  const Index d = 576, f = 1536, v = 49152, kv = 192;
  std::vector<peft::io::TensorSpec> specs;
  specs.push_back({"model.embed_tokens.weight", dtype, {v, d}});
  for (int l = 0; l < 30; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    specs.push_back({p + "input_layernorm.weight", dtype, {d}});
    specs.push_back({p + "post_attention_layernorm.weight", dtype, {d}});
    specs.push_back({p + "self_attn.q_proj.weight", dtype, {d, d}});
    specs.push_back({p + "self_attn.k_proj.weight", dtype, {kv, d}});
    specs.push_back({p + "self_attn.v_proj.weight", dtype, {kv, d}});
    specs.push_back({p + "self_attn.o_proj.weight", dtype, {d, d}});
    specs.push_back({p + "mlp.gate_proj.weight", dtype, {f, d}});
    specs.push_back({p + "mlp.up_proj.weight", dtype, {f, d}});
    specs.push_back({p + "mlp.down_proj.weight", dtype, {d, f}});
  }
  specs.push_back({"model.norm.weight", dtype, {d}});
  if (::mkdir(dir.c_str(), 0755) != 0 && !peft::io::is_directory(dir))
    throw peft::IoError("cannot create \"" + dir + "\"");
  peft::io::write_file_atomic(dir + "/config.json", kConfig);
  peft::Rng rng(1);
  std::vector<float> buf;
  std::size_t params = 0;
  peft::io::SafeTensorsWriter w(dir + "/model.safetensors", specs, {{"format", "pt"}});
  for (const auto& s : specs) {
    std::size_t n = 1;
    for (auto e : s.shape) n *= static_cast<std::size_t>(e);
    buf.resize(n);
    for (float& x : buf) x = static_cast<float>(rng.normal(0.0, 0.02));
    w.write<float>(buf.data(), n);
    params += n;
  }
  w.commit();
  std::printf("wrote %s: %zu parameters, %.1f MB\n", dir.c_str(), params, static_cast<double>(w.bytes_written()) / 1e6);
  return 0;
}

template <class T>
int load(const std::string& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  peft::io::LlamaLoadReport r;
  peft::LlamaForCausalLM<T> model = peft::io::load_llama<T>(dir, &r);
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::size_t params = 0;
  model.visit_parameters(
      [&](const std::string&, peft::Parameter<T>& p) { params += static_cast<std::size_t>(p.size()); });
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  const double peak = static_cast<double>(ru.ru_maxrss) / 1024.0;  // MB (ru_maxrss is in KiB)
  const double bound = (static_cast<double>(r.file_bytes) + static_cast<double>(params * sizeof(T))) * 1.1 / 1048576.0;
  std::printf(
      "loaded %zu parameters (%zu tensors, %.1f MB of files) as %s in %.2f s (weights %.2f s); "
      "peak RSS %.0f MiB, bound (file + weights) x 1.1 = %.0f MiB\n",
      params, r.tensors, static_cast<double>(r.file_bytes) / 1e6, sizeof(T) == 4 ? "float" : "double", total, r.seconds,
      peak, bound);
  return peak <= bound ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: llama_load write DIR [BF16|F32] | llama_load load DIR [float|double]\n");
    return 2;
  }
  try {
    const std::string mode = argv[1], dir = argv[2], opt = argc > 3 ? argv[3] : "";
    if (mode == "write") {
      peft::io::DType dtype = peft::io::DType::BF16;
      if (!opt.empty()) peft::io::parse_dtype(opt, dtype);
      return write(dir, dtype);
    }
    if (mode == "load") return opt == "double" ? load<double>(dir) : load<float>(dir);
    std::fprintf(stderr, "llama_load: unknown mode \"%s\"\n", mode.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama_load: %s\n", e.what());
    return 1;
  }
}
