// libFuzzer target: an adapter directory (adapter_config.json + adapter_model.safetensors) taken
// end to end through what `peft merge` and `peft combine` do with it. The input is split into the
// config's bytes and the weights' bytes (fuzz_support.hpp: a 2-byte length, then the config).
//
// Accepted adapters are then
//   - combined with themselves (cat, svd, linear, ties): a result must be finite and of the
//     promised rank, or the call throws a peft::Error;
//   - merged into a generated base model whose tensors fit every module, by the streaming
//     merge_adapter_file, on tmpfs (/dev/shm: fsync costs nothing there); a merge that throws must
//     leave no output file.
// Any other exception, crash, leak or sanitizer report is a bug.
#include <peft/io/merge_file.hpp>
#include <peft/io/peft_format.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/merge/combine.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "fuzz_support.hpp"

namespace {

constexpr peft::Index kMaxElements = 1 << 14;  // keeps each run fast: larger modules are only loaded

const std::string& scratch_dir() {
  static const std::string dir = [] {
    std::string tmpl =
        (::access("/dev/shm", W_OK) == 0 ? std::string("/dev/shm") : std::string("/tmp")) + "/peft-fuzz-merge-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
    return tmpl;
  }();
  return dir;
}

bool small(const peft::io::LoraModuleWeights<float>& m) {
  return m.B.rows() * m.A.cols() <= kMaxElements && m.A.rows() <= 64;
}

void combine_with_itself(const peft::io::PeftAdapter<float>& ad) {
  for (const auto& m : ad.lora) {
    if (!small(m) || m.magnitude.size() != 0) continue;
    const std::vector<peft::LoraFactors<float>> fs{{m.A, m.B, m.scaling, "a"}, {m.A, m.B, m.scaling, "b"}};
    for (peft::CombineMethod method :
         {peft::CombineMethod::Cat, peft::CombineMethod::Svd, peft::CombineMethod::Linear, peft::CombineMethod::Ties}) {
      peft::CombineOptions opt;
      opt.method = method;
      opt.density = method == peft::CombineMethod::Ties ? 0.5 : 1.0;
      try {
        const peft::CombineResult<float> r = peft::combine(fs, {0.5, 0.5}, opt);
        if (!r.factors.A.allFinite() || !r.factors.B.allFinite()) std::abort();  // must have thrown
      } catch (const peft::Error&) {
      }
    }
  }
}

void merge_into_generated_base(const peft::io::PeftAdapter<float>& ad) {
  if (!ad.config.is_lora()) return;
  std::vector<peft::Matrix<float>> values;
  std::vector<std::string> names;
  for (const auto& m : ad.lora) {
    if (!small(m)) return;
    const bool fan = ad.config.fan_in_fan_out;
    values.push_back(
        peft::Matrix<float>::Constant(fan ? m.A.cols() : m.B.rows(), fan ? m.B.rows() : m.A.cols(), 0.25f));
    names.push_back(m.path + ".weight");
  }
  for (const auto& f : ad.full) {
    if (f.value.size() > kMaxElements) return;
    values.push_back(peft::Matrix<float>::Zero(f.value.rows(), f.value.cols()));
    names.push_back(f.name);
  }
  std::vector<peft::io::NamedTensor<float>> tensors;
  for (std::size_t i = 0; i < values.size(); ++i) {
    std::vector<std::int64_t> shape{values[i].rows(), values[i].cols()};
    if (i >= ad.lora.size()) shape = ad.full[i - ad.lora.size()].shape;
    tensors.emplace_back(names[i], shape, values[i].data());
  }
  const std::string base = scratch_dir() + "/base.safetensors", out = scratch_dir() + "/out.safetensors";
  ::unlink(out.c_str());
  try {
    peft::io::save_safetensors<float>(base, tensors);
  } catch (const peft::Error&) {
    return;  // e.g. duplicate names: not what this target is about
  }
  try {
    peft::io::merge_adapter_file<float>(base, ad, out);
  } catch (const peft::Error&) {
    struct stat st;
    if (::stat(out.c_str(), &st) == 0) std::abort();  // a refused merge left an output behind
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::Split parts;
  if (!fuzz::split(data, size, parts)) return 0;
  const char* text = reinterpret_cast<const char*>(parts.first);
  peft::io::AdapterConfig config;
  try {
    config = peft::io::parse_adapter_config(peft::io::parse_json_strict(text, text + parts.first_size, "fuzz"), "fuzz");
  } catch (const peft::Error&) {
    return 0;
  }
  const fuzz::MemFile weights(parts.second, parts.second_size);
  try {
    const peft::io::SafeTensorsFile st(weights.path());
    const peft::io::PeftAdapter<float> ad = peft::io::adapter_from_file<float>(config, st);
    combine_with_itself(ad);
    merge_into_generated_base(ad);
  } catch (const peft::Error&) {
  }
  return 0;
}
