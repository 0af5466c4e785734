// Test build only: the one compiled copy of the Eigen decompositions and product kernels several
// test TUs use (their `extern template` declarations are in support/extern_templates.hpp, which is
// force-included here too: a definition may follow the declaration).
#include <Eigen/QR>
#include <Eigen/SVD>

#if !EIGEN_VERSION_AT_LEAST(3, 4, 90)
namespace Eigen {
template class BDCSVD<MatrixXd>;
template class JacobiSVD<MatrixXd>;
template class HouseholderQR<MatrixXd>;
}  // namespace Eigen
#endif

#ifdef PEFT_EIGEN_PRODUCT_TEMPLATES
namespace Eigen::internal {
PEFT_EIGEN_PRODUCT_TEMPLATES(, float)
PEFT_EIGEN_PRODUCT_TEMPLATES(, double)
}  // namespace Eigen::internal
#endif
