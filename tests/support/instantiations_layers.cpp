// Test build only: the one compiled copy of the layer templates the tests use for float and double
// (their `extern template` declarations: the end of each header, and support/extern_templates.hpp).
#include "peft/core/module.hpp"
#include "peft/layers/adapter.hpp"
#include "peft/layers/dropout.hpp"
#include "peft/layers/embedding.hpp"
#include "peft/layers/ia3.hpp"
#include "peft/layers/layer_norm.hpp"
#include "peft/layers/linear.hpp"
#include "peft/layers/lora_adapter_set.hpp"
#include "peft/layers/lora_linear.hpp"

namespace peft {
template class Module<float>;
template class Module<double>;
template class Linear<float>;
template class Linear<double>;
template class LoraAdapterSet<float>;
template class LoraAdapterSet<double>;
template class LoRALinear<float>;
template class LoRALinear<double>;
template class IA3Vector<float>;
template class IA3Vector<double>;
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
}  // namespace peft
