#pragma once
// Input checks shared by the losses.
#include <string>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"

namespace peft {

namespace detail {
template <class T>
void check_finite_rows(const char* who, const ConstMatrixRef<T>& m, const char* what) {
  if (all_finite(m)) return;  // the common case, vectorized; the row search below only on failure
  for (Index i = 0; i < m.rows(); ++i)
    if (!m.row(i).allFinite())
      throw NumericError(std::string(who) + ": " + what + " row " + std::to_string(i) + " contains NaN or Inf");
}
}  // namespace detail

}  // namespace peft
