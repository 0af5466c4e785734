// `peft reward` (peft_reward.hpp).
#include "peft_reward.hpp"

#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include <peft/core/error.hpp>
#include <peft/core/rng.hpp>
#include <peft/io/file.hpp>
#include <peft/io/llama_checkpoint.hpp>
#include <peft/io/reward_model.hpp>
#include <peft/io/tokenizer.hpp>
#include <peft/models/reward_model.hpp>

namespace peft::cli {

int run_reward(const RewardCommand& c, std::ostream& out, std::ostream& err) {
  using T = float;
  if (c.batch < 1) throw ConfigError("--batch must be >= 1, got " + std::to_string(c.batch));
  const io::Tokenizer tok = io::load_tokenizer(c.tokenizer.empty() ? c.model + "/tokenizer.json" : c.tokenizer);
  LlamaForCausalLM<T> base = io::load_llama<T>(c.model);
  const LlamaConfig config = base.config();
  Rng rng(0);  // the fresh head is overwritten by the saved one
  LlamaRewardModel<T> rm(config, std::move(base.model), rng);
  const RewardNormalization norm = io::load_reward_model<T>(c.reward, rm);
  rm.eval();

  std::vector<std::string> lines;
  std::vector<std::vector<Index>> seqs;
  std::istringstream in(io::read_text_file(c.input));
  std::string line;
  std::size_t skipped = 0;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    std::vector<Index> ids;
    if (!line.empty())
      for (std::int32_t id : tok.encode(line, !c.no_special)) ids.push_back(id);
    if (ids.empty()) {
      ++skipped;
      continue;
    }
    lines.push_back(line);
    seqs.push_back(std::move(ids));
  }
  Matrix<T> raw;
  score_sequences<T>(rm, seqs, raw, static_cast<Index>(c.batch));
  Matrix<T> score = raw;
  norm.apply<T>(score);
  char buf[64];
  for (std::size_t i = 0; i < lines.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(score(static_cast<Index>(i), 0)));
    out << buf << "\t";
    if (c.raw) {
      std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(raw(static_cast<Index>(i), 0)));
      out << buf << "\t";
    }
    out << lines[i] << "\n";
  }
  if (skipped > 0) err << "skipped " << skipped << " empty line(s)\n";
  return 0;
}

}  // namespace peft::cli
