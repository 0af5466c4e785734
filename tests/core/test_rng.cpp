// Rng: determinism, state checkpointing and distribution sanity (moments of uniform and normal).
#include <peft/core/error.hpp>
#include <peft/core/rng.hpp>

#include <cmath>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("Rng is deterministic for a seed and differs across seeds", "[rng]") {
  Rng a(42), b(42), c(43);
  bool any_diff = false;
  for (int i = 0; i < 100; ++i) {
    const std::uint64_t x = a.next_u64();
    CHECK(x == b.next_u64());
    any_diff = any_diff || (x != c.next_u64());
  }
  CHECK(any_diff);
  // reseed restarts the same stream.
  Rng d(7);
  const double first = d.normal();
  d.uniform();
  d.reseed(7);
  CHECK(d.normal() == first);
}

TEST_CASE("Rng state save/restore continues identically", "[rng]") {
  Rng rng(123);
  for (int i = 0; i < 17; ++i) rng.normal();
  const Rng::State saved = rng.state();
  std::vector<double> expected;
  for (int i = 0; i < 50; ++i) expected.push_back(i % 2 ? rng.normal() : rng.uniform());
  Rng other(999);
  other.set_state(saved);
  for (int i = 0; i < 50; ++i)
    CHECK((i % 2 ? other.normal() : other.uniform()) == expected[static_cast<std::size_t>(i)]);
}

TEST_CASE("Rng uniform and normal have the right moments", "[rng]") {
  Rng rng(2024);
  const int n = 200000;
  // Standard errors: mean ~ σ/√n, variance ~ σ²·√(2/n) (normal) — checks use ~6 standard errors.
  double su = 0, su2 = 0, sn = 0, sn2 = 0, lo = 1, hi = 0;
  for (int i = 0; i < n; ++i) {
    const double u = rng.uniform();
    REQUIRE(u >= 0.0);
    REQUIRE(u < 1.0);
    lo = std::min(lo, u);
    hi = std::max(hi, u);
    su += u;
    su2 += u * u;
    const double z = rng.normal(3.0, 2.0);
    sn += z;
    sn2 += z * z;
  }
  const double mu = su / n, vu = su2 / n - mu * mu;
  CHECK(std::abs(mu - 0.5) < 6 * std::sqrt(1.0 / 12 / n));
  CHECK(std::abs(vu - 1.0 / 12) < 0.005);
  CHECK(lo < 1e-3);
  CHECK(hi > 1 - 1e-3);
  const double mn = sn / n, vn = sn2 / n - mn * mn;
  CHECK(std::abs(mn - 3.0) < 6 * 2.0 / std::sqrt(n));
  CHECK(std::abs(vn - 4.0) < 6 * 4.0 * std::sqrt(2.0 / n));

  const double a = -2.5, b = 1.5;
  double s = 0;
  for (int i = 0; i < n; ++i) {
    const double u = rng.uniform(a, b);
    REQUIRE(u >= a);
    REQUIRE(u < b);
    s += u;
  }
  CHECK(std::abs(s / n - (a + b) / 2) < 6 * (b - a) * std::sqrt(1.0 / 12 / n));
}

TEST_CASE("Rng uniform_int and bernoulli", "[rng]") {
  Rng rng(5);
  std::vector<int> counts(7, 0);
  const int n = 70000;
  for (int i = 0; i < n; ++i) {
    const std::uint64_t k = rng.uniform_int(7);
    REQUIRE(k < 7);
    ++counts[k];
  }
  for (int c : counts) CHECK(std::abs(c - n / 7) < 6 * std::sqrt(n / 7.0));
  int ones = 0;
  for (int i = 0; i < n; ++i) ones += rng.bernoulli(0.3) ? 1 : 0;
  CHECK(std::abs(ones - 0.3 * n) < 6 * std::sqrt(n * 0.3 * 0.7));
  CHECK_FALSE(rng.bernoulli(0.0));
  CHECK(rng.bernoulli(1.0));
  PEFT_REQUIRE_THROWS_WITH(rng.uniform_int(0), ConfigError, "n must be > 0");
}
