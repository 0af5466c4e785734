#include <peft/train/batches.hpp>

#include <algorithm>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

namespace {
std::vector<Index> one_epoch(BatchSampler& s, std::vector<Index>* sizes = nullptr) {
  std::vector<Index> all, batch;
  while (s.next(batch)) {
    if (sizes != nullptr) sizes->push_back(static_cast<Index>(batch.size()));
    all.insert(all.end(), batch.begin(), batch.end());
  }
  return all;
}
}  // namespace

TEST_CASE("BatchSampler covers every index once per epoch", "[train][batches]") {
  BatchSampler s(10, 4, /*seed=*/7);
  CHECK(s.batches_per_epoch() == 3);
  std::vector<Index> sizes;
  std::vector<Index> first = one_epoch(s, &sizes);
  CHECK(sizes == std::vector<Index>{4, 4, 2});
  std::vector<Index> sorted = first;
  std::sort(sorted.begin(), sorted.end());
  for (Index i = 0; i < 10; ++i) CHECK(sorted[static_cast<std::size_t>(i)] == i);
  std::vector<Index> natural(10);
  for (Index i = 0; i < 10; ++i) natural[static_cast<std::size_t>(i)] = i;
  CHECK(first != natural);  // shuffled (probability 1/10! of a false failure, and the seed is fixed)

  s.start_epoch();
  const std::vector<Index> second = one_epoch(s);
  CHECK(second != first);  // a new permutation each epoch

  BatchSampler again(10, 4, 7);
  CHECK(one_epoch(again) == first);  // same seed, same batches
}

TEST_CASE("BatchSampler without shuffling keeps order; drop_last drops the remainder", "[train][batches]") {
  BatchSampler s(7, 3, 1, /*shuffle=*/false, /*drop_last=*/true);
  CHECK(s.batches_per_epoch() == 2);
  std::vector<Index> sizes;
  CHECK(one_epoch(s, &sizes) == std::vector<Index>{0, 1, 2, 3, 4, 5});
  CHECK(sizes == std::vector<Index>{3, 3});
  std::vector<Index> batch{42};
  CHECK_FALSE(s.next(batch));
  CHECK(batch.empty());
}

TEST_CASE("shuffle is a permutation", "[train][batches]") {
  Rng rng(3);
  std::vector<int> v{1, 2, 3, 4, 5, 6, 7, 8};
  shuffle(v, rng);
  std::vector<int> sorted = v;
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8});
  std::vector<int> empty;
  shuffle(empty, rng);
  CHECK(empty.empty());
}

TEST_CASE("BatchSampler rejects bad sizes", "[train][batches][errors]") {
  PEFT_REQUIRE_THROWS_WITH(BatchSampler(0, 4, 1), ConfigError, "BatchSampler: dataset size must be > 0, got 0");
  PEFT_REQUIRE_THROWS_WITH(BatchSampler(5, 0, 1), ConfigError, "BatchSampler: batch size must be > 0, got 0");
  PEFT_REQUIRE_THROWS_WITH(BatchSampler(5, 8, 1, true, true), ConfigError,
                           "drop_last with batch size 8 > dataset size 5");
}
