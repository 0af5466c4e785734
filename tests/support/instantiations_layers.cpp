// Test build only: the one compiled copy of the layer templates the tests use, for float and double
// (their `extern template` declarations sit at the end of each header, inside
// #ifdef PEFT_EXTERN_TEMPLATES; tests/CMakeLists.txt says why).
#include "peft/core/module.hpp"
#include "peft/layers/adapter.hpp"
#include "peft/layers/dropout.hpp"
#include "peft/layers/embedding.hpp"
#include "peft/layers/layer_norm.hpp"
#include "peft/layers/linear.hpp"
#include "peft/layers/soft_prompt.hpp"

namespace peft {
template class Module<float>;
template class Module<double>;
template class Linear<float>;
template class Linear<double>;
template class LayerNorm<float>;
template class LayerNorm<double>;
template class Embedding<float>;
template class Embedding<double>;
template class PositionalEmbedding<float>;
template class PositionalEmbedding<double>;
template class Dropout<float>;
template class Dropout<double>;
template class Adapter<float>;
template class Adapter<double>;
template class SoftPrompt<float>;
template class SoftPrompt<double>;
}  // namespace peft
