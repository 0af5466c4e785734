#include "model.hpp"

#include <peft/core/error.hpp>

#include "model_registry.hpp"

namespace study {

std::string available_architectures() {
#if STUDY_HAS_TRANSFORMER
  return "transformer, mlp";
#else
  return "mlp";
#endif
}

std::unique_ptr<Net> make_net(const NetOptions& options, Index height, Index width, peft::Rng& rng) {
  if (options.arch == "mlp") return make_mlp(options, height, width, rng);
#if STUDY_HAS_TRANSFORMER
  if (options.arch == "transformer") return make_transformer(options, height, width, rng);
#endif
  throw peft::ConfigError("--arch " + options.arch + ": unknown architecture; available: " + available_architectures());
}

}  // namespace study
