#pragma once
// Factories of the architectures compiled in (one translation unit each).
#include "model.hpp"

namespace study {
std::unique_ptr<Net> make_mlp(const NetOptions& options, Index height, Index width, peft::Rng& rng);
#if STUDY_HAS_TRANSFORMER
std::unique_ptr<Net> make_transformer(const NetOptions& options, Index height, Index width, peft::Rng& rng);
#endif
}  // namespace study
