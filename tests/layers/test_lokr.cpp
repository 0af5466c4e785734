// LoKr (peft/adapters/lokr.hpp): reproduces Hugging Face PEFT 0.21.2 on every module of the
// fixtures lokr, lokr_decompose_both and lokr_factor, PEFT's factorization() table, exact
// gradients (finite differences) for every layout, merged == unmerged, the LoRA factor form and
// its rank, identity at init, the training-only dropouts and every error path.
#include <peft/adapters/lokr.hpp>
#include <peft/io/json.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/train/gradient_check.hpp>

#include <Eigen/SVD>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>

#include "method_fixtures.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace lokr_test {

using peft::test::methods::data_dir;
using peft::test::methods::kModules;
using peft::test::methods::match_pattern;
using peft::test::methods::read_text;

LokrConfig config_for(const io::Json& j, const std::string& path) {
  LokrConfig c;
  c.r = j.at("r").get<int>();
  c.alpha = j.at("alpha").get<double>();
  match_pattern(j.at("rank_pattern"), path, c.r);
  match_pattern(j.at("alpha_pattern"), path, c.alpha);
  c.decompose_both = j.at("decompose_both").get<bool>();
  c.decompose_factor = j.at("decompose_factor").get<int>();
  c.rank_dropout = j.at("rank_dropout").get<double>();
  c.module_dropout = j.at("module_dropout").get<double>();
  c.rank_dropout_scale = j.at("rank_dropout_scale").get<bool>();
  c.use_effective_conv2d = j.at("use_effective_conv2d").get<bool>();
  return c;
}

/// #{σ_j > rtol · σ_1}; rtol 1e-5 suits float data (rounding noise ~1e-7 · σ_1).
Index numerical_rank(const Matrix<double>& m, double rtol = 1e-5) {
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(m);
  const auto& s = svd.singularValues();
  Index k = 0;
  for (Index i = 0; i < s.size(); ++i) k += s(i) > rtol * s(0) ? 1 : 0;
  return k;
}

template <class T>
void set_random(LokrAdapter<T>& a, Rng& rng, double std = 0.5) {
  for (auto& t : a.tensors("m", "default"))
    t.parameter->value = test::random_matrix<T>(t.parameter->value.rows(), t.parameter->value.cols(), rng, std);
}

double loss_of(LokrAdapter<double>& a, const Matrix<double>& x, const Matrix<double>& g) {
  typename LokrAdapter<double>::Cache c;
  Matrix<double> y = Matrix<double>::Zero(x.rows(), a.out_features());
  a.forward(x, y, c);
  return test::dot(g, y);
}

void gradcheck(LokrAdapter<double>& a, Matrix<double>& x, const Matrix<double>& g) {
  for (auto& t : a.tensors("m", "default")) t.parameter->zero_grad();
  typename LokrAdapter<double>::Cache c;
  Matrix<double> y = Matrix<double>::Zero(x.rows(), a.out_features());
  a.forward(x, y, c);
  Matrix<double> dx = Matrix<double>::Zero(x.rows(), x.cols());
  a.backward(c, g, &dx);
  auto loss = [&] { return loss_of(a, x, g); };
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  for (auto& t : a.tensors("m", "default")) {
    INFO("parameter " << t.model_name);
    REQUIRE(t.parameter->trainable());
    CHECK(t.parameter->grad.norm() > 0.0);
    CHECK(relative_error(t.parameter->grad, numerical_gradient(t.parameter->value, loss)) < Tolerances<double>::grad);
  }
}

}  // namespace lokr_test

TEST_CASE("LoKr factorization matches PEFT's table", "[lokr]") {
  const std::string path = lokr_test::data_dir() + "/methods/lokr_factorization.json";
  const io::Json j = io::parse_json_strict(lokr_test::read_text(path), path);
  const io::Json& rows = j.at("rows");
  REQUIRE(rows.size() == 32 * 6);
  for (const auto& row : rows) {
    const Index d = row[0].get<Index>();
    const int f = row[1].get<int>();
    INFO("factorization(" << d << ", " << f << ")");
    const std::pair<Index, Index> mn = lokr_factorization(d, f);
    CHECK(mn.first == row[2].get<Index>());
    CHECK(mn.second == row[3].get<Index>());
  }
  // Facts from the README: unsorted with a dividing factor, capped by a non-dividing one, (1, d) for 0 / −2.
  CHECK(lokr_factorization(8, 4) == std::make_pair(Index(4), Index(2)));
  CHECK(lokr_factorization(16, 3) == std::make_pair(Index(2), Index(8)));
  CHECK(lokr_factorization(12, 5) == std::make_pair(Index(3), Index(4)));
  CHECK(lokr_factorization(12, 0) == std::make_pair(Index(1), Index(12)));
  CHECK(lokr_factorization(12, -2) == std::make_pair(Index(1), Index(12)));
  PEFT_REQUIRE_THROWS_WITH(lokr_factorization(0, -1), ConfigError, "dimension must be >= 1");
}

TEST_CASE("LoKr reproduces PEFT on every fixture module", "[lokr][peft]") {
  using lokr_test::kModules;
  const std::string dir = lokr_test::data_dir() + "/methods/";
  const io::SafeTensorsFile base(dir + "base.safetensors");
  // Fixture ranks of ΔW from the README, in kModules order.
  const std::map<std::string, std::vector<Index>> ranks = {
      {"lokr", {8, 8, 12, 12}}, {"lokr_decompose_both", {1, 8, 12, 12}}, {"lokr_factor", {8, 8, 4, 8}}};
  for (const char* name : {"lokr", "lokr_decompose_both", "lokr_factor"}) {
    const std::string cdir = dir + name + "/";
    const io::Json j = io::parse_json_strict(lokr_test::read_text(cdir + "adapter_config.json"), name);
    const io::SafeTensorsFile file(cdir + "adapter_model.safetensors");
    const io::SafeTensorsFile expected(cdir + "expected.safetensors");
    for (std::size_t m = 0; m < 4; ++m) {
      const std::string path = kModules[m].path;
      const Index in = kModules[m].in, out = kModules[m].out;
      INFO("case " << name << ", module " << path);
      const LokrConfig cfg = lokr_test::config_for(j, path);
      // The layout from the keys present equals the one PEFT's rules predict from the config.
      std::map<std::string, std::pair<Index, Index>> shapes;
      const std::string prefix = peft_file_key(path, "");
      for (const auto& t : file.tensors())
        if (t.name.compare(0, prefix.size(), prefix) == 0) shapes[t.name.substr(prefix.size())] = {t.rows(), t.cols()};
      const LokrLayout layout = lokr_layout_from_shapes(in, out, cfg.r, shapes, path);
      CHECK(layout == lokr_layout(in, out, cfg));
      Rng rng(1);
      LokrAdapter<float> a(in, out, cfg, layout, rng, path);
      a.eval();
      const auto tensors = a.tensors(path, "default");
      REQUIRE(tensors.size() == shapes.size());
      for (const auto& t : tensors) {
        Matrix<float> v = file.load<float>(t.file_key);
        REQUIRE(v.rows() == t.parameter->value.rows());
        REQUIRE(v.cols() == t.parameter->value.cols());
        t.parameter->value = v;
      }
      const Matrix<float> x = expected.load<float>("in." + path);
      const Matrix<float> W = base.load<float>(path + ".weight");
      const Matrix<float> b = base.load<float>(path + ".bias");
      Matrix<float> y = x * W.transpose();
      y.rowwise() += b.row(0);
      typename LokrAdapter<float>::Cache cache;
      a.forward(x, y, cache);
      CHECK(test::rel_diff(y, expected.load<float>("out." + path)) < 1e-6);
      Matrix<float> dW;
      a.delta(dW);
      const Matrix<float> ref = expected.load<float>("delta." + path);
      CHECK(test::rel_diff(dW, ref) < 1e-6);
      CHECK(lokr_test::numerical_rank(ref.cast<double>()) == ranks.at(name)[m]);
      // Merged: W + ΔW (one add in float, as PEFT's merge_and_unload) gives the same output.
      Matrix<float> y2 = x * (W + dW).transpose();
      y2.rowwise() += b.row(0);
      CHECK(test::rel_diff(y2, expected.load<float>("out." + path)) < 1e-6);
    }
  }
}

TEST_CASE("LoKr backward matches finite differences for every layout", "[lokr][gradcheck]") {
  Rng rng(21);
  struct Case {
    Index in, out;
    LokrConfig cfg;
    bool w1_full, w2_full;
  };
  auto cfg = [](int r, double alpha, bool both, int f) {
    LokrConfig c;
    c.r = r;
    c.alpha = alpha;
    c.decompose_both = both;
    c.decompose_factor = f;
    return c;
  };
  const Case cases[] = {
      {12, 8, cfg(4, 7.0, false, -1), true, true},   // w1 [2,3], w2 [4,4]
      {12, 16, cfg(2, 3.0, false, 3), true, false},  // w1 [2,3] full, w2 [8,4] factored (2 < 4)
      {12, 8, cfg(1, 5.0, true, -1), false, false},  // all four factors
      {30, 20, cfg(1, 2.5, true, 2), true, false},   // f = 2: w1 [2,2], w2 [10,15] factored
      {36, 36, cfg(1, 3.0, true, 6), false, false},  // w1 [6,6] factored (1 < 3), w2 [6,6] factored
  };
  for (const Case& c : cases) {
    INFO("in " << c.in << ", out " << c.out << ", r " << c.cfg.r << ", factor " << c.cfg.decompose_factor);
    LokrAdapter<double> a(c.in, c.out, c.cfg, rng);
    CHECK(a.layout().w1_full == c.w1_full);
    CHECK(a.layout().w2_full == c.w2_full);
    lokr_test::set_random(a, rng);
    Matrix<double> x = test::random_matrix<double>(5, c.in, rng);
    const Matrix<double> g = test::random_matrix<double>(5, c.out, rng);
    lokr_test::gradcheck(a, x, g);
  }
}

TEST_CASE("LoKr forward equals x kron(w1, w2)^T s and two caches work", "[lokr]") {
  Rng rng(22);
  LokrConfig c;
  c.r = 2;
  c.alpha = 3.0;
  c.decompose_factor = 3;
  LokrAdapter<double> a(12, 16, c, rng);
  lokr_test::set_random(a, rng);
  Matrix<double> dW;
  a.delta(dW);
  const Matrix<double> w1 = a.w1.value, w2 = a.w2_a.value * a.w2_b.value;
  CHECK(test::rel_diff(dW, Matrix<double>(1.5 * kron<double>(w1, w2))) < 1e-14);
  const Matrix<double> x1 = test::random_matrix<double>(3, 12, rng), x2 = test::random_matrix<double>(6, 12, rng);
  const Matrix<double> g1 = test::random_matrix<double>(3, 16, rng), g2 = test::random_matrix<double>(6, 16, rng);
  typename LokrAdapter<double>::Cache c1, c2;
  Matrix<double> y1 = Matrix<double>::Zero(3, 16), y2 = Matrix<double>::Zero(6, 16);
  a.forward(x1, y1, c1);
  a.forward(x2, y2, c2);
  CHECK(test::rel_diff(y1, Matrix<double>(x1 * dW.transpose())) < 1e-13);
  CHECK(test::rel_diff(y2, Matrix<double>(x2 * dW.transpose())) < 1e-13);
  Matrix<double> dx1 = Matrix<double>::Zero(3, 12), dx2 = Matrix<double>::Zero(6, 12);
  a.backward(c1, g1, &dx1);
  a.backward(c2, g2, &dx2);
  CHECK(test::rel_diff(dx1, Matrix<double>(g1 * dW)) < 1e-13);
  CHECK(test::rel_diff(dx2, Matrix<double>(g2 * dW)) < 1e-13);
  // Both backwards accumulated into the same gradient: dΔW = g1ᵀ x1 + g2ᵀ x2 projected onto w1.
  const Matrix<double> D = 1.5 * (g1.transpose() * x1 + g2.transpose() * x2);
  Matrix<double> dw1 = Matrix<double>::Zero(w1.rows(), w1.cols());
  for (Index i = 0; i < w1.rows(); ++i)
    for (Index j = 0; j < w1.cols(); ++j)
      dw1(i, j) = (D.block(i * w2.rows(), j * w2.cols(), w2.rows(), w2.cols()).array() * w2.array()).sum();
  CHECK(test::rel_diff(a.w1.grad, dw1) < 1e-13);
}

TEMPLATE_TEST_CASE("LoKr merged == unmerged, LoRA factors reproduce the delta", "[lokr][merge]", float, double) {
  using T = TestType;
  Rng rng(23);
  struct Case {
    Index in, out;
    int r, f;
    bool both;
    Index factor_rank;  // inner(w1) · inner(w2)
  };
  // (12, 8, f -1): w1 [2,3] full = I·w1 → inner 2, w2 [4,4] full → 4: rank 8; r = 1 with decompose_both: 1 · 1.
  for (const Case& c : {Case{12, 8, 4, -1, false, 8}, Case{12, 8, 1, -1, true, 1}, Case{36, 36, 1, 6, true, 1}}) {
    LokrConfig cfg;
    cfg.r = c.r;
    cfg.alpha = 2.5;
    cfg.decompose_factor = c.f;
    cfg.decompose_both = c.both;
    LokrAdapter<T> a(c.in, c.out, cfg, rng);
    lokr_test::set_random(a, rng);
    const Matrix<T> W = test::random_matrix<T>(c.out, c.in, rng);
    const Matrix<T> x = test::random_matrix<T>(7, c.in, rng);
    Matrix<T> y = x * W.transpose();
    typename LokrAdapter<T>::Cache cache;
    a.forward(x, y, cache);
    Matrix<T> dW;
    a.delta(dW);
    Matrix<T> merged = W + dW;
    CHECK(test::rel_diff(Matrix<T>(x * merged.transpose()), y) < Tolerances<T>::rel);
    merged -= dW;  // unmerge
    CHECK(test::rel_diff(merged, W) < Tolerances<T>::rel);
    const LoraFactors<T> f = a.to_factors();
    CHECK(f.rank() == c.factor_rank);
    CHECK(f.scaling == 2.5 / c.r);
    CHECK(test::rel_diff(f.delta(), dW) < Tolerances<T>::rel);
    CHECK(lokr_test::numerical_rank(dW.template cast<double>()) <= f.rank());
  }
}

TEST_CASE("LoKr is the identity at init", "[lokr][init]") {
  Rng rng(24);
  const Matrix<double> x = test::random_matrix<double>(4, 12, rng);
  const Matrix<double> y0 = test::random_matrix<double>(4, 16, rng);
  for (LokrInit init : {LokrInit::Default, LokrInit::Lycoris, LokrInit::Random}) {
    for (bool both : {false, true}) {
      LokrConfig c;
      c.r = 1;
      c.decompose_both = both;
      c.init_weights = init;
      LokrAdapter<double> a(12, 16, c, rng);
      Matrix<double> y = y0;
      typename LokrAdapter<double>::Cache cache;
      a.forward(x, y, cache);
      if (init == LokrInit::Random)
        CHECK(test::rel_diff(y, y0) > 1e-3);
      else
        CHECK(y == y0);
      if (init == LokrInit::Default) CHECK((both ? a.w1_a.value.norm() : a.w1.value.norm()) == 0.0);
      if (init == LokrInit::Lycoris) CHECK((a.layout().w2_full ? a.w2.value.norm() : a.w2_b.value.norm()) == 0.0);
      // Training can leave the identity: the zero factor gets a gradient.
      Matrix<double> dx = Matrix<double>::Zero(4, 12);
      a.backward(cache, test::random_matrix<double>(4, 16, rng), &dx);
      double total = 0.0;
      for (auto& t : a.tensors("m", "default")) total += t.parameter->grad.norm();
      CHECK(total > 0.0);
    }
  }
}

TEST_CASE("LoKr training-only dropouts", "[lokr][dropout]") {
  Rng rng(25);
  LokrConfig c;
  c.r = 4;
  c.alpha = 6.0;
  c.rank_dropout = 0.4;
  c.rank_dropout_scale = true;
  LokrAdapter<double> a(12, 8, c, rng);
  lokr_test::set_random(a, rng);
  const Matrix<double> x = test::random_matrix<double>(6, 12, rng);
  const Matrix<double> g = test::random_matrix<double>(6, 8, rng);
  Matrix<double> dW;
  a.delta(dW);
  // Eval: identity (no mask).
  a.eval();
  typename LokrAdapter<double>::Cache ce;
  Matrix<double> ye = Matrix<double>::Zero(6, 8);
  a.forward(x, ye, ce);
  CHECK(ce.mask.size() == 0);
  CHECK(test::rel_diff(ye, Matrix<double>(x * dW.transpose())) < 1e-13);
  // Train: rows of ΔW masked, the mask rescaled by its mean; backward uses the cached mask.
  a.train();
  typename LokrAdapter<double>::Cache ct;
  Matrix<double> yt = Matrix<double>::Zero(6, 8);
  a.forward(x, yt, ct);
  REQUIRE(ct.mask.size() == 8);
  const Index kept = (ct.mask.array() > 0.0).count();
  REQUIRE(kept > 0);
  CHECK(ct.mask.sum() == Approx(8.0));
  const Matrix<double> dWm = ct.mask.transpose().asDiagonal() * dW;
  CHECK(test::rel_diff(yt, Matrix<double>(x * dWm.transpose())) < 1e-13);
  Matrix<double> dx = Matrix<double>::Zero(6, 12);
  a.backward(ct, g, &dx);
  CHECK(test::rel_diff(dx, Matrix<double>(g * dWm)) < 1e-13);
  // Module dropout skips the whole term (and its backward) about p of the time.
  c.rank_dropout = 0.0;
  c.module_dropout = 0.5;
  LokrAdapter<double> b(12, 8, c, rng);
  lokr_test::set_random(b, rng);
  int skipped = 0;
  for (int i = 0; i < 200; ++i) {
    typename LokrAdapter<double>::Cache cm;
    Matrix<double> y = Matrix<double>::Zero(6, 8);
    b.forward(x, y, cm);
    if (cm.skipped) {
      ++skipped;
      CHECK(y.norm() == 0.0);
      Matrix<double> d = Matrix<double>::Zero(6, 12);
      b.backward(cm, g, &d);
      CHECK(d.norm() == 0.0);
    }
  }
  CHECK(skipped > 60);
  CHECK(skipped < 140);
}

TEST_CASE("LoKr refuses bad configs, layouts and shapes", "[lokr][errors]") {
  Rng rng(26);
  LokrConfig c;
  c.r = 0;
  PEFT_REQUIRE_THROWS_WITH(LokrAdapter<double>(12, 8, c, rng, "q"), ConfigError, "r must be >= 1");
  c.r = 2;
  c.rank_dropout = 1.0;
  PEFT_REQUIRE_THROWS_WITH(LokrAdapter<double>(12, 8, c, rng, "q"), ConfigError, "rank_dropout");
  c.rank_dropout = 0.0;
  c.module_dropout = -0.1;
  PEFT_REQUIRE_THROWS_WITH(LokrAdapter<double>(12, 8, c, rng, "q"), ConfigError, "module_dropout");
  c.module_dropout = 0.0;
  using Shapes = std::map<std::string, std::pair<Index, Index>>;
  PEFT_REQUIRE_THROWS_WITH(
      lokr_layout_from_shapes(12, 8, 2, Shapes{{"lokr_w1", {2, 3}}, {"lokr_w2", {4, 4}}, {"lokr_t2", {2, 2}}}, "q"),
      ConfigError, "lokr_t2");
  PEFT_REQUIRE_THROWS_WITH(lokr_layout_from_shapes(12, 8, 2, Shapes{{"lokr_w1", {2, 3}}, {"lokr_w2_a", {4, 2}}}, "q"),
                           ConfigError, "lokr_w2_b");
  PEFT_REQUIRE_THROWS_WITH(
      lokr_layout_from_shapes(12, 8, 2, Shapes{{"lokr_w1", {2, 3}}, {"lokr_w2_a", {4, 3}}, {"lokr_w2_b", {3, 4}}}, "q"),
      ShapeError, "inner size r = 2");
  PEFT_REQUIRE_THROWS_WITH(lokr_layout_from_shapes(12, 8, 2, Shapes{{"lokr_w1", {2, 3}}, {"lokr_w2", {4, 3}}}, "q"),
                           ShapeError, "base weight is [8, 12]");
  LokrLayout bad;
  bad.out_l = 3;
  bad.out_k = 3;
  bad.in_m = 3;
  bad.in_n = 4;
  PEFT_REQUIRE_THROWS_WITH(LokrAdapter<double>(12, 8, c, bad, rng, "q"), ShapeError, "does not give the base shape");
  LokrAdapter<double> a(12, 8, c, rng, "q");
  typename LokrAdapter<double>::Cache cache;
  Matrix<double> y = Matrix<double>::Zero(3, 8);
  PEFT_REQUIRE_THROWS_WITH(a.forward(Matrix<double>::Zero(3, 11), y, cache), ShapeError, "input has 11 features");
  Matrix<double> ybad = Matrix<double>::Zero(3, 7);
  PEFT_REQUIRE_THROWS_WITH(a.forward(Matrix<double>::Zero(3, 12), ybad, cache), ShapeError, "output y");
  a.forward(Matrix<double>::Zero(3, 12), y, cache);
  Matrix<double> dx = Matrix<double>::Zero(2, 12);
  PEFT_REQUIRE_THROWS_WITH(a.backward(cache, Matrix<double>::Zero(3, 8), &dx), ShapeError, "dx");
  a.w1.value.resize(3, 3);  // a loader replaced a factor with the wrong shape
  PEFT_REQUIRE_THROWS_WITH(a.forward(Matrix<double>::Zero(3, 12), y, cache), ShapeError, "lokr_w1");
}
