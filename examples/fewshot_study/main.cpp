// Few-shot study: fine-tuning a pretrained model (head only, LoRA) against meta-learning (first-order
// MAML, Reptile, second-order MAML, prototypical networks) on two task families with many tasks:
//   (1) MAML's sinusoid regression (Finn et al., 2017, §5.1): y = A sin(x − φ), A ~ U[0.1, 5],
//       φ ~ U[0, π], x ~ U[−5, 5]; K = 5 or 10 support points, 50 query points per test task.
//   (2) few-shot text classification over the files of Debian's `fortunes` package (each file a
//       class): meta-train on some classes, choose hyper-parameters on validation classes, test on
//       5-way 1-shot and 5-shot episodes over classes never seen in training.
// Every method adapts on the support set only and is scored on the query set; hyper-parameters are
// chosen on validation tasks / classes; 95 % confidence intervals over the test episodes; several
// seeds. Writes <out>/fewshot.csv and <out>/fewshot.svg. See README.md next to this file.
#include <peft/peft.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <peft/meta/episodes.hpp>
#include <peft/meta/maml.hpp>
#include <peft/meta/protonet.hpp>

namespace {

using T = double;  // second-order MAML differences gradients: double keeps its products accurate
using peft::Index;
using peft::Matrix;
using peft::MetaSplit;

// ---------------------------------------------------------------------------------------------
// The network: x → tanh(fc1) → tanh(fc2) = embedding → head. LoRALinear layers (plain linears until
// an adapter is added) so the LoRA baseline can attach adapters to fc1 / fc2.
struct Net {
  peft::LoRALinear<T> fc1, fc2, head;
  peft::LoRALinear<T>::Cache c1, c2, c3;
  Matrix<T> z1, h1, z2, h2, out, dh2, dh1, dz;

  Net(Index in, Index hidden, Index embed, Index classes, peft::Rng& rng)
      : fc1(in, hidden, rng, true, "fc1"),
        fc2(hidden, embed, rng, true, "fc2"),
        head(embed, classes, rng, true, "head") {}

  const Matrix<T>& embed(const peft::ConstMatrixRef<T>& x) {
    fc1.forward(x, z1, c1);
    peft::activation_forward<T>(peft::Activation::Tanh, z1, h1);
    fc2.forward(h1, z2, c2);
    peft::activation_forward<T>(peft::Activation::Tanh, z2, h2);
    return h2;
  }
  const Matrix<T>& forward(const peft::ConstMatrixRef<T>& x) {
    embed(x);
    head.forward(h2, out, c3);
    return out;
  }
  // tanh' = 1 − tanh²: from the forward's outputs h1, h2 (activation_backward would evaluate tanh
  // again from z; on these small networks tanh is a third of the run time).
  void backward_embed(const peft::ConstMatrixRef<T>& d_embed) {
    dz.resize(h2.rows(), h2.cols());
    dz.array() = d_embed.array() * (T(1) - h2.array().square());  // dz2 = dh2 ⊙ (1 − h2²)
    fc2.backward(c2, dz, &dh1);
    dz.resize(h1.rows(), h1.cols());
    dz.array() = dh1.array() * (T(1) - h1.array().square());  // dz1 = dh1 ⊙ (1 − h1²)
    fc1.backward(c1, dz, nullptr);
  }
  void backward(const peft::ConstMatrixRef<T>& dout) {
    head.backward(c3, dout, &dh2);
    backward_embed(dh2);
  }
  void visit(const std::function<void(const std::string&, peft::Parameter<T>&)>& fn) {
    fc1.visit_parameters(fn, "fc1");
    fc2.visit_parameters(fn, "fc2");
    head.visit_parameters(fn, "head");
  }
  std::vector<peft::NamedParameter<T>> trainable() {
    std::vector<peft::NamedParameter<T>> out_;
    visit([&](const std::string& n, peft::Parameter<T>& p) {
      if (p.trainable()) out_.push_back({n, &p});
    });
    return out_;
  }
  void set_trainable(bool on) {
    visit([&](const std::string&, peft::Parameter<T>& p) { p.set_trainable(on); });
  }
  /// A fresh zero head with `classes` outputs (fine-tuning baselines start each episode from it).
  void new_zero_head(Index classes) {
    peft::Rng r(1);
    head = peft::LoRALinear<T>(fc2.out_features(), classes, r, true, "head");
    head.weight.value.setZero();
    head.bias.value.setZero();
  }
};

// ---------------------------------------------------------------------------------------------
// Statistics and output.
struct Stat {
  double mean = 0, ci95 = 0;
  Index n = 0;
};
Stat stat(const std::vector<double>& v) {
  Stat s;
  s.n = static_cast<Index>(v.size());
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  double ss = 0;
  for (double x : v) ss += (x - s.mean) * (x - s.mean);
  const double sd = v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : 0.0;
  s.ci95 = 1.96 * sd / std::sqrt(static_cast<double>(v.size()));
  return s;
}

struct Row {  // one method × setting × seed
  std::string part, setting, method, chosen;
  int seed = 0;
  Stat test;
  double seconds = 0;
};

struct Options {
  bool quick = false, check = false;
  std::string out = "fewshot_out";
  std::string fortunes = "/usr/share/games/fortunes";
  std::string parts = "sine,text";
  int seeds = 3;
  // sinusoid
  int sine_iters = 1500, sine_batch = 8, sine_val = 100, sine_test = 600, sine_pre_iters = 1500;
  // text
  int text_iters = 500, text_batch = 4, text_val = 100, text_test = 600, text_pre_iters = 600;
  int text_train_query = 5;  ///< queries per class in meta-training / ProtoNet training episodes
  int buckets = 512, hidden = 32, embed_dim = 32, per_class = 100;
};

std::string fmt(double v, int prec = 3) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", prec, v);
  return b;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---------------------------------------------------------------------------------------------
// Meta-training and evaluation, generic over a task family. A Family provides
//   void sample_train(peft::Rng&), sample_val(i), sample_test(i)  (fill its current task)
//   T operator()(MetaSplit)          loss + backward on the current task (MetaLearner's contract)
//   double score()                   query metric of the current parameters (no backward)
//   Index n_out()                    outputs of the head during episodes
enum class Meta { FOMAML, Reptile, MAML };
const char* meta_name(Meta m) {
  return m == Meta::FOMAML ? "FOMAML" : m == Meta::Reptile ? "Reptile" : "MAML (2nd order)";
}

struct MetaHP {
  double inner_lr = 0.01, outer_lr = 1e-3;
  int inner_steps = 5, iters = 1000, batch = 8;
};

template <class Family>
std::vector<double> evaluate(Net& net, Family& fam, bool test, int count, double lr, int steps, bool adam);

/// Keeps the parameters of the best validation score seen (the number of meta-training steps is a
/// hyper-parameter too: on few classes, meta-training overfits them), and the validation curve.
struct Checkpoint {
  std::vector<Matrix<T>> best;
  double best_score = 0;
  bool any = false;
  int offers = 0, best_at = 0;  ///< checkpoints seen, and the 1-based index of the best
  std::string curve;            ///< "iter:score ..." for the log
  void offer(Net& net, double score, bool lower_better, int iter) {
    ++offers;
    curve += " " + std::to_string(iter) + ":" + std::to_string(score).substr(0, 5);
    if (any && (lower_better ? score >= best_score : score <= best_score)) return;
    best_at = offers;
    best.clear();
    net.visit([&](const std::string&, peft::Parameter<T>& p) { best.push_back(p.value); });
    best_score = score;
    any = true;
  }
  void restore(Net& net) const {
    std::size_t i = 0;
    net.visit([&](const std::string&, peft::Parameter<T>& p) { p.value = best[i++]; });
    std::fprintf(stderr, "      validation curve:%s  (best: checkpoint %d of %d)\n", curve.c_str(), best_at, offers);
  }
};

template <class Family>
void meta_train(Meta method, Net& net, Family& fam, const MetaHP& hp, peft::Rng& rng, int eval_every, int val_tasks,
                bool lower_better) {
  net.set_trainable(true);
  const auto params = net.trainable();
  peft::Adam<T> outer(params, peft::AdamOptions{hp.outer_lr});
  peft::SGD<T> inner(params, peft::SGDOptions{hp.inner_lr});
  peft::MetaLearner<T> learner(params, outer);
  Checkpoint ckpt;
  for (int it = 1; it <= hp.iters; ++it) {
    for (int b = 0; b < hp.batch; ++b) {
      fam.sample_train(rng);
      if (method == Meta::FOMAML)
        learner.add_fomaml_task(fam, inner, hp.inner_steps);
      else if (method == Meta::Reptile)
        learner.add_reptile_task(fam, inner, hp.inner_steps);
      else
        learner.add_maml_task(fam, hp.inner_lr, hp.inner_steps);
    }
    learner.outer_step();
    if (it % eval_every == 0 || it == hp.iters)
      ckpt.offer(net, stat(evaluate(net, fam, false, val_tasks, hp.inner_lr, hp.inner_steps, false)).mean, lower_better,
                 it);
  }
  ckpt.restore(net);
}

/// Scores of `count` tasks (val or test) after adapting the parameters `params` of `net` with `steps`
/// steps: plain SGD of lr `lr` (the MAML family, as meta-trained) or Adam (fine-tuning baselines).
template <class Family>
std::vector<double> evaluate(Net& net, Family& fam, bool test, int count, double lr, int steps, bool adam) {
  const auto params = net.trainable();
  peft::MetaLearner<T> learner(params);
  peft::Adam<T> opt(params, peft::AdamOptions{lr});
  std::vector<double> scores;
  for (int i = 0; i < count; ++i) {
    if (test)
      fam.sample_test(i);
    else
      fam.sample_val(i);
    if (adam)
      learner.adapt(fam, opt, steps);
    else
      learner.adapt_sgd(fam, lr, steps);
    scores.push_back(fam.score());
    learner.restore();
  }
  return scores;
}

// ---------------------------------------------------------------------------------------------
// (1) Sinusoid regression.
struct SineFamily {
  Index k = 5, q_train = 10, q_test = 50;
  Net* net = nullptr;
  std::uint64_t seed = 0;
  Matrix<T> xs, ys, xq, yq, dout;

  void draw(peft::Rng& r, Index nq) {
    const double a = r.uniform(0.1, 5.0), phase = r.uniform(0.0, 3.141592653589793);
    xs.resize(k, 1);
    ys.resize(k, 1);
    xq.resize(nq, 1);
    yq.resize(nq, 1);
    for (Index i = 0; i < k; ++i) {
      xs(i, 0) = r.uniform(-5.0, 5.0);
      ys(i, 0) = a * std::sin(xs(i, 0) - phase);
    }
    for (Index i = 0; i < nq; ++i) {
      xq(i, 0) = r.uniform(-5.0, 5.0);
      yq(i, 0) = a * std::sin(xq(i, 0) - phase);
    }
  }
  void sample_train(peft::Rng& r) { draw(r, q_train); }
  void sample_val(int i) {
    peft::Rng r(seed * 1000003 + 17 + static_cast<std::uint64_t>(i));
    draw(r, q_test);
  }
  void sample_test(int i) {
    peft::Rng r(seed * 1000003 + 500009 + static_cast<std::uint64_t>(i));
    draw(r, q_test);
  }
  T operator()(MetaSplit s) {
    const Matrix<T>& x = s == MetaSplit::support ? xs : xq;
    const Matrix<T>& y = s == MetaSplit::support ? ys : yq;
    const T l = peft::mse<T>(net->forward(x), y, &dout);
    net->backward(dout);
    return l;
  }
  double score() { return peft::mse<T>(net->forward(xq), yq, nullptr); }  // query MSE (lower is better)
};

/// Pretraining for the fine-tuning baselines: one regressor fit to points of many tasks at once
/// (MAML's "pretrained" baseline), Adam, the same number of tasks as meta-training sees.
void pretrain_sine(Net& net, SineFamily& fam, int iters, int batch, peft::Rng& rng) {
  net.set_trainable(true);
  const auto params = net.trainable();
  peft::Adam<T> opt(params, peft::AdamOptions{1e-3});
  for (int it = 0; it < iters; ++it) {
    opt.zero_grad();
    for (int b = 0; b < batch; ++b) {
      fam.sample_train(rng);
      fam(MetaSplit::support);
      fam(MetaSplit::query);
    }
    opt.step();
  }
}

// ---------------------------------------------------------------------------------------------
// (2) Fortunes text classification.
struct TextData {
  std::vector<std::string> class_names;
  Matrix<T> features;  // [rows, buckets]
  std::vector<std::int64_t> labels;
  std::vector<std::int64_t> train_classes, val_classes, test_classes;
};

std::uint64_t fnv1a(const char* p, std::size_t n, std::uint64_t salt) {
  std::uint64_t h = 1469598103934665603ULL ^ salt;
  for (std::size_t i = 0; i < n; ++i) {
    h ^= static_cast<unsigned char>(p[i]);
    h *= 1099511628211ULL;
  }
  return h;
}

/// Hashed bag of word unigrams and byte trigrams (lower-cased, whitespace collapsed) into `buckets`
/// counts, log(1 + count), scaled to norm √buckets.
void featurize(const std::string& text, Index buckets, Eigen::Ref<peft::RowVector<T>> row) {
  std::string s;
  for (char c : text) {
    const unsigned char u = static_cast<unsigned char>(c);
    const char l = static_cast<char>(std::tolower(u));
    if (std::isspace(u)) {
      if (!s.empty() && s.back() != ' ') s.push_back(' ');
    } else {
      s.push_back(l);
    }
  }
  row.setZero();
  const std::uint64_t nb = static_cast<std::uint64_t>(buckets);
  std::size_t start = std::string::npos;
  for (std::size_t i = 0; i <= s.size(); ++i) {
    const bool alnum = i < s.size() && std::isalnum(static_cast<unsigned char>(s[i]));
    if (alnum && start == std::string::npos) start = i;
    if (!alnum && start != std::string::npos) {
      row(static_cast<Index>(fnv1a(s.data() + start, i - start, 1) % nb)) += 1;
      start = std::string::npos;
    }
  }
  for (std::size_t i = 0; i + 3 <= s.size(); ++i) row(static_cast<Index>(fnv1a(s.data() + i, 3, 2) % nb)) += 1;
  row = row.array().log1p().matrix();
  const T norm = row.norm();
  // Rows of norm √buckets: entries of order one, so that fc1's pre-activations (torch's init,
  // U(±1/√in)) are of order one too and tanh is neither linear nor saturated.
  if (norm > 0) row *= std::sqrt(static_cast<T>(buckets)) / norm;
}

bool load_fortunes(const Options& o, TextData& d) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(o.fortunes, ec)) return false;
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(o.fortunes, ec)) {
    if (e.is_symlink() || !e.is_regular_file()) continue;  // symlinks point into it/ (Italian)
    const std::string name = e.path().filename().string();
    if (name.size() > 4 && (name.substr(name.size() - 4) == ".dat" || name.substr(name.size() - 3) == ".u8")) continue;
    files.push_back(name);
  }
  std::sort(files.begin(), files.end());
  std::vector<std::string> texts;
  peft::Rng pick(14);
  for (const std::string& f : files) {
    std::ifstream in(o.fortunes + "/" + f);
    std::vector<std::string> entries;
    std::string line, cur;
    auto flush = [&] {
      Index letters = 0;
      for (char c : cur) letters += std::isalpha(static_cast<unsigned char>(c)) ? 1 : 0;
      if (letters >= 20) entries.push_back(cur);
      cur.clear();
    };
    while (std::getline(in, line)) {
      if (line == "%")
        flush();
      else
        cur += line + "\n";
    }
    flush();
    if (static_cast<int>(entries.size()) < 40) continue;  // too few for 5-shot + 15 queries with variety
    peft::shuffle(entries, pick);
    if (static_cast<int>(entries.size()) > o.per_class) entries.resize(static_cast<std::size_t>(o.per_class));
    const std::int64_t c = static_cast<std::int64_t>(d.class_names.size());
    d.class_names.push_back(f);
    for (auto& e : entries) {
      texts.push_back(e);
      d.labels.push_back(c);
    }
  }
  const Index nc = static_cast<Index>(d.class_names.size());
  if (nc < 5 + 5 + 5) return false;
  d.features.resize(static_cast<Index>(texts.size()), o.buckets);
  for (std::size_t i = 0; i < texts.size(); ++i) featurize(texts[i], o.buckets, d.features.row(static_cast<Index>(i)));
  // Fixed class split (as few-shot benchmarks fix theirs): 10 test, 6 validation, the rest train.
  std::vector<std::int64_t> order(static_cast<std::size_t>(nc));
  for (Index c = 0; c < nc; ++c) order[static_cast<std::size_t>(c)] = c;
  peft::Rng split(2014);
  peft::shuffle(order, split);
  for (std::size_t i = 0; i < order.size(); ++i)
    (i < 10 ? d.test_classes : i < 16 ? d.val_classes : d.train_classes).push_back(order[i]);
  for (auto* v : {&d.test_classes, &d.val_classes, &d.train_classes}) std::sort(v->begin(), v->end());
  return true;
}

struct TextFamily {
  const TextData* data = nullptr;
  Net* net = nullptr;
  Index n_way = 5, k_shot = 1, n_query = 15;
  Index n_query_train = 15;  ///< queries per class of meta-training episodes (validation / test: n_query)
  std::uint64_t seed = 0;
  std::unique_ptr<peft::EpisodeSampler> train_sampler;
  peft::Episode ep;
  Matrix<T> xs, xq, dout;

  void init(std::uint64_t s) {
    seed = s;
    train_sampler =
        std::make_unique<peft::EpisodeSampler>(data->labels, n_way, k_shot, n_query_train, s, data->train_classes);
  }
  void fill() {
    const Index f = data->features.cols();
    xs.resize(static_cast<Index>(ep.support.size()), f);
    xq.resize(static_cast<Index>(ep.query.size()), f);
    for (std::size_t i = 0; i < ep.support.size(); ++i)
      xs.row(static_cast<Index>(i)) = data->features.row(ep.support[i]);
    for (std::size_t i = 0; i < ep.query.size(); ++i) xq.row(static_cast<Index>(i)) = data->features.row(ep.query[i]);
  }
  void sample_train(peft::Rng&) {
    train_sampler->next(ep);
    fill();
  }
  // Validation and test episodes are a fixed sequence per seed: every method sees the same ones.
  std::unique_ptr<peft::EpisodeSampler> fixed;
  int fixed_pos = -1;
  bool fixed_test = false;
  void sample_fixed(int i, bool test) {
    if (!fixed || i == 0 || fixed_test != test || i != fixed_pos + 1) {
      fixed = std::make_unique<peft::EpisodeSampler>(data->labels, n_way, k_shot, n_query, seed * 7919 + (test ? 2 : 1),
                                                     test ? data->test_classes : data->val_classes);
      fixed_test = test;
      for (int j = 0; j < i; ++j) fixed->next(ep);
    }
    fixed->next(ep);
    fixed_pos = i;
    fill();
  }
  void sample_val(int i) { sample_fixed(i, false); }
  void sample_test(int i) { sample_fixed(i, true); }
  T operator()(MetaSplit s) {
    const bool sup = s == MetaSplit::support;
    const T l = peft::cross_entropy<T>(net->forward(sup ? xs : xq), sup ? ep.support_labels : ep.query_labels, &dout);
    net->backward(dout);
    return l;
  }
  double score() {  // query accuracy
    const Matrix<T>& logits = net->forward(xq);
    Index hits = 0;
    for (Index j = 0; j < logits.rows(); ++j) {
      Index best = 0;
      logits.row(j).maxCoeff(&best);
      hits += best == ep.query_labels[static_cast<std::size_t>(j)] ? 1 : 0;
    }
    return static_cast<double>(hits) / static_cast<double>(logits.rows());
  }
};

/// Pretraining for the fine-tuning baselines: an ordinary classifier over all meta-train classes.
void pretrain_text(Net& net, const TextData& d, int iters, peft::Rng& rng) {
  std::vector<Index> rows;
  std::vector<std::int64_t> map(d.class_names.size(), -1);
  for (std::size_t i = 0; i < d.train_classes.size(); ++i)
    map[static_cast<std::size_t>(d.train_classes[i])] = static_cast<std::int64_t>(i);
  for (std::size_t i = 0; i < d.labels.size(); ++i)
    if (map[static_cast<std::size_t>(d.labels[i])] >= 0) rows.push_back(static_cast<Index>(i));
  net.set_trainable(true);
  peft::Adam<T> opt(net.trainable(), peft::AdamOptions{1e-3});
  peft::BatchSampler batches(static_cast<Index>(rows.size()), 32, rng.next_u64(), true, true);
  std::vector<Index> batch;
  Matrix<T> x, dout;
  std::vector<std::int64_t> y;
  for (int it = 0; it < iters; ++it) {
    if (!batches.next(batch)) {
      batches.start_epoch();
      batches.next(batch);
    }
    x.resize(static_cast<Index>(batch.size()), d.features.cols());
    y.resize(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i) {
      const Index r = rows[static_cast<std::size_t>(batch[i])];
      x.row(static_cast<Index>(i)) = d.features.row(r);
      y[i] = map[static_cast<std::size_t>(d.labels[static_cast<std::size_t>(r)])];
    }
    opt.zero_grad();
    peft::cross_entropy<T>(net.forward(x), y, &dout);
    net.backward(dout);
    opt.step();
  }
}

/// Prototypical networks: the embedding (fc1, fc2) trained on train-class episodes with the
/// prototypical loss; a test episode is classified by the nearest support mean, no adaptation.
struct ProtoRunner {
  TextFamily* fam;
  peft::PrototypicalLoss<T> proto;
  Matrix<T> both, dboth, ds, dq;

  T episode_loss(bool backward) {
    const Index ns = fam->xs.rows();
    both.resize(ns + fam->xq.rows(), fam->xs.cols());
    both << fam->xs, fam->xq;
    const Matrix<T>& e = fam->net->embed(both);
    const T l =
        proto.forward_backward(e.topRows(ns), fam->ep.support_labels, e.bottomRows(e.rows() - ns), fam->ep.query_labels,
                               fam->n_way, backward ? &ds : nullptr, backward ? &dq : nullptr);
    if (backward) {
      dboth.resize(both.rows(), e.cols());
      dboth << ds, dq;
      fam->net->backward_embed(dboth);
    }
    return l;
  }
  void train(int iters, double lr, peft::Rng& rng, int eval_every, int val_episodes) {
    Net& net = *fam->net;
    net.set_trainable(true);
    net.head.weight.set_trainable(false);  // the head is not used
    net.head.bias.set_trainable(false);
    peft::Adam<T> opt(net.trainable(), peft::AdamOptions{lr});
    Checkpoint ckpt;  // the best validation accuracy, as for the meta-learners
    for (int it = 1; it <= iters; ++it) {
      fam->sample_train(rng);
      opt.zero_grad();
      episode_loss(true);
      opt.step();
      if (it % eval_every == 0 || it == iters) ckpt.offer(net, stat(evaluate(false, val_episodes)).mean, false, it);
    }
    ckpt.restore(net);
  }
  std::vector<double> evaluate(bool test, int count) {
    std::vector<double> acc;
    for (int i = 0; i < count; ++i) {
      if (test)
        fam->sample_test(i);
      else
        fam->sample_val(i);
      episode_loss(false);
      acc.push_back(static_cast<double>(proto.correct(fam->ep.query_labels)) /
                    static_cast<double>(fam->ep.query_labels.size()));
    }
    return acc;
  }
};

// ---------------------------------------------------------------------------------------------
// Fine-tuning baselines: from a pretrained network, a fresh zero head of `n_out` outputs, then per
// episode `steps` Adam steps on the support set of the head only, or of the head and LoRA adapters
// (r = 4, alpha = 8) on fc1 and fc2 (fc1 only when its input has one feature, where rank 4 > 1).
Net make_finetune_net(const Net& pre, Index n_out, bool lora) {
  Net net = pre;
  net.set_trainable(false);
  net.new_zero_head(n_out);
  if (lora) {
    if (net.fc1.in_features() >= 4) net.fc1.add_adapter("default", peft::LoraConfig{4, 8.0});
    net.fc2.add_adapter("default", peft::LoraConfig{4, 8.0});
  }
  return net;
}

struct Result {
  std::string chosen;
  std::vector<double> test;
};

/// For each value of `grid`: make(value) gives a ready network (trained or pretrained), score(net,
/// value, test) its validation or test scores; the value best on validation is tested.
template <class Make, class Score>
Result select_and_test(const std::vector<double>& grid, bool lower_better, const char* what, Make&& make,
                       Score&& score) {
  double best_v = grid.front(), best = lower_better ? 1e300 : -1e300;
  std::unique_ptr<Net> best_net;
  for (double v : grid) {
    std::unique_ptr<Net> net = make(v);
    const double m = stat(score(*net, v, false)).mean;
    if (lower_better ? m < best : m > best) {
      best = m;
      best_v = v;
      best_net = std::move(net);
    }
  }
  return Result{std::string(what) + "=" + fmt(best_v, 4), score(*best_net, best_v, true)};
}

void report(std::vector<Row>& rows, const std::string& part, const std::string& setting, const std::string& method,
            int seed, Result r, double secs, const char* metric) {
  rows.push_back(Row{part, setting, method, r.chosen, seed, stat(r.test), secs});
  std::fprintf(stderr, "  %s %-7s seed %d  %-20s test %s %.3f ± %.3f  (%s, %.1f s)\n", part.c_str(), setting.c_str(),
               seed, method.c_str(), metric, rows.back().test.mean, rows.back().test.ci95, r.chosen.c_str(), secs);
}

// ---------------------------------------------------------------------------------------------
void run_sine(const Options& o, std::vector<Row>& rows) {
  const std::vector<double> grid = o.quick ? std::vector<double>{0.01} : std::vector<double>{0.01, 0.03, 0.1};
  const int steps = 5;  // inner steps, in meta-training and at test; fine-tuning baselines take the same
  for (int seed = 1; seed <= o.seeds; ++seed)
    for (Index k : {Index{5}, Index{10}}) {
      const std::string setting = "K=" + std::to_string(k);
      SineFamily fam;
      fam.k = k;
      fam.seed = static_cast<std::uint64_t>(seed);
      const std::uint64_t base = static_cast<std::uint64_t>(seed) * 1000 + static_cast<std::uint64_t>(k);
      // Fine-tuning baselines from one regressor pretrained on all tasks' points.
      auto t0 = std::chrono::steady_clock::now();
      peft::Rng rng(base);
      Net pre(1, 40, 40, 1, rng);
      fam.net = &pre;
      pretrain_sine(pre, fam, o.sine_pre_iters, o.sine_batch, rng);
      const double pre_secs = seconds_since(t0);
      for (bool lora : {false, true}) {
        t0 = std::chrono::steady_clock::now();
        Result r = select_and_test(
            grid, true, "lr",
            [&](double) {
              auto net = std::make_unique<Net>(make_finetune_net(pre, 1, lora));
              net->head = pre.head;  // regression: keep the pretrained output layer, trainable
              net->head.weight.set_trainable(true);
              net->head.bias.set_trainable(true);
              return net;
            },
            [&](Net& net, double lr, bool test) {
              fam.net = &net;
              return evaluate(net, fam, test, test ? o.sine_test : o.sine_val, lr, steps, true);
            });
        report(rows, "sine", setting, lora ? "pretrained + LoRA" : "pretrained + head", seed, r,
               pre_secs + seconds_since(t0), "MSE");
      }
      for (Meta m : {Meta::FOMAML, Meta::Reptile, Meta::MAML}) {
        t0 = std::chrono::steady_clock::now();
        Result r = select_and_test(
            grid, true, "inner_lr",
            [&](double lr) {
              peft::Rng r2(base + 77);
              auto net = std::make_unique<Net>(1, 40, 40, 1, r2);
              fam.net = net.get();
              MetaHP hp;
              hp.inner_lr = lr;
              hp.inner_steps = steps;
              hp.iters = o.sine_iters;
              hp.batch = o.sine_batch;
              meta_train(m, *net, fam, hp, r2, std::max(1, hp.iters / 6), o.sine_val, true);
              return net;
            },
            [&](Net& net, double lr, bool test) {
              fam.net = &net;
              return evaluate(net, fam, test, test ? o.sine_test : o.sine_val, lr, steps, false);
            });
        report(rows, "sine", setting, meta_name(m), seed, r, seconds_since(t0), "MSE");
      }
    }
}

void run_text(const Options& o, const TextData& d, std::vector<Row>& rows) {
  const std::vector<double> grid = o.quick ? std::vector<double>{0.3} : std::vector<double>{0.03, 0.1, 0.3};
  const std::vector<double> ft_grid = o.quick ? std::vector<double>{0.01} : std::vector<double>{0.003, 0.01, 0.03};
  const std::vector<double> proto_grid = o.quick ? std::vector<double>{1e-3} : std::vector<double>{1e-4, 3e-4, 1e-3};
  const int meta_steps = 3, ft_steps = 20;
  const Index f = d.features.cols();
  const Index n_train = static_cast<Index>(d.train_classes.size());
  for (int seed = 1; seed <= o.seeds; ++seed) {
    // One pretrained classifier per seed serves both shot settings.
    auto t0 = std::chrono::steady_clock::now();
    peft::Rng rng(static_cast<std::uint64_t>(seed) * 7 + 3);
    Net pre(f, o.hidden, o.embed_dim, n_train, rng);
    pretrain_text(pre, d, o.text_pre_iters, rng);
    const double pre_secs = seconds_since(t0);
    for (Index k : {Index{1}, Index{5}}) {
      const std::string setting = "5w" + std::to_string(k) + "s";
      const std::uint64_t base = static_cast<std::uint64_t>(seed) * 1000 + static_cast<std::uint64_t>(k);
      TextFamily fam;
      fam.data = &d;
      fam.k_shot = k;
      fam.n_query_train = o.text_train_query;
      for (bool lora : {false, true}) {
        t0 = std::chrono::steady_clock::now();
        Result r = select_and_test(
            ft_grid, false, "lr", [&](double) { return std::make_unique<Net>(make_finetune_net(pre, 5, lora)); },
            [&](Net& net, double lr, bool test) {
              fam.net = &net;
              fam.init(base);
              return evaluate(net, fam, test, test ? o.text_test : o.text_val, lr, ft_steps, true);
            });
        report(rows, "text", setting, lora ? "pretrained + LoRA" : "pretrained + head", seed, r,
               pre_secs / 2 + seconds_since(t0), "acc");
      }
      for (Meta m : {Meta::FOMAML, Meta::Reptile, Meta::MAML}) {
        t0 = std::chrono::steady_clock::now();
        Result r = select_and_test(
            grid, false, "inner_lr",
            [&](double lr) {
              peft::Rng r2(base + 77);
              auto net = std::make_unique<Net>(f, o.hidden, o.embed_dim, 5, r2);
              fam.net = net.get();
              fam.init(base);
              MetaHP hp;
              hp.inner_lr = lr;
              hp.inner_steps = meta_steps;
              hp.iters = o.text_iters;
              hp.batch = o.text_batch;
              meta_train(m, *net, fam, hp, r2, std::max(1, hp.iters / 6), o.text_val, false);
              return net;
            },
            [&](Net& net, double lr, bool test) {
              fam.net = &net;
              return evaluate(net, fam, test, test ? o.text_test : o.text_val, lr, meta_steps, false);
            });
        report(rows, "text", setting, meta_name(m), seed, r, seconds_since(t0), "acc");
      }
      {  // reference without any training: nearest class mean of the raw bag-of-n-gram features
        t0 = std::chrono::steady_clock::now();
        fam.init(base);
        peft::PrototypicalLoss<T> raw;
        std::vector<double> acc;
        for (int i = 0; i < o.text_test; ++i) {
          fam.sample_test(i);
          raw.forward(fam.xs, fam.ep.support_labels, fam.xq, fam.n_way);
          acc.push_back(static_cast<double>(raw.correct(fam.ep.query_labels)) /
                        static_cast<double>(fam.ep.query_labels.size()));
        }
        report(rows, "text", setting, "raw-feature nearest mean", seed, Result{"none=0", acc}, seconds_since(t0),
               "acc");
      }
      {
        t0 = std::chrono::steady_clock::now();
        ProtoRunner pr{&fam, {}, {}, {}, {}, {}};
        Result r = select_and_test(
            proto_grid, false, "lr",
            [&](double lr) {
              peft::Rng r2(base + 91);
              auto net = std::make_unique<Net>(f, o.hidden, o.embed_dim, 5, r2);
              fam.net = net.get();
              fam.init(base);
              // as many episodes as the meta-learners' tasks
              pr.train(o.text_iters * o.text_batch, lr, r2, std::max(1, o.text_iters * o.text_batch / 6), o.text_val);
              return net;
            },
            [&](Net& net, double, bool test) {
              fam.net = &net;
              return pr.evaluate(test, test ? o.text_test : o.text_val);
            });
        report(rows, "text", setting, "ProtoNet", seed, r, seconds_since(t0), "acc");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Aggregation over seeds, CSV, table, SVG.
struct Agg {
  std::string part, setting, method;
  double mean = 0, ci95 = 0, seed_sd = 0, seconds = 0;
  int seeds = 0;
  Index episodes = 0;
  std::string chosen;
};

std::vector<Agg> aggregate(const std::vector<Row>& rows) {
  std::vector<Agg> out;
  for (const Row& r : rows) {
    Agg* a = nullptr;
    for (Agg& x : out)
      if (x.part == r.part && x.setting == r.setting && x.method == r.method) a = &x;
    if (!a) {
      out.emplace_back();
      a = &out.back();
      a->part = r.part;
      a->setting = r.setting;
      a->method = r.method;
    }
    a->mean += r.test.mean;
    a->ci95 += r.test.ci95;
    a->seconds += r.seconds;
    a->episodes += r.test.n;
    a->chosen += (a->seeds ? " " : "") + r.chosen.substr(r.chosen.find('=') + 1);
    ++a->seeds;
  }
  for (Agg& a : out) {
    a.mean /= a.seeds;
    a.ci95 /= a.seeds;
    double ss = 0;
    for (const Row& r : rows)
      if (r.part == a.part && r.setting == a.setting && r.method == a.method)
        ss += (r.test.mean - a.mean) * (r.test.mean - a.mean);
    a.seed_sd = a.seeds > 1 ? std::sqrt(ss / (a.seeds - 1)) : 0.0;
  }
  return out;
}

std::string svg_escape(const std::string& s) {
  std::string o;
  for (char c : s) o += c == '&' ? std::string("&amp;") : c == '<' ? std::string("&lt;") : std::string(1, c);
  return o;
}

/// One bar panel: groups (settings) × methods, bars with 95 % CI whiskers.
void svg_panel(std::ostringstream& svg, double x0, double y0, double w, double h, const std::string& title,
               const std::string& ylabel, const std::vector<Agg>& aggs, const std::string& part,
               const std::vector<std::string>& methods, const std::vector<std::string>& settings, double ymax) {
  const char* colors[] = {"#9e9e9e", "#616161", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e"};
  const double left = 50, bottom = 40, top = 30;
  const double pw = w - left - 10, ph = h - bottom - top;
  svg << "<text x='" << x0 + w / 2 << "' y='" << y0 + 18 << "' text-anchor='middle' font-size='14'>"
      << svg_escape(title) << "</text>\n";
  auto ypix = [&](double v) { return y0 + top + ph * (1.0 - std::min(v, ymax) / ymax); };
  for (int t = 0; t <= 5; ++t) {
    const double v = ymax * t / 5.0;
    svg << "<line x1='" << x0 + left << "' x2='" << x0 + left + pw << "' y1='" << ypix(v) << "' y2='" << ypix(v)
        << "' stroke='#e0e0e0'/>\n<text x='" << x0 + left - 4 << "' y='" << ypix(v) + 4
        << "' text-anchor='end' font-size='10'>" << fmt(v, 2) << "</text>\n";
  }
  svg << "<text transform='translate(" << x0 + 12 << "," << y0 + top + ph / 2 << ") rotate(-90)' text-anchor='middle' "
      << "font-size='11'>" << svg_escape(ylabel) << "</text>\n";
  const double gw = pw / static_cast<double>(settings.size());
  const double bw = gw * 0.8 / static_cast<double>(methods.size());
  for (std::size_t g = 0; g < settings.size(); ++g) {
    const double gx = x0 + left + gw * static_cast<double>(g) + gw * 0.1;
    svg << "<text x='" << gx + gw * 0.4 << "' y='" << y0 + top + ph + 16 << "' text-anchor='middle' font-size='12'>"
        << svg_escape(settings[g]) << "</text>\n";
    for (std::size_t m = 0; m < methods.size(); ++m)
      for (const Agg& a : aggs)
        if (a.part == part && a.setting == settings[g] && a.method == methods[m]) {
          const double bx = gx + bw * static_cast<double>(m);
          svg << "<rect x='" << bx << "' y='" << ypix(a.mean) << "' width='" << bw * 0.9 << "' height='"
              << y0 + top + ph - ypix(a.mean) << "' fill='" << colors[m % 7] << "'/>\n";
          const double cx = bx + bw * 0.45;
          svg << "<line x1='" << cx << "' x2='" << cx << "' y1='" << ypix(a.mean - a.ci95) << "' y2='"
              << ypix(a.mean + a.ci95) << "' stroke='black'/>\n";
          svg << "<text x='" << cx << "' y='" << ypix(a.mean + a.ci95) - 3 << "' text-anchor='middle' font-size='8'>"
              << fmt(a.mean, 2) << "</text>\n";
        }
  }
}

void write_outputs(const Options& o, const std::vector<Row>& rows, const std::vector<Agg>& aggs) {
  std::filesystem::create_directories(o.out);
  std::ofstream csv(o.out + "/fewshot.csv");
  csv << "part,setting,method,seed,chosen,metric_mean,ci95,episodes,seconds\n";
  for (const Row& r : rows)
    csv << r.part << "," << r.setting << "," << r.method << "," << r.seed << "," << r.chosen << "," << r.test.mean
        << "," << r.test.ci95 << "," << r.test.n << "," << r.seconds << "\n";
  const std::vector<std::string> methods{
      "pretrained + head", "pretrained + LoRA",       "FOMAML", "Reptile", "MAML (2nd order)",
      "ProtoNet",          "raw-feature nearest mean"};
  std::ostringstream svg;
  const bool sine = std::any_of(aggs.begin(), aggs.end(), [](const Agg& a) { return a.part == "sine"; });
  const bool text = std::any_of(aggs.begin(), aggs.end(), [](const Agg& a) { return a.part == "text"; });
  const double pw = 420, ph = 320;
  const double width = pw * ((sine ? 1 : 0) + (text ? 1 : 0)) + 10;
  svg << "<svg xmlns='http://www.w3.org/2000/svg' width='" << width << "' height='" << ph + 80
      << "' font-family='sans-serif'>\n<rect width='100%' height='100%' fill='white'/>\n";
  double x = 0;
  if (sine) {
    double ymax = 0;
    for (const Agg& a : aggs)
      if (a.part == "sine") ymax = std::max(ymax, a.mean + a.ci95);
    svg_panel(svg, x, 0, pw, ph, "Sinusoid regression: test MSE (lower is better)", "query MSE after adaptation", aggs,
              "sine", methods, {"K=5", "K=10"}, std::ceil(ymax * 1.15 * 2) / 2);
    x += pw;
  }
  if (text) {
    svg_panel(svg, x, 0, pw, ph, "fortunes, unseen classes: 5-way accuracy", "query accuracy", aggs, "text", methods,
              {"5w1s", "5w5s"}, 1.0);
    const double y = 30 + (ph - 70) * (1.0 - 0.2);  // the panel's plot area: top 30, bottom margin 40
    svg << "<line x1='" << x + 50 << "' x2='" << x + pw - 10 << "' y1='" << y << "' y2='" << y
        << "' stroke='black' stroke-dasharray='4,3'/>\n<text x='" << x + pw - 12 << "' y='" << y - 3
        << "' text-anchor='end' font-size='9'>chance</text>\n";
  }
  for (std::size_t m = 0; m < methods.size(); ++m) {
    const char* colors[] = {"#9e9e9e", "#616161", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e"};
    const double lx = 10 + 165.0 * static_cast<double>(m % 4);
    const double ly = ph + 22 + 16.0 * static_cast<double>(m / 4);
    svg << "<rect x='" << lx << "' y='" << ly << "' width='10' height='10' fill='" << colors[m] << "'/><text x='"
        << lx + 14 << "' y='" << ly + 9 << "' font-size='11'>" << svg_escape(methods[m]) << "</text>\n";
  }
  svg << "<text x='10' y='" << ph + 70
      << "' font-size='10' fill='#555'>bars: mean over seeds; whiskers: 95 % CI over test episodes (mean of the "
         "seeds' intervals)</text>\n</svg>\n";
  std::ofstream(o.out + "/fewshot.svg") << svg.str();
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  std::string from_csv;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw peft::ConfigError("fewshot_study: " + a + " needs a value");
      return argv[++i];
    };
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--check") {
      o.check = true;
    } else if (a == "--out") {
      o.out = next();
    } else if (a == "--fortunes") {
      o.fortunes = next();
    } else if (a == "--parts") {
      o.parts = next();
    } else if (a == "--seeds") {
      o.seeds = std::stoi(next());
    } else if (a == "--from-csv") {
      from_csv = next();
    } else if (a == "--sine-iters") {
      o.sine_iters = std::stoi(next());
    } else if (a == "--sine-pre-iters") {
      o.sine_pre_iters = std::stoi(next());
    } else if (a == "--text-iters") {
      o.text_iters = std::stoi(next());
    } else if (a == "--text-train-query") {
      o.text_train_query = std::stoi(next());
    } else if (a == "--buckets") {
      o.buckets = std::stoi(next());
    } else if (a == "--hidden") {
      o.hidden = std::stoi(next());
    } else if (a == "--embed") {
      o.embed_dim = std::stoi(next());
    } else {
      std::fprintf(stderr,
                   "usage: fewshot_study [--quick] [--check] [--seeds N] [--parts sine,text] [--out DIR] "
                   "[--fortunes DIR] [--sine-iters N] [--sine-pre-iters N] [--text-iters N] [--text-train-query Q] "
                   "[--buckets B] [--hidden H] [--embed E] [--from-csv FILE]\n");
      return 2;
    }
  }
  if (o.quick) {
    o.seeds = 1;
    o.sine_iters = 300;
    o.sine_pre_iters = 300;
    o.sine_val = 20;
    o.sine_test = 100;
    o.text_iters = 60;
    o.text_pre_iters = 150;
    o.text_val = 20;
    o.text_test = 100;
  }
  const auto start = std::chrono::steady_clock::now();
  std::vector<Row> rows;
  if (!from_csv.empty()) {  // table and SVG again from a run's CSV, nothing trained
    std::ifstream in(from_csv);
    std::string line;
    std::getline(in, line);
    int max_seed = 0;
    while (std::getline(in, line)) {
      std::vector<std::string> f;
      std::stringstream ls(line);
      std::string cell;
      while (std::getline(ls, cell, ',')) f.push_back(cell);
      if (f.size() != 9) continue;
      Row r;
      r.part = f[0];
      r.setting = f[1];
      r.method = f[2];
      r.seed = std::stoi(f[3]);
      r.chosen = f[4];
      r.test.mean = std::stod(f[5]);
      r.test.ci95 = std::stod(f[6]);
      r.test.n = std::stol(f[7]);
      r.seconds = std::stod(f[8]);
      max_seed = std::max(max_seed, r.seed);
      rows.push_back(r);
    }
    o.seeds = max_seed;
    o.parts.clear();
  }
  if (o.parts.find("sine") != std::string::npos) {
    std::fprintf(stderr, "(1) sinusoid regression: 1-40-40-1 tanh MLP, 5 inner steps, %d seeds\n", o.seeds);
    run_sine(o, rows);
  }
  bool have_text = false;
  if (o.parts.find("text") != std::string::npos) {
    TextData d;
    have_text = load_fortunes(o, d);
    if (!have_text) {
      std::fprintf(stderr, "(2) skipped: no fortunes files under %s (Debian package `fortunes`)\n", o.fortunes.c_str());
    } else {
      std::fprintf(stderr,
                   "(2) fortunes text: %zu classes (%zu train, %zu validation, %zu test), %ld texts, hashed "
                   "word + byte-trigram bag of %ld buckets -> %d -> %d tanh MLP\n",
                   d.class_names.size(), d.train_classes.size(), d.val_classes.size(), d.test_classes.size(),
                   static_cast<long>(d.features.rows()), static_cast<long>(d.features.cols()), o.hidden, o.embed_dim);
      std::string test_names;
      for (std::int64_t c : d.test_classes) test_names += " " + d.class_names[static_cast<std::size_t>(c)];
      std::fprintf(stderr, "    test classes:%s\n", test_names.c_str());
      run_text(o, d, rows);
    }
  }
  const std::vector<Agg> aggs = aggregate(rows);
  write_outputs(o, rows, aggs);
  std::printf(
      "\n| part | setting | method | seeds | test metric (mean over seeds) | 95 %% CI (episodes) | sd over seeds | "
      "chosen (per seed) |\n|---|---|---|---|---|---|---|---|\n");
  for (const Agg& a : aggs)
    std::printf("| %s | %s | %s | %d | %s %.3f | ± %.3f | %.3f | %s |\n", a.part.c_str(), a.setting.c_str(),
                a.method.c_str(), a.seeds, a.part == "sine" ? "MSE" : "acc", a.mean, a.ci95, a.seed_sd,
                a.chosen.c_str());
  std::printf(
      "\n%ld test episodes per method and setting and seed; total %.0f s; wrote %s/fewshot.csv, %s/fewshot.svg\n",
      static_cast<long>(rows.empty() ? 0 : rows.front().test.n), seconds_since(start), o.out.c_str(), o.out.c_str());
  if (o.check) {
    // What even a --quick run must show: on the sinusoid every method beats the zero predictor
    // (its MSE is E[A²]/2 ≈ 4.25) and second-order MAML clearly so; on text no method is below 5-way
    // chance, and the raw-feature nearest mean and LoRA fine-tuning are significantly above it.
    bool ok = true;
    for (const Agg& a : aggs) {
      bool good = true;
      if (a.part == "sine") good = a.mean < 4.25 && (a.method != "MAML (2nd order)" || a.mean < 3.5);
      if (a.part == "text") {
        good = a.mean + a.ci95 > 0.2;
        if (a.method == "raw-feature nearest mean" || a.method == "pretrained + LoRA") good = a.mean - a.ci95 > 0.2;
      }
      if (!good) {
        std::fprintf(stderr, "CHECK FAILED: %s %s %s = %.3f ± %.3f\n", a.part.c_str(), a.setting.c_str(),
                     a.method.c_str(), a.mean, a.ci95);
        ok = false;
      }
    }
    if (!ok) return 1;
  }
  return 0;
}
