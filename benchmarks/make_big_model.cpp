// Writes a large safetensors "model" tensor by tensor (memory stays at one tensor) plus a rank-16
// PEFT LoRA adapter on its attention projections, for benchmarks/run_io.sh. Uses the library's own
// streaming writer, so the I/O benchmark needs nothing beyond the build (no Python, no torch).
//
//   make_big_model OUT_DIR [LAYERS] [F32|F16|BF16]
// Default: 8 layers of a 2048-wide decoder in F32: q,k,v,o [2048, 2048], up [5504, 2048],
// down [2048, 5504] and a norm [2048] per layer = 1.19 GB; the largest tensor is 45 MB.
#include <peft/core/rng.hpp>
#include <peft/io/peft_format.hpp>
#include <peft/io/safetensors.hpp>

#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

namespace {

using peft::Index;
using peft::Matrix;

void fill_normal(std::vector<float>& v, peft::Rng& rng, double stddev) {
  for (float& x : v) x = static_cast<float>(rng.normal(0.0, stddev));
}

int run(const std::string& out, int layers, peft::io::DType dtype) {
  constexpr Index d = 2048, f = 5504;
  constexpr int r = 16;
  std::vector<peft::io::TensorSpec> specs;
  const char* projections[] = {"q_proj", "k_proj", "v_proj", "o_proj"};
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    for (const char* proj : projections) specs.push_back({p + ".self_attn." + proj + ".weight", dtype, {d, d}});
    specs.push_back({p + ".mlp.up_proj.weight", dtype, {f, d}});
    specs.push_back({p + ".mlp.down_proj.weight", dtype, {d, f}});
    specs.push_back({p + ".input_layernorm.weight", dtype, {d}});
  }
  peft::Rng rng(0);
  std::vector<float> buf;
  if (::mkdir(out.c_str(), 0755) != 0 && !peft::io::is_directory(out))
    throw peft::IoError("cannot create \"" + out + "\"");
  peft::io::SafeTensorsWriter w(out + "/base.safetensors", specs, {{"format", "pt"}});
  for (const auto& s : specs) {
    std::size_t n = 1;
    for (auto e : s.shape) n *= static_cast<std::size_t>(e);
    buf.resize(n);
    fill_normal(buf, rng, 0.02);
    w.write<float>(buf.data(), n);
  }
  w.commit();

  peft::io::PeftAdapter<float> ad;
  ad.config = peft::io::parse_adapter_config(
      peft::io::parse_json_strict(R"({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "task_type": "CAUSAL_LM",
                                      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "bias": "none"})",
                                  "make_big_model"),
      "make_big_model");
  for (int l = 0; l < layers; ++l)
    for (const char* proj : projections) {
      peft::io::LoraModuleWeights<float> m;
      m.path = "model.layers." + std::to_string(l) + ".self_attn." + proj;
      m.A.resize(r, d);
      m.B.resize(d, r);
      for (Index i = 0; i < m.A.size(); ++i) m.A.data()[i] = static_cast<float>(rng.normal(0.0, 0.01));
      for (Index i = 0; i < m.B.size(); ++i) m.B.data()[i] = static_cast<float>(rng.normal(0.0, 0.01));
      m.alpha = 32.0;
      m.scaling = 2.0;
      ad.lora.push_back(std::move(m));
    }
  peft::io::save_peft_adapter(out + "/adapter", ad);
  std::printf("wrote %s/base.safetensors (%.2f GB) and %s/adapter\n", out.c_str(),
              static_cast<double>(w.bytes_written()) / 1e9, out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 4) {
    std::fprintf(stderr, "usage: make_big_model OUT_DIR [LAYERS] [F32|F16|BF16]\n");
    return 2;
  }
  try {
    const int layers = argc > 2 ? std::atoi(argv[2]) : 8;
    const std::string dt = argc > 3 ? argv[3] : "F32";
    if (layers <= 0 || (dt != "F32" && dt != "F16" && dt != "BF16")) {
      std::fprintf(stderr, "make_big_model: LAYERS must be > 0 and DTYPE one of F32, F16, BF16\n");
      return 2;
    }
    peft::io::DType dtype = peft::io::DType::F32;
    peft::io::parse_dtype(dt, dtype);
    return run(argv[1], layers, dtype);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_big_model: %s\n", e.what());
    return 1;
  }
}
