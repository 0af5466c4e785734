#pragma once
// `peft reward`: scores lines of text with a reward model (io/reward_model.hpp) on a Llama-family
// base checkpoint. Its own translation unit (peft_reward.cpp), so the Llama model's code is not
// compiled into the other commands'.
#include <ostream>
#include <string>

namespace peft::cli {

struct RewardCommand {
  std::string model;        ///< base checkpoint directory (config.json + safetensors)
  std::string tokenizer;    ///< tokenizer.json (empty: model/tokenizer.json)
  std::string reward;       ///< the reward model directory (save_reward_model)
  std::string input;        ///< text file, one text per line (empty lines skipped)
  bool raw = false;         ///< also print the raw reward
  bool no_special = false;  ///< encode without the tokenizer's special tokens (BOS)
  long long batch = 16;
};

/// Prints "score<TAB>text" (with raw: "score<TAB>raw<TAB>text") per non-empty line, the score
/// normalised by the saved statistics; floats with 9 significant digits (exact for float). Throws
/// the library's errors (the caller maps them to exit codes).
int run_reward(const RewardCommand& c, std::ostream& out, std::ostream& err);

}  // namespace peft::cli
