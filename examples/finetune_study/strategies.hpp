#pragma once
// The fine-tuning strategies compared by the study, all run from the same pretrained network on
// the same target budget, batch order and seed; each at every rate of its own small grid, the rate
// chosen on the validation split.
#include <cstdint>
#include <iosfwd>
#include <limits>
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
  std::string family;  ///< "baseline", "full fine-tuning", "PEFT", "forgetting cure", "control"
  bool needs_sequence_model = false;
  int lora_rank = 0;
  std::vector<double> lr_grid;  ///< the rates tried (one rate for every trained parameter unless the id says)
  bool in_default = false;      ///< part of the default set (the rest: --full or --strategies)
  bool peft = false;            ///< attaches modules that can be disabled (the pretrained network stays frozen)
};

/// Every strategy, in table order.
const std::vector<StrategyInfo>& all_strategies();
const StrategyInfo& strategy(const std::string& id);

struct StudyOptions {
  int pretrain_epochs = 2;
  Index steps = 200;  ///< fine-tuning optimizer steps, whatever the budget
  Index batch = 32;
  Index pretrain_batch = 64;
  std::uint64_t seed = 1;
  double replay_fraction = 0.25;  ///< source images mixed into each batch, relative to the batch size
  double l2sp_lambda = 1.0;
  double ewc_lambda = 200.0;
  Index ewc_samples = 200;       ///< source examples (one per backward) for the diagonal Fisher
  Index curve_points = 10;       ///< validation points on each learning curve
  double lp_ft_probe_lr = 1e-2;  ///< LP-FT's probe phase (the linear probe's middle grid point)
  peft::ProgressOptions progress;
  std::ostream* log = nullptr;  ///< progress display target
};

/// One point of a learning curve.
struct CurvePoint {
  Index step = 0;
  double train_loss = 0.0;       ///< mean training loss since the previous point
  double val_acc = 0.0;          ///< target validation accuracy (source when pretraining)
  double source_val_acc = -1.0;  ///< source validation accuracy (-1: not measured)
};

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

/// One strategy trained at one rate with one seed.
struct RunResult {
  StrategyInfo info;
  std::uint64_t seed = 0;
  double lr = 0.0;
  bool chosen = false;              ///< the rate with the best validation accuracy for this seed
  double val_acc = 0.0;             ///< target validation accuracy at the end: the selection criterion
  bool tested = false;              ///< test accuracies measured (the chosen rate; every rate under --full)
  double target_acc = kNaN;         ///< target test accuracy (5-way, classes 5-9)
  double source_acc = kNaN;         ///< source test accuracy after adaptation, modules active (5-way, 0-4)
  double source_disabled = kNaN;    ///< the same with the PEFT modules disabled (PEFT strategies only)
  double disabled_max_diff = kNaN;  ///< max |source logit − pretrained source logit| while disabled
  bool source_measured = true;      ///< false for "from scratch", which never saw the source task
  Index trainable = 0;
  Index total = 0;
  std::int64_t state_bytes = 0;  ///< gradients + optimizer moments of the trainable parameters
  Index steps = 0;
  double train_seconds = 0.0;      ///< wall time of the optimizer steps only (no evaluation)
  double train_cpu_seconds = 0.0;  ///< process CPU time of the same
  std::int64_t peak_rss = -1;      ///< peak resident bytes during training, -1 when not measurable
  /// peak_rss minus the resident bytes at the start of training (after the evaluation buffers
  /// exist): what training itself added (activations, gradients, optimizer state); -1 likewise.
  std::int64_t peak_rss_added = -1;
  std::vector<CurvePoint> curve;
};

struct Pretrained {
  std::unique_ptr<Net> net;
  std::uint64_t seed = 0;
  double source_acc = 0.0;  ///< source test accuracy of the pretrained network
  double target_acc = 0.0;  ///< target test accuracy with the (untrained) target head: chance level
  double source_val_acc = 0.0;
  double seconds = 0.0;
  std::vector<CurvePoint> curve;
  Mat source_test_logits;  ///< [source test images, 5]: what a disabled PEFT model must reproduce
};

/// Trains a fresh network on the source classes.
Pretrained pretrain(const TransferData& data, const NetOptions& net_options, const StudyOptions& options);

/// Adapts a copy of the pretrained network with one strategy at one rate; measures the validation
/// accuracy (and the learning curve). The adapted network is returned through `adapted` for test().
RunResult run_strategy(const StrategyInfo& info, double lr, const Pretrained& pretrained, const TransferData& data,
                       const NetOptions& net_options, const StudyOptions& options, std::unique_ptr<Net>& adapted);

/// Test accuracies of an adapted network (active; disabled for PEFT strategies, with the check
/// that disabled ≡ pretrained).
void test(RunResult& r, Net& adapted, const Pretrained& pretrained, const TransferData& data);

/// What an evaluation pass reuses (images, logits, labels of one chunk).
struct EvalBuffers {
  Mat x, logits;
  std::vector<std::int64_t> labels;
  std::vector<Index> rows;
};

/// Accuracy on `s` with the argmax restricted to one task's five classes (offset 0 or 5),
/// evaluated `chunk` images at a time through Net::forward_inference (nothing kept for backward;
/// the training buffers are left alone). `logits_out`, if given, receives that task's logits.
double task_accuracy(Net& net, const TransferData& data, const Subset& s, int class_offset, Index chunk,
                     EvalBuffers& buffers, Mat* logits_out = nullptr);
/// The same with buffers of its own.
double task_accuracy(Net& net, const TransferData& data, const Subset& s, int class_offset, Index chunk = 500,
                     Mat* logits_out = nullptr);

}  // namespace study
