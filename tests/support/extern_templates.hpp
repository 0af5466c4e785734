#pragma once
// Test build only: explicit instantiation declarations for Eigen's decompositions that several test
// TUs use (merge/low_rank_svd, LoftQ, the LoHa / LoKr / VeRA tests). Their heavy members are defined
// outside the class body, so the declaration saves the whole instantiation, not only code
// generation. The library's own class templates declare theirs at the end of their headers (inside
// #ifdef PEFT_EXTERN_TEMPLATES). tests/CMakeLists.txt force-includes this file (-include) into the
// test TUs that link peft_test_instantiations; instantiations_eigen.cpp holds the definitions.
// Eigen 3.4 types; on Eigen 5 the options are template arguments and these are left implicit.
#include <Eigen/QR>
#include <Eigen/SVD>

#if defined(PEFT_EXTERN_TEMPLATES) && !EIGEN_VERSION_AT_LEAST(3, 4, 90)
namespace Eigen {
extern template class BDCSVD<MatrixXd>;     // the library's SVDs run in double (merge/low_rank_svd.hpp)
extern template class JacobiSVD<MatrixXd>;  // BDCSVD's small-block solver, and the tests' reference SVD
extern template class HouseholderQR<MatrixXd>;
}  // namespace Eigen
#endif
