// Parameter: the gradient buffer exists only while trainable; logical (PyTorch) shapes.
#include <peft/core/parameter.hpp>

#include "support/test_utils.hpp"

using namespace peft;

TEMPLATE_TEST_CASE("Parameter trainable toggling allocates and frees the gradient", "[parameter]", float, double) {
  Parameter<TestType> p(3, 4);
  CHECK(p.trainable());
  CHECK(p.grad.rows() == 3);
  CHECK(p.grad.cols() == 4);
  CHECK(p.grad.cwiseAbs().maxCoeff() == TestType(0));
  CHECK(p.size() == 12);

  p.grad.setConstant(TestType(2));
  p.set_trainable(true);  // already trainable: the accumulated gradient is kept
  CHECK(p.grad(1, 1) == TestType(2));
  p.zero_grad();
  CHECK(p.grad.cwiseAbs().maxCoeff() == TestType(0));

  p.set_trainable(false);
  CHECK_FALSE(p.trainable());
  CHECK(p.grad.size() == 0);
  p.zero_grad();  // no-op while frozen
  CHECK(p.grad.size() == 0);

  p.set_trainable(true);
  CHECK(p.grad.rows() == 3);
  CHECK(p.grad.cols() == 4);
  CHECK(p.grad.cwiseAbs().maxCoeff() == TestType(0));

  Parameter<TestType> frozen(2, 2, false);
  CHECK_FALSE(frozen.trainable());
  CHECK(frozen.grad.size() == 0);
}

TEMPLATE_TEST_CASE("Parameter gradient follows a reshaped value", "[parameter]", float, double) {
  Parameter<TestType> p(2, 3);
  p.value.resize(5, 7);  // e.g. replaced by a loaded tensor
  p.zero_grad();
  CHECK(p.grad.rows() == 5);
  CHECK(p.grad.cols() == 7);
  p.value.resize(1, 2);
  Matrix<TestType>& g = p.accumulator();
  CHECK(g.rows() == 1);
  CHECK(g.cols() == 2);
  CHECK(&g == &p.grad);
}

TEST_CASE("Parameter shape is the PyTorch shape", "[parameter]") {
  Parameter<float> w(4, 6);
  CHECK(w.shape() == std::vector<std::int64_t>{4, 6});
  CHECK_FALSE(w.is_vector());
  Parameter<float> b(1, 6, true, true);
  CHECK(b.is_vector());
  CHECK(b.shape() == std::vector<std::int64_t>{6});
}
