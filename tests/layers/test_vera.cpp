// VeRA (peft/adapters/vera.hpp): reproduces Hugging Face PEFT 0.21.2 on every module of the
// fixture vera (shared projections sliced per layer), refuses vera_noproj (save_projection=False),
// exact gradients (finite differences), merged == unmerged, the exact rank-r LoRA form, identity
// at init, shared-projection ownership under copy and move, input dropout and every error path.
#include <peft/adapters/vera.hpp>
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

namespace vera_test {

using peft::test::methods::data_dir;
using peft::test::methods::kModules;
using peft::test::methods::read_text;

VeraConfig config_from(const io::Json& j) {
  VeraConfig c;
  c.r = j.at("r").get<int>();
  c.vera_dropout = j.at("vera_dropout").get<double>();
  c.d_initial = j.at("d_initial").get<double>();
  c.init_weights = j.at("init_weights").get<bool>();
  c.save_projection = j.at("save_projection").get<bool>();
  c.projection_prng_key = j.at("projection_prng_key").get<std::uint64_t>();
  c.fan_in_fan_out = j.at("fan_in_fan_out").get<bool>();
  c.bias = j.at("bias").get<std::string>();
  return c;
}

std::vector<std::string> names_of(const io::SafeTensorsFile& f) {
  std::vector<std::string> v;
  for (const auto& t : f.tensors()) v.push_back(t.name);
  return v;
}

template <class T>
VeraAdapter<T> make(Index in, Index out, int r, Rng& rng, std::shared_ptr<const VeraProjections<T>> p = nullptr) {
  VeraConfig c;
  c.r = r;
  if (!p) p = VeraProjections<T>::generate(r, in + 3, out + 2, rng);
  VeraAdapter<T> a(in, out, c, p, rng, "q");
  a.lambda_b.value = test::random_matrix<T>(1, out, rng);
  a.lambda_d.value = test::random_matrix<T>(1, r, rng);
  return a;
}

double loss_of(VeraAdapter<double>& a, const Matrix<double>& x, const Matrix<double>& g) {
  typename VeraAdapter<double>::Cache c;
  Matrix<double> y = Matrix<double>::Zero(x.rows(), a.out_features());
  a.forward(x, y, c);
  return test::dot(g, y);
}

}  // namespace vera_test

TEST_CASE("VeRA reproduces PEFT on every fixture module", "[vera][peft]") {
  const std::string dir = vera_test::data_dir() + "/methods/";
  const io::SafeTensorsFile base(dir + "base.safetensors");
  const io::Json j = io::parse_json_strict(vera_test::read_text(dir + "vera/adapter_config.json"), "vera");
  const io::SafeTensorsFile file(dir + "vera/adapter_model.safetensors");
  const io::SafeTensorsFile expected(dir + "vera/expected.safetensors");
  const VeraConfig cfg = vera_test::config_from(j);
  check_vera_file(cfg, vera_test::names_of(file), "vera");  // accepted
  const auto proj =
      VeraProjections<float>::make(file.load<float>(vera_A_file_key()), file.load<float>(vera_B_file_key()));
  CHECK(proj->A.rows() == 4);
  CHECK(proj->in_max() == 16);
  CHECK(proj->out_max() == 16);
  for (const auto& m : vera_test::kModules) {
    const std::string path = m.path;
    INFO("module " << path);
    Rng rng(1);
    VeraAdapter<float> a(m.in, m.out, cfg, proj, rng, path);
    a.eval();  // vera_dropout = 0.1 is training-only
    const auto tensors = a.tensors(path, "default");
    REQUIRE(tensors.size() == 2);
    CHECK(tensors[0].model_name == path + ".vera_lambda_b.default");
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
    typename VeraAdapter<float>::Cache cache;
    a.forward(x, y, cache);
    CHECK(test::rel_diff(y, expected.load<float>("out." + path)) < 1e-6);
    Matrix<float> dW;
    a.delta(dW);
    const Matrix<float> ref = expected.load<float>("delta." + path);
    CHECK(test::rel_diff(dW, ref) < 1e-6);
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(ref.cast<double>());
    const auto& s = svd.singularValues();
    CHECK((s.array() > 1e-5 * s(0)).count() == 4);  // rank exactly r
    const LoraFactors<float> f = a.to_factors();
    CHECK(f.rank() == 4);
    CHECK(f.scaling == 1.0);
    CHECK(test::rel_diff(f.delta(), ref) < 1e-6);
  }
}

TEST_CASE("VeRA refuses a file saved with save_projection=False", "[vera][errors]") {
  const std::string dir = vera_test::data_dir() + "/methods/vera_noproj/";
  const io::Json j = io::parse_json_strict(vera_test::read_text(dir + "adapter_config.json"), "vera_noproj");
  const io::SafeTensorsFile file(dir + "adapter_model.safetensors");
  const VeraConfig cfg = vera_test::config_from(j);
  CHECK_FALSE(cfg.save_projection);
  PEFT_REQUIRE_THROWS_WITH(check_vera_file(cfg, vera_test::names_of(file), "vera_noproj"), ConfigError,
                           "save_projection=false");
  PEFT_REQUIRE_THROWS_WITH(check_vera_file(cfg, vera_test::names_of(file), "vera_noproj"), ConfigError,
                           "PEFT regenerates them");
  PEFT_REQUIRE_THROWS_WITH(check_vera_file(cfg, vera_test::names_of(file), "vera_noproj"), ConfigError,
                           "projection_prng_key=42");
  // save_projection=true but the projections missing: refused as well.
  VeraConfig c2 = cfg;
  c2.save_projection = true;
  PEFT_REQUIRE_THROWS_WITH(check_vera_file(c2, vera_test::names_of(file)), ConfigError, "no base_model.vera_A");
  PEFT_REQUIRE_THROWS_WITH(check_vera_file(c2, {vera_A_file_key()}), ConfigError, "no base_model.vera_B");
  check_vera_file(c2, {vera_A_file_key(), vera_B_file_key()});
}

TEST_CASE("VeRA backward matches finite differences", "[vera][gradcheck]") {
  Rng rng(41);
  VeraAdapter<double> a = vera_test::make<double>(7, 6, 3, rng);
  Matrix<double> x = test::random_matrix<double>(5, 7, rng);
  const Matrix<double> g = test::random_matrix<double>(5, 6, rng);
  typename VeraAdapter<double>::Cache cache;
  Matrix<double> y = Matrix<double>::Zero(5, 6);
  a.forward(x, y, cache);
  Matrix<double> dx = Matrix<double>::Zero(5, 7);
  a.backward(cache, g, &dx);
  auto loss = [&] { return vera_test::loss_of(a, x, g); };
  CHECK(relative_error(dx, numerical_gradient(x, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(a.lambda_b.grad, numerical_gradient(a.lambda_b.value, loss)) < Tolerances<double>::grad);
  CHECK(relative_error(a.lambda_d.grad, numerical_gradient(a.lambda_d.value, loss)) < Tolerances<double>::grad);
  // Accumulation, and a frozen vector gets no gradient.
  const Matrix<double> gb = a.lambda_b.grad;
  a.lambda_d.set_trainable(false);
  a.backward(cache, g, nullptr);
  CHECK(test::rel_diff(a.lambda_b.grad, Matrix<double>(2 * gb)) < 1e-14);
  CHECK(a.lambda_d.grad.size() == 0);
}

TEMPLATE_TEST_CASE("VeRA merged == unmerged, exact rank-r LoRA factors", "[vera][merge]", float, double) {
  using T = TestType;
  Rng rng(42);
  VeraAdapter<T> a = vera_test::make<T>(10, 9, 4, rng);
  const Matrix<T> W = test::random_matrix<T>(9, 10, rng);
  const Matrix<T> x = test::random_matrix<T>(6, 10, rng);
  Matrix<T> y = x * W.transpose();
  typename VeraAdapter<T>::Cache cache;
  a.forward(x, y, cache);
  Matrix<T> dW;
  a.delta(dW);
  Matrix<T> merged = W + dW;
  CHECK(test::rel_diff(Matrix<T>(x * merged.transpose()), y) < Tolerances<T>::rel);
  merged -= dW;
  CHECK(test::rel_diff(merged, W) < Tolerances<T>::rel);
  // Slicing: A_l = vera_A[:, :in], B_l = vera_B[:out, :].
  CHECK(a.A_l() == a.projections()->A.leftCols(10));
  CHECK(a.B_l() == a.projections()->B.topRows(9));
  const LoraFactors<T> f = a.to_factors();
  CHECK(f.rank() == 4);
  CHECK(f.scaling == 1.0);
  CHECK(test::rel_diff(f.delta(), dW) < Tolerances<T>::rel);
  const Matrix<T> ref = a.lambda_b.value.row(0).transpose().asDiagonal() * a.B_l() *
                        a.lambda_d.value.row(0).transpose().asDiagonal() * a.A_l();
  CHECK(test::rel_diff(dW, ref) < Tolerances<T>::rel);
}

TEST_CASE("VeRA is the identity at init (lambda_b = 0, lambda_d = d_initial)", "[vera][init]") {
  Rng rng(43);
  auto p = VeraProjections<double>::generate(3, 12, 10, rng);
  VeraConfig c;
  c.r = 3;
  c.d_initial = 0.5;
  VeraAdapter<double> a(8, 10, c, p, rng);
  CHECK(a.lambda_b.value.norm() == 0.0);
  CHECK((a.lambda_d.value.array() == 0.5).all());
  CHECK(a.lambda_b.shape() == std::vector<std::int64_t>{10});
  const Matrix<double> x = test::random_matrix<double>(4, 8, rng);
  const Matrix<double> y0 = test::random_matrix<double>(4, 10, rng);
  Matrix<double> y = y0;
  typename VeraAdapter<double>::Cache cache;
  a.forward(x, y, cache);
  CHECK(y == y0);
  a.backward(cache, test::random_matrix<double>(4, 10, rng), nullptr);
  CHECK(a.lambda_b.grad.norm() > 0.0);
  c.init_weights = false;  // λ_b = 1, λ_d ~ N(0, 1)
  VeraAdapter<double> b(8, 10, c, p, rng);
  CHECK((b.lambda_b.value.array() == 1.0).all());
  y = y0;
  b.forward(x, y, cache);
  CHECK(test::rel_diff(y, y0) > 1e-4);
  // generate(): PEFT's distribution, kaiming-uniform with gain √2: |A| ≤ √(6/in_max), |B| ≤ √(6/r).
  CHECK(p->A.cwiseAbs().maxCoeff() <= std::sqrt(6.0 / 12));
  CHECK(p->B.cwiseAbs().maxCoeff() <= std::sqrt(6.0 / 3));
}

TEST_CASE("VeRA projections are shared, immutable and survive copies and moves", "[vera]") {
  Rng rng(44);
  auto p = VeraProjections<double>::generate(3, 12, 12, rng);
  VeraAdapter<double> a = vera_test::make<double>(12, 8, 3, rng, p);
  VeraAdapter<double> b = vera_test::make<double>(8, 12, 3, rng, p);  // another layer of the same model
  CHECK(a.projections().get() == b.projections().get());
  CHECK(p.use_count() == 3);
  const Matrix<double> x = test::random_matrix<double>(4, 12, rng);
  Matrix<double> ya = Matrix<double>::Zero(4, 8);
  typename VeraAdapter<double>::Cache cache;
  a.forward(x, ya, cache);
  p.reset();  // the model's own handle goes away: the adapters keep the pair alive
  VeraAdapter<double> copy = a;
  CHECK(copy.projections().get() == a.projections().get());
  CHECK(a.projections().use_count() == 3);
  copy.lambda_b.value.setConstant(1.0);  // copies own their λ, share the projections
  CHECK(a.lambda_b.value != copy.lambda_b.value);
  VeraAdapter<double> moved = std::move(copy);
  CHECK(moved.projections().get() == a.projections().get());
  moved.lambda_b.value = a.lambda_b.value;
  Matrix<double> ym = Matrix<double>::Zero(4, 8);
  moved.forward(x, ym, cache);
  CHECK(ym == ya);
  { VeraAdapter<double> tmp = a; }
  CHECK(a.projections().use_count() == 3);  // a, b, moved
}

TEST_CASE("VeRA input dropout (training only)", "[vera][dropout]") {
  Rng rng(45);
  auto p = VeraProjections<double>::generate(3, 9, 7, rng);
  VeraConfig c;
  c.r = 3;
  c.vera_dropout = 0.3;
  VeraAdapter<double> a(9, 7, c, p, rng);
  a.lambda_b.value = test::random_matrix<double>(1, 7, rng);
  const Matrix<double> x = test::random_matrix<double>(30, 9, rng);
  const Matrix<double> g = test::random_matrix<double>(30, 7, rng);
  a.train();
  typename VeraAdapter<double>::Cache ct;
  Matrix<double> yt = Matrix<double>::Zero(30, 7);
  a.forward(x, yt, ct);
  REQUIRE(ct.keep.rows() == 30);
  const double kept = 1.0 / 0.7;
  CHECK(((ct.keep.array() == 0.0) || (ct.keep.array() == kept)).all());
  CHECK((ct.keep.array() == 0.0).count() > 0);
  Matrix<double> dx = Matrix<double>::Zero(30, 9);
  a.backward(ct, g, &dx);
  // Same as eval on the dropped input, with dX masked.
  const Matrix<double> xd = x.cwiseProduct(ct.keep);
  a.eval();
  typename VeraAdapter<double>::Cache ce;
  Matrix<double> ye = Matrix<double>::Zero(30, 7);
  a.forward(xd, ye, ce);
  CHECK(ce.keep.size() == 0);
  CHECK(test::rel_diff(yt, ye) < 1e-14);
  Matrix<double> dxe = Matrix<double>::Zero(30, 9);
  a.backward(ce, g, &dxe);
  CHECK(test::rel_diff(dx, Matrix<double>(dxe.cwiseProduct(ct.keep))) < 1e-14);
}

TEST_CASE("VeRA refuses unsupported options and shapes by name", "[vera][errors]") {
  Rng rng(46);
  auto p = VeraProjections<double>::generate(4, 12, 10, rng);
  VeraConfig c;
  c.r = 4;
  c.fan_in_fan_out = true;
  PEFT_REQUIRE_THROWS_WITH(VeraAdapter<double>(8, 6, c, p, rng, "q"), ConfigError, "fan_in_fan_out");
  c.fan_in_fan_out = false;
  c.bias = "vera_only";
  PEFT_REQUIRE_THROWS_WITH(VeraAdapter<double>(8, 6, c, p, rng, "q"), ConfigError, "bias=\"vera_only\"");
  c.bias = "none";
  c.save_projection = false;
  PEFT_REQUIRE_THROWS_WITH(VeraAdapter<double>(8, 6, c, p, rng, "q"), ConfigError, "save_projection=false");
  c.save_projection = true;
  c.vera_dropout = 1.0;
  PEFT_REQUIRE_THROWS_WITH(VeraAdapter<double>(8, 6, c, p, rng, "q"), ConfigError, "vera_dropout");
  c.vera_dropout = 0.0;
  c.r = 3;
  PEFT_REQUIRE_THROWS_WITH(VeraAdapter<double>(8, 6, c, p, rng, "q"), ShapeError, "config r is 3");
  c.r = 4;
  PEFT_REQUIRE_THROWS_WITH(VeraAdapter<double>(13, 6, c, p, rng, "q"), ShapeError,
                           "does not fit the shared projections");
  PEFT_REQUIRE_THROWS_WITH(VeraAdapter<double>(8, 11, c, p, rng, "q"), ShapeError,
                           "does not fit the shared projections");
  PEFT_REQUIRE_THROWS_WITH(VeraAdapter<double>(8, 6, c, nullptr, rng, "q"), ConfigError, "no shared projections");
  PEFT_REQUIRE_THROWS_WITH(VeraProjections<double>::make(Matrix<double>::Zero(4, 8), Matrix<double>::Zero(8, 3)),
                           ShapeError, "vera_B has shape [8, 3]");
  VeraAdapter<double> a(8, 6, c, p, rng, "q");
  typename VeraAdapter<double>::Cache cache;
  Matrix<double> y = Matrix<double>::Zero(3, 6);
  PEFT_REQUIRE_THROWS_WITH(a.forward(Matrix<double>::Zero(3, 9), y, cache), ShapeError, "VeRA \"q\": input has 9");
  a.lambda_d.value.resize(1, 5);
  PEFT_REQUIRE_THROWS_WITH(a.forward(Matrix<double>::Zero(3, 8), y, cache), ShapeError, "vera_lambda_d");
}
