// peft::gemm allocates nothing after the first product of a shape, on every path of its dispatch,
// with alpha and with the operand forms the layers pass. The one-row result with alpha (dW += dYᵀ X
// of a one-output head) once copied a's row into a heap temporary on every call.
#include "support/no_malloc.hpp"

#include <peft/core/gemm.hpp>

#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("gemm: no allocation after the first product of each shape", "[gemm][no_malloc]") {
  Rng rng(7);
  struct Case {
    Matrix<float> a, b, y, x;  // y = a b; x [rows of a, k] for dW += yᵀ-shaped products
  };
  // (m, k, n): small, one-row, one-column, and GEMMs whose packing blocks exceed 128 KiB.
  const Index shapes[][3] = {{2, 3, 4}, {1, 37, 29}, {33, 41, 1}, {64, 48, 40}, {300, 260, 280}};
  std::vector<Case> cases;
  for (const auto& s : shapes)
    cases.push_back({peft::test::random_matrix<float>(s[0], s[1], rng),
                     peft::test::random_matrix<float>(s[1], s[2], rng), Matrix<float>(s[0], s[2]),
                     Matrix<float>(s[1], s[2])});
  Matrix<float> dw;  // [1, n]: a one-output head's dW += dyᵀ x, dy [rows, 1]
  const Matrix<float> dy = peft::test::random_matrix<float>(40, 1, rng),
                      xin = peft::test::random_matrix<float>(40, 24, rng);
  dw.setZero(1, 24);
  const long n = peft::test::no_malloc::allocations_after_warmup([&] {
    for (Case& c : cases) {
      const ConstMatrixRef<float> ra(c.a), rb(c.b);
      gemm(c.y, ra, rb, 0.5f);
      gemm(c.y, c.a, c.b, -1.5f, true);
      gemm(c.x, c.a.transpose(), c.y);  // [k, m] · [m, n]
    }
    const ConstMatrixRef<float> rdy(dy);
    gemm(dw, rdy.transpose(), xin, 0.25f, true);
  });
  CHECK(n == 0);
}

TEST_CASE("gemm: peft's own kernel allocates nothing after the first product of each shape",
          "[gemm][no_malloc]") {
  // detail::gemm_impl<true> (peft::gemm's default with AVX-512): its packed blocks come from the
  // thread's arena, which only grows. Shapes: whole and partial tiles, several depth blocks, B
  // wider than one column block, and a column-major destination (computed as its transpose).
  Rng rng(9);
  using ColMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  const Index shapes[][3] = {{64, 64, 64}, {37, 900, 70}, {130, 40, 700}};
  std::vector<Matrix<float>> as, bs, ys;
  std::vector<ColMajor> cms;
  for (const auto& s : shapes) {
    as.push_back(peft::test::random_matrix<float>(s[0], s[1], rng));
    bs.push_back(peft::test::random_matrix<float>(s[1], s[2], rng));
    ys.emplace_back(s[0], s[2]);
    cms.emplace_back(s[0], s[2]);
  }
  const long n = peft::test::no_malloc::allocations_after_warmup([&] {
    for (std::size_t i = 0; i < as.size(); ++i) {
      detail::gemm_impl<true>(ys[i], as[i], bs[i], 0.5f, false);
      detail::gemm_impl<true>(ys[i], as[i], bs[i], -1.5f, true);
      detail::gemm_impl<true>(cms[i], as[i], bs[i], 1.0f, false);
    }
  });
  CHECK(n == 0);
}

TEST_CASE("gemm: the allocation guard is live in this build", "[gemm][no_malloc]") {
  Rng rng(8);
  const Matrix<float> a = peft::test::random_matrix<float>(8, 8, rng);
  const long n = peft::test::no_malloc::count_allocations([&] {
    Matrix<float> fresh = a * a;  // a new matrix allocates
    (void)fresh;
  });
  CHECK(n > 0);
}
