// Fine-tuning strategies: one training loop, configured per strategy by which parameters train,
// with which learning rates, what is attached to the network and what is added to the loss.
//
// Protocol (same for every strategy): AdamW without weight decay (so nothing drifts that the loss
// does not move), a 10 % linear warmup then cosine decay, gradient clipping at global norm 1, the
// same batch order (BatchSampler seeded with --seed). Losses and accuracies are task-aware: a
// task's cross-entropy and argmax use only its own five logits, so "source accuracy after
// adaptation" measures how much the shared backbone drifted (the forgetting PEFT is said to avoid),
// not merely that the classifier now prefers the new classes.
#include "strategies.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <functional>
#include <iostream>

#include <peft/core/parameters.hpp>
#include <peft/loss/cross_entropy.hpp>
#include <peft/optim/adam.hpp>
#include <peft/optim/clip.hpp>
#include <peft/optim/param_groups.hpp>
#include <peft/optim/regularizers.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/train/batches.hpp>
#include <peft/train/memory.hpp>

namespace study {
namespace {

using peft::NamedParameter;
using peft::ParamGroup;

constexpr double kHeadLr = 1e-2;    ///< the new task's zero-initialised head, in every strategy
constexpr double kFullFtLr = 1e-4;  ///< "small LR" for the pretrained backbone
constexpr double kScratchLr = 1e-3;
constexpr double kPeftLr = 2e-3;    ///< LoRA, adapters
constexpr double kIa3Lr = 1e-2;     ///< (IA)³ vectors start at 1 and need large steps
constexpr double kPromptLr = 1e-2;  ///< prompt and prefix tables
constexpr double kClipNorm = 1.0;
constexpr Index kEvalChunk = 500;

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

/// Mean cross-entropy of rows [row0, row0 + n) over the five logits of one task; writes the
/// gradient (scaled by weight) into the same block of dlogits.
double task_loss(const Mat& logits, const std::vector<std::int64_t>& labels, Index row0, Index n, int offset,
                 double weight, Mat& dlogits, Mat& scratch, std::vector<std::int64_t>& task_labels) {
  task_labels.resize(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i)
    task_labels[static_cast<std::size_t>(i)] = labels[static_cast<std::size_t>(row0 + i)] - offset;
  const float loss = peft::cross_entropy<float>(logits.block(row0, offset, n, kTaskClasses), task_labels, &scratch);
  dlogits.block(row0, offset, n, kTaskClasses) = static_cast<float>(weight) * scratch;
  return static_cast<double>(loss);
}

/// Zeroes the target rows (classes 5-9) of the head: the new task starts from "no opinion", the
/// source rows stay the pretrained source head.
void zero_target_head(Net& net) {
  for (auto& np : peft::named_parameters<float>(net)) {
    if (np.name == net.head_name() + ".weight") np.param->value.bottomRows(kTaskClasses).setZero();
    if (np.name == net.head_name() + ".bias") np.param->value.rightCols(kTaskClasses).setZero();
  }
}

std::string head_pattern(const Net& net) { return net.head_name() + "\\..*"; }

/// Everything a strategy customizes in the shared loop.
struct Plan {
  std::vector<ParamGroup<float>> groups;
  std::function<void(int epoch)> on_epoch;  ///< freezing schedule (gradual unfreezing, LP-FT)
  std::function<double()> regularize;       ///< adds a penalty's gradient; returns its value
  bool replay = false;
  bool from_scratch = false;
};

std::vector<ParamGroup<float>> head_and_rest(Net& net, double rest_lr) {
  return peft::param_groups_by_rules<float>(net, {{head_pattern(net), kHeadLr, 0.0, "head"}}, rest_lr, 0.0);
}

std::vector<ParamGroup<float>> head_and_trainable(Net& net, double rest_lr) {
  return peft::param_groups_by_rules<float>(net, {{head_pattern(net), kHeadLr, 0.0, "head"}}, rest_lr, 0.0,
                                            /*trainable_only=*/true);
}

}  // namespace

const std::vector<StrategyInfo>& all_strategies() {
  static const std::vector<StrategyInfo> list = {
      {"scratch", "from scratch", "baseline", false, 0},
      {"linear_probe", "linear probe (zero-init head)", "baseline", false, 0},
      {"lp_ft", "linear probe, then unfreeze (LP-FT)", "full fine-tuning", false, 0},
      {"full_ft", "full FT (small LR + warmup)", "full fine-tuning", false, 0},
      {"discriminative", "full FT, layer-wise LR decay", "full fine-tuning", false, 0},
      {"gradual", "full FT, gradual unfreezing", "full fine-tuning", false, 0},
      {"lora4", "LoRA r=4", "PEFT", false, 4},
      {"lora8", "LoRA r=8", "PEFT", false, 8},
      {"lora16", "LoRA r=16", "PEFT", false, 16},
      {"adapter", "adapters (bottleneck 16)", "PEFT", false, 0},
      {"ia3", "(IA)^3", "PEFT", false, 0},
      {"prompt", "prompt tuning (8 tokens)", "PEFT", true, 0},
      {"prefix", "prefix tuning (8 tokens)", "PEFT", true, 0},
      {"l2sp", "full FT + L2-SP", "forgetting cure", false, 0},
      {"ewc", "full FT + EWC", "forgetting cure", false, 0},
      {"replay", "full FT + replay (25 %)", "forgetting cure", false, 0},
  };
  return list;
}

double task_accuracy(Net& net, const TransferData& data, const Subset& s, int class_offset) {
  net.eval();
  Mat x, logits;
  std::vector<std::int64_t> labels;
  std::vector<Index> rows;
  Index correct = 0;
  for (Index start = 0; start < s.size(); start += kEvalChunk) {
    const Index n = std::min(kEvalChunk, s.size() - start);
    rows.resize(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) rows[static_cast<std::size_t>(i)] = start + i;
    gather(data, s, rows.data(), n, x, labels);
    net.forward(x, logits);
    for (Index i = 0; i < n; ++i) {
      Index best = 0;
      logits.row(i).segment(class_offset, kTaskClasses).maxCoeff(&best);
      if (best + class_offset == labels[static_cast<std::size_t>(i)]) ++correct;
    }
  }
  net.train();
  return s.size() == 0 ? 0.0 : static_cast<double>(correct) / static_cast<double>(s.size());
}

namespace {

/// The shared loop: `epochs` passes over `train` (class offset `offset`), optionally mixing in
/// source batches, validating on `val` after every val_every epochs.
std::vector<CurvePoint> train_loop(Net& net, Plan& plan, const TransferData& data, const Subset& train, int offset,
                                   const Subset& val, int epochs, Index batch, const StudyOptions& o,
                                   const std::string& phase, const std::string& label) {
  peft::BatchSampler sampler(train.size(), batch, o.seed);
  const Index replay_batch =
      plan.replay ? std::max<Index>(1, static_cast<Index>(std::lround(o.replay_fraction * static_cast<double>(batch))))
                  : 0;
  peft::BatchSampler replay_sampler(data.source_train.size(), std::max<Index>(replay_batch, 1), o.seed + 7, true, true);
  peft::AdamW<float> opt(plan.groups, peft::AdamWOptions{kHeadLr, 0.9, 0.999, 1e-8, 0.0});
  const std::int64_t total_steps = static_cast<std::int64_t>(epochs) * sampler.batches_per_epoch();
  const peft::CosineSchedule schedule(total_steps / 10, total_steps);
  peft::Progress progress(label, static_cast<Index>(total_steps), o.log != nullptr ? *o.log : std::cout, o.progress);

  Mat x, xs, logits, dlogits, scratch;
  std::vector<std::int64_t> labels, source_labels, task_labels;
  std::vector<Index> rows, source_rows;
  std::vector<CurvePoint> curve;
  std::int64_t step = 0;
  for (int epoch = 0; epoch < epochs; ++epoch) {
    if (plan.on_epoch) plan.on_epoch(epoch);
    if (epoch > 0) sampler.start_epoch();
    double loss_sum = 0.0;
    Index loss_count = 0;
    while (sampler.next(rows)) {
      const Index bt = static_cast<Index>(rows.size());
      gather(data, train, rows.data(), bt, x, labels);
      Index bs = 0;
      if (replay_batch > 0) {
        if (!replay_sampler.next(source_rows)) {
          replay_sampler.start_epoch();
          replay_sampler.next(source_rows);
        }
        bs = static_cast<Index>(source_rows.size());
        gather(data, data.source_train, source_rows.data(), bs, xs, source_labels);
        x.conservativeResize(bt + bs, Eigen::NoChange);
        x.bottomRows(bs) = xs;
        labels.insert(labels.end(), source_labels.begin(), source_labels.end());
      }
      net.forward(x, logits);
      dlogits.setZero(logits.rows(), logits.cols());
      const double wt = static_cast<double>(bt) / static_cast<double>(bt + bs);
      double loss = wt * task_loss(logits, labels, 0, bt, offset, wt, dlogits, scratch, task_labels);
      if (bs > 0) {
        const double ws = static_cast<double>(bs) / static_cast<double>(bt + bs);
        loss += ws * task_loss(logits, labels, bt, bs, 0, ws, dlogits, scratch, task_labels);
      }
      net.zero_grad();
      net.backward(dlogits);
      if (plan.regularize) loss += plan.regularize();
      peft::clip_grad_norm<float>(net, kClipNorm);
      peft::apply_schedule<float>(opt, schedule, step);
      opt.step();
      ++step;
      loss_sum += loss;
      ++loss_count;
      progress.update(static_cast<Index>(step), loss);
    }
    if ((epoch + 1) % o.val_every == 0 || epoch + 1 == epochs) {
      CurvePoint p;
      p.phase = phase;
      p.epoch = epoch + 1;
      p.step = static_cast<Index>(step);
      p.train_loss = loss_sum / static_cast<double>(std::max<Index>(loss_count, 1));
      p.val_acc = task_accuracy(net, data, val, offset);
      curve.push_back(p);
    }
  }
  char summary[128];
  std::snprintf(summary, sizeof summary, "done in %s, validation accuracy %.1f%%",
                peft::format_duration(progress.elapsed()).c_str(), curve.empty() ? 0.0 : 100.0 * curve.back().val_acc);
  progress.finish(summary);
  return curve;
}

/// Diagonal empirical Fisher of the source task at the pretrained weights, one example per backward.
void estimate_fisher(Net& net, peft::EWC<float>& ewc, const TransferData& data, Index samples) {
  Mat x, logits, dlogits, scratch;
  std::vector<std::int64_t> labels, task_labels;
  const Index n = std::min(samples, data.source_train.size());
  for (Index i = 0; i < n; ++i) {
    gather(data, data.source_train, &i, 1, x, labels);
    net.forward(x, logits);
    dlogits.setZero(logits.rows(), logits.cols());
    task_loss(logits, labels, 0, 1, 0, 1.0, dlogits, scratch, task_labels);
    net.zero_grad();
    net.backward(dlogits);
    ewc.accumulate();
  }
  ewc.finalize();
  net.zero_grad();
}

std::vector<NamedParameter<float>> backbone(Net& net) {
  std::vector<NamedParameter<float>> out;
  for (auto& np : peft::named_parameters<float>(net))
    if (np.name.rfind(net.head_name() + ".", 0) != 0) out.push_back(np);
  return out;
}

}  // namespace

Pretrained pretrain(const TransferData& data, const NetOptions& net_options, const StudyOptions& o) {
  Pretrained p;
  const double t0 = now_s();
  peft::Rng rng(o.seed);
  p.net = make_net(net_options, data.train.height, data.train.width, rng);
  Plan plan;
  plan.groups = {ParamGroup<float>{peft::named_parameters<float>(*p.net), kScratchLr, 0.0, "all"}};
  p.curve = train_loop(*p.net, plan, data, data.source_train, 0, data.source_val, o.pretrain_epochs, o.pretrain_batch,
                       o, "pretrain", "pretrain");
  p.source_acc = task_accuracy(*p.net, data, data.source_test, 0);
  p.target_acc = task_accuracy(*p.net, data, data.target_test, kTaskClasses);
  p.seconds = now_s() - t0;
  return p;
}

StrategyResult run_strategy(const StrategyInfo& info, const Pretrained& pretrained, const TransferData& data,
                            const NetOptions& net_options, const StudyOptions& o) {
  StrategyResult r;
  r.info = info;
  const bool peak_measurable = peft::reset_peak_rss();  // else VmHWM would include pretraining
  const double t0 = now_s();
  const std::clock_t c0 = std::clock();
  peft::Rng rng(o.seed * 1000003ULL + 99);
  std::unique_ptr<Net> net;
  Plan plan;
  const std::string& id = info.id;
  if (id == "scratch") {
    net = make_net(net_options, data.train.height, data.train.width, rng);
    plan.groups = {ParamGroup<float>{peft::named_parameters<float>(*net), kScratchLr, 0.0, "all"}};
    r.source_measured = false;
  } else {
    net = pretrained.net->clone();
    zero_target_head(*net);
  }
  Net& m = *net;
  const int epochs = o.epochs;

  if (id == "linear_probe") {
    peft::freeze<float>(m);
    peft::unfreeze<float>(m, head_pattern(m));
    plan.groups = head_and_trainable(m, kHeadLr);
  } else if (id == "lp_ft") {
    // Kumar et al., 2022 ("Fine-Tuning can Distort Pretrained Features"): fit the head first so
    // the backbone never sees the large gradients of a random head; then tune everything.
    plan.groups = head_and_rest(m, kFullFtLr);
    const int probe_epochs = std::max(1, epochs / 3);
    plan.on_epoch = [&m, probe_epochs](int epoch) {
      if (epoch == 0) {
        peft::freeze<float>(m);
        peft::unfreeze<float>(m, head_pattern(m));
      } else if (epoch == probe_epochs) {
        peft::unfreeze<float>(m);
      }
    };
  } else if (id == "full_ft" || id == "l2sp" || id == "ewc" || id == "replay") {
    plan.groups = head_and_rest(m, kFullFtLr);
    if (id == "l2sp") {
      auto reg = std::make_shared<peft::L2SP<float>>(backbone(m), o.l2sp_lambda);
      plan.regularize = [reg] { return static_cast<double>(reg->add_to_gradients()); };
    } else if (id == "ewc") {
      auto reg = std::make_shared<peft::EWC<float>>(backbone(m), o.ewc_lambda);
      estimate_fisher(m, *reg, data, o.ewc_samples);
      plan.regularize = [reg] { return static_cast<double>(reg->add_to_gradients()); };
    } else if (id == "replay") {
      plan.replay = true;
    }
  } else if (id == "discriminative") {
    // ULMFiT's discriminative fine-tuning: lr_i = lr_head · 0.5^(L − i); the embedding is layer −1.
    peft::LayerwiseLrOptions lw;
    lw.base_lr = kHeadLr;
    lw.decay = 0.5;
    lw.num_layers = m.num_layers();
    lw.fixed_layers = m.layer_rules();
    plan.groups = peft::layerwise_lr_groups<float>(m, lw);
  } else if (id == "gradual") {
    // ULMFiT's gradual unfreezing: head alone, then one more block per stage from the top down.
    plan.groups = head_and_rest(m, kFullFtLr);
    const int stages = static_cast<int>(m.unfreeze_order().size()) + 1;
    plan.on_epoch = [&m, stages, epochs](int epoch) {
      const int stage = std::min(stages - 1, epoch * stages / std::max(1, epochs));
      peft::freeze<float>(m);
      peft::unfreeze<float>(m, head_pattern(m));
      const std::vector<std::string> order = m.unfreeze_order();
      for (int k = 0; k < stage && k < static_cast<int>(order.size()); ++k)
        peft::unfreeze<float>(m, order[static_cast<std::size_t>(k)]);
    };
  } else if (id != "scratch") {
    // PEFT: freeze the pretrained network, attach the method, train it and the head (HF PEFT's
    // modules_to_save = ["head"]).
    peft::freeze<float>(m);
    double lr = kPeftLr;
    if (info.lora_rank > 0) {
      peft::LoraConfig c;
      c.r = info.lora_rank;
      c.alpha = 2.0 * info.lora_rank;  // s = alpha / r = 2 for every rank, so ranks compare at equal scale
      m.add_lora(c, rng);
    } else if (id == "adapter") {
      m.add_adapters(16, rng);
    } else if (id == "ia3") {
      m.add_ia3();
      lr = kIa3Lr;
    } else if (id == "prompt") {
      m.add_soft_prompt(8, rng);
      lr = kPromptLr;
    } else if (id == "prefix") {
      m.add_prefix(8, rng);
      lr = kPromptLr;
    } else {
      throw peft::ConfigError("unknown strategy \"" + id + "\"");
    }
    peft::freeze<float>(m);
    peft::unfreeze<float>(m, Net::peft_pattern());
    peft::unfreeze<float>(m, head_pattern(m));
    plan.groups = head_and_trainable(m, lr);
  }

  r.curve = train_loop(m, plan, data, data.target_budget, kTaskClasses, data.target_val, epochs, o.batch, o, "finetune",
                       info.id);
  const peft::ParameterCount count = peft::count_parameters<float>(m);
  r.trainable = count.trainable;
  r.total = count.total;
  r.state_bytes = static_cast<std::int64_t>(count.trainable) * 3 * static_cast<std::int64_t>(sizeof(float));
  r.target_acc = task_accuracy(m, data, data.target_test, kTaskClasses);
  r.source_acc = task_accuracy(m, data, data.source_test, 0);
  r.seconds = now_s() - t0;
  r.cpu_seconds = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
  r.peak_rss = peak_measurable ? peft::peak_rss_bytes() : -1;
  return r;
}

}  // namespace study
