// Test build only: the one compiled copy of the adapted-linear host and the LoRA family
// (see instantiations_layers.cpp).
#include "peft/adapters/ia3.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/layers/adapted_linear.hpp"

namespace peft {
template class AdaptedLinear<float>;
template class AdaptedLinear<double>;
template class LoraMethod<float>;
template class LoraMethod<double>;
template class DoraMethod<float>;
template class DoraMethod<double>;
template class IA3Method<float>;
template class IA3Method<double>;
}  // namespace peft
