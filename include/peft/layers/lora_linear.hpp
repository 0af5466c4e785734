#pragma once
// LoRALinear: the library's adapted linear layer under the name it is known by. It hosts LoRA and
// DoRA adapters (adapters/lora.hpp) and every other method behind the adapter interface (VeRA,
// LoHa, LoKr, (IA)³): see layers/adapted_linear.hpp for the host and its merge algebra.
#include "peft/layers/adapted_linear.hpp"

namespace peft {

template <class T>
using LoRALinear = AdaptedLinear<T>;

}  // namespace peft
