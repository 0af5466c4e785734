#pragma once
// Test build only: explicit instantiation declarations for Eigen's decompositions that several test
// TUs use (merge/low_rank_svd, LoftQ, the LoHa / LoKr / VeRA tests). Their heavy members are defined
// outside the class body, so the declaration saves the whole instantiation, not only code
// generation. The library's own class templates declare theirs at the end of their headers (inside
// #ifdef PEFT_EXTERN_TEMPLATES). tests/CMakeLists.txt force-includes this file (-include) into the
// test TUs that link peft_test_instantiations; instantiations_eigen.inc holds the definitions.
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

// Eigen's matrix-product kernels (GEBP micro-kernel, panel packing, GEMV) for float and double in
// the shapes row-major products use, and the GEMM driver (general_matrix_matrix_product::run, for
// the four operand storage orders of a column-major result, which a row-major result is computed
// as). The kernels are EIGEN_DONT_INLINE members defined outside their class: under the
// declaration a TU neither instantiates nor compiles them (they were in every test TU, 11 or 12
// copies each). The driver's run() is defined in its class, so a TU still instantiates it where it
// is called, but at -Og (the test build's level) no longer compiles it (it was in 12 test objects).
// instantiations_eigen.inc holds the one copy. Not with EIGEN_USE_BLAS (the release-blas preset:
// Eigen then specializes the products).
#if !EIGEN_VERSION_AT_LEAST(3, 4, 90) && !defined(EIGEN_USE_BLAS)
// KW is `extern` (declaration) or empty (definition); T is float or double.
#define PEFT_EIGEN_PRODUCT_TEMPLATES(KW, T)                                                                         \
  KW template struct gebp_kernel<T, T, Index, blas_data_mapper<T, Index, ColMajor, Unaligned, 1>,                   \
                                 gebp_traits<T, T>::mr, gebp_traits<T, T>::nr, false, false>;                       \
  KW template struct gemm_pack_lhs<T, Index, const_blas_data_mapper<T, Index, ColMajor>, gebp_traits<T, T>::mr,     \
                                   gebp_traits<T, T>::LhsProgress, gebp_traits<T, T>::LhsPacket4Packing, ColMajor>; \
  KW template struct gemm_pack_lhs<T, Index, const_blas_data_mapper<T, Index, RowMajor>, gebp_traits<T, T>::mr,     \
                                   gebp_traits<T, T>::LhsProgress, gebp_traits<T, T>::LhsPacket4Packing, RowMajor>; \
  KW template struct gemm_pack_rhs<T, Index, const_blas_data_mapper<T, Index, ColMajor>, gebp_traits<T, T>::nr,     \
                                   ColMajor>;                                                                       \
  KW template struct gemm_pack_rhs<T, Index, const_blas_data_mapper<T, Index, RowMajor>, gebp_traits<T, T>::nr,     \
                                   RowMajor>;                                                                       \
  KW template struct general_matrix_vector_product<Index, T, const_blas_data_mapper<T, Index, ColMajor>, ColMajor,  \
                                                   false, T, const_blas_data_mapper<T, Index, RowMajor>, false, 0>; \
  KW template struct general_matrix_vector_product<Index, T, const_blas_data_mapper<T, Index, RowMajor>, RowMajor,  \
                                                   false, T, const_blas_data_mapper<T, Index, ColMajor>, false, 0>; \
  KW template struct general_matrix_matrix_product<Index, T, ColMajor, false, T, ColMajor, false, ColMajor, 1>;     \
  KW template struct general_matrix_matrix_product<Index, T, ColMajor, false, T, RowMajor, false, ColMajor, 1>;     \
  KW template struct general_matrix_matrix_product<Index, T, RowMajor, false, T, ColMajor, false, ColMajor, 1>;     \
  KW template struct general_matrix_matrix_product<Index, T, RowMajor, false, T, RowMajor, false, ColMajor, 1>;
#if defined(PEFT_EXTERN_TEMPLATES)
namespace Eigen::internal {
PEFT_EIGEN_PRODUCT_TEMPLATES(extern, float)
PEFT_EIGEN_PRODUCT_TEMPLATES(extern, double)
}  // namespace Eigen::internal
#endif
#endif
