#include <peft/layers/lora_mixed_batch.hpp>

#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {

template <class T>
LoRALinear<T> make_layer(Rng& rng) {
  LoRALinear<T> layer(10, 7, rng, true, "layers.3.o");
  LoraConfig a;
  a.r = 2;
  a.alpha = 4.0;
  a.init = LoraInit::None;  // non-zero B: every adapter changes the output
  LoraConfig b = a;
  b.r = 3;
  b.alpha = 6.0;
  b.use_rslora = true;
  LoraConfig c = a;
  c.r = 1;
  c.alpha = 0.5;
  layer.add_adapter("a", a, rng);
  layer.add_adapter("b", b, rng);
  layer.add_adapter("c", c, rng);
  return layer;
}

/// Row-by-row reference: the layer's own forward with only that row's adapter active.
template <class T>
Matrix<T> separate_runs(LoRALinear<T>& layer, const Matrix<T>& x, const std::vector<std::string>& names) {
  Matrix<T> y(x.rows(), layer.out_features());
  typename LoRALinear<T>::Cache cache;
  for (Index r = 0; r < x.rows(); ++r) {
    const std::string& n = names[static_cast<std::size_t>(r)];
    if (n == "none")
      layer.set_active(std::vector<std::string>{});
    else
      layer.set_active(n);
    y.row(r) = layer.forward(x.row(r), cache);
  }
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("mixed batch equals running each adapter separately", "[lora][mixed]", float, double) {
  Rng rng(41);
  LoRALinear<TestType> layer = make_layer<TestType>(rng);
  const Matrix<TestType> x = test::random_matrix<TestType>(9, 10, rng);
  const std::vector<std::string> names = {"b", "none", "a", "c", "b", "b", "none", "a", "c"};
  MixedBatchWorkspace<TestType> ws;
  Matrix<TestType> y;
  forward_mixed(layer, x, names, y, ws);
  const Matrix<TestType> ref = separate_runs(layer, x, names);
  CHECK(test::rel_diff(y, ref) < Tolerances<TestType>::rel);

  // Precomputed integer routing gives the same result.
  const std::vector<int> routing = route_rows(layer, names);
  CHECK(routing == std::vector<int>{1, kNoAdapter, 0, 2, 1, 1, kNoAdapter, 0, 2});
  Matrix<TestType> y2;
  forward_mixed(layer, x, routing, y2, ws);
  CHECK(y2 == y);

  // All rows on one adapter: the layer's own forward with that adapter active.
  for (const std::string n : {"a", "b", "c"}) {
    const std::vector<std::string> all(9, n);
    forward_mixed(layer, x, all, y, ws);
    layer.set_active(n);
    typename LoRALinear<TestType>::Cache cache;
    CHECK(test::rel_diff(y, layer.forward(x, cache)) < Tolerances<TestType>::rel);
  }
  // All rows "none": the base layer.
  forward_mixed(layer, x, std::vector<std::string>(9, "none"), y, ws);
  Matrix<TestType> base = x * layer.weight.value.transpose();
  base.rowwise() += layer.bias.value.row(0);
  CHECK(test::rel_diff(y, base) < Tolerances<TestType>::rel);

  // A smaller batch after a larger one reuses the buffers.
  const Matrix<TestType> x3 = x.topRows(3);
  forward_mixed(layer, x3, std::vector<std::string>{"c", "a", "none"}, y, ws);
  CHECK(test::rel_diff(y, separate_runs(layer, x3, {"c", "a", "none"})) < Tolerances<TestType>::rel);
}

TEST_CASE("mixed batch reuses its workspace and keeps its buffers after warm-up", "[lora][mixed]") {
  Rng rng(42);
  LoRALinear<double> layer = make_layer<double>(rng);
  const Matrix<double> x = test::random_matrix<double>(16, 10, rng);
  std::vector<std::string> names;
  for (int r = 0; r < 16; ++r) names.push_back(r % 4 == 3 ? "none" : std::string(1, static_cast<char>('a' + r % 4)));
  MixedBatchWorkspace<double> ws;
  Matrix<double> y;
  forward_mixed(layer, x, names, y, ws);  // warm-up
  std::vector<const double*> xg, up;
  for (std::size_t a = 0; a < ws.xg.size(); ++a) {
    xg.push_back(ws.xg[a].data());
    up.push_back(ws.up[a].data());
  }
  const double* yd = y.data();
  const Matrix<double> first = y;
  for (int it = 0; it < 3; ++it) forward_mixed(layer, x, names, y, ws);
  for (std::size_t a = 0; a < ws.xg.size(); ++a) {
    CHECK(ws.xg[a].data() == xg[a]);
    CHECK(ws.up[a].data() == up[a]);
  }
  CHECK(y.data() == yd);
  CHECK(y == first);
}

TEST_CASE("mixed batch rejects bad routing, merged layers and wrong shapes", "[lora][mixed][errors]") {
  Rng rng(43);
  LoRALinear<float> layer = make_layer<float>(rng);
  const Matrix<float> x = test::random_matrix<float>(4, 10, rng);
  MixedBatchWorkspace<float> ws;
  Matrix<float> y;
  PEFT_REQUIRE_THROWS_WITH(forward_mixed(layer, x, std::vector<std::string>{"a", "b", "zz", "none"}, y, ws),
                           ConfigError,
                           "LoRALinear \"layers.3.o\": row 2 asks for unknown adapter \"zz\"; "
                           "available: [a, b, c] or \"none\"");
  PEFT_REQUIRE_THROWS_WITH(forward_mixed(layer, x, std::vector<std::string>{"a", "b"}, y, ws), ShapeError,
                           "mixed batch has 4 rows but 2 row adapter entries");
  PEFT_REQUIRE_THROWS_WITH(forward_mixed(layer, x, std::vector<int>{0, 1, 2}, y, ws), ShapeError,
                           "mixed batch has 4 rows but 3 row adapter entries");
  PEFT_REQUIRE_THROWS_WITH(forward_mixed(layer, x, std::vector<int>{0, 3, 2, -1}, y, ws), ConfigError,
                           "row 1 is routed to adapter 3, expected -1 (none) or an index in [0, 3)");
  PEFT_REQUIRE_THROWS_WITH(forward_mixed(layer, x, std::vector<int>{0, -2, 2, -1}, y, ws), ConfigError,
                           "row 1 is routed to adapter -2");
  PEFT_REQUIRE_THROWS_WITH(
      forward_mixed(layer, Matrix<float>(Matrix<float>::Zero(4, 9)), std::vector<std::string>(4, "a"), y, ws),
      ShapeError, "input has 9 features, expected 10");
  layer.set_active("b");
  layer.merge();
  PEFT_REQUIRE_THROWS_WITH(forward_mixed(layer, x, std::vector<std::string>(4, "a"), y, ws), ConfigError,
                           "mixed-adapter batches need an unmerged layer (merged: b)");
  layer.unmerge();
  forward_mixed(layer, x, std::vector<std::string>(4, "none"), y, ws);
  CHECK(y.rows() == 4);
}

TEST_CASE("mixed batch serves DoRA rows next to LoRA rows", "[lora][mixed][dora]") {
  Rng rng(44);
  LoRALinear<double> layer = make_layer<double>(rng);
  LoraConfig d;
  d.r = 2;
  d.use_dora = true;
  d.init = LoraInit::None;  // B ≠ 0: the magnitude's scale really differs from 1
  layer.add_adapter("d", d, rng);
  layer.adapter("d").magnitude.value.array() *= 1.5;
  const Matrix<double> x = test::random_matrix<double>(5, 10, rng);
  MixedBatchWorkspace<double> ws;
  Matrix<double> y;
  const std::vector<std::string> rows{"a", "d", "none", "d", "b"};
  forward_mixed(layer, x, rows, y, ws);
  CHECK(test::rel_diff(y, separate_runs(layer, x, rows)) < Tolerances<double>::rel);
}
