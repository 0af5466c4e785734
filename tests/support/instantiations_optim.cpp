// Test build only: the one compiled copy of the optimizers for float and double
// (see instantiations_layers.cpp).
#include "peft/optim/adam.hpp"
#include "peft/optim/optimizer.hpp"
#include "peft/optim/sgd.hpp"

namespace peft {
template class Optimizer<float>;
template class Optimizer<double>;
template class BasicOptimizer<float, AdamState<float>>;
template class BasicOptimizer<double, AdamState<double>>;
template class BasicOptimizer<float, SGDState<float>>;
template class BasicOptimizer<double, SGDState<double>>;
template class detail::AdamImpl<float, false>;
template class detail::AdamImpl<double, false>;
template class detail::AdamImpl<float, true>;
template class detail::AdamImpl<double, true>;
template class Adam<float>;
template class Adam<double>;
template class AdamW<float>;
template class AdamW<double>;
template class SGD<float>;
template class SGD<double>;
}  // namespace peft
