#include <peft/merge/combine.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "merge_test_utils.hpp"

using namespace peft;
using peft::test::SvdTolerances;

namespace {

constexpr Index kOut = 14;
constexpr Index kIn = 11;

// ---- independent dense references (double, full sorts and per-entry loops) --------------------

Eigen::MatrixXd ref_trim(const Eigen::MatrixXd& d, double density) {
  // Row-major entry order to match the documented tie-break (lower row-major index first).
  const Index n = d.size();
  std::vector<Index> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), Index(0));
  auto at = [&](Index k) { return d(k / d.cols(), k % d.cols()); };
  std::stable_sort(idx.begin(), idx.end(), [&](Index a, Index b) { return std::abs(at(a)) > std::abs(at(b)); });
  const Index keep = static_cast<Index>(std::floor(density * static_cast<double>(n)));
  Eigen::MatrixXd out = Eigen::MatrixXd::Zero(d.rows(), d.cols());
  for (Index t = 0; t < keep; ++t) out(idx[t] / d.cols(), idx[t] % d.cols()) = at(idx[t]);
  return out;
}

Eigen::MatrixXd ref_dare(const Eigen::MatrixXd& d, double density, std::uint64_t seed) {
  Rng rng(seed);
  Eigen::MatrixXd out = Eigen::MatrixXd::Zero(d.rows(), d.cols());
  for (Index o = 0; o < d.rows(); ++o)
    for (Index j = 0; j < d.cols(); ++j)
      if (rng.uniform() < density) out(o, j) = d(o, j) / density;
  return out;
}

int sgn(double x) { return (x > 0) - (x < 0); }

Eigen::MatrixXd ref_ties(const std::vector<Eigen::MatrixXd>& p, const std::vector<double>& w, bool frequency) {
  Eigen::MatrixXd out = Eigen::MatrixXd::Zero(p[0].rows(), p[0].cols());
  for (Index o = 0; o < out.rows(); ++o)
    for (Index j = 0; j < out.cols(); ++j) {
      double vote = 0.0;
      for (const auto& t : p) vote += frequency ? sgn(t(o, j)) : t(o, j);
      const int e = vote >= 0.0 ? 1 : -1;
      double num = 0.0;
      int cnt = 0;
      for (std::size_t i = 0; i < p.size(); ++i)
        if (sgn(p[i](o, j)) == e) {
          num += w[i] * p[i](o, j);
          ++cnt;
        }
      out(o, j) = num / std::max(cnt, 1);
    }
  return out;
}

template <class T>
Eigen::MatrixXd ref_target(const std::vector<LoraFactors<T>>& fs, const std::vector<double>& w,
                           const CombineOptions& opt) {
  std::vector<Eigen::MatrixXd> p;
  for (std::size_t i = 0; i < fs.size(); ++i) {
    const Eigen::MatrixXd d = test::product_d(fs[i]);
    switch (opt.method) {
      case CombineMethod::MagnitudePrune:
      case CombineMethod::Ties: p.push_back(ref_trim(d, opt.density)); break;
      case CombineMethod::DareLinear:
      case CombineMethod::DareTies: p.push_back(ref_dare(d, opt.density, opt.seed + i)); break;
      default: p.push_back(d);
    }
  }
  if (opt.method == CombineMethod::Ties || opt.method == CombineMethod::DareTies)
    return ref_ties(p, w, opt.majority_sign == MajoritySign::Frequency);
  Eigen::MatrixXd out = Eigen::MatrixXd::Zero(p[0].rows(), p[0].cols());
  for (std::size_t i = 0; i < p.size(); ++i) out += w[i] * p[i];
  return out;
}

template <class T>
Eigen::MatrixXd result_delta(const CombineResult<T>& r) {
  return test::product_d(r.factors);
}

}  // namespace

TEMPLATE_TEST_CASE("cat is exact with rank sum r_i and unit scaling", "[merge][combine]", float, double) {
  Rng rng(11);
  const auto fs = test::make_sources<TestType>(kOut, kIn, rng);
  const auto w = test::mixed_weights();
  const Eigen::MatrixXd target = test::ref_weighted_sum(fs, w);
  CombineOptions opt;
  opt.method = CombineMethod::Cat;
  const CombineResult<TestType> r = combine(fs, w, opt);
  CHECK(r.factors.rank() == 9);
  CHECK(r.config.r == 9);
  CHECK(r.config.scaling() == 1.0);
  CHECK(r.factors.scaling == 1.0);
  CHECK(test::rel_diff(result_delta(r), target) < test::Tolerances<TestType>::rel);
  CHECK(r.discarded_energy == 0.0);

  // Stored through LoraConfig (plain and rsLoRA), the layer reproduces the delta exactly.
  for (bool rs : {false, true}) {
    opt.use_rslora = rs;
    const CombineResult<TestType> rr = combine(fs, w, opt);
    CHECK(rr.config.use_rslora == rs);
    CHECK(rr.config.scaling() == 1.0);
    Rng lrng(5);
    LoRALinear<TestType> layer(kIn, kOut, lrng, true, "q");
    add_factors_as_adapter(layer, "merged", rr.factors, rs);
    CHECK(layer.adapter("merged").config.scaling() == 1.0);
    const Matrix<TestType> d = layer.delta_weight("merged");
    CHECK(test::rel_diff(Eigen::MatrixXd(d.template cast<double>()), target) < test::Tolerances<TestType>::rel);
  }
}

TEMPLATE_TEST_CASE("svd at full rank is exact, at rank k loses exactly the discarded energy", "[merge][combine]", float,
                   double) {
  Rng rng(12);
  const auto fs = test::make_sources<TestType>(kOut, kIn, rng);
  const auto w = test::mixed_weights();
  const Eigen::MatrixXd target = test::ref_weighted_sum(fs, w);
  const Eigen::VectorXd sigma = test::ref_singular_values(target);
  const double tol = SvdTolerances<TestType>::rel * target.norm();

  CombineOptions opt;
  opt.method = CombineMethod::Svd;
  const CombineResult<TestType> full = combine(fs, w, opt);
  CHECK(full.factors.rank() == 9);
  CHECK((result_delta(full) - target).norm() < tol);
  CHECK(full.discarded_energy < tol * tol);

  for (Index k : {1, 3, 6}) {
    opt.rank = k;
    const CombineResult<TestType> r = combine(fs, w, opt);
    INFO("k = " << k);
    CHECK(r.factors.rank() == k);
    CHECK(r.config.r == k);
    CHECK(r.config.scaling() == 1.0);
    const double measured = (result_delta(r) - target).norm();
    CHECK(std::abs(measured - r.frobenius_error) < tol);                                    // Eckart–Young, our σ
    CHECK(std::abs(r.frobenius_error - std::sqrt(test::ref_tail_energy(sigma, k))) < tol);  // reference σ
    CHECK(std::abs(r.spectral_error - sigma(k)) < tol);
    for (Index j = 0; j < 9; ++j) CHECK(std::abs(r.singular_values[static_cast<std::size_t>(j)] - sigma(j)) < tol);
    // Balanced factors: column norms of B' equal row norms of A' (both √σ_j).
    for (Index j = 0; j < k; ++j)
      CHECK(std::abs(static_cast<double>(r.factors.B.col(j).norm() - r.factors.A.row(j).norm())) <
            SvdTolerances<TestType>::rel * std::sqrt(sigma(0)));
  }

  // Linear is the same target, done densely: the same best rank-k approximation.
  opt.rank = 3;
  const CombineResult<TestType> s = combine(fs, w, opt);
  opt.method = CombineMethod::Linear;
  const CombineResult<TestType> l = combine(fs, w, opt);
  CHECK((result_delta(l) - result_delta(s)).norm() < tol);
  CHECK(std::abs(l.frobenius_error - s.frobenius_error) < tol);
  opt.rank = 0;
  CHECK((result_delta(combine(fs, w, opt)) - target).norm() < tol);
}

TEMPLATE_TEST_CASE("pruning methods match the dense reference", "[merge][combine]", float, double) {
  Rng rng(13);
  const auto fs = test::make_sources<TestType>(kOut, kIn, rng);
  const auto w = test::mixed_weights();
  struct Case {
    CombineMethod method;
    MajoritySign sign;
    double density;
  };
  const std::vector<Case> cases = {
      {CombineMethod::MagnitudePrune, MajoritySign::Total, 0.3}, {CombineMethod::Ties, MajoritySign::Total, 0.4},
      {CombineMethod::Ties, MajoritySign::Frequency, 0.4},       {CombineMethod::Ties, MajoritySign::Total, 1.0},
      {CombineMethod::DareLinear, MajoritySign::Total, 0.5},     {CombineMethod::DareTies, MajoritySign::Total, 0.6},
      {CombineMethod::DareTies, MajoritySign::Frequency, 0.6},
  };
  for (const Case& c : cases) {
    CombineOptions opt;
    opt.method = c.method;
    opt.majority_sign = c.sign;
    opt.density = c.density;
    opt.seed = 77;
    INFO(to_string(c.method) << (c.sign == MajoritySign::Total ? " total" : " frequency") << " density " << c.density);
    const Eigen::MatrixXd target = ref_target(fs, w, opt);
    const double tol = SvdTolerances<TestType>::rel * target.norm();
    // The dense target itself.
    const Matrix<TestType> t = combination_target(fs, w, opt);
    CHECK((t.template cast<double>() - target).norm() < tol);
    // Lossless (rank 0 = min(out, in)): re-factoring loses nothing.
    const CombineResult<TestType> full = combine(fs, w, opt);
    CHECK(full.factors.rank() == kIn);
    CHECK((result_delta(full) - target).norm() < tol);
    // Rank 4: the error is the discarded energy of the reference target.
    opt.rank = 4;
    const CombineResult<TestType> r = combine(fs, w, opt);
    const Eigen::VectorXd sigma = test::ref_singular_values(target);
    CHECK(std::abs((result_delta(r) - target).norm() - std::sqrt(test::ref_tail_energy(sigma, 4))) < tol);
    CHECK(std::abs(r.frobenius_error - std::sqrt(test::ref_tail_energy(sigma, 4))) < tol);
  }
}

TEST_CASE("ties elects the sign on unweighted deltas, as PEFT does", "[merge][combine]") {
  // One entry, two tasks: P = (+1, −2) with weights (1, −1). Total vote: 1 − 2 < 0 → e = −1, so only
  // task 1 agrees: result = w_1 · (−2) / 1 = +2 (a weighted vote would have elected + and given 1).
  LoraFactors<double> a{Matrix<double>::Constant(1, 1, 1.0), Matrix<double>::Constant(1, 1, 1.0), 1.0, "a"};
  LoraFactors<double> b{Matrix<double>::Constant(1, 1, 1.0), Matrix<double>::Constant(1, 1, -2.0), 1.0, "b"};
  CombineOptions opt;
  opt.method = CombineMethod::Ties;
  const Matrix<double> t = combination_target<double>({a, b}, {1.0, -1.0}, opt);
  CHECK(t(0, 0) == 2.0);
  opt.majority_sign = MajoritySign::Frequency;  // one vote each: tie → +, only task 0 agrees
  CHECK(combination_target<double>({a, b}, {1.0, -1.0}, opt)(0, 0) == 1.0);
}

TEMPLATE_TEST_CASE("dare is reproducible for a seed", "[merge][combine]", float, double) {
  Rng rng(14);
  const auto fs = test::make_sources<TestType>(kOut, kIn, rng);
  const auto w = test::mixed_weights();
  CombineOptions opt;
  opt.method = CombineMethod::DareTies;
  opt.density = 0.5;
  opt.seed = 1234;
  opt.rank = 5;
  const CombineResult<TestType> r1 = combine(fs, w, opt);
  const CombineResult<TestType> r2 = combine(fs, w, opt);
  CHECK(r1.factors.A == r2.factors.A);
  CHECK(r1.factors.B == r2.factors.B);
  opt.seed = 1235;
  const CombineResult<TestType> r3 = combine(fs, w, opt);
  CHECK((result_delta(r3) - result_delta(r1)).norm() > 1e-3 * result_delta(r1).norm());
}

TEMPLATE_TEST_CASE("add_combined_adapter combines layer adapters exactly, rsLoRA sources included", "[merge][combine]",
                   float, double) {
  Rng rng(15);
  LoRALinear<TestType> layer(kIn, kOut, rng, true, "layers.0.v");
  LoraConfig c0;
  c0.r = 2;
  c0.alpha = 16.0;
  c0.init = LoraInit::None;
  LoraConfig c1 = c0;
  c1.r = 4;
  c1.use_rslora = true;
  LoraConfig c2 = c0;
  c2.r = 3;
  c2.alpha = 3.0;
  layer.add_adapter("x", c0, rng);
  layer.add_adapter("y", c1, rng);
  layer.add_adapter("z", c2, rng);
  const std::vector<double> w = {1.0, -0.5, 2.0};
  Matrix<double> expected = Matrix<double>::Zero(kOut, kIn);
  expected += w[0] * layer.delta_weight("x").template cast<double>();
  expected += w[1] * layer.delta_weight("y").template cast<double>();
  expected += w[2] * layer.delta_weight("z").template cast<double>();
  for (bool rs : {false, true}) {
    CombineOptions opt;
    opt.method = CombineMethod::Svd;
    opt.use_rslora = rs;
    const std::string name = rs ? "xyz_rs" : "xyz";
    add_combined_adapter(layer, name, {"x", "y", "z"}, w, opt);
    CHECK(layer.adapter(name).config.r == 9);
    CHECK(layer.adapter(name).scaling() == 1.0);
    CHECK(test::rel_diff(Matrix<double>(layer.delta_weight(name).template cast<double>()), expected) <
          SvdTolerances<TestType>::rel);
  }
}

TEST_CASE("combine rejects bad inputs with named errors", "[merge][combine][errors]") {
  Rng rng(16);
  auto fs = test::make_sources<double>(kOut, kIn, rng);
  const auto w = test::mixed_weights();
  CombineOptions opt;

  PEFT_REQUIRE_THROWS_WITH(combine<double>({}, {}, opt), ConfigError, "no adapters given");
  PEFT_REQUIRE_THROWS_WITH(combine(fs, {1.0, 2.0}, opt), ConfigError, "2 weights given for 3 adapters");
  PEFT_REQUIRE_THROWS_WITH(combine(fs, {1.0, std::nan(""), 2.0}, opt), ConfigError, "weight of adapter 1");

  {
    auto bad = fs;
    bad[1].A(0, 0) = std::numeric_limits<double>::quiet_NaN();
    PEFT_REQUIRE_THROWS_WITH(combine(bad, w, opt), NumericError, "adapter 1: A contains NaN or Inf");
    bad = fs;
    bad[2].B(3, 1) = std::numeric_limits<double>::infinity();
    bad[2].name = "task_c";
    PEFT_REQUIRE_THROWS_WITH(combine(bad, w, opt), NumericError, "adapter 2 (\"task_c\"): B contains NaN or Inf");
    bad = fs;
    bad[0].scaling = std::numeric_limits<double>::infinity();
    PEFT_REQUIRE_THROWS_WITH(combine(bad, w, opt), NumericError, "adapter 0: scaling is not finite");
  }
  {
    auto bad = fs;
    bad[2].A = Matrix<double>::Zero(4, kIn + 1);
    PEFT_REQUIRE_THROWS_WITH(combine(bad, w, opt), ShapeError,
                             "adapter 2 has delta shape [14, 12] but adapter 0 has delta shape [14, 11]");
    bad = fs;
    bad[1].B = Matrix<double>::Zero(kOut, 2);
    PEFT_REQUIRE_THROWS_WITH(combine(bad, w, opt), ShapeError,
                             "adapter 1: A has shape [3, 11] but B has shape [14, 2]");
  }
  opt.rank = kIn + 1;
  PEFT_REQUIRE_THROWS_WITH(combine(fs, w, opt), ConfigError, "rank must be in [0, 11]");
  opt.rank = -1;
  PEFT_REQUIRE_THROWS_WITH(combine(fs, w, opt), ConfigError, "got -1");
  opt.rank = 3;
  opt.method = CombineMethod::Cat;
  PEFT_REQUIRE_THROWS_WITH(combine(fs, w, opt), ConfigError, "leave rank = 0 (got 3)");
  opt.rank = 0;
  {
    auto many = fs;
    many.push_back(fs[2]);  // Σ r_i = 13 > min(out, in) = 11: legal and exact, reported as wasteful
    std::vector<std::string> seen;
    const ScopedWarningHandler guard([&](const std::string& m) { seen.push_back(m); });
    const CombineResult<double> big = combine(many, {1.0, 1.0, 1.0, 1.0}, opt);
    CHECK(big.factors.rank() == 13);
    REQUIRE(seen.size() == 1);
    CHECK(seen[0].find("Σ r_i = 13 exceeds min(out, in) = 11") != std::string::npos);
  }
  for (CombineMethod m :
       {CombineMethod::Ties, CombineMethod::DareLinear, CombineMethod::MagnitudePrune, CombineMethod::DareTies}) {
    opt.method = m;
    for (double d : {0.0, -0.5, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
      opt.density = d;
      PEFT_REQUIRE_THROWS_WITH(combine(fs, w, opt), ConfigError, "density must be in (0, 1]");
    }
  }
  Rng lrng(1);
  LoRALinear<double> layer(kIn, kOut, lrng, true, "fc");
  layer.add_adapter("a", LoraConfig{}, lrng);
  PEFT_REQUIRE_THROWS_WITH(add_combined_adapter(layer, "m", {"a", "nope"}, {1.0, 1.0}), ConfigError,
                           "unknown adapter \"nope\"; available: [a]");
  LoraFactors<double> wrong{Matrix<double>::Zero(2, kIn + 2), Matrix<double>::Zero(kOut, 2), 1.0, ""};
  PEFT_REQUIRE_THROWS_WITH(add_factors_as_adapter(layer, "w", wrong), ShapeError,
                           "adapter \"w\" has delta shape [14, 13], layer weight has shape [14, 11]");
  PEFT_REQUIRE_THROWS_WITH(unit_scaling_config(0), ConfigError, "rank must be >= 1");
  LoraConfig dora;
  dora.r = 2;
  dora.use_dora = true;
  layer.add_adapter("d", dora, lrng);
  PEFT_REQUIRE_THROWS_WITH(add_combined_adapter(layer, "m", {"a", "d"}, {1.0, 1.0}), ConfigError,
                           "adapter \"d\" uses DoRA: its delta is not s·B·A");
}

namespace {

const std::vector<CombineMethod> kAllMethods = {
    CombineMethod::Cat,  CombineMethod::Svd,        CombineMethod::Linear,  CombineMethod::MagnitudePrune,
    CombineMethod::Ties, CombineMethod::DareLinear, CombineMethod::DareTies};

CombineOptions options_for(CombineMethod m) {
  CombineOptions opt;
  opt.method = m;
  if (detail::uses_density(m)) opt.density = 0.6;
  opt.seed = 5;
  return opt;
}

/// Everything a combine result reports is finite.
template <class T>
bool finite_result(const CombineResult<T>& r) {
  bool ok = r.factors.A.allFinite() && r.factors.B.allFinite() && std::isfinite(r.discarded_energy) &&
            std::isfinite(r.frobenius_error) && std::isfinite(r.spectral_error);
  for (double s : r.singular_values) ok = ok && std::isfinite(s);
  return ok;
}

}  // namespace

TEMPLATE_TEST_CASE("combine refuses a weight x scaling that overflows T (a huge lora_alpha), every method",
                   "[merge][combine][errors]", float, double) {
  Rng rng(40);
  auto fs = test::make_sources<TestType>(kOut, kIn, rng);
  fs[1].name = "b:layers.0.q";
  fs[1].scaling = static_cast<double>(std::numeric_limits<TestType>::max()) / 2;  // finite in T
  const std::vector<double> w{1.0, 4.0, 1.0};                                     // w·s = 2·max: not
  for (CombineMethod m : kAllMethods) {
    INFO(to_string(m));
    const std::string method = std::string("combine (") + to_string(m) + ")";
    PEFT_REQUIRE_THROWS_WITH(combine(fs, w, options_for(m)), NumericError, method);
    PEFT_REQUIRE_THROWS_WITH(combine(fs, w, options_for(m)), NumericError, "adapter 1 (\"b:layers.0.q\") has scaling");
    PEFT_REQUIRE_THROWS_WITH(combine(fs, w, options_for(m), "layers.0.q"), NumericError,
                             method + " of module \"layers.0.q\"");
    PEFT_REQUIRE_THROWS_WITH(combine(fs, w, options_for(m)), NumericError, "lora_alpha too large");
  }
  // A scaling that is finite in double but not in float (alpha = 1e39).
  if (std::is_same<TestType, float>::value) {
    fs[1].scaling = 1e39;
    PEFT_REQUIRE_THROWS_WITH(combine(fs, {1.0, 1.0, 1.0}, options_for(CombineMethod::Svd)), NumericError,
                             "is not finite in float");
  }
}

TEMPLATE_TEST_CASE("combine refuses scaled factors and deltas that overflow T, every method",
                   "[merge][combine][errors]", float, double) {
  Rng rng(41);
  auto fs = test::make_sources<TestType>(kOut, kIn, rng);
  fs[0].scaling = static_cast<double>(std::numeric_limits<TestType>::max()) / 2;  // w·s finite
  fs[0].B(3, 1) = TestType(4);                                                    // but w·s·B and s·B·A overflow
  fs[0].A.row(1).setConstant(TestType(1));
  for (CombineMethod m : kAllMethods) {
    INFO(to_string(m));
    PEFT_REQUIRE_THROWS_WITH(combine(fs, {1.0, 1.0, 1.0}, options_for(m), "layers.3.v"), NumericError,
                             std::string("combine (") + to_string(m) + ") of module \"layers.3.v\"");
    PEFT_REQUIRE_THROWS_WITH(combine(fs, {1.0, 1.0, 1.0}, options_for(m)), NumericError, "is not finite");
    if (m != CombineMethod::Cat && m != CombineMethod::Svd) {
      PEFT_REQUIRE_THROWS_WITH(combination_target(fs, {1.0, 1.0, 1.0}, options_for(m)), NumericError,
                               "the delta s·B·A of adapter 0 is not finite");
    }
  }
}

TEMPLATE_TEST_CASE("combine never returns a non-finite adapter or error: refuses or succeeds finitely",
                   "[merge][combine][errors]", float, double) {
  // Scalings from ordinary to near the overflow of T (and of Σ σ² in double): every method either
  // throws NumericError or returns finite factors, singular values and truncation errors.
  Rng rng(42);
  const auto base = test::make_sources<TestType>(kOut, kIn, rng);
  int refused = 0, done = 0;
  for (double s : {1.0, 1e10, 1e19, 1e30, 1e36, 1e100, 1e154, 1e160, 1e200, 1e300}) {
    auto fs = base;
    for (auto& f : fs) f.scaling = s;
    for (CombineMethod m : kAllMethods) {
      INFO("scaling " << s << ", " << to_string(m));
      try {
        const CombineResult<TestType> r = combine(fs, test::mixed_weights(), options_for(m));
        CHECK(finite_result(r));
        ++done;
      } catch (const NumericError& e) {
        CHECK(std::string(e.what()).find(to_string(m)) != std::string::npos);
        ++refused;
      }
    }
  }
  CHECK(refused > 0);
  CHECK(done > 0);
}

TEST_CASE("combine refuses a target whose singular values overflow (double)", "[merge][combine][errors]") {
  // Every input and every delta entry is finite (≈ 1e200), but Σ σ² (the discarded energy) and the
  // norms inside the SVD are not: the methods that report a truncation error refuse.
  Rng rng(43);
  auto fs = test::make_sources<double>(kOut, kIn, rng);
  for (auto& f : fs) f.scaling = 1e200;
  for (CombineMethod m : kAllMethods) {
    if (m == CombineMethod::Cat) continue;  // no SVD: its factors w_i s_i B_i are finite and exact
    INFO(to_string(m));
    CombineOptions opt = options_for(m);
    opt.rank = 1;
    PEFT_REQUIRE_THROWS_WITH(combine(fs, test::mixed_weights(), opt, "fc"), NumericError,
                             std::string("combine (") + to_string(m) + ") of module \"fc\"");
  }
  const CombineResult<double> cat = combine(fs, test::mixed_weights(), options_for(CombineMethod::Cat));
  CHECK(finite_result(cat));
}
