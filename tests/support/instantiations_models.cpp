// Test build only: the one compiled copy of the composite layers and the built-in models for float
// and double (see instantiations_layers.cpp).
#include "peft/layers/attention.hpp"
#include "peft/layers/feed_forward.hpp"
#include "peft/layers/prefix_attention.hpp"
#include "peft/models/llama.hpp"
#include "peft/models/transformer.hpp"

namespace peft {
template class MultiHeadAttention<float>;
template class MultiHeadAttention<double>;
template class FeedForward<float>;
template class FeedForward<double>;
template class PrefixAttention<float>;
template class PrefixAttention<double>;
template class TransformerBlock<float>;
template class TransformerBlock<double>;
template class TransformerClassifier<float>;
template class TransformerClassifier<double>;
template class ModulesToSave<float, LoRALinear<float>>;
template class ModulesToSave<double, LoRALinear<double>>;
template class RMSNorm<float>;
template class RMSNorm<double>;
template class LlamaAttention<float>;
template class LlamaAttention<double>;
template class LlamaMLP<float>;
template class LlamaMLP<double>;
template class LlamaDecoderLayer<float>;
template class LlamaDecoderLayer<double>;
template class LlamaModel<float>;
template class LlamaModel<double>;
template class LlamaForCausalLM<float>;
template class LlamaForCausalLM<double>;
}  // namespace peft
