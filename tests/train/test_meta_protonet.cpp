#include <peft/meta/protonet.hpp>

#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"
#include "train/meta_test_utils.hpp"

using namespace peft;

namespace {
std::vector<std::int64_t> proto_labels(const Matrix<double>& m) {
  std::vector<std::int64_t> out;
  for (Index j = 0; j < m.cols(); ++j) out.push_back(static_cast<std::int64_t>(m(0, j)));
  return out;
}
}  // namespace

TEST_CASE("PrototypicalLoss matches torch autograd", "[train][meta]") {
  const auto fx = peft::test::meta::read_meta_fixture();
  const Matrix<double>& s = fx.at("proto_support");
  const Matrix<double>& q = fx.at("proto_query");
  const auto ys = proto_labels(fx.at("proto_support_labels"));
  const auto yq = proto_labels(fx.at("proto_query_labels"));
  PrototypicalLoss<double> proto;
  Matrix<double> ds, dq;
  const double l = proto.forward_backward(s, ys, q, yq, 3, &ds, &dq);
  CHECK(l == Approx(fx.at("proto_loss")(0, 0)).epsilon(1e-12));
  CHECK(relative_error(ds, fx.at("proto_dsupport")) < 1e-12);
  CHECK(relative_error(dq, fx.at("proto_dquery")) < 1e-12);
}

TEMPLATE_TEST_CASE("PrototypicalLoss: prototypes, logits and predictions", "[train][meta]", float, double) {
  using T = TestType;
  Matrix<T> s(4, 2), q(3, 2);
  s << 0, 0, 2, 0, 10, 10, 10, 12;  // prototypes (1, 0) and (10, 11)
  q << 1, 1, 9, 11, 0, 0;
  PrototypicalLoss<T> proto;
  Matrix<T> dq;
  proto.forward_backward(s, {0, 0, 1, 1}, q, {0, 1, 1}, 2, nullptr, &dq);
  CHECK(proto.prototypes()(1, 1) == Approx(11.0));
  CHECK(proto.logits()(0, 0) == Approx(-1.0).epsilon(test::Tolerances<T>::rel));  // −‖(1,1) − (1,0)‖²
  CHECK(proto.logits()(1, 1) == Approx(-1.0).epsilon(test::Tolerances<T>::rel));
  CHECK(proto.correct({0, 1, 1}) == 2);  // the last query is nearest to class 0
}

TEST_CASE("PrototypicalLoss: gradients through the means match finite differences", "[train][meta]") {
  Rng rng(21);
  Matrix<double> s = test::random_matrix<double>(9, 5, rng);  // 3-way, uneven shots 4 / 3 / 2
  Matrix<double> q = test::random_matrix<double>(7, 5, rng);
  const std::vector<std::int64_t> ys{0, 1, 2, 0, 1, 0, 2, 1, 0}, yq{2, 0, 1, 1, 2, 0, 0};
  PrototypicalLoss<double> proto;
  Matrix<double> ds, dq;
  proto.forward_backward(s, ys, q, yq, 3, &ds, &dq);
  auto loss = [&] { return proto.forward_backward(s, ys, q, yq, 3, nullptr, nullptr); };
  CHECK(relative_error(ds, numerical_gradient<double>(s, loss)) < test::Tolerances<double>::grad);
  CHECK(relative_error(dq, numerical_gradient<double>(q, loss)) < test::Tolerances<double>::grad);
}

TEST_CASE("PrototypicalLoss refuses bad episodes by name", "[train][meta]") {
  Matrix<double> s(2, 3), q(1, 3), q4(1, 4);
  s.setOnes();
  q.setZero();
  q4.setZero();
  PrototypicalLoss<double> proto;
  PEFT_REQUIRE_THROWS_WITH(proto.forward_backward(s, {0, 1}, q4, {0}, 2, nullptr, nullptr), ShapeError,
                           "query embeddings have 4 features, expected 3");
  PEFT_REQUIRE_THROWS_WITH(proto.forward_backward(s, {0, 0}, q, {0}, 2, nullptr, nullptr), ShapeError,
                           "class 1 has no support row");
  PEFT_REQUIRE_THROWS_WITH(proto.forward_backward(s, {0, 2}, q, {0}, 2, nullptr, nullptr), ShapeError,
                           "support label at row 1 is 2");
  PEFT_REQUIRE_THROWS_WITH(proto.forward_backward(s, {0}, q, {0}, 2, nullptr, nullptr), ShapeError,
                           "1 support labels for 2 support rows");
  PEFT_REQUIRE_THROWS_WITH(proto.forward_backward(s, {0, 1}, q, {0}, 0, nullptr, nullptr), ConfigError,
                           "n_way must be >= 1");
}
