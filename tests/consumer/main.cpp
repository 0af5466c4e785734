// A downstream program: includes the umbrella header, builds a LoRA layer, checks merge == unmerged.
#include <peft/peft.hpp>

#include <cstdio>

// peft::peft brings OpenMP exactly when the peft build under test was configured with it.
#if PEFT_CONSUMER_OPENMP && !defined(_OPENMP)
#error "peft was built with OpenMP (PEFT_USE_OPENMP), but peft::peft did not pass it on"
#elif !PEFT_CONSUMER_OPENMP && defined(_OPENMP)
#error "peft was built without OpenMP, but peft::peft brought it"
#endif

int main() {
  peft::Rng rng(1);
  peft::LoRALinear<float> layer(16, 8, rng, true, "consumer.proj");
  layer.add_adapter("default", peft::LoraConfig{4, 8.0});
  peft::init::normal<float>(layer.adapter("default").B.value, rng, 0.0, 0.1);
  peft::Matrix<float> x = peft::Matrix<float>::Random(3, 16);
  peft::LoRALinear<float>::Cache cache;
  layer.eval();
  const peft::Matrix<float> y = layer.forward(x, cache);
  layer.merge();
  const peft::Matrix<float> ym = layer.forward(x, cache);
  const float rel = (y - ym).norm() / y.norm();
  std::printf("peft %d.%d.%d consumer: merged vs unmerged rel. difference %.2e\n", peft::kVersionMajor,
              peft::kVersionMinor, peft::kVersionPatch, static_cast<double>(rel));
  return rel < 1e-5f ? 0 : 1;
}
