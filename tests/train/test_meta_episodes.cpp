#include <peft/meta/episodes.hpp>

#include <algorithm>
#include <set>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

namespace {
/// 7 classes (class c has 6 + c rows), interleaved.
std::vector<std::int64_t> episode_test_labels() {
  std::vector<std::int64_t> y;
  for (int round = 0; round < 12; ++round)
    for (std::int64_t c = 0; c < 7; ++c)
      if (round < 6 + c) y.push_back(c);
  return y;
}
bool same_episode(const Episode& a, const Episode& b) {
  return a.classes == b.classes && a.support == b.support && a.query == b.query &&
         a.support_labels == b.support_labels && a.query_labels == b.query_labels;
}
}  // namespace

TEST_CASE("EpisodeSampler draws class-balanced N-way K-shot episodes", "[train][meta]") {
  const std::vector<std::int64_t> y = episode_test_labels();
  EpisodeSampler s(y, /*n_way=*/3, /*k_shot=*/2, /*n_query=*/3, /*seed=*/5);
  CHECK(s.classes() == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6});
  Episode e;
  std::vector<int> drawn(7, 0);
  for (int t = 0; t < 700; ++t) {
    s.next(e);
    REQUIRE(e.classes.size() == 3);
    REQUIRE(e.support.size() == 6);
    REQUIRE(e.query.size() == 9);
    CHECK(std::set<std::int64_t>(e.classes.begin(), e.classes.end()).size() == 3);
    std::set<Index> rows;
    for (std::size_t i = 0; i < e.support.size(); ++i) {
      CHECK(e.support_labels[i] == static_cast<std::int64_t>(i / 2));
      CHECK(y[static_cast<std::size_t>(e.support[i])] == e.classes[i / 2]);
      rows.insert(e.support[i]);
    }
    for (std::size_t i = 0; i < e.query.size(); ++i) {
      CHECK(e.query_labels[i] == static_cast<std::int64_t>(i / 3));
      CHECK(y[static_cast<std::size_t>(e.query[i])] == e.classes[i / 3]);
      rows.insert(e.query[i]);
    }
    CHECK(rows.size() == 15);  // no row twice in an episode
    for (std::int64_t c : e.classes) ++drawn[static_cast<std::size_t>(c)];
  }
  CHECK(s.episodes() == 700);
  for (int c = 0; c < 7; ++c) CHECK(drawn[static_cast<std::size_t>(c)] == Approx(300).margin(60));  // 700·3/7
}

TEST_CASE("EpisodeSampler is seeded, restricted to its classes and resumes from its state", "[train][meta]") {
  const std::vector<std::int64_t> y = episode_test_labels();
  EpisodeSampler a(y, 2, 1, 4, 11, {1, 4, 6}), b(y, 2, 1, 4, 11, {1, 4, 6});
  Episode ea, eb;
  for (int t = 0; t < 20; ++t) {
    a.next(ea);
    b.next(eb);
    CHECK(same_episode(ea, eb));
    for (std::int64_t c : ea.classes) CHECK((c == 1 || c == 4 || c == 6));
  }
  const EpisodeSampler::State st = a.state();
  std::vector<Episode> later(5);
  for (Episode& e : later) a.next(e);
  EpisodeSampler resumed(y, 2, 1, 4, /*another seed*/ 99, {1, 4, 6});
  resumed.set_state(st);
  CHECK(resumed.episodes() == 20);
  for (const Episode& e : later) {
    resumed.next(eb);
    CHECK(same_episode(e, eb));
  }
  EpisodeSampler other(y, 2, 1, 4, 12, {1, 4, 6});
  other.next(eb);
  EpisodeSampler first(y, 2, 1, 4, 11, {1, 4, 6});
  first.next(ea);
  CHECK_FALSE(same_episode(ea, eb));
}

TEST_CASE("EpisodeSampler refuses impossible episodes by name", "[train][meta]") {
  const std::vector<std::int64_t> y = episode_test_labels();
  PEFT_REQUIRE_THROWS_WITH(EpisodeSampler(y, 8, 1, 1, 0), ConfigError, "8-way episodes need 8 classes, got 7");
  PEFT_REQUIRE_THROWS_WITH(EpisodeSampler(y, 2, 5, 3, 0), ConfigError,
                           "class 0 has 6 examples, expected >= 8 (k_shot 5 + n_query 3)");
  PEFT_REQUIRE_THROWS_WITH(EpisodeSampler(y, 2, 0, 3, 0), ConfigError, "k_shot must be >= 1, got 0");
  PEFT_REQUIRE_THROWS_WITH(EpisodeSampler(y, 2, 1, 1, 0, {3, 3}), ConfigError, "class 3 is listed twice");
  PEFT_REQUIRE_THROWS_WITH(EpisodeSampler(y, 2, 1, 1, 0, {3, 42}), ConfigError, "class 42 has 0 examples");
  PEFT_REQUIRE_THROWS_WITH(EpisodeSampler({0, -1}, 1, 1, 0, 0), ConfigError, "label of row 1 is -1");
  EpisodeSampler s(y, 2, 1, 1, 0);
  PEFT_REQUIRE_THROWS_WITH(s.set_state(EpisodeSampler::State{{}, -3}), ConfigError, "episode count is -3");
}
