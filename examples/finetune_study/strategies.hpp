#pragma once
// The fine-tuning strategies compared by the study, all run from the same pretrained network on
// the same target budget, batch order and seed.
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include <peft/train/progress.hpp>

#include "data.hpp"
#include "model.hpp"

namespace study {

struct StrategyInfo {
  std::string id;      ///< command-line name
  std::string label;   ///< table name
  std::string family;  ///< "baseline", "full fine-tuning", "PEFT", "forgetting cure"
  bool needs_sequence_model = false;
  int lora_rank = 0;
};

/// Every strategy, in table order.
const std::vector<StrategyInfo>& all_strategies();

struct StudyOptions {
  int pretrain_epochs = 2;
  int epochs = 10;  ///< fine-tuning epochs over the budget
  Index batch = 32;
  Index pretrain_batch = 64;
  std::uint64_t seed = 1;
  double replay_fraction = 0.25;  ///< source images mixed into each batch, relative to the batch size
  double l2sp_lambda = 1.0;
  double ewc_lambda = 200.0;
  Index ewc_samples = 200;  ///< source examples (one per backward) for the diagonal Fisher
  Index val_every = 1;      ///< epochs between learning-curve evaluations
  peft::ProgressOptions progress;
  std::ostream* log = nullptr;  ///< progress display target
};

/// One point of a learning curve: mean training loss over the epoch, validation accuracy after it.
struct CurvePoint {
  std::string phase;  ///< "pretrain" or "finetune"
  int epoch = 0;
  Index step = 0;
  double train_loss = 0.0;
  double val_acc = 0.0;  ///< source validation accuracy when pretraining, target when fine-tuning
};

struct StrategyResult {
  StrategyInfo info;
  double target_acc = 0.0;      ///< target test accuracy (5-way, classes 5-9)
  double source_acc = 0.0;      ///< source test accuracy after adaptation (5-way, classes 0-4)
  bool source_measured = true;  ///< false for "from scratch", which never saw the source task
  Index trainable = 0;
  Index total = 0;
  std::int64_t state_bytes = 0;  ///< gradients + optimizer moments of the trainable parameters
  double seconds = 0.0;
  double cpu_seconds = 0.0;    ///< process CPU time (all threads): the cost a loaded machine cannot inflate
  std::int64_t peak_rss = -1;  ///< bytes, -1 when the platform does not expose it
  std::vector<CurvePoint> curve;
};

struct Pretrained {
  std::unique_ptr<Net> net;
  double source_acc = 0.0;  ///< source test accuracy of the pretrained network
  double target_acc = 0.0;  ///< target test accuracy with the (untrained) target head: chance level
  double seconds = 0.0;
  std::vector<CurvePoint> curve;
};

/// Trains a fresh network on the source classes.
Pretrained pretrain(const TransferData& data, const NetOptions& net_options, const StudyOptions& options);

/// Adapts a copy of the pretrained network with one strategy and evaluates it.
StrategyResult run_strategy(const StrategyInfo& info, const Pretrained& pretrained, const TransferData& data,
                            const NetOptions& net_options, const StudyOptions& options);

/// Accuracy on `s` with the argmax restricted to one task's five classes (offset 0 or 5).
double task_accuracy(Net& net, const TransferData& data, const Subset& s, int class_offset);

}  // namespace study
