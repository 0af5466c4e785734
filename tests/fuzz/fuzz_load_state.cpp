// libFuzzer target: load_safetensors (io/load_state.hpp) of arbitrary bytes into a small model,
// strict and not, with a name map. Any input must either load or throw a peft::Error subclass; a
// load that throws must leave the model unchanged (staged, then swapped in), and a load that
// succeeds leaves only finite values.
#include <peft/io/load_state.hpp>
#include <peft/layers/linear.hpp>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "fuzz_support.hpp"

namespace {

class TwoLinears : public peft::Module<float> {
 public:
  TwoLinears() {
    peft::Rng rng(1);
    fc1 = peft::Linear<float>(4, 6, rng);
    fc2 = peft::Linear<float>(6, 3, rng, false);
  }
  peft::Linear<float> fc1, fc2;

 protected:
  void visit_children(const ChildVisitor& fn) override {
    fn("fc1", fc1);
    fn("fc2", fc2);
  }
};

std::vector<peft::Matrix<float>> values(TwoLinears& m) {
  std::vector<peft::Matrix<float>> v;
  m.visit_parameters([&](const std::string&, peft::Parameter<float>& p) { v.push_back(p.value); });
  return v;
}

bool same(const std::vector<peft::Matrix<float>>& a, const std::vector<peft::Matrix<float>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].rows() != b[i].rows() || a[i].cols() != b[i].cols() || !(a[i].array() == b[i].array()).all()) return false;
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const fuzz::MemFile file(data, size);
  for (int mode = 0; mode < 2; ++mode) {
    TwoLinears model;
    const std::vector<peft::Matrix<float>> before = values(model);
    peft::io::LoadStateOptions opt;
    opt.strict = mode == 0;
    if (mode == 1) opt.name_map = peft::io::strip_prefix("model.");
    try {
      (void)peft::io::load_safetensors(model, file.path(), opt);
    } catch (const peft::Error&) {
      if (!same(values(model), before)) std::abort();  // a refused load changed the model
      continue;
    }
    for (const auto& m : values(model))
      if (!m.allFinite()) std::abort();
  }
  return 0;
}
