// Reward normalisation statistics (models/reward_model.hpp) and the reward model on disk
// (io/reward_model.hpp): save → load onto the same base gives the same raw and normalised rewards
// bit for bit; bad statistics and mismatched files are refused by name.
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include <peft/io/methods.hpp>
#include <peft/io/reward_model.hpp>
#include <peft/models/llama.hpp>
#include <peft/models/reward_model.hpp>

#include "io/io_test_utils.hpp"
#include "models/llama_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;

namespace {

const io::Json& rm_io_lora() {
  static const io::Json cfg = {
      {"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"q_proj", "v_proj", "up_proj"}}};
  return cfg;
}

std::vector<std::vector<Index>> rm_io_texts() {
  return {{1, 2, 3}, {4, 5, 6, 7, 8}, {9}, {10, 3, 3, 2}, {5, 5, 5, 5, 5, 5}, {2, 7}, {8, 1, 4}};
}

}  // namespace

TEST_CASE("reward_normalization: mean and population std, apply is (r - mean) / std", "[reward]") {
  Matrix<float> raw(4, 1);
  raw << 1.0f, 2.0f, 3.0f, 6.0f;
  const RewardNormalization n = reward_normalization<float>(raw);
  CHECK(n.mean == Approx(3.0));
  CHECK(n.std == Approx(std::sqrt((4.0 + 1.0 + 0.0 + 9.0) / 4.0)));
  CHECK(n.count == 4);
  Matrix<float> z = raw;
  n.apply<float>(z);
  CHECK(z.mean() == Approx(0.0).margin(1e-6));
  CHECK(std::sqrt(z.squaredNorm() / 4.0) == Approx(1.0));
  CHECK(z(3, 0) == static_cast<float>((6.0 - n.mean) / n.std));

  Matrix<float> same = Matrix<float>::Constant(3, 1, 2.0f);
  PEFT_REQUIRE_THROWS_WITH(reward_normalization<float>(same), NumericError, "all equal (std 0)");
  Matrix<float> nan = raw;
  nan(1, 0) = std::nanf("");
  PEFT_REQUIRE_THROWS_WITH(reward_normalization<float>(nan), NumericError, "raw reward 1 is not finite");
  PEFT_REQUIRE_THROWS_WITH(reward_normalization<float>(Matrix<float>(0, 1)), ShapeError, "expected [n, 1]");
  RewardNormalization bad;
  bad.std = 0.0;
  PEFT_REQUIRE_THROWS_WITH(bad.validate("rm"), ConfigError, "rm: reward normalisation needs");
}

TEMPLATE_TEST_CASE("reward model: save_reward_model -> load_reward_model gives the same scores, bitwise",
                   "[reward][io]", float, double) {
  using T = TestType;
  Rng rng(41);
  const LlamaConfig cfg = peft::test::tiny_llama_base();
  LlamaForCausalLM<T> base(cfg, rng);
  base.freeze_all();
  LlamaModel<T> backbone_copy = base.model;  // the base as a user reloads it
  LlamaRewardModel<T> rm(cfg, std::move(base.model), rng);
  io::apply_method<T>(rm, rm_io_lora(), "reward", rng);
  rm.visit_parameters([&](const std::string& n, Parameter<T>& p) {
    if (n.find("lora_B") != std::string::npos)
      p.value = peft::test::random_matrix<T>(p.value.rows(), p.value.cols(), rng, 0.5);
  });
  rm.score.weight.value = peft::test::random_matrix<T>(1, cfg.hidden_size, rng);
  rm.eval();
  // Scored the same way from the same state, a model gives the same bits; its reused buffers keep
  // the shapes of earlier batches, and Eigen's vectorised kernels may then round differently in the
  // last bit (seen in double). So the loaded model is compared with a fresh copy of the original.
  LlamaRewardModel<T> fresh = rm;
  const std::vector<std::vector<Index>> texts = rm_io_texts();
  const RewardNormalization norm = reward_normalization<T>(rm, texts, 3);
  Matrix<T> raw, scored;
  score_sequences<T>(rm, texts, raw, 3);
  REQUIRE(raw.rows() == 7);
  // Batching pads; the reward of a text does not depend on its batch (up to rounding).
  Matrix<T> one;
  score_sequences<T>(rm, texts, one, 1);
  CHECK((one - raw).cwiseAbs().maxCoeff() <= 1e-5 * (1.0 + raw.cwiseAbs().maxCoeff()));
  scored = raw;
  norm.apply<T>(scored);

  peft::test::io::TempDir dir;
  const std::string out = dir.file("rm");
  io::save_reward_model<T>(out, rm, "reward", rm_io_lora(), norm);
  CHECK(dir.entries("rm") == std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors",
                                                      "reward_head.safetensors", "reward_model.json"});

  Rng other(99);
  LlamaRewardModel<T> back(cfg, backbone_copy, other);
  const RewardNormalization loaded = io::load_reward_model<T>(out, back);
  back.eval();
  CHECK(loaded.mean == norm.mean);
  CHECK(loaded.std == norm.std);
  CHECK(loaded.count == 7);
  {  // every parameter bit-identical
    std::map<std::string, Matrix<T>> want;
    rm.visit_parameters([&](const std::string& n, Parameter<T>& p) { want[n] = p.value; });
    back.visit_parameters([&](const std::string& n, Parameter<T>& p) {
      INFO(n);
      REQUIRE(want.count(n) == 1);
      CHECK(p.value == want[n]);
    });
  }
  Matrix<T> raw2, raw_fresh;
  score_sequences<T>(back, texts, raw2, 3);
  score_sequences<T>(fresh, texts, raw_fresh, 3);
  CHECK(raw2 == raw_fresh);
  CHECK((raw2 - raw).cwiseAbs().maxCoeff() <= 1e-5 * (1.0 + raw.cwiseAbs().maxCoeff()));
  raw = raw_fresh;
  scored = raw;
  norm.apply<T>(scored);
  loaded.apply<T>(raw2);
  CHECK(raw2 == scored);

  // Refused, naming what is wrong; nothing changes.
  PEFT_REQUIRE_THROWS_WITH(io::save_reward_model<T>(dir.file("x"), rm, "nope", rm_io_lora(), norm), ConfigError,
                           "holds adapter \"nope\"");
  RewardNormalization bad = norm;
  bad.std = -1.0;
  PEFT_REQUIRE_THROWS_WITH(io::save_reward_model<T>(dir.file("x"), rm, "reward", rm_io_lora(), bad), ConfigError,
                           "finite std > 0");
  CHECK(dir.entries() == std::vector<std::string>{"rm"});
  LlamaConfig wide = cfg;
  wide.hidden_size = 16;
  wide.head_dim = 4;
  Rng r3(3);
  LlamaForCausalLM<T> wide_base(wide, r3);
  LlamaRewardModel<T> wrong(wide, std::move(wide_base.model), r3);
  PEFT_REQUIRE_THROWS_WITH(io::load_reward_model<T>(out, wrong), ShapeError, "saved with hidden_size 8");
  peft::test::io::write_bytes(out + "/reward_model.json", "{\"format\": \"something else\"}");
  PEFT_REQUIRE_THROWS_WITH(io::load_reward_model<T>(out, back), IoError, "not a reward model file");
  peft::test::io::write_bytes(out + "/reward_model.json",
                              "{\"format\": \"peft-cpp reward model\", \"adapter\": \"reward\", \"hidden_size\": 8, "
                              "\"normalization\": {\"mean\": 0.5, \"std\": 0, \"count\": 3}}");
  PEFT_REQUIRE_THROWS_WITH(io::load_reward_model<T>(out, back), ConfigError, "finite std > 0");
  PEFT_REQUIRE_THROWS_WITH(io::load_reward_model<T>(dir.file("missing"), back), IoError, "is not a directory");
}
