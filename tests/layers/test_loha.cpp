// LoHa (peft/adapters/loha.hpp): reproduces Hugging Face PEFT 0.21.2 on every module of the
// fixtures loha (float32) and loha_f64 (float64, rank/alpha patterns, float32-rounded scale),
// exact gradients (finite differences), merged == unmerged, the Khatri–Rao LoRA form at rank r²,
// identity at init, the training-only dropouts and every error path.
#include <peft/adapters/loha.hpp>
#include <peft/io/json.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/train/gradient_check.hpp>

#include <Eigen/SVD>
#include <cstdlib>
#include <fstream>
#include <iterator>

#include "method_fixtures.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace loha_test {

using peft::test::methods::data_dir;
using peft::test::methods::kModules;
using peft::test::methods::match_pattern;
using peft::test::methods::read_text;

LohaConfig config_for(const io::Json& j, const std::string& path) {
  LohaConfig c;
  c.r = j.at("r").get<int>();
  c.alpha = j.at("alpha").get<double>();
  match_pattern(j.at("rank_pattern"), path, c.r);
  match_pattern(j.at("alpha_pattern"), path, c.alpha);
  c.rank_dropout = j.at("rank_dropout").get<double>();
  c.module_dropout = j.at("module_dropout").get<double>();
  c.use_effective_conv2d = j.at("use_effective_conv2d").get<bool>();
  return c;
}

/// #{σ_j > rtol · σ_1}.
Index numerical_rank(const Matrix<double>& m, double rtol) {
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(m);
  const auto& s = svd.singularValues();
  Index k = 0;
  for (Index i = 0; i < s.size(); ++i) k += s(i) > rtol * s(0) ? 1 : 0;
  return k;
}

template <class T>
void set_random(LohaAdapter<T>& a, Rng& rng, double std = 0.5) {
  for (auto& t : a.tensors("m", "default"))
    t.parameter->value = test::random_matrix<T>(t.parameter->value.rows(), t.parameter->value.cols(), rng, std);
}

/// Checks every module of one fixture case in scalar type T against PEFT's outputs and deltas.
template <class T>
void check_case(const std::string& name, const std::string& base_file, double tol, const std::vector<Index>& ranks) {
  const std::string dir = data_dir() + "/methods/";
  const io::SafeTensorsFile base(dir + base_file);
  const io::Json j = io::parse_json_strict(read_text(dir + name + "/adapter_config.json"), name);
  const io::SafeTensorsFile file(dir + name + "/adapter_model.safetensors");
  const io::SafeTensorsFile expected(dir + name + "/expected.safetensors");
  for (std::size_t m = 0; m < 4; ++m) {
    const std::string path = kModules[m].path;
    INFO("case " << name << ", module " << path);
    const LohaConfig cfg = config_for(j, path);
    REQUIRE(file.info(peft_file_key(path, "hada_w1_a")).cols() == cfg.r);  // rank_pattern resolved as PEFT
    Rng rng(1);
    LohaAdapter<T> a(kModules[m].in, kModules[m].out, cfg, rng, path);
    a.eval();
    for (const auto& t : a.tensors(path, "default")) {
      Matrix<T> v = file.load<T>(t.file_key);
      REQUIRE(v.rows() == t.parameter->value.rows());
      REQUIRE(v.cols() == t.parameter->value.cols());
      t.parameter->value = v;
    }
    const Matrix<T> x = expected.load<T>("in." + path);
    const Matrix<T> W = base.load<T>(path + ".weight");
    const Matrix<T> b = base.load<T>(path + ".bias");
    Matrix<T> y = x * W.transpose();
    y.rowwise() += b.row(0);
    typename LohaAdapter<T>::Cache cache;
    a.forward(x, y, cache);
    CHECK(test::rel_diff(y, expected.load<T>("out." + path)) < tol);
    Matrix<T> dW;
    a.delta(dW);
    const Matrix<T> ref = expected.load<T>("delta." + path);
    CHECK(test::rel_diff(dW, ref) < tol);
    CHECK(numerical_rank(ref.template cast<double>(), sizeof(T) == 4 ? 1e-5 : 1e-12) == ranks[m]);
    const LoraFactors<T> f = a.to_factors();
    CHECK(f.rank() == Index(cfg.r) * cfg.r);
    CHECK(test::rel_diff(f.delta(), ref) < 10 * tol);
  }
}

double loss_of(LohaAdapter<double>& a, const Matrix<double>& x, const Matrix<double>& g) {
  typename LohaAdapter<double>::Cache c;
  Matrix<double> y = Matrix<double>::Zero(x.rows(), a.out_features());
  a.forward(x, y, c);
  return test::dot(g, y);
}

}  // namespace loha_test

TEST_CASE("LoHa reproduces PEFT on every fixture module", "[loha][peft]") {
  loha_test::check_case<float>("loha", "base.safetensors", 1e-6, {8, 8, 12, 12});
  loha_test::check_case<double>("loha_f64", "base_f64.safetensors", 1e-12, {8, 8, 9, 12});
}

TEST_CASE("LoHa scale is rounded to float32 as in PEFT", "[loha]") {
  LohaConfig c;
  c.r = 3;
  c.alpha = 8.0;
  CHECK(c.scaling() == static_cast<double>(static_cast<float>(8.0 / 3.0)));
  CHECK(c.scaling() != 8.0 / 3.0);
  c.r = 4;
  CHECK(c.scaling() == 2.0);
}

TEST_CASE("LoHa backward matches finite differences", "[loha][gradcheck]") {
  Rng rng(31);
  for (int r : {1, 3}) {
    LohaConfig c;
    c.r = r;
    c.alpha = 5.0;
    LohaAdapter<double> a(7, 6, c, rng);
    loha_test::set_random(a, rng);
    Matrix<double> x = test::random_matrix<double>(5, 7, rng);
    const Matrix<double> g = test::random_matrix<double>(5, 6, rng);
    for (auto& t : a.tensors("m", "default")) t.parameter->zero_grad();
    typename LohaAdapter<double>::Cache cache;
    Matrix<double> y = Matrix<double>::Zero(5, 6);
    a.forward(x, y, cache);
    Matrix<double> dx = Matrix<double>::Zero(5, 7);
    a.backward(cache, g, &dx);
    auto loss = [&] { return loha_test::loss_of(a, x, g); };
    CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
    for (auto& t : a.tensors("m", "default")) {
      INFO("r " << r << ", parameter " << t.model_name);
      CHECK(t.parameter->grad.norm() > 0.0);
      CHECK(relative_error(t.parameter->grad, numerical_gradient(t.parameter->value, loss)) < Tolerances<double>::grad);
    }
    // A frozen factor gets no gradient; the others are unchanged by freezing it.
    const Matrix<double> g1a = a.w1_a.grad;
    a.w1_b.set_trainable(false);
    for (auto& t : a.tensors("m", "default")) t.parameter->zero_grad();
    a.backward(cache, g, nullptr);
    CHECK(a.w1_b.grad.size() == 0);
    CHECK(test::rel_diff(a.w1_a.grad, g1a) < 1e-14);
  }
}

TEMPLATE_TEST_CASE("LoHa merged == unmerged, Khatri-Rao LoRA factors at rank r^2", "[loha][merge]", float, double) {
  using T = TestType;
  Rng rng(32);
  LohaConfig c;
  c.r = 3;
  c.alpha = 7.0;
  LohaAdapter<T> a(20, 16, c, rng);
  loha_test::set_random(a, rng);
  const Matrix<T> W = test::random_matrix<T>(16, 20, rng);
  const Matrix<T> x = test::random_matrix<T>(6, 20, rng);
  Matrix<T> y = x * W.transpose();
  typename LohaAdapter<T>::Cache cache;
  a.forward(x, y, cache);
  Matrix<T> dW;
  a.delta(dW);
  Matrix<T> merged = W + dW;
  CHECK(test::rel_diff(Matrix<T>(x * merged.transpose()), y) < Tolerances<T>::rel);
  merged -= dW;
  CHECK(test::rel_diff(merged, W) < Tolerances<T>::rel);
  const LoraFactors<T> f = a.to_factors();
  CHECK(f.rank() == 9);
  CHECK(f.B.rows() == 16);
  CHECK(f.A.cols() == 20);
  CHECK(f.scaling == a.scaling());
  CHECK(test::rel_diff(f.delta(), dW) < Tolerances<T>::rel);
  CHECK(loha_test::numerical_rank(dW.template cast<double>(), sizeof(T) == 4 ? 1e-5 : 1e-10) == 9);
  // The face-splitting identity itself.
  const Matrix<T> lhs = (a.w1_a.value * a.w1_b.value).cwiseProduct(a.w2_a.value * a.w2_b.value);
  CHECK(test::rel_diff(Matrix<T>(row_kron<T>(a.w1_a.value, a.w2_a.value) * col_kron<T>(a.w1_b.value, a.w2_b.value)),
                       lhs) < Tolerances<T>::rel);
}

TEST_CASE("LoHa is the identity at init (w2_b = 0), random with init_weights=false", "[loha][init]") {
  Rng rng(33);
  const Matrix<double> x = test::random_matrix<double>(4, 10, rng);
  const Matrix<double> y0 = test::random_matrix<double>(4, 6, rng);
  LohaConfig c;
  c.r = 2;
  LohaAdapter<double> a(10, 6, c, rng);
  CHECK(a.w2_b.value.norm() == 0.0);
  CHECK(a.w1_a.value.norm() > 0.0);
  CHECK(a.w1_b.value.norm() > 0.0);
  CHECK(a.w2_a.value.norm() > 0.0);
  Matrix<double> y = y0;
  typename LohaAdapter<double>::Cache cache;
  a.forward(x, y, cache);
  CHECK(y == y0);
  a.backward(cache, test::random_matrix<double>(4, 6, rng), nullptr);
  CHECK(a.w2_b.grad.norm() > 0.0);  // training leaves the identity through w2_b
  c.init_weights = false;
  LohaAdapter<double> b(10, 6, c, rng);
  y = y0;
  b.forward(x, y, cache);
  CHECK(test::rel_diff(y, y0) > 1e-4);
}

TEST_CASE("LoHa training-only dropouts", "[loha][dropout]") {
  Rng rng(34);
  LohaConfig c;
  c.r = 3;
  c.alpha = 4.0;
  c.rank_dropout = 0.4;
  LohaAdapter<double> a(9, 8, c, rng);
  loha_test::set_random(a, rng);
  const Matrix<double> x = test::random_matrix<double>(5, 9, rng);
  const Matrix<double> g = test::random_matrix<double>(5, 8, rng);
  Matrix<double> dW;
  a.delta(dW);
  a.eval();
  typename LohaAdapter<double>::Cache ce;
  Matrix<double> ye = Matrix<double>::Zero(5, 8);
  a.forward(x, ye, ce);
  CHECK(ce.mask.size() == 0);
  CHECK(test::rel_diff(ye, Matrix<double>(x * dW.transpose())) < 1e-13);
  a.train();
  typename LohaAdapter<double>::Cache ct;
  Matrix<double> yt = Matrix<double>::Zero(5, 8);
  a.forward(x, yt, ct);
  REQUIRE(ct.mask.size() == 8);
  REQUIRE((ct.mask.array() > 0.0).count() > 0);
  CHECK(ct.mask.mean() == Approx(1.0));  // LoHa always divides the mask by its mean
  const Matrix<double> dWm = ct.mask.transpose().asDiagonal() * dW;
  CHECK(test::rel_diff(yt, Matrix<double>(x * dWm.transpose())) < 1e-13);
  Matrix<double> dx = Matrix<double>::Zero(5, 9);
  a.backward(ct, g, &dx);
  CHECK(test::rel_diff(dx, Matrix<double>(g * dWm)) < 1e-13);
  c.rank_dropout = 0.0;
  c.module_dropout = 0.5;
  LohaAdapter<double> b(9, 8, c, rng);
  loha_test::set_random(b, rng);
  int skipped = 0;
  for (int i = 0; i < 200; ++i) {
    typename LohaAdapter<double>::Cache cm;
    Matrix<double> y = Matrix<double>::Zero(5, 8);
    b.forward(x, y, cm);
    if (cm.skipped) {
      ++skipped;
      CHECK(y.norm() == 0.0);
    }
  }
  CHECK(skipped > 60);
  CHECK(skipped < 140);
}

TEST_CASE("LoHa refuses bad configs and shapes", "[loha][errors]") {
  Rng rng(35);
  LohaConfig c;
  c.r = 0;
  PEFT_REQUIRE_THROWS_WITH(LohaAdapter<double>(8, 6, c, rng, "q"), ConfigError, "r must be >= 1");
  c.r = 2;
  c.alpha = std::nan("");
  PEFT_REQUIRE_THROWS_WITH(LohaAdapter<double>(8, 6, c, rng, "q"), ConfigError, "alpha");
  c.alpha = 4.0;
  c.rank_dropout = 1.0;
  PEFT_REQUIRE_THROWS_WITH(LohaAdapter<double>(8, 6, c, rng, "q"), ConfigError, "rank_dropout");
  c.rank_dropout = 0.0;
  c.module_dropout = 2.0;
  PEFT_REQUIRE_THROWS_WITH(LohaAdapter<double>(8, 6, c, rng, "q"), ConfigError, "module_dropout");
  c.module_dropout = 0.0;
  PEFT_REQUIRE_THROWS_WITH(LohaAdapter<double>(0, 6, c, rng, "q"), ShapeError, "is empty");
  LohaAdapter<double> a(8, 6, c, rng, "q");
  typename LohaAdapter<double>::Cache cache;
  Matrix<double> y = Matrix<double>::Zero(3, 6);
  PEFT_REQUIRE_THROWS_WITH(a.forward(Matrix<double>::Zero(3, 7), y, cache), ShapeError, "LoHa \"q\": input has 7");
  a.forward(Matrix<double>::Zero(3, 8), y, cache);
  PEFT_REQUIRE_THROWS_WITH(a.backward(cache, Matrix<double>::Zero(2, 6), nullptr), ShapeError, "dy");
  a.w2_b.value.resize(3, 8);
  PEFT_REQUIRE_THROWS_WITH(a.forward(Matrix<double>::Zero(3, 8), y, cache), ShapeError, "hada_w2_b");
}
