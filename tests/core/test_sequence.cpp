#include <peft/core/sequence.hpp>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("SequenceLayout addresses rows and validates", "[sequence]") {
  const SequenceLayout layout(3, 4, {4, 1, 2});
  CHECK(layout.rows() == 12);
  CHECK(layout.row(2, 1) == 9);
  CHECK(layout.valid(1, 0));
  CHECK_FALSE(layout.valid(1, 1));
  CHECK(layout.padded());
  CHECK(layout.total_tokens() == 7);
  CHECK_FALSE(SequenceLayout(2, 3).padded());
  layout.validate("x", 12);
  const SequenceLayout p = layout.prepended(2);
  CHECK(p.seq == 6);
  CHECK(p.lengths == std::vector<Index>{6, 3, 4});
  PEFT_REQUIRE_THROWS_WITH(layout.validate("Model \"m\"", 10), ShapeError,
                           "Model \"m\": sequence data has 10 rows, expected batch*seq = 3*4 = 12");
  PEFT_REQUIRE_THROWS_WITH(SequenceLayout(2, 4, {4, 5}).validate("m"), ShapeError,
                           "m: sequence 1 has length 5, expected 1 <= length <= seq=4");
  PEFT_REQUIRE_THROWS_WITH(SequenceLayout(0, 4).validate("m"), ShapeError, "batch >= 1 and seq >= 1");
}

TEMPLATE_TEST_CASE("pack_sequences pads; prepend_rows and its backward", "[sequence]", float, double) {
  using T = TestType;
  Rng rng(91);
  const std::vector<Matrix<T>> seqs = {test::random_matrix<T>(2, 3, rng), test::random_matrix<T>(4, 3, rng)};
  const SequenceBatch<T> batch = pack_sequences(seqs, T(-1));
  CHECK(batch.layout.seq == 4);
  CHECK(batch.layout.lengths == std::vector<Index>{2, 4});
  CHECK(batch.sequence(0).topRows(2) == seqs[0]);
  CHECK(batch.sequence(0).bottomRows(2).isConstant(T(-1)));
  CHECK(batch.sequence(1) == seqs[1]);

  // Shared prefix [n, d] and per-sequence prefix [batch·n, d].
  const Matrix<T> shared = test::random_matrix<T>(2, 3, rng), per = test::random_matrix<T>(4, 3, rng);
  Matrix<T> out;
  SequenceLayout out_layout;
  prepend_rows<T>(batch.data, batch.layout, shared, out, out_layout, 2);
  CHECK(out_layout.seq == 6);
  CHECK(out_layout.lengths == std::vector<Index>{4, 6});
  CHECK(out.middleRows(0, 2) == shared);
  CHECK(out.middleRows(6, 2) == shared);
  CHECK(out.middleRows(2, 4) == batch.data.middleRows(0, 4));
  CHECK(out.middleRows(8, 4) == batch.data.middleRows(4, 4));
  prepend_rows<T>(batch.data, batch.layout, per, out, out_layout, 2);
  CHECK(out.middleRows(6, 2) == per.bottomRows(2));

  const Matrix<T> dy = test::random_matrix<T>(12, 3, rng);
  Matrix<T> dx, dshared = Matrix<T>::Zero(2, 3), dper = Matrix<T>::Zero(4, 3);
  split_prepended_rows<T>(dy, out_layout, 2, &dx, &dshared);
  split_prepended_rows<T>(dy, out_layout, 2, nullptr, &dper);
  CHECK(dx.middleRows(0, 4) == dy.middleRows(2, 4));
  CHECK(dx.middleRows(4, 4) == dy.middleRows(8, 4));
  CHECK(test::rel_diff(dshared, Matrix<T>(dy.middleRows(0, 2) + dy.middleRows(6, 2))) < test::Tolerances<T>::rel);
  CHECK(dper.topRows(2) == dy.middleRows(0, 2));
  CHECK(dper.bottomRows(2) == dy.middleRows(6, 2));

  PEFT_REQUIRE_THROWS_WITH(prepend_rows<T>(batch.data, batch.layout, Matrix<T>::Zero(3, 3), out, out_layout, 2),
                           ShapeError, "prefix has 3 rows, expected n=2 (shared) or batch*n=4");
  PEFT_REQUIRE_THROWS_WITH(prepend_rows<T>(batch.data, batch.layout, Matrix<T>::Zero(2, 5), out, out_layout, 2),
                           ShapeError, "prefix has 5 features, expected 3");
  PEFT_REQUIRE_THROWS_WITH(pack_sequences(std::vector<Matrix<T>>{Matrix<T>::Zero(2, 3), Matrix<T>::Zero(2, 4)}),
                           ShapeError, "sequence 1 has 4 features, expected 3");
}

TEST_CASE("pack_token_ids pads ids and rejects empty sequences", "[sequence]") {
  SequenceLayout layout;
  const auto ids = pack_token_ids({{5, 6, 7}, {8}}, layout, 0);
  CHECK(ids == std::vector<Index>{5, 6, 7, 8, 0, 0});
  CHECK(layout.lengths == std::vector<Index>{3, 1});
  PEFT_REQUIRE_THROWS_WITH(pack_token_ids({{5}, {}}, layout), ShapeError, "sequence 1 has length 0");
}
