// Continual, multi-task and personalised learning on Split Fashion-MNIST.
//
// Five tasks of two classes each ({0,1}, {2,3}, ..., {8,9}) learned one after the other by a
// 784-128-128-10 MLP whose two hidden linears can host LoRA adapters. Two settings:
//   task-incremental (TIL): the task id is known; training and prediction use the task's 2 logits;
//   class-incremental (CIL): it is not; training uses all 10 logits and prediction the argmax of 10
//     (the adapter methods train task-locally in both, they differ only at prediction).
// Methods: naive fine-tuning, EWC (one penalty per past task), online EWC, replay (class-balanced
// reservoir, several buffer sizes), LwF, one LoRA adapter per task over a base trained on task 0
// and then frozen (zero forgetting with the task id), the task adapters merged into one
// (peft::add_combined_adapter, task id not needed), and joint training on all tasks (upper bound).
// Hyper-parameters (EWC λ, online EWC λ, LwF λ, merge weight) are chosen on a validation split
// held out of the training images, by the mean final ACC over seeds 0 .. val_seeds − 1 (default 3);
// the test runs use seeds 1 .. seeds on the test images.
//
// Sections: multi-task (joint TIL training with summed loss vs PCGrad vs uncertainty weighting,
// per-task accuracy and gradient-conflict statistics) and personalisation (a per-user LoRA adapter
// for a user whose images are transposed, trained with and without a distillation term to the
// general model: user accuracy gain vs drift on the general data).
//
// Usage: continual_study [--quick] [--seeds N] [--val-seeds N] [--out DIR] [--data-dir DIR] [--check]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <peft/core/parameters.hpp>
#include <peft/io/idx.hpp>
#include <peft/layers/activations.hpp>
#include <peft/layers/linear.hpp>
#include <peft/layers/lora_linear.hpp>
#include <peft/loss/kl.hpp>
#include <peft/merge/combine.hpp>
#include <peft/models/peft_model.hpp>
#include <peft/optim/adam.hpp>
#include <peft/optim/regularizers.hpp>
#include <peft/train/batches.hpp>
#include <peft/train/continual.hpp>
#include <peft/train/multitask.hpp>
#include <peft/train/task_adapters.hpp>

namespace {

using peft::Index;
using Mat = peft::Matrix<float>;
constexpr int kTasks = 5;
constexpr int kClasses = 10;
constexpr Index kHidden = 128;

// ---- options and data -----------------------------------------------------------------------

struct Options {
  bool quick = false;
  bool check = false;
  int seeds = 5;
  int val_seeds = 3;  ///< hyper-parameters are chosen by the mean validation ACC over seeds 0 .. val_seeds − 1
  std::string out = "continual_study_out";
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  Index train_per_class = 1500, val_per_class = 200, test_per_class = 500;
  int epochs = 2;
  Index batch = 32;
  double lr = 1e-3;
  Index fisher_examples = 200;
  std::vector<std::size_t> buffers{100, 500, 2000};
  std::vector<double> ewc_grid{1e2, 1e3, 1e4, 1e5, 1e6, 1e7}, oewc_grid{1e2, 1e3, 1e4, 1e5, 1e6, 1e7};
  std::vector<double> lwf_grid{0.1, 0.3, 1.0, 3.0, 10.0, 30.0};
  std::vector<double> merge_grid{1.0, 0.5, 0.25, 0.125};
  std::vector<double> personal_lambdas{0.0, 0.3, 1.0, 3.0};
};

struct Data {
  peft::IdxDataset train, test;
  float mean = 0.f, sd = 1.f;
  // per task: ids into train (train / val) or test
  std::vector<std::vector<Index>> tr, va, te;
};

Data load_data(const Options& o) {
  Data d;
  d.train = peft::read_idx_dataset(o.data_dir + "/train-images-idx3-ubyte.gz",
                                   o.data_dir + "/train-labels-idx1-ubyte.gz", kClasses);
  d.test = peft::read_idx_dataset(o.data_dir + "/t10k-images-idx3-ubyte.gz", o.data_dir + "/t10k-labels-idx1-ubyte.gz",
                                  kClasses);
  double s = 0, s2 = 0;
  for (std::uint8_t p : d.train.pixels) {
    s += p / 255.0;
    s2 += (p / 255.0) * (p / 255.0);
  }
  const double n = static_cast<double>(d.train.pixels.size());
  d.mean = static_cast<float>(s / n);
  d.sd = static_cast<float>(std::sqrt(s2 / n - (s / n) * (s / n)));
  std::vector<std::vector<Index>> by_class(kClasses), test_by_class(kClasses);
  for (Index i = 0; i < d.train.count; ++i) by_class[d.train.labels[static_cast<std::size_t>(i)]].push_back(i);
  for (Index i = 0; i < d.test.count; ++i) test_by_class[d.test.labels[static_cast<std::size_t>(i)]].push_back(i);
  peft::Rng rng(2024);  // the split is fixed; seeds vary the training
  d.tr.resize(kTasks);
  d.va.resize(kTasks);
  d.te.resize(kTasks);
  for (int c = 0; c < kClasses; ++c) {
    auto& v = by_class[static_cast<std::size_t>(c)];
    peft::shuffle(v, rng);
    const int t = c / 2;
    for (Index k = 0; k < o.val_per_class; ++k) d.va[t].push_back(v[static_cast<std::size_t>(k)]);
    for (Index k = 0; k < o.train_per_class; ++k) d.tr[t].push_back(v[static_cast<std::size_t>(o.val_per_class + k)]);
    auto& w = test_by_class[static_cast<std::size_t>(c)];
    for (Index k = 0; k < std::min<Index>(o.test_per_class, static_cast<Index>(w.size())); ++k)
      d.te[t].push_back(w[static_cast<std::size_t>(k)]);
  }
  return d;
}

/// Rows of `set` selected by `ids` as normalised floats; `transpose` swaps image rows and columns
/// (the personalisation user's view of the data).
void gather(const Data& d, const peft::IdxDataset& set, const std::vector<Index>& ids, Mat& x,
            std::vector<std::int64_t>& y, bool transpose = false) {
  const Index p = set.pixels_per_image();
  x.resize(static_cast<Index>(ids.size()), p);
  y.resize(ids.size());
  for (std::size_t r = 0; r < ids.size(); ++r) {
    const std::uint8_t* img = set.pixels.data() + ids[r] * p;
    for (Index i = 0; i < set.rows; ++i)
      for (Index j = 0; j < set.cols; ++j) {
        const Index src = transpose ? j * set.cols + i : i * set.cols + j;
        x(static_cast<Index>(r), i * set.cols + j) = (img[src] / 255.f - d.mean) / d.sd;
      }
    y[r] = set.labels[static_cast<std::size_t>(ids[r])];
  }
}

// ---- the network ----------------------------------------------------------------------------

class Net : public peft::Module<float> {
 public:
  Net(Index in, peft::Rng& rng) : fc1(in, kHidden, rng), fc2(kHidden, kHidden, rng), head(kHidden, kClasses, rng) {}

  peft::LoRALinear<float> fc1, fc2;
  peft::Linear<float> head;

  void forward(const Mat& x, Mat& logits) {
    fc1.forward(x, z1_, c1_);
    peft::activation_forward<float>(peft::Activation::ReLU, z1_, a1_);
    fc2.forward(a1_, z2_, c2_);
    peft::activation_forward<float>(peft::Activation::ReLU, z2_, a2_);
    head.forward(a2_, logits, ch_);
  }
  void backward(const Mat& dlogits) {
    head.backward(ch_, dlogits, &d2_);
    peft::activation_backward<float>(peft::Activation::ReLU, z2_, d2_, d2_);
    fc2.backward(c2_, d2_, &d1_);
    peft::activation_backward<float>(peft::Activation::ReLU, z1_, d1_, d1_);
    fc1.backward(c1_, d1_, nullptr);
  }

 protected:
  void visit_children(const ChildVisitor& fn) override {
    fn("fc1", fc1);
    fn("fc2", fc2);
    fn("head", head);
  }

 private:
  peft::LoRALinear<float>::Cache c1_, c2_;
  peft::Linear<float>::Cache ch_;
  Mat z1_, a1_, z2_, a2_, d1_, d2_;
};

enum class Setting { kTIL, kCIL };
const char* setting_name(Setting s) { return s == Setting::kTIL ? "task-IL" : "class-IL"; }

/// Cross-entropy over each row's logit range [lo, hi) (TIL: its task's two classes; CIL: all 10),
/// mean over rows; gradient into dl (zero outside the range).
double masked_ce(const Mat& logits, const std::vector<std::int64_t>& y, Setting s, Mat& dl, bool task_local) {
  dl.setZero(logits.rows(), logits.cols());
  double total = 0;
  const float inv = 1.f / static_cast<float>(logits.rows());
  for (Index i = 0; i < logits.rows(); ++i) {
    const Index label = static_cast<Index>(y[static_cast<std::size_t>(i)]);
    const bool local = task_local || s == Setting::kTIL;
    const Index lo = local ? (label / 2) * 2 : 0, hi = local ? lo + 2 : kClasses;
    const auto z = logits.row(i).segment(lo, hi - lo);
    const float m = z.maxCoeff();
    const float lse = m + std::log((z.array() - m).exp().sum());
    total += lse - logits(i, label);
    dl.row(i).segment(lo, hi - lo).array() = (z.array() - lse).exp() * inv;
    dl(i, label) -= inv;
  }
  return total / static_cast<double>(logits.rows());
}

double accuracy(Net& net, const Data& d, const peft::IdxDataset& set, const std::vector<Index>& ids, Setting s,
                bool transpose = false) {
  Mat x, logits;
  std::vector<std::int64_t> y;
  Index correct = 0;
  for (std::size_t b = 0; b < ids.size(); b += 500) {
    const std::vector<Index> part(ids.begin() + static_cast<std::ptrdiff_t>(b),
                                  ids.begin() + static_cast<std::ptrdiff_t>(std::min(ids.size(), b + 500)));
    gather(d, set, part, x, y, transpose);
    net.forward(x, logits);
    for (Index i = 0; i < logits.rows(); ++i) {
      const Index label = static_cast<Index>(y[static_cast<std::size_t>(i)]);
      const Index lo = s == Setting::kTIL ? (label / 2) * 2 : 0, hi = s == Setting::kTIL ? lo + 2 : kClasses;
      Index arg = lo;
      for (Index c = lo; c < hi; ++c)
        if (logits(i, c) > logits(i, arg)) arg = c;
      correct += arg == label ? 1 : 0;
    }
  }
  return static_cast<double>(correct) / static_cast<double>(ids.size());
}

// ---- methods --------------------------------------------------------------------------------

enum class Kind { kNaive, kEWC, kOnlineEWC, kReplay, kLwF, kAdapters, kJoint };

struct MethodSpec {
  std::string name;
  Kind kind = Kind::kNaive;
  double lambda = 0;       ///< EWC / online EWC / LwF strength
  std::size_t buffer = 0;  ///< replay capacity
};

struct RunResult {
  peft::AccuracyMatrix r{kTasks};
  std::map<double, peft::AccuracyMatrix> merged;  ///< merge weight → R of the merged adapters
  double trainable_pct = 0;                       ///< trainable / total parameters in the last task
  double state_bytes = 0;                         ///< what the method keeps besides the model
  double seconds = 0;
};

std::int64_t count_values(Net& net, bool trainable_only) {
  std::int64_t n = 0;
  net.visit_parameters([&](const std::string&, peft::Parameter<float>& p) {
    if (!trainable_only || p.trainable()) n += p.value.size();
  });
  return n;
}

class Runner {
 public:
  Runner(const Options& o, const Data& d) : o_(o), d_(d) {}

  /// One method over the task sequence; evaluate on validation (`val`) or test ids.
  RunResult run(const MethodSpec& m, Setting s, std::uint64_t seed, bool val) {
    const auto t0 = std::chrono::steady_clock::now();
    peft::Rng rng(seed * 7919 + 17);
    Net net(d_.train.pixels_per_image(), rng);
    const auto& eval_ids = val ? d_.va : d_.te;
    const peft::IdxDataset& eval_set = val ? d_.train : d_.test;
    RunResult res;
    std::vector<std::unique_ptr<peft::EWC<float>>> ewcs;
    std::unique_ptr<peft::OnlineEWC<float>> oewc;
    std::unique_ptr<peft::ReplayBuffer> buffer;
    if (m.kind == Kind::kReplay) buffer = std::make_unique<peft::ReplayBuffer>(m.buffer, true, seed + 5);
    std::unique_ptr<Net> teacher;
    int current = 0;
    // Adapter per task (peft::TaskAdapters over a PeftModel of the net): task t >= 1 gets LoRA "t<t>"
    // (r = 8, alpha = 16) on fc1 and fc2; the first freezes the base, the head stays trainable (its
    // rows are task-local: the loss of a task reaches only its own two logits). Task 0 is the base's.
    peft::PeftModel<float> pm(net);
    pm.rng().set_state(rng.state());  // adapters draw their initial values from the run's generator
    peft::TaskAdaptersOptions tao;
    tao.prefix = "t";
    tao.shared_trainable = {"head"};
    peft::TaskAdapters<float> ta(
        pm, peft::io::Json{{"peft_type", "LORA"}, {"r", 8}, {"lora_alpha", 16}, {"target_modules", {"fc1", "fc2"}}},
        tao);

    auto train = [&](int task) {
      current = task;
      if (m.kind == Kind::kJoint && task > 0) return;  // joint: everything at task 0, then nothing to add
      if (m.kind == Kind::kAdapters && task > 0) ta.add_task(task);
      std::vector<Index> ids = d_.tr[static_cast<std::size_t>(task)];
      if (m.kind == Kind::kJoint)
        for (int t = 1; t < kTasks; ++t) ids.insert(ids.end(), d_.tr[t].begin(), d_.tr[t].end());
      const bool task_local = m.kind == Kind::kAdapters;
      std::vector<peft::NamedParameter<float>> params = peft::trainable_parameters(net);
      peft::Adam<float> opt(params, peft::AdamOptions{o_.lr});
      peft::BatchSampler sampler(static_cast<Index>(ids.size()), o_.batch,
                                 seed * 31 + static_cast<std::uint64_t>(task));
      std::vector<Index> batch, rows;
      std::vector<peft::ReplayItem> replayed;
      Mat x, logits, dl, tlog, sblk, tblk, gblk, scratch;
      std::vector<std::int64_t> y;
      peft::DistillationWorkspace<float> ws;
      const peft::DistillationOptions dopt{2.0, peft::DistillationLoss::kKL};
      for (int epoch = 0; epoch < o_.epochs; ++epoch) {
        if (epoch > 0) sampler.start_epoch();
        while (sampler.next(batch)) {
          rows.clear();
          for (Index b : batch) rows.push_back(ids[static_cast<std::size_t>(b)]);
          if (buffer && task > 0) {
            buffer->sample(static_cast<std::size_t>(o_.batch), replayed);
            for (const auto& it : replayed) rows.push_back(static_cast<Index>(it.id));
          }
          gather(d_, d_.train, rows, x, y);
          opt.zero_grad();
          net.forward(x, logits);
          masked_ce(logits, y, s, dl, task_local);
          if (teacher && m.lambda > 0) {  // LwF: distil the old classes' outputs of the model before this task
            teacher->forward(x, tlog);
            if (s == Setting::kCIL) {
              distil_block(logits, tlog, 0, 2 * task, m.lambda, dopt, dl, sblk, tblk, gblk, scratch, ws);
            } else {
              for (int t = 0; t < task; ++t)
                distil_block(logits, tlog, 2 * t, 2, m.lambda / task, dopt, dl, sblk, tblk, gblk, scratch, ws);
            }
          }
          net.backward(dl);
          for (auto& e : ewcs) e->add_to_gradients();
          if (oewc) oewc->add_to_gradients();
          opt.step();
          if (buffer && epoch == 0)
            for (Index b : batch) {
              const Index id = ids[static_cast<std::size_t>(b)];
              buffer->add({id, d_.train.labels[static_cast<std::size_t>(id)], task});
            }
        }
      }
      // After the task: Fisher estimates, LwF snapshot.
      if (m.kind == Kind::kEWC || m.kind == Kind::kOnlineEWC) {
        auto tp = peft::trainable_parameters(net);
        if (m.kind == Kind::kEWC) ewcs.push_back(std::make_unique<peft::EWC<float>>(tp, m.lambda));
        if (m.kind == Kind::kOnlineEWC && !oewc) oewc = std::make_unique<peft::OnlineEWC<float>>(tp, m.lambda, 0.9);
        const auto& tr = d_.tr[static_cast<std::size_t>(task)];
        for (Index k = 0; k < std::min<Index>(o_.fisher_examples, static_cast<Index>(tr.size())); ++k) {
          gather(d_, d_.train, {tr[static_cast<std::size_t>(k * static_cast<Index>(tr.size()) / o_.fisher_examples)]},
                 x, y);
          for (auto& np : tp) np.param->zero_grad();
          net.forward(x, logits);
          masked_ce(logits, y, s, dl, false);
          net.backward(dl);
          if (m.kind == Kind::kEWC)
            ewcs.back()->accumulate();
          else
            oewc->accumulate();
        }
        if (m.kind == Kind::kEWC)
          ewcs.back()->finalize();
        else
          oewc->end_task();
      }
      if (m.kind == Kind::kLwF) teacher = std::make_unique<Net>(net);
      res.trainable_pct =
          100.0 * static_cast<double>(count_values(net, true)) / static_cast<double>(count_values(net, false));
    };

    auto evaluate = [&](int task) {
      if (m.kind == Kind::kAdapters) {
        ta.route(task <= current ? task : 0);  // a task not trained yet has no adapter: the base
        const double a = accuracy(net, d_, eval_set, eval_ids[static_cast<std::size_t>(task)], s);
        ta.route(current);
        return a;
      }
      return accuracy(net, d_, eval_set, eval_ids[static_cast<std::size_t>(task)], s);
    };

    // The runner evaluates the untrained model first (baseline for FWT).
    res.r = peft::run_task_sequence(
        kTasks,
        [&](int task) {
          train(task);
          if (m.kind == Kind::kAdapters) evaluate_merged(net, ta, task, s, eval_set, eval_ids, res);
        },
        evaluate);
    // State kept besides the model, in bytes (float = 4).
    const double pbytes = 4.0 * static_cast<double>(count_values(net, false));
    switch (m.kind) {
      case Kind::kEWC: res.state_bytes = 2.0 * pbytes * (kTasks - 1); break;  // Fisher + anchor per past task
      case Kind::kOnlineEWC: res.state_bytes = 3.0 * pbytes; break;           // Fisher, anchor, task accumulator
      case Kind::kReplay: res.state_bytes = static_cast<double>(m.buffer) * (784 + 24); break;  // bytes + item
      case Kind::kLwF: res.state_bytes = pbytes; break;                                         // the old model
      case Kind::kAdapters: {
        double a = 0;
        net.visit_parameters([&](const std::string& name, peft::Parameter<float>& p) {
          if (name.find("lora_") != std::string::npos) a += 4.0 * static_cast<double>(p.value.size());
        });
        res.state_bytes = a;  // every task adapter (the merged one replaces them when the task id is unknown)
        break;
      }
      case Kind::kJoint: res.state_bytes = static_cast<double>(kTasks * d_.tr[0].size()) * 784; break;  // all data
      default: break;
    }
    res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return res;
  }

 private:
  static void distil_block(const Mat& logits, const Mat& tlog, Index c0, Index nc, double lambda,
                           const peft::DistillationOptions& dopt, Mat& dl, Mat& sblk, Mat& tblk, Mat& gblk,
                           Mat& scratch, peft::DistillationWorkspace<float>& ws) {
    sblk = logits.middleCols(c0, nc);
    tblk = tlog.middleCols(c0, nc);
    gblk.setZero(logits.rows(), nc);
    peft::add_distillation<float>(sblk, tblk, lambda, dopt, gblk, ws, scratch);
    dl.middleCols(c0, nc) += gblk;
  }

  /// After task i of the adapters method: the merge of adapters t1..ti (weight w each, SVD;
  /// TaskAdapters::merge_tasks), evaluated on every task without the task id, for each weight of the
  /// grid; R of each goes to res.merged. After task 0 there is no adapter: the base is evaluated.
  void evaluate_merged(Net& net, peft::TaskAdapters<float>& ta, int task, Setting s, const peft::IdxDataset& set,
                       const std::vector<std::vector<Index>>& ids, RunResult& res) {
    for (double w : o_.merge_grid) {
      auto it = res.merged.find(w);
      if (it == res.merged.end()) it = res.merged.emplace(w, peft::AccuracyMatrix(kTasks)).first;
      if (!ta.tasks().empty()) {
        peft::CombineOptions co;
        co.method = peft::CombineMethod::Svd;
        ta.merge_tasks("merged", std::vector<double>(ta.tasks().size(), w), co);
        ta.route_adapter("merged");
      } else {
        ta.route_base();
      }
      for (int j = 0; j < kTasks; ++j) {
        it->second.set(task, j, accuracy(net, d_, set, ids[static_cast<std::size_t>(j)], s));
      }
      ta.route(task);
      if (!ta.tasks().empty()) ta.model().delete_adapter("merged");
    }
  }

  const Options& o_;
  const Data& d_;
};

// ---- statistics and output ------------------------------------------------------------------

struct Stat {
  std::vector<double> v;
  double mean() const {
    double s = 0;
    for (double x : v) s += x;
    return v.empty() ? std::nan("") : s / static_cast<double>(v.size());
  }
  double sd() const {
    if (v.size() < 2) return 0.0;
    const double m = mean();
    double s = 0;
    for (double x : v) s += (x - m) * (x - m);
    return std::sqrt(s / static_cast<double>(v.size() - 1));
  }
  std::string pm(double scale = 100.0, int prec = 1) const {
    if (v.empty() || std::isnan(mean())) return "n/a";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f ± %.*f", prec, scale * mean(), prec, scale * sd());
    return buf;
  }
};

std::string svg_color(double a) {  // 0 → dark purple, 1 → yellow (viridis-like ramp in 3 stops)
  const double t = std::clamp(a, 0.0, 1.0);
  const double r = t < 0.5 ? 68 + (33 - 68) * t * 2 : 33 + (253 - 33) * (t - 0.5) * 2;
  const double g = t < 0.5 ? 1 + (145 - 1) * t * 2 : 145 + (231 - 145) * (t - 0.5) * 2;
  const double b = t < 0.5 ? 84 + (140 - 84) * t * 2 : 140 + (37 - 140) * (t - 0.5) * 2;
  char buf[32];
  std::snprintf(buf, sizeof buf, "rgb(%d,%d,%d)", static_cast<int>(r), static_cast<int>(g), static_cast<int>(b));
  return buf;
}

void write_heatmaps(const std::string& path, const std::vector<std::pair<std::string, std::vector<double>>>& maps,
                    int per_row) {
  const int cell = 26, pad = 40, title = 34, w = kTasks * cell;
  const int cols = per_row, rows = (static_cast<int>(maps.size()) + per_row - 1) / per_row;
  const int W = cols * (w + pad) + pad, H = 20 + rows * (w + pad + title);
  std::ofstream f(path);
  f << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"10\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  f << "<text x=\"" << pad
    << "\" y=\"16\" font-size=\"13\">Accuracy matrix R[i][j] (row i: after training task i; "
       "column j: task j), test, mean over seeds</text>\n";
  for (std::size_t k = 0; k < maps.size(); ++k) {
    const int ox = pad + static_cast<int>(k % static_cast<std::size_t>(per_row)) * (w + pad);
    const int oy = 20 + title + static_cast<int>(k / static_cast<std::size_t>(per_row)) * (w + pad + title);
    f << "<text x=\"" << ox << "\" y=\"" << oy - 8 << "\" font-size=\"9\">" << maps[k].first << "</text>\n";
    for (int i = 0; i < kTasks; ++i)
      for (int j = 0; j < kTasks; ++j) {
        const double a = maps[k].second[static_cast<std::size_t>(i * kTasks + j)];
        f << "<rect x=\"" << ox + j * cell << "\" y=\"" << oy + i * cell << "\" width=\"" << cell << "\" height=\""
          << cell << "\" fill=\"" << svg_color(a) << "\"/>";
        f << "<text x=\"" << ox + j * cell + cell / 2 << "\" y=\"" << oy + i * cell + cell / 2 + 3
          << "\" text-anchor=\"middle\" font-size=\"8\" fill=\"" << (a > 0.6 ? "black" : "white") << "\">"
          << static_cast<int>(std::lround(100 * a)) << "</text>\n";
      }
  }
  f << "</svg>\n";
}

struct Aggregate {
  Stat acc, bwt, fwt, forgetting, seconds;
  std::vector<double> r_sum = std::vector<double>(kTasks * kTasks, 0.0);
  int n = 0;
  double trainable_pct = 0, state_bytes = 0;
  void add(const peft::AccuracyMatrix& r, bool sequence, double secs) {
    const peft::ContinualMetrics m = r.metrics();
    acc.v.push_back(m.acc);
    if (sequence) {
      bwt.v.push_back(m.bwt);
      fwt.v.push_back(m.fwt);
      forgetting.v.push_back(m.forgetting);
    }
    seconds.v.push_back(secs);
    for (int i = 0; i < kTasks; ++i)
      for (int j = 0; j < kTasks; ++j) r_sum[static_cast<std::size_t>(i * kTasks + j)] += r.at(i, j);
    ++n;
  }
  std::vector<double> r_mean() const {
    std::vector<double> v = r_sum;
    for (double& x : v) x /= std::max(n, 1);
    return v;
  }
};

std::string human_bytes(double b) {
  char buf[32];
  if (b < 1024)
    std::snprintf(buf, sizeof buf, "%.0f B", b);
  else if (b < 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024);
  else
    std::snprintf(buf, sizeof buf, "%.1f MiB", b / (1024 * 1024));
  return buf;
}

// ---- multi-task and personalisation sections ------------------------------------------------

enum class MtMode { kSum, kPCGrad, kUncertainty };

struct MtResult {
  std::vector<double> task_acc;
  double conflict_fraction = 0, mean_cos = 0, min_cos = 0;
  std::vector<double> final_weights;  ///< uncertainty weighting: exp(−s_k) at the end
};

MtResult run_multitask(const Options& o, const Data& d, MtMode mode, std::uint64_t seed) {
  peft::Rng rng(seed * 104729 + 3);
  Net net(d.train.pixels_per_image(), rng);
  auto params = peft::trainable_parameters(net);
  peft::MultiTaskGradients<float> mt(params, kTasks);
  peft::UncertaintyWeighting<float> uw(kTasks);
  auto all = params;
  if (mode == MtMode::kUncertainty) all.push_back({"log_vars", &uw.log_vars});
  peft::Adam<float> opt(all, peft::AdamOptions{o.lr});
  std::vector<peft::BatchSampler> samplers;
  for (int t = 0; t < kTasks; ++t)
    samplers.emplace_back(static_cast<Index>(d.tr[t].size()), o.batch, seed * 13 + static_cast<std::uint64_t>(t));
  const Index steps = o.epochs * samplers[0].batches_per_epoch();
  std::vector<Index> batch, rows;
  std::vector<double> losses(kTasks);
  Mat x, logits, dl;
  std::vector<std::int64_t> y;
  MtResult res;
  double conflicts = 0, cos_sum = 0, cos_min = 1;
  peft::GradientConflicts gc;
  for (Index step = 0; step < steps; ++step) {
    for (int t = 0; t < kTasks; ++t) {
      if (!samplers[t].next(batch)) {
        samplers[t].start_epoch();
        samplers[t].next(batch);
      }
      rows.clear();
      for (Index b : batch) rows.push_back(d.tr[t][static_cast<std::size_t>(b)]);
      gather(d, d.train, rows, x, y);
      for (auto& np : params) np.param->zero_grad();
      net.forward(x, logits);
      losses[static_cast<std::size_t>(t)] = masked_ce(logits, y, Setting::kTIL, dl, true);
      net.backward(dl);
      mt.capture(t);
    }
    mt.conflicts(gc);
    conflicts += static_cast<double>(gc.conflicting) / gc.pairs;
    cos_sum += gc.mean_cosine;
    cos_min = std::min(cos_min, gc.min_cosine);
    uw.log_vars.zero_grad();
    if (mode == MtMode::kSum) mt.combine_weighted();
    if (mode == MtMode::kPCGrad) mt.combine_pcgrad(rng);
    if (mode == MtMode::kUncertainty) {
      mt.combine_weighted(uw.weights());
      uw.loss(losses);
    }
    opt.step();
  }
  res.conflict_fraction = conflicts / static_cast<double>(steps);
  res.mean_cos = cos_sum / static_cast<double>(steps);
  res.min_cos = cos_min;
  for (int t = 0; t < kTasks; ++t) res.task_acc.push_back(accuracy(net, d, d.test, d.te[t], Setting::kTIL));
  res.final_weights = uw.weights();
  return res;
}

struct PersonalResult {
  double user_before = 0, user_after = 0, general_before = 0, general_after = 0, drift_kl = 0;
};

/// General model: all 10 classes (class-IL joint training). User: the same classes seen transposed,
/// a few labelled images per class. Adapter: LoRA r = 4 on fc1 and fc2, base and head frozen.
PersonalResult run_personal(const Options& o, const Data& d, const Net& general, double lambda, std::uint64_t seed) {
  peft::Rng rng(seed * 15485863 + 11);
  Net net(general);
  net.fc1.add_adapter("user", peft::LoraConfig{4, 8.0}, rng);
  net.fc2.add_adapter("user", peft::LoraConfig{4, 8.0}, rng);
  peft::freeze(net, ".*");
  peft::unfreeze(net, ".*lora_.*");
  std::vector<Index> user_train, general_pool, user_test, general_test;
  const Index per_class = o.quick ? 10 : 20;
  for (int t = 0; t < kTasks; ++t) {
    // user images: the validation ids (not used to train the general model), per class
    std::vector<Index> by_class[2];
    for (Index id : d.va[t]) by_class[d.train.labels[static_cast<std::size_t>(id)] % 2].push_back(id);
    for (auto& v : by_class) {
      peft::shuffle(v, rng);
      for (Index k = 0; k < per_class && k < static_cast<Index>(v.size()); ++k)
        user_train.push_back(v[static_cast<std::size_t>(k)]);
    }
    general_pool.insert(general_pool.end(), d.tr[t].begin(), d.tr[t].end());
    user_test.insert(user_test.end(), d.te[t].begin(), d.te[t].end());
  }
  general_test = user_test;
  PersonalResult r;
  Net gen(general);
  r.user_before = accuracy(gen, d, d.test, user_test, Setting::kCIL, true);
  r.general_before = accuracy(gen, d, d.test, general_test, Setting::kCIL, false);
  auto params = peft::trainable_parameters(net);
  peft::Adam<float> opt(params, peft::AdamOptions{2e-3});
  peft::BatchSampler us(static_cast<Index>(user_train.size()), 16, seed + 1);
  peft::BatchSampler gs(static_cast<Index>(general_pool.size()), 32, seed + 2);
  std::vector<Index> batch, rows;
  Mat x, logits, dl, gx, glog, tlog, gdl, scratch;
  std::vector<std::int64_t> y, gy;
  peft::DistillationWorkspace<float> ws;
  const peft::DistillationOptions dopt{2.0, peft::DistillationLoss::kKL};
  const int steps = o.quick ? 60 : 200;
  for (int step = 0; step < steps; ++step) {
    if (!us.next(batch)) {
      us.start_epoch();
      us.next(batch);
    }
    rows.clear();
    for (Index b : batch) rows.push_back(user_train[static_cast<std::size_t>(b)]);
    gather(d, d.train, rows, x, y, true);
    opt.zero_grad();
    net.forward(x, logits);
    masked_ce(logits, y, Setting::kCIL, dl, false);
    net.backward(dl);
    if (lambda > 0) {  // λ · τ² KL(general ‖ personalised) on a batch of general (untransposed) images
      if (!gs.next(batch)) {
        gs.start_epoch();
        gs.next(batch);
      }
      rows.clear();
      for (Index b : batch) rows.push_back(general_pool[static_cast<std::size_t>(b)]);
      gather(d, d.train, rows, gx, gy, false);
      gen.forward(gx, tlog);
      net.forward(gx, glog);
      gdl.setZero(glog.rows(), glog.cols());
      peft::add_distillation<float>(glog, tlog, lambda, dopt, gdl, ws, scratch);
      net.backward(gdl);
    }
    opt.step();
  }
  r.user_after = accuracy(net, d, d.test, user_test, Setting::kCIL, true);
  r.general_after = accuracy(net, d, d.test, general_test, Setting::kCIL, false);
  // Drift: mean KL(general ‖ personalised) at τ = 1 on the general test images.
  double kl = 0;
  for (std::size_t b = 0; b < general_test.size(); b += 500) {
    const std::vector<Index> part(
        general_test.begin() + static_cast<std::ptrdiff_t>(b),
        general_test.begin() + static_cast<std::ptrdiff_t>(std::min(general_test.size(), b + 500)));
    gather(d, d.test, part, gx, gy, false);
    gen.forward(gx, tlog);
    net.forward(gx, glog);
    kl += static_cast<double>(peft::distillation_loss<float>(glog, tlog, nullptr, {1.0, peft::DistillationLoss::kKL})) *
          static_cast<double>(part.size());
  }
  r.drift_kl = kl / static_cast<double>(general_test.size());
  return r;
}

int fail(const std::string& what) {
  std::cerr << "continual_study: check failed: " << what << "\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "continual_study: " << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--quick")
      o.quick = true;
    else if (a == "--check")
      o.check = true;
    else if (a == "--seeds")
      o.seeds = std::stoi(next());
    else if (a == "--val-seeds")
      o.val_seeds = std::stoi(next());
    else if (a == "--out")
      o.out = next();
    else if (a == "--data-dir")
      o.data_dir = next();
    else {
      std::cerr
          << "usage: continual_study [--quick] [--check] [--seeds N] [--val-seeds N] [--out DIR] [--data-dir DIR]\n";
      return 2;
    }
  }
  if (o.quick) {
    o.train_per_class = 150;
    o.val_per_class = 50;
    o.test_per_class = 100;
    o.epochs = 1;
    o.fisher_examples = 30;
    o.buffers = {50, 200};
    o.ewc_grid = {1e3};
    o.oewc_grid = {1e3};
    o.lwf_grid = {1.0};
    o.merge_grid = {1.0, 0.5};
    o.personal_lambdas = {0.0, 1.0};
    if (o.seeds > 2) o.seeds = 1;
    o.val_seeds = 1;
  }
  std::string cmd = "mkdir -p '" + o.out + "'";
  if (std::system(cmd.c_str()) != 0) return fail("cannot create " + o.out);
  const auto t_start = std::chrono::steady_clock::now();
  Data d;
  try {
    d = load_data(o);
  } catch (const std::exception& e) {
    std::cerr << "continual_study: cannot read Fashion-MNIST from " << o.data_dir << ": " << e.what()
              << "\n(Debian: apt install dataset-fashion-mnist); skipped\n";
    return 77;  // ctest's SKIP_RETURN_CODE
  }
  std::cout << "# Continual study: Split Fashion-MNIST (" << kTasks << " tasks × 2 classes), MLP 784-" << kHidden << "-"
            << kHidden << "-10\n";
  std::cout << "train " << o.train_per_class << "/class, validation " << o.val_per_class << "/class, test "
            << o.test_per_class << "/class; " << o.epochs << " epochs per task, batch " << o.batch << ", Adam lr "
            << o.lr << "; seeds " << o.seeds << (o.quick ? " (--quick)" : "") << "\n\n";
  Runner runner(o, d);
  std::ofstream csv(o.out + "/continual.csv");
  csv << "setting,method,seed,acc,bwt,fwt,forgetting,seconds\n";
  bool ok = true;
  double naive_cil = 0, replay_cil = 0;  // --check: replay must beat naive fine-tuning in class-IL
  std::vector<std::pair<std::string, std::vector<double>>> heat;
  std::vector<std::string> validation_notes;
  for (Setting s : {Setting::kTIL, Setting::kCIL}) {
    // Validation: choose λ for EWC, online EWC, LwF and the merge weight by the mean final ACC on
    // the validation split over seeds 0 .. val_seeds − 1; each grid's line goes to the report.
    auto note_choice = [&](const char* name, const std::vector<double>& grid, const std::vector<Stat>& accs,
                           std::size_t best) {
      std::string line = std::string("  ") + name + ":";
      for (std::size_t i = 0; i < grid.size(); ++i) {
        char b[96];
        std::snprintf(b, sizeof b, " %g → %s%s", grid[i], accs[i].pm().c_str(), i == best ? " (chosen)" : "");
        line += b;
        if (i + 1 < grid.size()) line += ";";
      }
      if (grid.size() > 1 && (best == 0 || best + 1 == grid.size())) line += "  [chosen value at the grid's edge]";
      validation_notes.push_back(std::string("[") + setting_name(s) + "]" + line);
    };
    auto choose = [&](Kind k, const std::vector<double>& grid, const char* name) {
      std::vector<Stat> accs(grid.size());
      std::size_t best = 0;
      for (std::size_t i = 0; i < grid.size(); ++i) {
        for (int vs = 0; vs < o.val_seeds; ++vs) {
          const double a = runner.run({name, k, grid[i], 0}, s, static_cast<std::uint64_t>(vs), true).r.metrics().acc;
          accs[i].v.push_back(a);
          std::cerr << "  [" << setting_name(s) << "] validation " << name << " λ=" << grid[i] << " seed " << vs
                    << ": ACC " << a << "\n";
        }
        if (accs[i].mean() > accs[best].mean()) best = i;
      }
      note_choice(name, grid, accs, best);
      return grid[best];
    };
    const double ewc_l = choose(Kind::kEWC, o.ewc_grid, "EWC λ");
    const double oewc_l = choose(Kind::kOnlineEWC, o.oewc_grid, "online EWC λ");
    const double lwf_l = choose(Kind::kLwF, o.lwf_grid, "LwF λ");
    double merge_w = o.merge_grid.front();
    {
      std::vector<Stat> accs(o.merge_grid.size());
      for (int vs = 0; vs < o.val_seeds; ++vs) {
        const RunResult vr = runner.run({"adapters", Kind::kAdapters, 0, 0}, s, static_cast<std::uint64_t>(vs), true);
        for (std::size_t i = 0; i < o.merge_grid.size(); ++i) {
          const peft::AccuracyMatrix& r = vr.merged.at(o.merge_grid[i]);
          double a = 0;
          for (int j = 0; j < kTasks; ++j) a += r.at(kTasks - 1, j) / kTasks;
          accs[i].v.push_back(a);
        }
      }
      std::size_t best = 0;
      for (std::size_t i = 0; i < accs.size(); ++i)
        if (accs[i].mean() > accs[best].mean()) best = i;
      merge_w = o.merge_grid[best];
      note_choice("merge weight", o.merge_grid, accs, best);
    }
    char ewc_name[64], oewc_name[64];
    std::snprintf(ewc_name, sizeof ewc_name, "EWC (λ=%g)", ewc_l);
    std::snprintf(oewc_name, sizeof oewc_name, "online EWC (γ=0.9, λ=%g)", oewc_l);
    std::vector<MethodSpec> methods{{"naive fine-tuning", Kind::kNaive, 0, 0},
                                    {ewc_name, Kind::kEWC, ewc_l, 0},
                                    {oewc_name, Kind::kOnlineEWC, oewc_l, 0}};
    for (std::size_t b : o.buffers)
      methods.push_back({"replay (" + std::to_string(b) + " images)", Kind::kReplay, 0, b});
    char lw[64];
    std::snprintf(lw, sizeof lw, "LwF (T=2, λ=%g)", lwf_l);
    methods.push_back({lw, Kind::kLwF, lwf_l, 0});
    methods.push_back({s == Setting::kTIL ? "adapter per task (LoRA r=8)"
                                          : "adapter per task (LoRA r=8; task id picks the adapter: an oracle here)",
                       Kind::kAdapters, 0, 0});
    methods.push_back({"joint training (upper bound)", Kind::kJoint, 0, 0});
    std::vector<std::pair<std::string, Aggregate>> rows;
    Aggregate merged;
    for (const auto& m : methods) {
      Aggregate agg;
      for (int seed = 1; seed <= o.seeds; ++seed) {
        const RunResult r = runner.run(m, s, static_cast<std::uint64_t>(seed), false);
        const bool seq = m.kind != Kind::kJoint;
        agg.add(r.r, seq, r.seconds);
        agg.trainable_pct = r.trainable_pct;
        agg.state_bytes = r.state_bytes;
        const auto mm = r.r.metrics();
        csv << setting_name(s) << ",\"" << m.name << "\"," << seed << "," << mm.acc << "," << (seq ? mm.bwt : NAN)
            << "," << (seq ? mm.fwt : NAN) << "," << (seq ? mm.forgetting : NAN) << "," << r.seconds << "\n";
        std::cerr << "  [" << setting_name(s) << "] " << m.name << " seed " << seed << ": ACC " << mm.acc << " ("
                  << r.seconds << " s)\n";
        if (m.kind == Kind::kAdapters) {
          const auto& mr = r.merged.at(merge_w);
          merged.add(mr, true, r.seconds);
          const auto m2 = mr.metrics();
          csv << setting_name(s) << ",\"merged task adapters\"," << seed << "," << m2.acc << "," << m2.bwt << ",,"
              << m2.forgetting << "," << r.seconds << "\n";
          if (s == Setting::kTIL && std::abs(mm.forgetting) > 0.0) {
            ok = false;
            std::cerr << "adapter per task forgot in task-IL: " << mm.forgetting << "\n";
          }
        }
        if (!(mm.acc >= 0 && mm.acc <= 1)) ok = false;
      }
      rows.emplace_back(m.name, agg);
      if (s == Setting::kCIL && m.kind == Kind::kNaive) naive_cil = agg.acc.mean();
      if (s == Setting::kCIL && m.kind == Kind::kReplay) replay_cil = std::max(replay_cil, agg.acc.mean());
      if (m.kind == Kind::kAdapters) {
        merged.trainable_pct = agg.trainable_pct;
        merged.state_bytes = agg.state_bytes / (kTasks - 1);
        char mn[96];
        std::snprintf(mn, sizeof mn, "merged task adapters (SVD, weight %g)", merge_w);
        rows.emplace_back(mn, merged);
      }
    }
    std::cout << "## " << setting_name(s) << " (test, mean ± sd over " << o.seeds << " seeds; %)\n\n";
    std::cout << "| method | ACC | BWT | FWT | forgetting | trainable % (last task) | state kept | s/run |\n";
    std::cout << "| --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for (const auto& [name, a] : rows) {
      char tp[32], sec[32];
      std::snprintf(tp, sizeof tp, "%.1f", a.trainable_pct);
      std::snprintf(sec, sizeof sec, "%.1f", a.seconds.mean());
      std::cout << "| " << name << " | " << a.acc.pm() << " | " << a.bwt.pm() << " | " << a.fwt.pm() << " | "
                << a.forgetting.pm() << " | " << tp << " | " << human_bytes(a.state_bytes) << " | " << sec << " |\n";
      if (name.rfind("joint", 0) != 0) {
        std::string label = name.substr(0, name.find(" ("));
        if (label == "replay")
          label = "replay " + name.substr(name.find('(') + 1, name.find(' ', name.find('(')) - name.find('(') - 1);
        if (label == "adapter per task") label = "adapter/task";
        if (label == "merged task adapters") label = "merged adapters";
        if (label == "naive fine-tuning") label = "naive";
        heat.emplace_back(std::string(setting_name(s)) + " " + label, a.r_mean());
      }
    }
    std::cout << "\n";
  }
  if (replay_cil < naive_cil + 0.10) {
    ok = false;
    std::cerr << "class-IL: replay's best ACC " << replay_cil << " is not 10 points above naive fine-tuning's "
              << naive_cil << "\n";
  }
  std::cout << "Validation (mean ± sd of the final ACC over " << o.val_seeds
            << " seed(s), validation split; the best mean is chosen):\n\n";
  for (const auto& line : validation_notes) std::cout << "- " << line << "\n";
  std::cout << "\n";
  write_heatmaps(o.out + "/accuracy_matrices.svg", heat, static_cast<int>(heat.size() / 2));
  std::cout << "Accuracy matrices: " << o.out << "/accuracy_matrices.svg; per-run rows: " << o.out
            << "/continual.csv\n\n";

  // ---- multi-task ----
  std::cout << "## Multi-task: the 5 tasks trained jointly (task-IL heads), " << o.epochs
            << " epochs of per-task batches; test accuracy per task (%), gradient conflicts over all parameters\n\n";
  std::cout
      << "| combination | task 0 | task 1 | task 2 | task 3 | task 4 | mean | conflicting pairs (% of steps×pairs) | "
         "mean cosine | min cosine |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
  std::string uw_line;
  for (MtMode mode : {MtMode::kSum, MtMode::kPCGrad, MtMode::kUncertainty}) {
    std::vector<Stat> per(kTasks), wts(kTasks);
    Stat mean, conf, mc, minc;
    for (int seed = 1; seed <= o.seeds; ++seed) {
      const MtResult r = run_multitask(o, d, mode, static_cast<std::uint64_t>(seed));
      double m = 0;
      for (int t = 0; t < kTasks; ++t) per[t].v.push_back(r.task_acc[t]), m += r.task_acc[t] / kTasks;
      mean.v.push_back(m);
      for (int t = 0; t < kTasks; ++t) wts[t].v.push_back(r.final_weights[static_cast<std::size_t>(t)]);
      conf.v.push_back(r.conflict_fraction);
      mc.v.push_back(r.mean_cos);
      minc.v.push_back(r.min_cos);
    }
    std::cout << "| "
              << (mode == MtMode::kSum      ? "summed"
                  : mode == MtMode::kPCGrad ? "PCGrad"
                                            : "uncertainty weighting");
    for (int t = 0; t < kTasks; ++t) std::cout << " | " << per[t].pm();
    std::cout << " | " << mean.pm() << " | " << conf.pm() << " | " << mc.pm(1, 3) << " | " << minc.pm(1, 3) << " |\n";
    if (mode == MtMode::kUncertainty) {
      uw_line = "Uncertainty weighting's final task weights exp(−s_k):";
      for (int t = 0; t < kTasks; ++t) uw_line += " " + wts[t].pm(1, 3);
    }
    std::cerr << "  multi-task mode " << static_cast<int>(mode) << " done\n";
  }
  std::cout << "\n" << uw_line << " (s_k trained by the same Adam, lr " << o.lr << ").\n\n";

  // ---- personalisation ----
  {
    peft::Rng grng(99);
    Net general(d.train.pixels_per_image(), grng);
    // The general model: class-IL joint training on all tasks.
    {
      std::vector<Index> ids;
      for (int t = 0; t < kTasks; ++t) ids.insert(ids.end(), d.tr[t].begin(), d.tr[t].end());
      auto params = peft::trainable_parameters(general);
      peft::Adam<float> opt(params, peft::AdamOptions{o.lr});
      peft::BatchSampler sampler(static_cast<Index>(ids.size()), o.batch, 77);
      std::vector<Index> batch, rows;
      Mat x, logits, dl;
      std::vector<std::int64_t> y;
      for (int e = 0; e < o.epochs; ++e) {
        if (e > 0) sampler.start_epoch();
        while (sampler.next(batch)) {
          rows.clear();
          for (Index b : batch) rows.push_back(ids[static_cast<std::size_t>(b)]);
          gather(d, d.train, rows, x, y);
          opt.zero_grad();
          general.forward(x, logits);
          masked_ce(logits, y, Setting::kCIL, dl, false);
          general.backward(dl);
          opt.step();
        }
      }
    }
    std::cout << "## Personalisation: a per-user LoRA adapter (r=4 on fc1, fc2; base and head frozen) for a user who "
                 "sees the images transposed, "
              << (o.quick ? 10 : 20)
              << " labelled images per class; distillation term λ·τ²·KL(general ‖ personal) "
                 "at τ=2 on general images\n\n";
    double drift_without = -1, drift_with = -1;
    for (double lam : o.personal_lambdas) {
      Stat ub, ua, gain, ga, kl;
      for (int seed = 1; seed <= o.seeds; ++seed) {
        const PersonalResult r = run_personal(o, d, general, lam, static_cast<std::uint64_t>(seed));
        ub.v.push_back(r.user_before);
        ua.v.push_back(r.user_after);
        gain.v.push_back(r.user_after - r.user_before);
        ga.v.push_back(r.general_after);
        kl.v.push_back(r.drift_kl);
        if (seed == 1 && lam == o.personal_lambdas.front())
          std::cout << "General model before personalisation: " << Stat{{r.general_before}}.pm()
                    << " % on the general test images.\n\n"
                    << "| λ | user accuracy before → after (%) | gain | general accuracy with the adapter (%) | drift: "
                       "KL(general ‖ personal) on general test |\n| --- | --- | --- | --- | --- |\n";
      }
      (lam == 0.0 ? drift_without : drift_with) = kl.mean();
      std::cout << "| " << lam << " | " << ub.pm() << " → " << ua.pm() << " | " << gain.pm() << " | " << ga.pm()
                << " | " << kl.pm(1, 3) << " |\n";
    }
    std::cout << "\n";
    if (drift_with >= 0 && drift_without >= 0 && !(drift_with < drift_without)) {
      ok = false;
      std::cerr << "personalisation: the distillation term did not reduce the drift (" << drift_with << " vs "
                << drift_without << ")\n";
    }
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::cout << "Total " << static_cast<int>(total) << " s.\n";
  if (o.check && !ok) return fail("see above");
  return 0;
}
