// Test build only: the one compiled copy of the composite layers and the built-in models for float
// and double (see instantiations_layers.cpp).
#include "peft/layers/attention.hpp"
#include "peft/layers/feed_forward.hpp"
#include "peft/layers/prefix_attention.hpp"
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
}  // namespace peft
