#pragma once
// Error hierarchy. Every public entry point validates its input and throws one of these with a
// message that names the object, what was expected and what was found, e.g.
//   LoRALinear "layers.0.q": input has 512 features, expected 768
#include <stdexcept>
#include <string>

namespace peft {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Tensor shapes that do not fit together.
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// Bad hyper-parameters, unknown names, invalid state transitions (e.g. training while merged).
class ConfigError : public Error {
 public:
  using Error::Error;
};

/// Malformed, truncated or hostile files; failed reads or writes.
class IoError : public Error {
 public:
  using Error::Error;
};

/// NaN or Inf where finite numbers are required (safe merge, losses, optimizer state).
class NumericError : public Error {
 public:
  using Error::Error;
};

/// `Kind "name"` prefix used in messages; an unnamed object is reported by its kind alone.
inline std::string describe(const std::string& kind, const std::string& name) {
  return name.empty() ? kind : kind + " \"" + name + "\"";
}

}  // namespace peft
