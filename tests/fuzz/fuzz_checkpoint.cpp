// libFuzzer target: the training-checkpoint reader (io/checkpoint.hpp) on arbitrary bytes, then
// every restore path a resumed run takes: parameters into a model, AdamW state, the sampler's data
// order and an RNG. Any input must either restore or throw a peft::Error subclass; a restore that
// throws must leave what it was restoring into unchanged (validate first, then mutate).
#include <peft/io/checkpoint.hpp>
#include <peft/layers/linear.hpp>
#include <peft/optim/adam.hpp>

#include <cstdint>
#include <cstdlib>

#include "fuzz_support.hpp"

namespace {

template <class T>
bool same(const peft::Matrix<T>& a, const peft::Matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && (a.array() == b.array()).all();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const fuzz::MemFile file(data, size);
  peft::io::Checkpoint<float> ck;
  try {
    ck = peft::io::Checkpoint<float>::load(file.path());
  } catch (const peft::Error&) {
    return 0;
  }
  for (const auto& kv : ck.tensors()) (void)kv.second.value.sum();  // every accepted tensor is readable

  peft::Rng init(1);
  peft::Linear<float> model(3, 2, init, true, "fc");
  const peft::Matrix<float> w0 = model.weight.value;
  try {
    (void)peft::io::restore_parameters(model, ck);
  } catch (const peft::Error&) {
    if (!same(model.weight.value, w0)) std::abort();  // a refused restore changed the model
  }

  peft::AdamW<float> opt(model, peft::AdamWOptions{1e-3});
  try {
    peft::io::load_optimizer_state(opt, ck);
  } catch (const peft::Error&) {
  }

  peft::BatchSampler sampler(10, 3, 0);
  try {
    peft::io::load_sampler_state(sampler, ck);
  } catch (const peft::Error&) {
  }

  peft::Rng rng(0);
  try {
    if (ck.has_rng("rng")) ck.get_rng("rng", rng);
    if (ck.has_int("step")) (void)ck.get_int("step");
    if (ck.has_double("lr")) (void)ck.get_double("lr");
  } catch (const peft::Error&) {
  }
  return 0;
}
