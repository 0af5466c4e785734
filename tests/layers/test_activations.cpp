#include <peft/layers/activations.hpp>
#include <peft/train/gradient_check.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {
const Activation kAll[] = {Activation::Identity, Activation::ReLU, Activation::GELU,
                           Activation::GELUTanh, Activation::SiLU, Activation::Tanh};
}

TEMPLATE_TEST_CASE("Activations match their closed forms", "[activations]", float, double) {
  using T = TestType;
  const T z = T(0.7);
  CHECK(activation_value<T>(Activation::Identity, z) == z);
  CHECK(activation_value<T>(Activation::ReLU, T(-0.3)) == T(0));
  CHECK(activation_value<T>(Activation::ReLU, z) == z);
  // torch.nn.functional.gelu / gelu(approximate="tanh") / silu / tanh at 0.7 in float64.
  constexpr double kGelu = 0.5306254434438489, kGeluTanh = 0.5305701347051167;
  constexpr double kSilu = 0.46773144051771626, kTanh = 0.6043677771171635;
  CHECK(std::abs(activation_value<T>(Activation::GELU, z) - kGelu) < 10 * Tolerances<T>::rel);
  CHECK(std::abs(activation_value<T>(Activation::GELUTanh, z) - kGeluTanh) < 10 * Tolerances<T>::rel);
  CHECK(std::abs(activation_value<T>(Activation::SiLU, z) - kSilu) < 10 * Tolerances<T>::rel);
  CHECK(std::abs(activation_value<T>(Activation::Tanh, z) - kTanh) < 10 * Tolerances<T>::rel);
  // The tanh approximation stays close to the exact GELU (|Δ| < 1e-3 on [-5, 5]).
  for (double x = -5.0; x <= 5.0; x += 0.25)
    CHECK(std::abs(activation_value<double>(Activation::GELU, x) - activation_value<double>(Activation::GELUTanh, x)) <
          1e-3);

  Rng rng(11);
  const Matrix<T> zm = test::random_matrix<T>(4, 5, rng, 2.0);
  for (Activation a : kAll) {
    Matrix<T> y;
    activation_forward<T>(a, zm, y);
    Matrix<T> inplace = zm;
    activation_forward_inplace<T>(a, inplace);
    for (Index i = 0; i < zm.rows(); ++i)
      for (Index j = 0; j < zm.cols(); ++j)  // Eigen's vectorised tanh may differ from std::tanh in the last ulps
        CHECK(std::abs(static_cast<double>(y(i, j) - activation_value<T>(a, zm(i, j)))) < 10 * Tolerances<T>::rel);
    CHECK(test::rel_diff(inplace, y) < Tolerances<T>::rel);
  }
}

TEMPLATE_TEST_CASE("Vectorised activation kernels match the scalar references over a wide range", "[activations]",
                   float, double) {
  // The matrix kernels use SIMD exp / tanh / erf; the scalar functions use the C library.
  using T = TestType;
  const double tol = std::is_same<T, float>::value ? 2e-6 : 1e-13;
  Matrix<T> z(1, 200);
  for (Index j = 0; j < z.cols(); ++j) z(0, j) = static_cast<T>(-25.0 + 0.25 * static_cast<double>(j) + 0.013);
  const Matrix<T> ones = Matrix<T>::Ones(1, z.cols());
  for (Activation a : kAll) {
    INFO(activation_name(a));
    Matrix<T> y, d, scratch;
    activation_forward<T>(a, z, y);
    activation_backward<T>(a, z, ones, d, scratch);
    for (Index j = 0; j < z.cols(); ++j) {
      INFO("z = " << z(0, j));
      const double fy = static_cast<double>(activation_value<T>(a, z(0, j)));
      const double fd = static_cast<double>(activation_derivative<T>(a, z(0, j)));
      CHECK(std::abs(static_cast<double>(y(0, j)) - fy) <= tol * std::max(1.0, std::abs(fy)));
      CHECK(std::abs(static_cast<double>(d(0, j)) - fd) <= tol * std::max(1.0, std::abs(fd)));
    }
  }
}

TEST_CASE("Activation backward matches finite differences", "[activations][gradcheck]") {
  Rng rng(12);
  Matrix<double> z = test::random_matrix<double>(3, 7, rng, 1.5);
  // Keep ReLU away from its kink at 0.
  for (Index i = 0; i < z.rows(); ++i)
    for (Index j = 0; j < z.cols(); ++j)
      if (std::abs(z(i, j)) < 0.05) z(i, j) = 0.3;
  const Matrix<double> g = test::random_matrix<double>(3, 7, rng);
  for (Activation a : kAll) {
    INFO(activation_name(a));
    auto loss = [&] {
      Matrix<double> y;
      activation_forward<double>(a, z, y);
      return test::dot(g, y);
    };
    Matrix<double> dz;
    activation_backward<double>(a, z, g, dz);
    CHECK(relative_error(dz, numerical_gradient(z, loss)) < Tolerances<double>::grad);
    // dz may alias dy.
    Matrix<double> inplace = g;
    activation_backward<double>(a, z, inplace, inplace);
    CHECK(test::rel_diff(inplace, dz) < Tolerances<double>::rel);
  }
}

TEST_CASE("Activation names parse and errors are named", "[activations][errors]") {
  CHECK(parse_activation("gelu") == Activation::GELU);
  CHECK(parse_activation("gelu_new") == Activation::GELUTanh);
  CHECK(parse_activation("gelu_pytorch_tanh") == Activation::GELUTanh);
  CHECK(parse_activation("swish") == Activation::SiLU);
  CHECK(parse_activation("linear") == Activation::Identity);
  for (Activation a : kAll) CHECK(parse_activation(activation_name(a)) == a);
  PEFT_REQUIRE_THROWS_WITH(parse_activation("sigmoidish"), ConfigError, "unknown name \"sigmoidish\"");
  Matrix<double> dz;
  PEFT_REQUIRE_THROWS_WITH(
      activation_backward<double>(Activation::ReLU, Matrix<double>::Zero(2, 3), Matrix<double>::Zero(2, 4), dz),
      ShapeError, "activation relu: output gradient has shape [2, 4], expected [2, 3]");
}
