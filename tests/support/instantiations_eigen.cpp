// Test build only: the one compiled copy of the Eigen decompositions several test TUs use (their
// `extern template` declarations are in support/extern_templates.hpp).
#include <Eigen/QR>
#include <Eigen/SVD>

#if !EIGEN_VERSION_AT_LEAST(3, 4, 90)
namespace Eigen {
template class BDCSVD<MatrixXd>;
template class JacobiSVD<MatrixXd>;
template class HouseholderQR<MatrixXd>;
}  // namespace Eigen
#endif
