// Test build only: the one compiled copy of the kernel methods (VeRA, LoHa, LoKr) (see
// instantiations_layers.cpp). The NF4 host is AdaptedLinear (instantiations_adapted.cpp).
#include "peft/adapters/loha.hpp"
#include "peft/adapters/lokr.hpp"
#include "peft/adapters/vera.hpp"

namespace peft {
template class VeraAdapter<float>;
template class VeraAdapter<double>;
template class KernelMethod<float, VeraAdapter<float>>;
template class KernelMethod<double, VeraAdapter<double>>;
template class LohaAdapter<float>;
template class LohaAdapter<double>;
template class KernelMethod<float, LohaAdapter<float>>;
template class KernelMethod<double, LohaAdapter<double>>;
template class LokrAdapter<float>;
template class LokrAdapter<double>;
template class KernelMethod<float, LokrAdapter<float>>;
template class KernelMethod<double, LokrAdapter<double>>;
}  // namespace peft
