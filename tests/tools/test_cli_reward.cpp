// `peft reward`: a reward model saved by io::save_reward_model on the fixture checkpoint
// (tests/data/llama/llama, its 64-token tokenizer) scores lines of a file exactly as the library
// does in-process; usage and file errors give their exit codes.
#include "peft_cli.hpp"

#include <peft/io/llama_checkpoint.hpp>
#include <peft/io/methods.hpp>
#include <peft/io/reward_model.hpp>
#include <peft/io/tokenizer.hpp>
#include <peft/models/reward_model.hpp>

#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "../io/io_test_utils.hpp"
#include "cli_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::cli::contains;
using peft::test::cli::run_cli;

TEST_CASE("peft reward: scores each line as the library does, normalised by the saved statistics", "[cli][reward]") {
  const std::string fixture = peft::test::io::data_dir() + "/llama/llama";
  const std::string tokenizer = peft::test::io::data_dir() + "/llama/tokenizer64/tokenizer.json";
  const std::vector<std::string> texts = {"The cat wants the river after the rain.", "A dog meets some bread.",
                                          "The old man likes the river at night.", "My sister takes the red ball."};
  const io::Tokenizer tok = io::load_tokenizer(tokenizer);
  std::vector<std::vector<Index>> seqs;
  for (const auto& t : texts) {
    std::vector<Index> ids;
    for (std::int32_t id : tok.encode(t, true)) ids.push_back(id);
    seqs.push_back(ids);
  }

  LlamaForCausalLM<float> base = io::load_llama<float>(fixture);
  Rng rng(5);
  LlamaRewardModel<float> rm(base.config(), std::move(base.model), rng);
  const io::Json lora = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"q_proj", "v_proj"}}};
  io::apply_method<float>(rm, lora, "reward", rng);
  rm.visit_parameters([&](const std::string& n, Parameter<float>& p) {
    if (n.find("lora_B") != std::string::npos)
      p.value = peft::test::random_matrix<float>(p.value.rows(), p.value.cols(), rng, 0.5);
  });
  rm.score.weight.value = peft::test::random_matrix<float>(1, rm.config().hidden_size, rng);
  rm.eval();
  const RewardNormalization norm = reward_normalization<float>(rm, seqs, 16);
  Matrix<float> raw;
  score_sequences<float>(rm, seqs, raw, 16);
  Matrix<float> scored = raw;
  norm.apply<float>(scored);

  peft::test::io::TempDir dir;
  io::save_reward_model<float>(dir.file("rm"), rm, "reward", lora, norm);
  std::string text;
  for (const auto& t : texts) text += t + "\n\n";  // empty lines are skipped
  peft::test::io::write_bytes(dir.file("texts.txt"), text);

  const auto r = run_cli({"reward", "--model", fixture, "--tokenizer", tokenizer, "--reward", dir.file("rm"), "--raw",
                          dir.file("texts.txt")});
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(contains(r.err, "skipped 4 empty line(s)"));
  std::istringstream lines(r.out);
  std::string line;
  std::size_t i = 0;
  char want[128];
  while (std::getline(lines, line)) {
    REQUIRE(i < texts.size());
    std::snprintf(want, sizeof want, "%.9g\t%.9g\t", static_cast<double>(scored(static_cast<Index>(i), 0)),
                  static_cast<double>(raw(static_cast<Index>(i), 0)));
    CHECK(line == std::string(want) + texts[i]);
    ++i;
  }
  CHECK(i == texts.size());

  // Usage and file errors.
  CHECK(run_cli({"reward", "--model", fixture, dir.file("texts.txt")}).code == cli::kUsage);  // no --reward
  CHECK(
      run_cli({"reward", "--model", fixture, "--reward", dir.file("rm"), "--batch", "0", dir.file("texts.txt")}).code ==
      cli::kUsage);
  const auto missing = run_cli(
      {"reward", "--model", fixture, "--tokenizer", tokenizer, "--reward", dir.file("nope"), dir.file("texts.txt")});
  CHECK(missing.code == cli::kIo);
  CHECK(contains(missing.err, "nope"));
  CHECK(contains(run_cli({"reward", "--help"}).out, "usage: peft reward"));
}
