// Test build only: the one compiled copy of the composite layers for float and
// double (see instantiations_layers.cpp).
#include "peft/layers/attention.hpp"
#include "peft/layers/feed_forward.hpp"
#include "peft/layers/prefix_attention.hpp"

namespace peft {
template class MultiHeadAttention<float>;
template class MultiHeadAttention<double>;
template class FeedForward<float>;
template class FeedForward<double>;
template class PrefixAttention<float>;
template class PrefixAttention<double>;
}  // namespace peft
