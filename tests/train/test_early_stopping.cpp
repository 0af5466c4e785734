#include <peft/train/early_stopping.hpp>

#include <cmath>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("EarlyStopping on a loss stops after `patience` evaluations without improvement", "[train][early_stopping]") {
  EarlyStopping es({/*patience=*/2, /*min_delta=*/0.05, /*maximize=*/false});
  CHECK(es.update(1.0));
  CHECK(es.update(0.9));
  CHECK_FALSE(es.update(0.87));  // better, but by less than min_delta
  CHECK_FALSE(es.should_stop());
  CHECK(es.update(0.5));  // improvement resets the counter
  CHECK(es.evaluations_since_best() == 0);
  CHECK_FALSE(es.update(0.6));
  CHECK_FALSE(es.should_stop());
  CHECK_FALSE(es.update(0.7));
  CHECK(es.should_stop());
  CHECK(es.best() == 0.5);
  CHECK(es.best_evaluation() == 4);
  CHECK(es.evaluations() == 6);
  es.reset();
  CHECK_FALSE(es.should_stop());
  CHECK(std::isinf(es.best()));
}

TEST_CASE("EarlyStopping maximizes accuracy and treats NaN as no improvement", "[train][early_stopping]") {
  EarlyStopping es({/*patience=*/1, /*min_delta=*/0.0, /*maximize=*/true});
  CHECK(es.update(0.5));
  CHECK(es.update(0.7));
  CHECK_FALSE(es.update(std::nan("")));
  CHECK(es.should_stop());
  CHECK(es.best() == 0.7);

  EarlyStopping first_nan({/*patience=*/3, /*min_delta=*/0.0, /*maximize=*/true});
  CHECK_FALSE(first_nan.update(std::nan("")));
  CHECK(first_nan.best_evaluation() == 0);
  CHECK(first_nan.update(0.1));
}

TEST_CASE("EarlyStopping rejects bad options", "[train][early_stopping][errors]") {
  PEFT_REQUIRE_THROWS_WITH(EarlyStopping({0, 0.0, false}), ConfigError, "EarlyStopping: patience must be >= 1, got 0");
  PEFT_REQUIRE_THROWS_WITH(EarlyStopping({3, -0.1, false}), ConfigError,
                           "EarlyStopping: min_delta must be finite and >= 0");
}
