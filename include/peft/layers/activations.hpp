#pragma once
// Element-wise activations with their derivatives, used by the feed-forward block and by adapters.
//
//   identity  f(z) = z                                   f'(z) = 1
//   relu      f(z) = max(z, 0)                           f'(z) = [z > 0]   (0 at z = 0, like torch)
//   gelu      f(z) = z Φ(z) = ½ z (1 + erf(z/√2))        f'(z) = Φ(z) + z φ(z)
//             (torch.nn.GELU(), exact erf form; Hendrycks & Gimpel, 2016, "Gaussian Error Linear Units")
//   gelu_tanh f(z) = ½ z (1 + tanh(u)), u = √(2/π)(z + 0.044715 z³)
//             f'(z) = ½ (1 + tanh u) + ½ z (1 − tanh² u) √(2/π)(1 + 3·0.044715 z²)
//             (torch.nn.GELU(approximate="tanh"), Hugging Face "gelu_new" / "gelu_pytorch_tanh")
//   silu      f(z) = z σ(z)                              f'(z) = σ(z)(1 + z(1 − σ(z)))
//             (Elfwing et al., 2017; a.k.a. swish)
//   tanh      f(z) = tanh z                              f'(z) = 1 − tanh² z
//
// Backward takes the *pre-activation* z (what the caller caches), so no layer has to keep both
// z and f(z): dz = dy ⊙ f'(z). All kernels are coefficient-wise, so dz may alias dy.
//
// The matrix kernels are Eigen array expressions, so exp, tanh and erf run as SIMD packets (erf
// from Eigen's SpecialFunctions module: for float a rational approximation within 5 ulp of the
// correctly rounded value; double calls std::erf). A scalar erf costs ~30 ns: on a transformer's
// [batch·seq, 4d] FFN activation that was most of a training step. activation_value /
// activation_derivative are the scalar references the tests compare against.
#include <cmath>
#include <string>

#include <unsupported/Eigen/SpecialFunctions>

#include "peft/core/error.hpp"
#include "peft/core/parallel.hpp"
#include "peft/core/types.hpp"

namespace peft {

enum class Activation { Identity, ReLU, GELU, GELUTanh, SiLU, Tanh };

/// Canonical name (the Hugging Face `hidden_act` spelling where one exists).
inline const char* activation_name(Activation a) {
  switch (a) {
    case Activation::Identity: return "identity";
    case Activation::ReLU: return "relu";
    case Activation::GELU: return "gelu";
    case Activation::GELUTanh: return "gelu_tanh";
    case Activation::SiLU: return "silu";
    case Activation::Tanh: return "tanh";
  }
  return "unknown";
}

/// Parses Hugging Face / PEFT spellings: "relu", "gelu", "gelu_new", "gelu_pytorch_tanh",
/// "gelu_tanh", "silu", "swish", "tanh", "identity", "linear". Unknown names throw ConfigError.
inline Activation parse_activation(const std::string& name) {
  if (name == "identity" || name == "linear" || name == "none") return Activation::Identity;
  if (name == "relu") return Activation::ReLU;
  if (name == "gelu") return Activation::GELU;
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_tanh" || name == "gelu_fast")
    return Activation::GELUTanh;
  if (name == "silu" || name == "swish") return Activation::SiLU;
  if (name == "tanh") return Activation::Tanh;
  throw ConfigError("activation: unknown name \"" + name +
                    "\"; expected one of identity, linear, relu, gelu, gelu_new, gelu_pytorch_tanh, gelu_tanh, "
                    "silu, swish, tanh");
}

namespace detail {
constexpr double kSqrt2OverPi = 0.7978845608028654;  // √(2/π)
constexpr double kInvSqrt2 = 0.7071067811865476;     // 1/√2
constexpr double kInvSqrt2Pi = 0.3989422804014327;   // 1/√(2π)
constexpr double kGeluTanhCoeff = 0.044715;
}  // namespace detail

/// f(z) for one scalar.
template <class T>
T activation_value(Activation a, T z) {
  using std::erf;
  using std::exp;
  using std::tanh;
  switch (a) {
    case Activation::Identity: return z;
    case Activation::ReLU: return z > T(0) ? z : T(0);
    case Activation::GELU: return T(0.5) * z * (T(1) + erf(z * T(detail::kInvSqrt2)));
    case Activation::GELUTanh: {
      const T u = T(detail::kSqrt2OverPi) * (z + T(detail::kGeluTanhCoeff) * z * z * z);
      return T(0.5) * z * (T(1) + tanh(u));
    }
    case Activation::SiLU: return z / (T(1) + exp(-z));
    case Activation::Tanh: return tanh(z);
  }
  return z;
}

/// f'(z) for one scalar.
template <class T>
T activation_derivative(Activation a, T z) {
  using std::erf;
  using std::exp;
  using std::tanh;
  switch (a) {
    case Activation::Identity: return T(1);
    case Activation::ReLU: return z > T(0) ? T(1) : T(0);
    case Activation::GELU: {
      const T cdf = T(0.5) * (T(1) + erf(z * T(detail::kInvSqrt2)));  // Φ(z)
      const T pdf = T(detail::kInvSqrt2Pi) * exp(T(-0.5) * z * z);    // φ(z)
      return cdf + z * pdf;
    }
    case Activation::GELUTanh: {
      const T z2 = z * z;
      const T th = tanh(T(detail::kSqrt2OverPi) * (z + T(detail::kGeluTanhCoeff) * z2 * z));
      const T du = T(detail::kSqrt2OverPi) * (T(1) + T(3.0 * detail::kGeluTanhCoeff) * z2);
      return T(0.5) * (T(1) + th) + T(0.5) * z * (T(1) - th * th) * du;
    }
    case Activation::SiLU: {
      const T s = T(1) / (T(1) + exp(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    case Activation::Tanh: {
      const T th = tanh(z);
      return T(1) - th * th;
    }
  }
  return T(1);
}

namespace detail {

/// out = f(z), out may be z itself (coefficient-wise).
template <class T, class In, class Out>
void activation_apply(Activation a, const In& z, Out& out) {
  switch (a) {
    case Activation::Identity: out = z; return;
    case Activation::ReLU: out = z.max(T(0)); return;
    case Activation::GELU: out = T(0.5) * z * (T(1) + (z * T(kInvSqrt2)).erf()); return;
    case Activation::GELUTanh:
      out = T(0.5) * z * (T(1) + (T(kSqrt2OverPi) * (z + T(kGeluTanhCoeff) * z.cube())).tanh());
      return;
    case Activation::SiLU: out = z / (T(1) + (-z).exp()); return;
    case Activation::Tanh: out = z.tanh(); return;
  }
}

/// d = f'(z) (d must not alias z).
template <class T, class In, class Out>
void activation_derivative_apply(Activation a, const In& z, Out& d) {
  switch (a) {
    case Activation::Identity: d.setConstant(T(1)); return;
    case Activation::ReLU: d = (z > T(0)).template cast<T>(); return;
    case Activation::GELU:  // Φ(z) + z φ(z)
      d = T(0.5) * (T(1) + (z * T(kInvSqrt2)).erf()) + T(kInvSqrt2Pi) * z * (T(-0.5) * z.square()).exp();
      return;
    case Activation::GELUTanh:  // d = tanh u first, then ½(1 + th) + ½ z (1 − th²) u'
      d = (T(kSqrt2OverPi) * (z + T(kGeluTanhCoeff) * z.cube())).tanh();
      d = T(0.5) * (T(1) + d) +
          T(0.5) * z * (T(1) - d.square()) * (T(kSqrt2OverPi) * (T(1) + T(3.0 * kGeluTanhCoeff) * z.square()));
      return;
    case Activation::SiLU:  // d = σ(z) first, then σ (1 + z (1 − σ))
      d = (T(1) + (-z).exp()).inverse();
      d = d * (T(1) + z * (T(1) - d));
      return;
    case Activation::Tanh:
      d = z.tanh();
      d = T(1) - d.square();
      return;
  }
}

/// Rough cost of one element of f or f' in flops' worth, for the thread split.
inline double activation_cost(Activation a) {
  switch (a) {
    case Activation::Identity:
    case Activation::ReLU: return 4.0;
    case Activation::GELU:
    case Activation::GELUTanh: return 40.0;
    case Activation::SiLU:
    case Activation::Tanh: return 25.0;
  }
  return 4.0;
}

}  // namespace detail

// Coefficient-wise, so the rows are split between threads (core/parallel.hpp): same values.

/// y = f(z), coefficient-wise. `y` is resized only when its shape differs (no allocation on reuse).
template <class T>
void activation_forward(Activation a, const ConstMatrixRef<T>& z, Matrix<T>& y) {
  y.resize(z.rows(), z.cols());
  parallel_rows(z.rows(), detail::activation_cost(a) * static_cast<double>(z.cols()), [&](Index b, Index e) {
    auto out = y.middleRows(b, e - b).array();
    detail::activation_apply<T>(a, z.middleRows(b, e - b).array(), out);
  });
}

/// In place: z ← f(z).
template <class T>
void activation_forward_inplace(Activation a, MatrixRef<T> z) {
  if (a == Activation::Identity) return;
  parallel_rows(z.rows(), detail::activation_cost(a) * static_cast<double>(z.cols()), [&](Index b, Index e) {
    auto out = z.middleRows(b, e - b).array();
    detail::activation_apply<T>(a, z.middleRows(b, e - b).array(), out);
  });
}

/// dz = dy ⊙ f'(z), from the cached pre-activation z, with f'(z) computed into `fprime` (scratch,
/// resized only when its shape differs). `dz` may be the same object as `dy`.
template <class T>
void activation_backward(Activation a, const ConstMatrixRef<T>& z, const ConstMatrixRef<T>& dy, Matrix<T>& dz,
                         Matrix<T>& fprime) {
  if (z.rows() != dy.rows() || z.cols() != dy.cols())
    throw ShapeError(std::string("activation ") + activation_name(a) + ": output gradient has shape " +
                     shape_str(dy.rows(), dy.cols()) + ", expected " + shape_str(z.rows(), z.cols()));
  if (a == Activation::Identity) {
    if (dz.data() != dy.data()) dz = dy;
    return;
  }
  fprime.resize(z.rows(), z.cols());
  if (dz.rows() != z.rows() || dz.cols() != z.cols()) dz.resize(z.rows(), z.cols());
  parallel_rows(z.rows(), detail::activation_cost(a) * static_cast<double>(z.cols()), [&](Index b, Index e) {
    auto d = fprime.middleRows(b, e - b).array();
    detail::activation_derivative_apply<T>(a, z.middleRows(b, e - b).array(), d);
    dz.middleRows(b, e - b).array() = dy.middleRows(b, e - b).array() * d;
  });
}

/// Same, with a temporary for f'(z) (allocates; layers pass their own scratch).
template <class T>
void activation_backward(Activation a, const ConstMatrixRef<T>& z, const ConstMatrixRef<T>& dy, Matrix<T>& dz) {
  Matrix<T> fprime;
  activation_backward<T>(a, z, dy, dz, fprime);
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_ACTIVATIONS_TEMPLATES(KW, T)                                                                             \
  KW template void activation_forward<T>(Activation, const ConstMatrixRef<T>&, Matrix<T>&);                           \
  KW template void activation_forward_inplace<T>(Activation, MatrixRef<T>);                                           \
  KW template void activation_backward<T>(Activation, const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, Matrix<T>&, \
                                          Matrix<T>&);                                                                \
  KW template void activation_backward<T>(Activation, const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, Matrix<T>&);
namespace peft {
PEFT_ACTIVATIONS_TEMPLATES(extern, float)
PEFT_ACTIVATIONS_TEMPLATES(extern, double)
}  // namespace peft
#endif
