#pragma once
// Test build only: explicit instantiation declarations for the class templates whose headers
// cannot carry their own `#ifdef PEFT_EXTERN_TEMPLATES` block yet (layers/lora_linear.hpp,
// lora_adapter_set.hpp, ia3.hpp, attention.hpp and feed_forward.hpp are being rewritten). The
// other heavy classes declare theirs at the end of their own header.
//
// tests/CMakeLists.txt force-includes this file (-include) into every test translation unit that
// defines PEFT_EXTERN_TEMPLATES. An extern template declaration must follow the class template's
// definition, so this header includes the definitions first. The matching explicit instantiation
// definitions live in tests/support/instantiations_*.cpp (library peft_test_instantiations).
//
// It also declares Eigen's decompositions that several test TUs use (merge/low_rank_svd, LoftQ,
// the LoHa / LoKr / VeRA tests): their heavy members are defined outside the class body, so here
// the declaration saves the whole instantiation, not only code generation (Eigen 3.4 types; on
// Eigen 5 the options are template arguments and these are left implicit).
//
// When these headers are rewritten, move each declaration to the end of its own header (inside
// `#ifdef PEFT_EXTERN_TEMPLATES`), keep the definition in instantiations_*.cpp, and delete this file
// together with its -include in tests/CMakeLists.txt.
#include <Eigen/QR>
#include <Eigen/SVD>

#include "peft/layers/attention.hpp"
#include "peft/layers/feed_forward.hpp"
#include "peft/layers/ia3.hpp"
#include "peft/layers/lora_adapter_set.hpp"
#include "peft/layers/lora_linear.hpp"

#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class LoraAdapterSet<float>;
extern template class LoraAdapterSet<double>;
extern template class LoRALinear<float>;
extern template class LoRALinear<double>;
extern template class IA3Vector<float>;
extern template class IA3Vector<double>;
extern template class MultiHeadAttention<float>;
extern template class MultiHeadAttention<double>;
extern template class FeedForward<float>;
extern template class FeedForward<double>;
}  // namespace peft
#endif

#if defined(PEFT_EXTERN_TEMPLATES) && !EIGEN_VERSION_AT_LEAST(3, 4, 90)
namespace Eigen {
extern template class BDCSVD<MatrixXf>;
extern template class BDCSVD<MatrixXd>;
extern template class JacobiSVD<Matrix<double, Dynamic, Dynamic, RowMajor>>;
extern template class HouseholderQR<MatrixXf>;
extern template class HouseholderQR<MatrixXd>;
}  // namespace Eigen
#endif
