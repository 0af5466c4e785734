// The reward model (models/reward_model.hpp): a Llama backbone with LoRA and a scalar head on the
// last non-padding token, trained with the Bradley–Terry loss (loss/bradley_terry.hpp).
#include <cmath>
#include <string>
#include <vector>

#include <peft/io/methods.hpp>
#include <peft/loss/bradley_terry.hpp>
#include <peft/models/llama.hpp>
#include <peft/models/reward_model.hpp>
#include <peft/optim/adam.hpp>
#include <peft/train/gradient_check.hpp>

#include "models/llama_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {

LlamaConfig rm_llama_config() { return peft::test::tiny_llama_base(); }

/// The backbone of a random causal LM (entries of a useful size), frozen, with a LoRA on q and v
/// (lora_B random when `random_b`), and a trainable score head.
LlamaRewardModel<double> rm_model(Rng& rng, bool random_b) {
  LlamaForCausalLM<double> lm(rm_llama_config(), rng);
  lm.visit_parameters([&](const std::string& n, Parameter<double>& p) {
    for (Index i = 0; i < p.value.size(); ++i)
      p.value.data()[i] =
          n.find("norm") != std::string::npos ? 1.0 + 0.2 * rng.normal(0.0, 1.0) : 0.4 * rng.normal(0.0, 1.0);
  });
  lm.freeze_all();
  LlamaRewardModel<double> rm(rm_llama_config(), std::move(lm.model), rng);
  const io::Json cfg = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"q_proj", "v_proj"}}};
  io::apply_method<double>(rm, cfg, "reward", rng);
  if (random_b)
    rm.visit_parameters([&](const std::string& n, Parameter<double>& p) {
      if (n.find("lora_B") != std::string::npos)
        p.value = peft::test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.5);
    });
  return rm;
}

/// N chosen sequences then N rejected ones, padded with `pad` to the longest.
struct RmBatch {
  std::vector<Index> ids;
  SequenceLayout layout;
  RmBatch(const std::vector<std::vector<Index>>& seqs, Index pad) {
    Index S = 0;
    for (const auto& s : seqs) S = std::max<Index>(S, static_cast<Index>(s.size()));
    std::vector<Index> lengths;
    for (const auto& s : seqs) {
      lengths.push_back(static_cast<Index>(s.size()));
      for (Index t = 0; t < S; ++t)
        ids.push_back(t < static_cast<Index>(s.size()) ? s[static_cast<std::size_t>(t)] : pad);
    }
    layout = SequenceLayout(static_cast<Index>(seqs.size()), S, lengths);
  }
};

}  // namespace

TEST_CASE("reward model: pooled at the last non-padding token; Bradley-Terry gradients match finite differences",
          "[llama][reward]") {
  Rng rng(21);
  LlamaRewardModel<double> rm = rm_model(rng, true);
  const std::vector<std::vector<Index>> seqs = {{1, 2, 3, 4, 5}, {6, 7, 8}, {1, 2, 9, 9}, {6, 7, 10, 4, 2}};
  const RmBatch batch(seqs, 0), other_pad(seqs, 7);
  typename LlamaRewardModel<double>::Cache cache;
  Matrix<double> r, r2, one, dc, dr, dreward(4, 1);
  rm.forward(batch.ids, batch.layout, r, cache);
  REQUIRE(r.rows() == 4);
  rm.forward(other_pad.ids, other_pad.layout, r2, cache);
  CHECK((r - r2).cwiseAbs().maxCoeff() < 1e-13);   // padding ids do not matter
  for (std::size_t s = 0; s < seqs.size(); ++s) {  // nor does batching: each sequence alone, unpadded
    rm.forward(seqs[s], SequenceLayout(1, static_cast<Index>(seqs[s].size())), one, cache);
    CHECK(std::abs(one(0, 0) - r(static_cast<Index>(s), 0)) < 1e-13);
  }
  auto loss = [&]() {
    rm.forward(batch.ids, batch.layout, r, cache);
    return bradley_terry<double>(r.topRows(2), r.bottomRows(2), nullptr, nullptr);
  };
  rm.forward(batch.ids, batch.layout, r, cache);
  bradley_terry<double>(r.topRows(2), r.bottomRows(2), &dc, &dr);
  dreward << dc, dr;
  rm.zero_grad();
  rm.backward(cache, dreward);
  int n = 0;
  rm.visit_parameters([&](const std::string& name, Parameter<double>& p) {
    if (!p.trainable()) return;
    INFO(name);
    const Matrix<double> num = numerical_gradient(p.value, loss);
    CHECK(relative_error(p.grad, num) < Tolerances<double>::grad);
    CHECK(p.grad.norm() > 0.0);
    ++n;
  });
  CHECK(n == 9);  // LoRA A and B on q and v in 2 layers, and the score head
  PEFT_REQUIRE_THROWS_WITH(rm.backward(cache, Matrix<double>::Zero(3, 1)), ShapeError, "rewards gradient");
}

TEST_CASE("reward model: LoRA + head trained with Bradley-Terry ranks held-out pairs", "[llama][reward]") {
  // Preference: the answer with more 5s than 6s is chosen (the pair's prompt is shared).
  Rng data_rng(5);
  auto make_pairs = [&](int count) {
    std::vector<std::vector<Index>> chosen, rejected;
    for (int i = 0; i < count; ++i) {
      std::vector<Index> prompt = {static_cast<Index>(1 + data_rng.uniform_int(4)),
                                   static_cast<Index>(1 + data_rng.uniform_int(4))};
      std::vector<Index> a = prompt, b = prompt;
      const Index len = 3 + static_cast<Index>(data_rng.uniform_int(3));
      for (Index t = 0; t < len; ++t) {
        a.push_back(data_rng.uniform() < 0.6 ? 5 : static_cast<Index>(7 + data_rng.uniform_int(4)));
        b.push_back(data_rng.uniform() < 0.6 ? 6 : static_cast<Index>(7 + data_rng.uniform_int(4)));
      }
      chosen.push_back(a);
      rejected.push_back(b);
    }
    std::vector<std::vector<Index>> all = chosen;
    all.insert(all.end(), rejected.begin(), rejected.end());
    return RmBatch(all, 0);
  };
  const RmBatch train = make_pairs(8), held_out = make_pairs(16);
  Rng rng(22);
  LlamaRewardModel<double> rm = rm_model(rng, false);
  AdamW<double> opt(rm, AdamWOptions{2e-2, 0.9, 0.999, 1e-8, 0.0});
  typename LlamaRewardModel<double>::Cache cache;
  Matrix<double> r, dc, dr, dreward(16, 1);
  auto accuracy = [&](const RmBatch& b) {
    rm.forward(b.ids, b.layout, r, cache);
    const Index n = r.rows() / 2;
    return (r.topRows(n).array() > r.bottomRows(n).array()).cast<double>().mean();
  };
  rm.forward(train.ids, train.layout, r, cache);
  const double first = bradley_terry<double>(r.topRows(8), r.bottomRows(8), nullptr, nullptr);
  double last = first;
  for (int step = 0; step < 40; ++step) {
    opt.zero_grad();
    rm.forward(train.ids, train.layout, r, cache);
    last = bradley_terry<double>(r.topRows(8), r.bottomRows(8), &dc, &dr);
    dreward << dc, dr;
    rm.backward(cache, dreward);
    opt.step();
  }
  const double train_acc = accuracy(train), held_acc = accuracy(held_out);
  INFO("loss " << first << " -> " << last << ", accuracy train " << train_acc << ", held-out " << held_acc);
  CHECK(last < 0.25 * first);
  CHECK(train_acc == 1.0);
  CHECK(held_acc >= 0.75);
}
