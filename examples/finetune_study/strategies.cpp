// Fine-tuning strategies: one training loop, configured per strategy by which parameters train,
// with which learning rates, what is attached to the network and what is added to the loss.
//
// Protocol (same for every strategy): AdamW without weight decay (so nothing drifts that the loss
// does not move), a 10 % linear warmup then cosine decay over --steps optimizer steps, gradient
// clipping at global norm 1, the same batch order (BatchSampler seeded with the seed). One learning
// rate for every trained parameter, the head included, taken from the strategy's grid (LP-FT's
// probe phase and layer-wise decay say what they do differently). Losses and accuracies are task-aware: a
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

#if defined(__GLIBC__)
#include <malloc.h>  // malloc_trim
#endif

namespace study {
namespace {

using peft::NamedParameter;
using peft::ParamGroup;

constexpr double kClipNorm = 1.0;
constexpr Index kTestChunk = 500;

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
/// source rows stay the pretrained source head. (Pretraining never trains rows 5-9: its loss
/// reads only the source logits, so without this they keep their random initialisation.)
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
  std::function<void(Index step)> on_step;  ///< freezing schedule (gradual unfreezing, LP-FT)
  std::function<double()> regularize;       ///< adds a penalty's gradient; returns its value
  bool replay = false;
  bool warmup = true;
};

std::vector<ParamGroup<float>> head_and_rest(Net& net, double head_lr, double rest_lr, bool trainable_only = false) {
  return peft::param_groups_by_rules<float>(net, {{head_pattern(net), head_lr, 0.0, "head"}}, rest_lr, 0.0,
                                            trainable_only);
}

struct LoopResult {
  std::vector<CurvePoint> curve;
  double seconds = 0.0, cpu_seconds = 0.0;
  std::int64_t peak_rss = -1, peak_rss_added = -1;
};

/// The shared loop: `steps` optimizer steps over `train` (class offset `offset`), optionally mixing
/// in source batches; validation on `val` (and on the source validation split when
/// `track_source`) at `points` evenly spaced steps, `batch` images at a time through
/// Net::forward_inference. Only the steps are timed. Memory: one validation pass before training
/// sizes the evaluation buffers (the model's inference buffers and EvalBuffers, reused by every
/// later pass: same chunks, same shapes); then the high-water mark is reset and the resident size
/// taken, so peak_rss_added = peak − that size counts what training adds, not evaluation nor what
/// earlier phases left resident.
LoopResult train_loop(Net& net, Plan& plan, const TransferData& data, const Subset& train, int offset,
                      const Subset& val, Index steps, Index batch, Index points, bool track_source, std::uint64_t seed,
                      const StudyOptions& o, const std::string& label) {
  // Full batches only (a budget of 100 at batch 32: 3 batches per epoch, reshuffled every epoch),
  // so no step is a noisy remainder of a few images.
  peft::BatchSampler sampler(train.size(), std::min(batch, train.size()), seed, true, train.size() > batch);
  const Index replay_batch =
      plan.replay ? std::max<Index>(1, static_cast<Index>(std::lround(o.replay_fraction * static_cast<double>(batch))))
                  : 0;
  peft::BatchSampler replay_sampler(data.source_train.size(), std::max<Index>(replay_batch, 1), seed + 7, true, true);
  peft::AdamW<float> opt(plan.groups, peft::AdamWOptions{1e-3, 0.9, 0.999, 1e-8, 0.0});
  const std::int64_t total = steps;
  const peft::CosineSchedule schedule(plan.warmup ? total / 10 : 0, total);
  peft::Progress progress(label, steps, o.log != nullptr ? *o.log : std::cout, o.progress);

  LoopResult out;
  EvalBuffers eval;
  task_accuracy(net, data, val, offset, batch, eval);
  if (track_source) task_accuracy(net, data, data.source_val, 0, batch, eval);
  // glibc keeps pages that earlier phases freed resident in its heap and hands them out again, so
  // what training allocates would not show as growth; returned to the kernel first, it does.
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
  const bool peak_measurable = peft::reset_peak_rss();
  const std::int64_t rss_start = peak_measurable ? peft::current_rss_bytes() : -1;
  Mat x, xs, logits, dlogits, scratch;
  std::vector<std::int64_t> labels, source_labels, task_labels;
  std::vector<Index> rows, source_rows;
  double loss_sum = 0.0, timed = 0.0;
  Index loss_count = 0;
  const std::clock_t c_start = std::clock();
  double cpu_excluded = 0.0;
  Index next_point = 1;
  for (Index step = 0; step < steps; ++step) {
    const double t0 = now_s();
    if (plan.on_step) plan.on_step(step);
    if (!sampler.next(rows)) {
      sampler.start_epoch();
      sampler.next(rows);
    }
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
    peft::apply_schedule<float>(opt, schedule, static_cast<std::int64_t>(step));
    opt.step();
    timed += now_s() - t0;
    loss_sum += loss;
    ++loss_count;
    progress.update(step + 1, loss);
    // Evaluation points: step·points/steps crosses an integer (the last step always).
    if ((step + 1) * points >= next_point * steps) {
      const std::clock_t ce = std::clock();
      CurvePoint p;
      p.step = step + 1;
      p.train_loss = loss_sum / static_cast<double>(std::max<Index>(loss_count, 1));
      p.val_acc = task_accuracy(net, data, val, offset, batch, eval);
      if (track_source) p.source_val_acc = task_accuracy(net, data, data.source_val, 0, batch, eval);
      out.curve.push_back(p);
      loss_sum = 0.0;
      loss_count = 0;
      while (next_point * steps <= (step + 1) * points) ++next_point;
      cpu_excluded += static_cast<double>(std::clock() - ce) / CLOCKS_PER_SEC;
    }
  }
  out.seconds = timed;
  out.cpu_seconds = static_cast<double>(std::clock() - c_start) / CLOCKS_PER_SEC - cpu_excluded;
  out.peak_rss = peak_measurable ? peft::peak_rss_bytes() : -1;
  if (out.peak_rss >= 0 && rss_start >= 0) out.peak_rss_added = std::max<std::int64_t>(0, out.peak_rss - rss_start);
  char summary[128];
  std::snprintf(summary, sizeof summary, "done in %s, validation accuracy %.1f%%",
                peft::format_duration(progress.elapsed()).c_str(),
                out.curve.empty() ? 0.0 : 100.0 * out.curve.back().val_acc);
  progress.finish(summary);
  return out;
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

const std::vector<StrategyInfo>& all_strategies() {
  // Grids: 3 rates a factor ~3 apart around where each kind of parameter trains in 200 steps; full
  // FT, LoRA and layer-wise decay share 1e-3 and 3e-3, so they can be compared at equal rates.
  const std::vector<double> ft = {3e-4, 1e-3, 3e-3};
  const std::vector<double> low_rank = {1e-3, 3e-3, 1e-2};
  const std::vector<double> vectors = {3e-3, 1e-2, 3e-2};
  static const std::vector<StrategyInfo> list = {
      {"scratch", "from scratch", "baseline", false, 0, ft, true, false},
      {"linear_probe", "linear probe", "baseline", false, 0, vectors, true, true},
      {"lp_ft", "linear probe, then full FT (LP-FT)", "full fine-tuning", false, 0, {1e-4, 3e-4, 1e-3}, true, false},
      {"full_ft", "full FT", "full fine-tuning", false, 0, ft, true, false},
      {"discriminative", "full FT, layer-wise LR decay", "full fine-tuning", false, 0, ft, false, false},
      {"gradual", "full FT, gradual unfreezing", "full fine-tuning", false, 0, ft, false, false},
      {"lora4", "LoRA r=4", "PEFT", false, 4, low_rank, false, true},
      {"lora8", "LoRA r=8", "PEFT", false, 8, low_rank, true, true},
      {"lora16", "LoRA r=16", "PEFT", false, 16, low_rank, false, true},
      {"adapter", "adapters (bottleneck 16)", "PEFT", false, 0, low_rank, true, true},
      {"ia3", "(IA)^3", "PEFT", false, 0, vectors, false, true},
      {"prompt", "prompt tuning (8 tokens)", "PEFT", true, 0, vectors, false, true},
      {"prefix", "prefix tuning (8 tokens)", "PEFT", true, 0, vectors, true, true},
      {"l2sp", "full FT + L2-SP", "forgetting cure", false, 0, ft, false, false},
      {"ewc", "full FT + EWC", "forgetting cure", false, 0, ft, false, false},
      {"replay", "full FT + replay (25 %)", "forgetting cure", false, 0, ft, true, false},
      {"full_ft_head", "full FT, random-init target head", "control", false, 0, ft, false, false},
      {"full_ft_nowarmup", "full FT, no warmup", "control", false, 0, ft, false, false},
  };
  return list;
}

const StrategyInfo& strategy(const std::string& id) {
  for (const auto& s : all_strategies())
    if (s.id == id) return s;
  throw peft::ConfigError("unknown strategy \"" + id + "\"");
}

double task_accuracy(Net& net, const TransferData& data, const Subset& s, int class_offset, Index chunk,
                     Mat* logits_out) {
  EvalBuffers buffers;
  return task_accuracy(net, data, s, class_offset, chunk, buffers, logits_out);
}

double task_accuracy(Net& net, const TransferData& data, const Subset& s, int class_offset, Index chunk,
                     EvalBuffers& buffers, Mat* logits_out) {
  net.eval();
  Mat& x = buffers.x;
  Mat& logits = buffers.logits;
  std::vector<std::int64_t>& labels = buffers.labels;
  std::vector<Index>& rows = buffers.rows;
  Index correct = 0;
  if (logits_out != nullptr) logits_out->resize(s.size(), kTaskClasses);
  for (Index start = 0; start < s.size(); start += chunk) {
    const Index n = std::min(chunk, s.size() - start);
    rows.resize(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) rows[static_cast<std::size_t>(i)] = start + i;
    gather(data, s, rows.data(), n, x, labels);
    net.forward_inference(x, logits);
    if (logits_out != nullptr) logits_out->middleRows(start, n) = logits.middleCols(class_offset, kTaskClasses);
    for (Index i = 0; i < n; ++i) {
      Index best = 0;
      logits.row(i).segment(class_offset, kTaskClasses).maxCoeff(&best);
      if (best + class_offset == labels[static_cast<std::size_t>(i)]) ++correct;
    }
  }
  net.train();
  return s.size() == 0 ? 0.0 : static_cast<double>(correct) / static_cast<double>(s.size());
}

Pretrained pretrain(const TransferData& data, const NetOptions& net_options, const StudyOptions& o) {
  Pretrained p;
  p.seed = o.seed;
  const double t0 = now_s();
  peft::Rng rng(o.seed);
  p.net = make_net(net_options, data.train.height, data.train.width, rng);
  Plan plan;
  plan.groups = {ParamGroup<float>{peft::named_parameters<float>(*p.net), 1e-3, 0.0, "all"}};
  const Index per_epoch = (data.source_train.size() + o.pretrain_batch - 1) / o.pretrain_batch;
  p.curve = train_loop(*p.net, plan, data, data.source_train, 0, data.source_val, o.pretrain_epochs * per_epoch,
                       o.pretrain_batch, 2 * o.pretrain_epochs, false, o.seed, o, "pretrain")
                .curve;
  p.source_acc = task_accuracy(*p.net, data, data.source_test, 0, kTestChunk, &p.source_test_logits);
  p.target_acc = task_accuracy(*p.net, data, data.target_test, kTaskClasses, kTestChunk);
  p.source_val_acc = task_accuracy(*p.net, data, data.source_val, 0, kTestChunk);
  p.seconds = now_s() - t0;
  return p;
}

RunResult run_strategy(const StrategyInfo& info, double lr, const Pretrained& pretrained, const TransferData& data,
                       const NetOptions& net_options, const StudyOptions& o, std::unique_ptr<Net>& adapted) {
  RunResult r;
  r.info = info;
  r.seed = o.seed;
  r.lr = lr;
  peft::Rng rng(o.seed * 1000003ULL + 99);
  std::unique_ptr<Net> net;
  Plan plan;
  const std::string& id = info.id;
  if (id == "scratch") {
    net = make_net(net_options, data.train.height, data.train.width, rng);
    r.source_measured = false;
  } else {
    net = pretrained.net->clone();
    if (id != "full_ft_head") zero_target_head(*net);
  }
  Net& m = *net;
  const Index steps = o.steps;

  if (id == "scratch" || id == "full_ft" || id == "full_ft_head" || id == "full_ft_nowarmup" || id == "l2sp" ||
      id == "ewc" || id == "replay") {
    plan.groups = {ParamGroup<float>{peft::named_parameters<float>(m), lr, 0.0, "all"}};
    plan.warmup = id != "full_ft_nowarmup";
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
  } else if (id == "linear_probe") {
    peft::freeze<float>(m);
    peft::unfreeze<float>(m, head_pattern(m));
    plan.groups = head_and_rest(m, lr, lr, /*trainable_only=*/true);
  } else if (id == "lp_ft") {
    // Kumar et al., 2022 ("Fine-Tuning can Distort Pretrained Features"): fit the head first (a
    // third of the steps, at the linear probe's rate) so the backbone never sees the large
    // gradients of an untrained head; then tune everything, the backbone at the grid rate.
    plan.groups = head_and_rest(m, o.lp_ft_probe_lr, lr);
    const Index probe_steps = std::max<Index>(1, steps / 3);
    plan.on_step = [&m, probe_steps](Index step) {
      if (step == 0) {
        peft::freeze<float>(m);
        peft::unfreeze<float>(m, head_pattern(m));
      } else if (step == probe_steps) {
        peft::unfreeze<float>(m);
      }
    };
  } else if (id == "discriminative") {
    // ULMFiT's discriminative fine-tuning: lr_i = lr · 0.5^(L − i) (the head at the grid rate, the
    // embedding is layer −1).
    peft::LayerwiseLrOptions lw;
    lw.base_lr = lr;
    lw.decay = 0.5;
    lw.num_layers = m.num_layers();
    lw.fixed_layers = m.layer_rules();
    plan.groups = peft::layerwise_lr_groups<float>(m, lw);
  } else if (id == "gradual") {
    // ULMFiT's gradual unfreezing: head alone, then one more block per stage from the top down.
    plan.groups = {ParamGroup<float>{peft::named_parameters<float>(m), lr, 0.0, "all"}};
    const int stages = static_cast<int>(m.unfreeze_order().size()) + 1;
    plan.on_step = [&m, stages, steps](Index step) {
      const int stage = static_cast<int>(std::min<Index>(stages - 1, step * stages / std::max<Index>(1, steps)));
      const int previous =
          step == 0 ? -1
                    : static_cast<int>(std::min<Index>(stages - 1, (step - 1) * stages / std::max<Index>(1, steps)));
      if (stage == previous) return;
      peft::freeze<float>(m);
      peft::unfreeze<float>(m, head_pattern(m));
      const std::vector<std::string> order = m.unfreeze_order();
      for (int k = 0; k < stage && k < static_cast<int>(order.size()); ++k)
        peft::unfreeze<float>(m, order[static_cast<std::size_t>(k)]);
    };
  } else {
    // PEFT: freeze the pretrained network, attach the method, train it and the head (HF PEFT's
    // modules_to_save = ["head"]).
    peft::freeze<float>(m);
    if (info.lora_rank > 0) {
      peft::LoraConfig c;
      c.r = info.lora_rank;
      c.alpha = 2.0 * info.lora_rank;  // s = alpha / r = 2 for every rank, so ranks compare at equal scale
      m.add_lora(c, rng);
    } else if (id == "adapter") {
      m.add_adapters(16, rng);
    } else if (id == "ia3") {
      m.add_ia3();
    } else if (id == "prompt") {
      m.add_soft_prompt(8, rng);
    } else if (id == "prefix") {
      m.add_prefix(8, rng);
    } else {
      throw peft::ConfigError("unknown strategy \"" + id + "\"");
    }
    peft::freeze<float>(m);
    peft::unfreeze<float>(m, Net::peft_pattern());
    peft::unfreeze<float>(m, head_pattern(m));
    plan.groups = head_and_rest(m, lr, lr, /*trainable_only=*/true);
  }

  char label[96];
  std::snprintf(label, sizeof label, "%s lr %g seed %llu", id.c_str(), lr, static_cast<unsigned long long>(o.seed));
  const LoopResult loop = train_loop(m, plan, data, data.target_budget, kTaskClasses, data.target_val, steps, o.batch,
                                     o.curve_points, r.source_measured, o.seed, o, label);
  r.curve = loop.curve;
  r.val_acc = loop.curve.empty() ? 0.0 : loop.curve.back().val_acc;
  r.steps = steps;
  r.train_seconds = loop.seconds;
  r.train_cpu_seconds = loop.cpu_seconds;
  r.peak_rss = loop.peak_rss;
  r.peak_rss_added = loop.peak_rss_added;
  if (id == "gradual" || id == "lp_ft") peft::unfreeze<float>(m);  // count what the strategy trains in the end
  const peft::ParameterCount count = peft::count_parameters<float>(m);
  r.trainable = count.trainable;
  r.total = count.total;
  r.state_bytes = static_cast<std::int64_t>(count.trainable) * 3 * static_cast<std::int64_t>(sizeof(float));
  adapted = std::move(net);
  return r;
}

void test(RunResult& r, Net& m, const Pretrained& pretrained, const TransferData& data) {
  r.tested = true;
  r.target_acc = task_accuracy(m, data, data.target_test, kTaskClasses, kTestChunk);
  r.source_acc = task_accuracy(m, data, data.source_test, 0, kTestChunk);
  if (r.info.peft) {
    // PEFT's promise: with the modules disabled the network is the pretrained one. The target
    // rows of the head changed, the source rows did not (no loss reads them), so the source
    // logits must equal the pretrained network's.
    Mat logits;
    m.set_peft_disabled(true);
    r.source_disabled = task_accuracy(m, data, data.source_test, 0, kTestChunk, &logits);
    m.set_peft_disabled(false);
    r.disabled_max_diff = static_cast<double>((logits - pretrained.source_test_logits).cwiseAbs().maxCoeff());
  }
}

}  // namespace study
