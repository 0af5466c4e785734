// preference_study: the preference-tuning pipeline on a small language model, with a preference that
// is scored exactly (README.md in this directory has the commands and the table it produced).
//
//   pretrain  a LlamaForCausalLM from scratch on Debian's English fortunes (byte tokenizer), as
//             examples/lm_finetune does
//   SFT       a LoRA adapter "sft" trained on the same text, then kept active and frozen
//   pairs     for prompts (the first bytes of a record), two continuations sampled from the SFT model;
//             the preferred one uses the letter "e" (e or E) less often per character (a lipogram
//             preference: both continuations have the same number of bytes, so length cannot solve
//             it, and the true preference of any text is computed exactly)
//   reward    a reward model (the pretrained backbone + LoRA "reward" + a scalar head) trained with
//             Bradley–Terry on the train pairs; accuracy on held-out pairs; normalisation statistics
//             over the SFT model's samples; saved with io::save_reward_model (seed 0)
//   methods   rows of method_rows(), each a function from the SFT model to a tuned policy: "sft" (no
//             training: the baseline) and DPO, IPO and conservative DPO with a LoRA adapter "policy"
//             beside "sft"; the reference is the policy adapter switched off
//             (DPOTrainOptions::reference_disabled = {"policy"}), i.e. exactly the SFT model
//
// Reported over training (at evenly spaced steps) on held-out test prompts: the normalised reward of
// the policy's samples, the true preference rate (the fraction of prompts where the policy's sample
// has a lower e-rate than the SFT model's sample; ties count one half), the KL to the reference
// (Monte-Carlo estimate of KL(π ‖ π_ref) over the sampled continuations, nats per continuation) and
// held-out bits per byte. β and the learning rate of each method are chosen on validation prompts
// (seed 0): the highest preference rate whose KL stays within --kl-budget. Then 3 seeds (a different
// SFT adapter, sampled pairs, reward model and policy each) give mean ± half the range.
#include <peft/io/reward_model.hpp>
#include <peft/io/tokenizer.hpp>
#include <peft/loss/bradley_terry.hpp>
#include <peft/loss/causal_lm.hpp>
#include <peft/loss/preference.hpp>
#include <peft/models/generation.hpp>
#include <peft/models/peft_model.hpp>
#include <peft/models/reward_model.hpp>
#include <peft/optim/adam.hpp>
#include <peft/optim/clip.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/train/ppo.hpp>
#include <peft/train/preference.hpp>

#include <dirent.h>
#include <sys/stat.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

using T = float;
using peft::Index;
using peft::LlamaForCausalLM;
using peft::Matrix;
using peft::io::Json;
using peft::io::Tokenizer;
using Clock = std::chrono::steady_clock;
using Model = LlamaForCausalLM<T>;

// ------------------------------------------------------------------------------------------------
// Options.
// ------------------------------------------------------------------------------------------------
struct Options {
  std::string source_dir = "/usr/share/games/fortunes";
  std::string out = "preference_study_out";
  int seeds = 3;
  bool quick = false, check = false;
  Index hidden = 64, layers = 2, heads = 4, kv_heads = 2, intermediate = 128, seq = 64, batch = 16;
  int pretrain_steps = 400, sft_steps = 100, rm_steps = 120, dpo_steps = 80, evals = 4;
  Index prompt_bytes = 12, continuation = 24;
  Index train_prompts = 256, val_prompts = 64, test_prompts = 96, pair_batch = 8;
  Index eval_bytes = 4000;
  double kl_budget = 6.0;  ///< nats per continuation, for the choice on validation
  bool grid = true;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "%s\nusage: preference_study [--quick] [--check] [--seeds N] [--out DIR] [--source-dir DIR]\n"
               "                        [--kl-budget NATS] [--dpo-steps N] [--no-grid]\n",
               why.c_str());
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    auto number = [&]() -> long {
      const std::string v = value();
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (end == v.c_str() || *end != '\0' || n <= 0) usage(a + " needs a positive integer, got \"" + v + "\"");
      return n;
    };
    if (a == "--quick") {
      o.quick = true;
      o.seeds = 1;
      o.grid = false;
      o.hidden = 32;
      o.intermediate = 64;
      o.batch = 8;
      o.pretrain_steps = 60;
      o.sft_steps = 15;
      o.rm_steps = 25;
      o.dpo_steps = 12;
      o.evals = 2;
      o.train_prompts = 48;
      o.val_prompts = 8;
      o.test_prompts = 24;
      o.continuation = 16;
      o.eval_bytes = 1500;
    } else if (a == "--check") {
      o.check = true;
    } else if (a == "--seeds") {
      o.seeds = static_cast<int>(number());
    } else if (a == "--out") {
      o.out = value();
    } else if (a == "--source-dir") {
      o.source_dir = value();
    } else if (a == "--kl-budget") {
      o.kl_budget = std::atof(value().c_str());
      if (!(o.kl_budget > 0)) usage("--kl-budget must be > 0");
    } else if (a == "--dpo-steps") {
      o.dpo_steps = static_cast<int>(number());
    } else if (a == "--no-grid") {
      o.grid = false;
    } else if (a == "--help" || a == "-h") {
      usage("preference_study: SFT -> reward model -> DPO / IPO / cDPO with adapters, on a lipogram preference");
    } else {
      usage("unknown option " + a);
    }
  }
  return o;
}

// ------------------------------------------------------------------------------------------------
// Data (as examples/lm_finetune: fortune files are records separated by lines holding "%").
// ------------------------------------------------------------------------------------------------
std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw peft::IoError("preference_study: cannot read \"" + path + "\"");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> read_fortunes(const std::string& dir, const std::vector<std::string>& names) {
  std::vector<std::string> records;
  for (const std::string& n : names) {
    struct stat st {};
    if (::lstat((dir + "/" + n).c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    std::istringstream in(read_file(dir + "/" + n));
    std::string line, rec;
    auto flush = [&]() {
      bool ascii = rec.size() > 30;
      for (unsigned char ch : rec) ascii = ascii && (ch == '\n' || (ch >= 32 && ch < 127));
      if (ascii) records.push_back(rec);
      rec.clear();
    };
    while (std::getline(in, line)) {
      if (line == "%") {
        flush();
      } else {
        rec += line;
        rec += '\n';
      }
    }
    flush();
  }
  if (records.empty())
    throw peft::IoError("preference_study: no fortune records in \"" + dir + "\" (Debian: apt install fortunes)");
  return records;
}

/// Record i: test when i % 10 == 0, validation when 1, else train (examples/lm_finetune's split).
struct Split {
  std::vector<std::string> train, val, test;
};
Split split(const std::vector<std::string>& records) {
  Split s;
  for (std::size_t i = 0; i < records.size(); ++i)
    (i % 10 == 0 ? s.test : i % 10 == 1 ? s.val : s.train).push_back(records[i]);
  return s;
}

std::vector<Index> token_stream(const Tokenizer& tok, const std::vector<std::string>& records, Index eos,
                                Index max_bytes) {
  std::vector<Index> out;
  Index bytes = 0;
  for (const std::string& r : records) {
    if (max_bytes > 0 && bytes >= max_bytes) break;
    for (std::int32_t id : tok.encode(r, false)) out.push_back(id);
    out.push_back(eos);
    bytes += static_cast<Index>(r.size());
  }
  return out;
}

/// The prompts of a split: each record's first `bytes` bytes (newlines as spaces), every record once.
std::vector<std::vector<Index>> prompts_of(const std::vector<std::string>& records, Index bytes, Index count) {
  std::vector<std::vector<Index>> out;
  for (const std::string& r : records) {
    if (static_cast<Index>(out.size()) >= count) break;
    std::vector<Index> p;
    for (Index i = 0; i < bytes; ++i)
      p.push_back(r[static_cast<std::size_t>(i)] == '\n' ? ' ' : r[static_cast<std::size_t>(i)]);
    out.push_back(p);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// The preference: the fraction of generated tokens that are the byte 'e' or 'E' (lower is better).
// ------------------------------------------------------------------------------------------------
double e_rate(const std::vector<Index>& seq, Index prompt_len) {
  Index e = 0;
  for (std::size_t t = static_cast<std::size_t>(prompt_len); t < seq.size(); ++t) e += (seq[t] == 'e' || seq[t] == 'E');
  return static_cast<double>(e) / static_cast<double>(seq.size() - static_cast<std::size_t>(prompt_len));
}

struct Pair {
  std::vector<Index> chosen, rejected;  ///< prompt + continuation, the same length
};

// ------------------------------------------------------------------------------------------------
// Training and evaluation helpers.
// ------------------------------------------------------------------------------------------------
/// Language-model training (AdamW, 10 % warmup + cosine, clipping at 1) on random windows.
void train_lm(Model& model, const std::vector<Index>& stream, int steps, double lr, Index batch, Index seq,
              std::uint64_t seed) {
  peft::Rng rng(seed);
  peft::AdamW<T> opt(model, peft::AdamWOptions{lr, 0.9, 0.999, 1e-8, 0.0});
  const peft::CosineSchedule schedule(std::max(1, steps / 10), steps);
  const auto params = peft::trainable_parameters(model);
  const peft::SequenceLayout layout(batch, seq);
  std::vector<Index> ids(static_cast<std::size_t>(batch * seq));
  std::vector<std::int64_t> labels(ids.size());
  Matrix<T> logits, dlogits;
  Model::Cache cache;
  model.train();
  for (int step = 0; step < steps; ++step) {
    for (Index b = 0; b < batch; ++b) {
      const Index start = static_cast<Index>(rng.uniform_int(stream.size() - static_cast<std::size_t>(seq)));
      std::copy_n(stream.begin() + start, seq, ids.begin() + b * seq);
    }
    std::copy(ids.begin(), ids.end(), labels.begin());
    peft::apply_schedule(opt, schedule, step);
    opt.zero_grad();
    model.forward(ids, layout, logits, cache);
    peft::causal_lm_loss<T>(logits, labels, layout, &dlogits);
    model.backward(cache, dlogits);
    peft::clip_grad_norm(params, 1.0);
    opt.step();
  }
  model.eval();
}

/// Held-out bits per byte (non-overlapping windows; every byte token counts one byte).
double bits_per_byte(Model& model, const std::vector<Index>& stream, Index seq, Index eos) {
  model.eval();
  const Index windows = std::max<Index>(1, static_cast<Index>(stream.size()) / seq);
  Matrix<T> logits;
  Model::Cache cache;
  double nll = 0.0;
  std::int64_t bytes = 0;
  for (Index w0 = 0; w0 < windows; w0 += 16) {
    const Index B = std::min<Index>(16, windows - w0);
    std::vector<Index> ids(stream.begin() + w0 * seq, stream.begin() + (w0 + B) * seq);
    std::vector<std::int64_t> labels(ids.begin(), ids.end());
    const peft::SequenceLayout layout(B, seq);
    model.forward(ids, layout, logits, cache);
    peft::CausalLMStats s;
    peft::causal_lm_loss<T>(logits, labels, layout, nullptr, &s);
    nll += s.nll_sum;
    for (Index b = 0; b < B; ++b)
      for (Index t = 1; t < seq; ++t) bytes += ids[static_cast<std::size_t>(b * seq + t)] != eos ? 1 : 0;
  }
  return peft::bits_per_byte(nll, bytes);
}

/// One continuation per prompt, sampled at temperature 1 (no top-k: the KL estimate needs π's own samples).
std::vector<std::vector<Index>> sample_continuations(Model& model, const std::vector<std::vector<Index>>& prompts,
                                                     Index tokens, std::uint64_t seed) {
  peft::GenerationConfig gc;
  gc.max_new_tokens = tokens;
  gc.do_sample = true;
  gc.temperature = 1.0;
  peft::Rng rng(seed);
  model.eval();
  std::vector<std::vector<Index>> out;
  for (std::size_t b0 = 0; b0 < prompts.size(); b0 += 32) {
    const std::vector<std::vector<Index>> chunk(
        prompts.begin() + static_cast<std::ptrdiff_t>(b0),
        prompts.begin() + static_cast<std::ptrdiff_t>(std::min(prompts.size(), b0 + 32)));
    for (auto& s : peft::generate_batch(model, chunk, gc, rng)) out.push_back(std::move(s));
  }
  return out;
}

/// Sequence log-probs [n, 1] of the continuations (tokens after the prompt) under the model as it is.
Matrix<T> continuation_log_probs(Model& model, const std::vector<std::vector<Index>>& seqs, Index prompt_len) {
  const Index n = static_cast<Index>(seqs.size()), S = static_cast<Index>(seqs.front().size());
  Matrix<T> out(n, 1), lp, logits;
  Model::Cache cache;
  peft::SequenceLogProbWorkspace<T> ws;
  for (Index b0 = 0; b0 < n; b0 += 32) {
    const Index B = std::min<Index>(32, n - b0);
    std::vector<Index> ids;
    std::vector<std::int64_t> labels;
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < S; ++t) {
        const Index id = seqs[static_cast<std::size_t>(b0 + b)][static_cast<std::size_t>(t)];
        ids.push_back(id);
        labels.push_back(t < prompt_len ? -100 : static_cast<std::int64_t>(id));
      }
    const peft::SequenceLayout layout(B, S);
    model.forward(ids, layout, logits, cache);
    peft::sequence_log_probs<T>(logits, labels, layout, lp, ws);
    out.middleRows(b0, B) = lp;
  }
  return out;
}

/// A preference batch of pairs [first, first + n): N chosen then N rejected, labels on the continuation.
peft::PreferenceBatch preference_batch(const std::vector<Pair>& pairs, const std::vector<std::size_t>& order,
                                       std::size_t first, Index n, Index prompt_len) {
  peft::PreferenceBatch b;
  const Index S = static_cast<Index>(pairs.front().chosen.size());
  for (int side = 0; side < 2; ++side)
    for (Index i = 0; i < n; ++i) {
      const Pair& p = pairs[order[(first + static_cast<std::size_t>(i)) % order.size()]];
      const std::vector<Index>& s = side == 0 ? p.chosen : p.rejected;
      for (Index t = 0; t < S; ++t) {
        b.ids.push_back(s[static_cast<std::size_t>(t)]);
        b.labels.push_back(t < prompt_len ? -100 : static_cast<std::int64_t>(s[static_cast<std::size_t>(t)]));
      }
    }
  b.layout = peft::SequenceLayout(2 * n, S);
  return b;
}

struct Summary {
  double mean = 0.0, spread = 0.0;  ///< spread: half the range over seeds
};
Summary summarize(const std::vector<double>& v) {
  Summary s;
  if (v.empty()) return s;
  double lo = v.front(), hi = v.front(), sum = 0.0;
  for (double x : v) {
    lo = std::min(lo, x);
    hi = std::max(hi, x);
    sum += x;
  }
  s.mean = sum / static_cast<double>(v.size());
  s.spread = 0.5 * (hi - lo);
  return s;
}
std::string pm(const Summary& s, int prec) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f ± %.*f", prec, s.mean, prec, s.spread);
  return buf;
}

// ------------------------------------------------------------------------------------------------
// One seed's pipeline state: the SFT model (PeftModel with "sft" active and frozen), the pairs, the
// reward model, and the SFT model's own samples on the evaluation prompts.
// ------------------------------------------------------------------------------------------------
struct Metrics {
  int step = 0;
  double reward = 0.0, preference = 0.0, kl = 0.0, bpb = 0.0, e_rate = 0.0;
  std::vector<std::vector<Index>> examples;  ///< the first few samples
};

struct Study;

struct SeedState {
  int seed = 0;
  Model model;  ///< base + "sft" (+ "policy" while a method runs)
  std::unique_ptr<peft::PeftModel<T>> pm;
  std::vector<Pair> train_pairs, val_pairs, test_pairs;
  std::unique_ptr<peft::LlamaRewardModel<T>> rm;
  peft::RewardNormalization norm;
  double rm_accuracy = 0.0, rm_val_accuracy = 0.0;
  /// The SFT model's samples on the val / test prompts (the preference rate's comparison).
  std::vector<std::vector<Index>> sft_val, sft_test;
};

struct Study {
  const Options& o;
  Tokenizer tok = Tokenizer::bytes({"<|endoftext|>"});
  Index eos = 256;
  Split records;
  std::vector<Index> train_stream, test_stream;
  std::vector<std::vector<Index>> train_prompts, val_prompts, test_prompts;
  Model base;
  explicit Study(const Options& opt) : o(opt) {}

  /// Metrics of the model as it is (policy adapter on when present) on `prompts`, against the SFT
  /// model's samples `sft` of the same prompts.
  Metrics evaluate(SeedState& st, const std::vector<std::vector<Index>>& prompts,
                   const std::vector<std::vector<Index>>& sft, std::uint64_t seed, bool with_bpb) {
    Metrics m;
    const std::vector<std::vector<Index>> samples = sample_continuations(st.model, prompts, o.continuation, seed);
    const Matrix<T> lp = continuation_log_probs(st.model, samples, o.prompt_bytes);
    Matrix<T> lp_ref = lp;
    if (st.pm->has_adapter("policy")) {
      auto ref = st.pm->disable_adapter("policy");  // the reference: the SFT model exactly
      lp_ref = continuation_log_probs(st.model, samples, o.prompt_bytes);
    }
    Matrix<T> r;
    st.rm->eval();
    peft::score_sequences<T>(*st.rm, samples, r, 32);
    st.norm.apply<T>(r);
    double pref = 0.0, er = 0.0;
    for (std::size_t i = 0; i < samples.size(); ++i) {
      const double a = e_rate(samples[i], o.prompt_bytes), b = e_rate(sft[i], o.prompt_bytes);
      pref += a < b ? 1.0 : a == b ? 0.5 : 0.0;
      er += a;
    }
    const double n = static_cast<double>(samples.size());
    m.preference = pref / n;
    m.e_rate = er / n;
    m.reward = static_cast<double>(r.mean());
    m.kl = static_cast<double>((lp - lp_ref).mean());
    m.bpb = with_bpb ? bits_per_byte(st.model, test_stream, o.seq, eos) : NAN;
    m.examples.assign(samples.begin(),
                      samples.begin() + std::min<std::ptrdiff_t>(3, static_cast<std::ptrdiff_t>(samples.size())));
    return m;
  }
};

/// Two samples per prompt from the SFT model; the pair keeps them ordered by e-rate (ties dropped).
std::vector<Pair> make_pairs(Study& s, SeedState& st, const std::vector<std::vector<Index>>& prompts,
                             std::uint64_t seed) {
  std::vector<std::vector<Index>> doubled;
  for (const auto& p : prompts) {
    doubled.push_back(p);
    doubled.push_back(p);
  }
  const auto samples = sample_continuations(st.model, doubled, s.o.continuation, seed);
  std::vector<Pair> pairs;
  for (std::size_t i = 0; i + 1 < samples.size(); i += 2) {
    const double a = e_rate(samples[i], s.o.prompt_bytes), b = e_rate(samples[i + 1], s.o.prompt_bytes);
    if (a == b) continue;
    pairs.push_back(a < b ? Pair{samples[i], samples[i + 1]} : Pair{samples[i + 1], samples[i]});
  }
  return pairs;
}

double rm_accuracy(peft::LlamaRewardModel<T>& rm, const std::vector<Pair>& pairs) {
  std::vector<std::vector<Index>> c, r;
  for (const Pair& p : pairs) {
    c.push_back(p.chosen);
    r.push_back(p.rejected);
  }
  Matrix<T> rc, rr;
  rm.eval();
  peft::score_sequences<T>(rm, c, rc, 32);
  peft::score_sequences<T>(rm, r, rr, 32);
  double acc = 0.0;
  for (Index i = 0; i < rc.rows(); ++i) acc += rc(i, 0) > rr(i, 0) ? 1.0 : rc(i, 0) == rr(i, 0) ? 0.5 : 0.0;
  return acc / static_cast<double>(rc.rows());
}

const Json& reward_lora() {
  static const Json cfg = {{"peft_type", "LORA"}, {"r", 8}, {"lora_alpha", 16}, {"target_modules", "all-linear"}};
  return cfg;
}

/// The reward model: the pretrained backbone + LoRA "reward" + the head, Bradley–Terry on the pairs.
std::unique_ptr<peft::LlamaRewardModel<T>> train_reward_model(Study& s, const std::vector<Pair>& pairs, double lr,
                                                              std::uint64_t seed) {
  peft::Rng rng(seed);
  Model copy = s.base;
  auto rm = std::make_unique<peft::LlamaRewardModel<T>>(s.base.config(), std::move(copy.model), rng);
  rm->model.visit_parameters([](const std::string&, peft::Parameter<T>& p) { p.set_trainable(false); });
  Json cfg = reward_lora();
  cfg["target_modules"] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  peft::io::apply_method<T>(*rm, cfg, "reward", rng);
  peft::AdamW<T> opt(*rm, peft::AdamWOptions{lr, 0.9, 0.999, 1e-8, 0.0});
  const auto params = peft::trainable_parameters(*rm);
  std::vector<std::size_t> order(pairs.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  const Index n = std::min<Index>(s.o.pair_batch * 2, static_cast<Index>(pairs.size()));
  typename peft::LlamaRewardModel<T>::Cache cache;
  Matrix<T> r, dc, dr, dreward(2 * n, 1);
  rm->train();
  for (int step = 0; step < s.o.rm_steps; ++step) {
    if ((static_cast<std::size_t>(step) * static_cast<std::size_t>(n)) % order.size() < static_cast<std::size_t>(n))
      for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.uniform_int(i)]);
    const peft::PreferenceBatch b =
        preference_batch(pairs, order, static_cast<std::size_t>(step) * static_cast<std::size_t>(n), n, 0);
    opt.zero_grad();
    rm->forward(b.ids, b.layout, r, cache);
    peft::bradley_terry<T>(r.topRows(n), r.bottomRows(n), &dc, &dr);
    dreward.topRows(n) = dc;
    dreward.bottomRows(n) = dr;
    rm->backward(cache, dreward);
    peft::clip_grad_norm(params, 1.0);
    opt.step();
  }
  rm->eval();
  return rm;
}

// ------------------------------------------------------------------------------------------------
// The methods: one row each. A row's function takes the seed's SFT model and hyper-parameters and
// returns its metrics over training (the first entry at step 0). A new method (e.g. PPO) is one
// more function and one more row.
// ------------------------------------------------------------------------------------------------
struct Hyper {
  double beta = 0.1, lr = 1e-3;
};

using MethodFn = std::function<std::vector<Metrics>(Study&, SeedState&, const Hyper&, bool validation)>;

struct MethodRow {
  const char* name;
  MethodFn run;
  std::vector<Hyper> grid;  ///< tried on validation (seed 0); empty: no hyper-parameters
};

/// The baseline: the SFT model itself, no training.
std::vector<Metrics> run_sft(Study& s, SeedState& st, const Hyper&, bool validation) {
  const auto& prompts = validation ? s.val_prompts : s.test_prompts;
  const auto& sft = validation ? st.sft_val : st.sft_test;
  return {s.evaluate(st, prompts, sft, 900 + static_cast<std::uint64_t>(st.seed), !validation)};
}

/// DPO-family training of a LoRA adapter "policy" beside the frozen "sft"; the reference is the
/// policy adapter switched off. Evaluated at o.evals + 1 evenly spaced steps (validation: at the end).
std::vector<Metrics> run_preference_loss(Study& s, SeedState& st, const Hyper& h, bool validation,
                                         peft::PreferenceLoss loss, double label_smoothing, bool average) {
  peft::PeftModel<T>& pm = *st.pm;
  const Json policy_cfg = {{"peft_type", "LORA"}, {"r", 8}, {"lora_alpha", 16}, {"target_modules", "all-linear"}};
  pm.add_adapter("policy", policy_cfg);
  pm.set_adapter({"sft", "policy"});
  for (auto& [path, host] : peft::io::adapted_linears<T>(st.model))  // "sft" active and frozen
    if (host->has_adapter("sft")) host->method("sft").set_trainable(false);
  peft::DPOTrainOptions o;
  o.loss = peft::DPOOptions{h.beta, loss, label_smoothing};
  o.average_log_probs = average;
  o.reference_disabled = {"policy"};
  peft::DPOObjective<T, Model> dpo(st.model, o);
  peft::AdamW<T> opt(st.model, peft::AdamWOptions{h.lr, 0.9, 0.999, 1e-8, 0.0});
  const auto params = peft::trainable_parameters(st.model);
  const int steps = s.o.dpo_steps;
  const peft::CosineSchedule schedule(std::max(1, steps / 10), steps);
  peft::Rng rng(5000 + static_cast<std::uint64_t>(st.seed));
  std::vector<std::size_t> order(st.train_pairs.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  const auto& prompts = validation ? s.val_prompts : s.test_prompts;
  const auto& sft = validation ? st.sft_val : st.sft_test;
  const std::uint64_t eval_seed = 900 + static_cast<std::uint64_t>(st.seed);
  std::vector<Metrics> out;
  if (!validation) out.push_back(s.evaluate(st, prompts, sft, eval_seed, true));
  const Index n = s.o.pair_batch;
  for (int step = 0; step < steps; ++step) {
    if ((static_cast<std::size_t>(step) * static_cast<std::size_t>(n)) % order.size() < static_cast<std::size_t>(n))
      for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.uniform_int(i)]);
    const peft::PreferenceBatch b = preference_batch(
        st.train_pairs, order, static_cast<std::size_t>(step) * static_cast<std::size_t>(n), n, s.o.prompt_bytes);
    st.model.train();
    peft::apply_schedule(opt, schedule, step);
    opt.zero_grad();
    dpo.step(b);
    peft::clip_grad_norm(params, 1.0);
    opt.step();
    st.model.eval();
    const bool at_eval = validation ? step + 1 == steps : (step + 1) * s.o.evals % steps < s.o.evals;
    if (at_eval) {
      out.push_back(s.evaluate(st, prompts, sft, eval_seed, !validation));
      out.back().step = step + 1;
    }
  }
  pm.delete_adapter("policy");  // back to the SFT model ("sft" stays active)
  return out;
}

/// PPO (train/ppo.hpp, TRL's recipe) of a LoRA adapter "policy" beside the frozen "sft", with a value
/// head on the shared backbone; the reward is the reward model's normalised score of the whole
/// sequence, minus β per-token KL to the reference (the policy adapter switched off:
/// PPOOptions::reference_disabled). h.beta is the initial KL coefficient (Ziegler et al.'s adaptive
/// controller, target o.kl_budget nats, TRL's horizon 10000). One iteration = one rollout of
/// o.pair_batch train prompts (o.continuation sampled bytes each, temperature 1), then 2 PPO epochs
/// over it as one minibatch; as many iterations as DPO steps, constant lr, clipping at 1.
std::vector<Metrics> run_ppo(Study& s, SeedState& st, const Hyper& h, bool validation) {
  peft::PeftModel<T>& pm = *st.pm;
  pm.add_adapter("policy",
                 Json{{"peft_type", "LORA"}, {"r", 8}, {"lora_alpha", 16}, {"target_modules", "all-linear"}});
  pm.set_adapter({"sft", "policy"});
  for (auto& [path, host] : peft::io::adapted_linears<T>(st.model))  // "sft" active and frozen
    if (host->has_adapter("sft")) host->method("sft").set_trainable(false);
  peft::Rng rng(7000 + static_cast<std::uint64_t>(st.seed));
  peft::ValueHead<T> v_head(st.model.config().hidden_size, rng);
  peft::PPOOptions po;
  po.generation.max_new_tokens = s.o.continuation;
  po.ppo_epochs = 2;
  po.mini_batch_size = s.o.pair_batch;
  po.init_kl_coef = h.beta;
  po.target_kl = s.o.kl_budget;
  po.max_grad_norm = 1.0;
  po.reference_disabled = {"policy"};
  peft::PPOTrainer<T> ppo(st.model, v_head, po);
  peft::AdamW<T> opt(ppo.trainable_parameters(), peft::AdamWOptions{h.lr, 0.9, 0.999, 1e-8, 0.0});
  const int steps = s.o.dpo_steps;
  const auto& prompts = validation ? s.val_prompts : s.test_prompts;
  const auto& sft = validation ? st.sft_val : st.sft_test;
  const std::uint64_t eval_seed = 900 + static_cast<std::uint64_t>(st.seed);
  std::vector<Metrics> out;
  if (!validation) out.push_back(s.evaluate(st, prompts, sft, eval_seed, true));
  std::vector<std::size_t> order(s.train_prompts.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  const std::size_t n = static_cast<std::size_t>(s.o.pair_batch);
  std::vector<std::vector<Index>> batch(n);
  peft::PPORollout<T> r;
  double kl = 0.0, score = 0.0;
  for (int step = 0; step < steps; ++step) {
    const std::size_t at = static_cast<std::size_t>(step) * n;
    if (at % order.size() < n)
      for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.uniform_int(i)]);
    for (std::size_t i = 0; i < n; ++i) batch[i] = s.train_prompts[order[(at + i) % order.size()]];
    st.model.eval();
    ppo.generate(batch, rng, r);
    st.rm->eval();
    peft::reward_model_scores(*st.rm, r);
    st.norm.apply<T>(r.scores);  // the study's normalised reward
    ppo.evaluate(r);
    st.model.train();
    const peft::PPOStats ps = ppo.update(r, opt, rng);
    st.model.eval();
    kl = ps.kl;
    score = ps.score;
    const bool at_eval = validation ? step + 1 == steps : (step + 1) * s.o.evals % steps < s.o.evals;
    if (at_eval) {
      out.push_back(s.evaluate(st, prompts, sft, eval_seed, !validation));
      out.back().step = step + 1;
      if (!validation)
        std::printf("    ppo seed %d iteration %d: rollout score %.3f, KL %.2f, kl_coef %.4f\n", st.seed, step + 1,
                    score, kl, ppo.kl_coef());
    }
  }
  pm.delete_adapter("policy");  // back to the SFT model ("sft" stays active)
  return out;
}

const std::vector<MethodRow>& method_rows() {
  static const std::vector<Hyper> dpo_grid = {{0.1, 1e-3}, {0.5, 1e-3}, {0.5, 3e-3}};
  static const std::vector<Hyper> ipo_grid = {{0.5, 1e-3}, {2.0, 1e-3}, {2.0, 3e-3}};
  static const std::vector<MethodRow> rows = {
      {"sft", run_sft, {}},
      {"dpo",
       [](Study& s, SeedState& st, const Hyper& h, bool v) {
         return run_preference_loss(s, st, h, v, peft::PreferenceLoss::kSigmoid, 0.0, false);
       },
       dpo_grid},
      {"cdpo",
       [](Study& s, SeedState& st, const Hyper& h, bool v) {
         return run_preference_loss(s, st, h, v, peft::PreferenceLoss::kSigmoid, 0.1, false);
       },
       dpo_grid},
      {"ipo",
       [](Study& s, SeedState& st, const Hyper& h, bool v) {
         return run_preference_loss(s, st, h, v, peft::PreferenceLoss::kIPO, 0.0, true);
       },
       ipo_grid},
      {"ppo", run_ppo, {{0.05, 1e-3}, {0.2, 1e-3}, {0.2, 3e-3}}},
  };
  return rows;
}

// ------------------------------------------------------------------------------------------------
// One seed: SFT, pairs, reward model, SFT samples.
// ------------------------------------------------------------------------------------------------
bool prepare_seed(Study& s, SeedState& st, int seed, bool save_rm) {
  const Options& o = s.o;
  st.seed = seed;
  st.model = s.base;
  st.pm = std::make_unique<peft::PeftModel<T>>(st.model, 0x5eedULL + static_cast<std::uint64_t>(seed));
  st.pm->add_adapter("sft",
                     Json{{"peft_type", "LORA"}, {"r", 8}, {"lora_alpha", 16}, {"target_modules", "all-linear"}});
  train_lm(st.model, s.train_stream, o.sft_steps, 3e-3, o.batch, o.seq, 100 + static_cast<std::uint64_t>(seed));
  for (auto& [path, host] : peft::io::adapted_linears<T>(st.model))
    if (host->has_adapter("sft")) host->method("sft").set_trainable(false);
  const std::uint64_t base_seed = 1000 * static_cast<std::uint64_t>(seed + 1);
  st.train_pairs = make_pairs(s, st, s.train_prompts, base_seed + 1);
  st.val_pairs = make_pairs(s, st, s.val_prompts, base_seed + 2);
  st.test_pairs = make_pairs(s, st, s.test_prompts, base_seed + 3);
  st.sft_val = sample_continuations(st.model, s.val_prompts, o.continuation, base_seed + 4);
  st.sft_test = sample_continuations(st.model, s.test_prompts, o.continuation, base_seed + 5);
  st.rm = train_reward_model(s, st.train_pairs, 3e-3, base_seed + 6);
  st.rm_val_accuracy = rm_accuracy(*st.rm, st.val_pairs);
  st.rm_accuracy = rm_accuracy(*st.rm, st.test_pairs);
  std::vector<std::vector<Index>> reference;  // the SFT model's samples: normalised rewards average 0 there
  for (const Pair& p : st.train_pairs) {
    reference.push_back(p.chosen);
    reference.push_back(p.rejected);
  }
  st.norm = peft::reward_normalization<T>(*st.rm, reference, 32);
  std::printf(
      "seed %d: SFT adapter trained; %zu / %zu / %zu pairs (train / val / test); reward model accuracy "
      "%.3f (val %.3f), normalisation mean %.4f std %.4f\n",
      seed, st.train_pairs.size(), st.val_pairs.size(), st.test_pairs.size(), st.rm_accuracy, st.rm_val_accuracy,
      st.norm.mean, st.norm.std);
  if (!save_rm) return true;
  // The reward model on disk: adapter directory + head + statistics; reloaded onto a fresh copy of
  // the pretrained backbone it must give the same scores, bit for bit.
  const std::string dir = o.out + "/reward_model";
  Json cfg = reward_lora();
  cfg["target_modules"] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  peft::io::save_reward_model<T>(dir, *st.rm, "reward", cfg, st.norm);
  Model copy = s.base;
  peft::Rng rng(1);
  peft::LlamaRewardModel<T> back(s.base.config(), std::move(copy.model), rng);
  const peft::RewardNormalization n2 = peft::io::load_reward_model<T>(dir, back);
  back.eval();
  std::vector<std::vector<Index>> some(reference.begin(),
                                       reference.begin() + std::min<std::size_t>(16, reference.size()));
  Matrix<T> a, b;
  peft::score_sequences<T>(*st.rm, some, a, 8);
  peft::score_sequences<T>(back, some, b, 8);
  st.norm.apply<T>(a);
  n2.apply<T>(b);
  const bool same = a == b;
  std::printf("reward model saved to %s (adapter + reward_head.safetensors + reward_model.json); reloaded: %s\n",
              dir.c_str(), same ? "the same scores, bit for bit" : "DIFFERENT SCORES");
  return same;
}

std::string text_of(const std::vector<Index>& seq) {
  std::string s;
  for (Index id : seq)
    s += id == 256                ? std::string("<eot>")
         : id == '\n'             ? std::string(" / ")
         : (id >= 32 && id < 127) ? std::string(1, static_cast<char>(id))
                                  : std::string("?");  // a byte of a broken UTF-8 sequence
  return s;
}

void write_svg(const std::string& path, const std::vector<std::string>& names,
               const std::vector<std::vector<Metrics>>& mean_curves, const std::vector<std::vector<Metrics>>& spread,
               double sft_pref, int steps) {
  const int W = 900, H = 380, top = 50, ph = 250, pw = 330;
  const char* colors[] = {"#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"};
  std::ofstream f(path);
  f << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
    << "' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n"
    << "<text x='" << W / 2 << "' y='20' text-anchor='middle' font-size='14'>Preference tuning on the lipogram "
    << "preference (test prompts; mean ± half-range over seeds)</text>\n";
  double kl_max = 0.5;
  for (std::size_t m = 0; m < mean_curves.size(); ++m)
    for (std::size_t k = 0; k < mean_curves[m].size(); ++k)
      kl_max = std::max(kl_max, mean_curves[m][k].kl + spread[m][k].kl);
  kl_max = std::ceil(kl_max);
  auto panel = [&](int x0, const char* title, const char* ylabel, double ymin, double ymax, bool pref) {
    f << "<text x='" << x0 + pw / 2 << "' y='" << top - 10 << "' text-anchor='middle'>" << title << "</text>\n";
    auto y_of = [&](double v) { return top + ph - (v - ymin) / (ymax - ymin) * ph; };
    auto x_of = [&](double st) { return x0 + st / steps * pw; };
    for (int i = 0; i <= 4; ++i) {
      const double v = ymin + (ymax - ymin) * i / 4.0;
      f << "<line x1='" << x0 << "' x2='" << x0 + pw << "' y1='" << y_of(v) << "' y2='" << y_of(v)
        << "' stroke='#ddd'/><text x='" << x0 - 5 << "' y='" << y_of(v) + 4 << "' text-anchor='end'>" << v
        << "</text>\n";
    }
    for (int i = 0; i <= 4; ++i)
      f << "<text x='" << x_of(steps * i / 4.0) << "' y='" << top + ph + 16 << "' text-anchor='middle'>"
        << steps * i / 4 << "</text>\n";
    f << "<text x='" << x0 + pw / 2 << "' y='" << top + ph + 34 << "' text-anchor='middle'>step (DPO step / PPO iteration)</text>\n"
      << "<text x='" << x0 - 45 << "' y='" << top + ph / 2 << "' transform='rotate(-90 " << x0 - 45 << " "
      << top + ph / 2 << ")' text-anchor='middle'>" << ylabel << "</text>\n";
    if (pref)
      f << "<line x1='" << x0 << "' x2='" << x0 + pw << "' y1='" << y_of(sft_pref) << "' y2='" << y_of(sft_pref)
        << "' stroke='black' stroke-dasharray='4 3'/><text x='" << x0 + pw - 4 << "' y='" << y_of(sft_pref) - 4
        << "' text-anchor='end'>SFT</text>\n";
    for (std::size_t m = 0; m < mean_curves.size(); ++m) {
      if (mean_curves[m].size() < 2) continue;
      std::string pts;
      for (std::size_t k = 0; k < mean_curves[m].size(); ++k) {
        const Metrics& a = mean_curves[m][k];
        const double v = pref ? a.preference : a.kl, e = pref ? spread[m][k].preference : spread[m][k].kl;
        pts += std::to_string(x_of(a.step)) + "," + std::to_string(y_of(v)) + " ";
        f << "<line x1='" << x_of(a.step) << "' x2='" << x_of(a.step) << "' y1='" << y_of(v - e) << "' y2='"
          << y_of(v + e) << "' stroke='" << colors[m % 5] << "'/>\n";
      }
      f << "<polyline fill='none' stroke-width='2' stroke='" << colors[m % 5] << "' points='" << pts << "'/>\n";
    }
  };
  panel(80, "true preference rate vs the SFT model's samples", "preference rate", 0.0, 1.0, true);
  panel(540, "KL(policy || reference), nats per continuation", "KL", 0.0, kl_max, false);
  int lx = 80;
  for (std::size_t m = 0; m < names.size(); ++m) {
    if (mean_curves[m].size() < 2) continue;
    f << "<rect x='" << lx << "' y='" << H - 22 << "' width='12' height='12' fill='" << colors[m % 5] << "'/><text x='"
      << lx + 16 << "' y='" << H - 12 << "'>" << names[m] << "</text>\n";
    lx += 90;
  }
  f << "</svg>\n";
}

int run(const Options& o) {
  const auto t0 = Clock::now();
  ::mkdir(o.out.c_str(), 0777);
  Study s(o);
  const std::vector<std::string> english = {"fortunes",  "wisdom", "literature", "humorists", "people",
                                            "science",   "work",   "education",  "love",      "politics",
                                            "men-women", "pets",   "food"};
  s.records = split(read_fortunes(o.source_dir, english));
  s.train_stream = token_stream(s.tok, s.records.train, s.eos, 0);
  s.test_stream = token_stream(s.tok, s.records.test, s.eos, o.eval_bytes);
  s.train_prompts = prompts_of(s.records.train, o.prompt_bytes, o.train_prompts);
  s.val_prompts = prompts_of(s.records.val, o.prompt_bytes, o.val_prompts);
  s.test_prompts = prompts_of(s.records.test, o.prompt_bytes, o.test_prompts);
  std::printf(
      "fortunes: %zu train / %zu val / %zu test records; %zu train tokens; prompts %zu / %zu / %zu of %ld "
      "bytes, continuations of %ld bytes\n",
      s.records.train.size(), s.records.val.size(), s.records.test.size(), s.train_stream.size(),
      s.train_prompts.size(), s.val_prompts.size(), s.test_prompts.size(), static_cast<long>(o.prompt_bytes),
      static_cast<long>(o.continuation));

  peft::LlamaConfig c;
  c.vocab_size = static_cast<Index>(s.tok.vocab_size());
  c.hidden_size = o.hidden;
  c.intermediate_size = o.intermediate;
  c.num_hidden_layers = o.layers;
  c.num_attention_heads = o.heads;
  c.num_key_value_heads = o.kv_heads;
  c.max_position_embeddings = o.seq;
  c.rms_norm_eps = 1e-5;
  peft::Rng init_rng(2024);
  s.base = Model(c, init_rng);
  train_lm(s.base, s.train_stream, o.pretrain_steps, 3e-3, o.batch, o.seq, 1);
  s.base.freeze_all();
  std::printf("pretrained (%ld hidden, %ld layers, %s parameters, %d steps): held-out bits/byte %.3f  [%.0f s]\n",
              static_cast<long>(c.hidden_size), static_cast<long>(c.num_hidden_layers),
              peft::with_thousands(peft::count_parameters(s.base).total).c_str(), o.pretrain_steps,
              bits_per_byte(s.base, s.test_stream, o.seq, s.eos),
              std::chrono::duration<double>(Clock::now() - t0).count());

  bool ok = true;
  const auto& rows = method_rows();
  std::vector<Hyper> chosen(rows.size());
  std::vector<std::vector<std::vector<Metrics>>> curves(rows.size());  // [method][seed][eval]
  std::vector<std::string> sample_lines;
  std::ofstream runs(o.out + "/runs.csv");
  runs << "method,seed,beta,lr,split,step,reward,preference_rate,kl,bits_per_byte,e_rate\n";
  auto log_run = [&](const char* name, int seed, const Hyper& h, const char* split_name,
                     const std::vector<Metrics>& ms) {
    for (const Metrics& m : ms)
      runs << name << "," << seed << "," << h.beta << "," << h.lr << "," << split_name << "," << m.step << ","
           << m.reward << "," << m.preference << "," << m.kl << "," << m.bpb << "," << m.e_rate << "\n";
  };
  std::vector<double> rm_acc;
  for (int seed = 0; seed < o.seeds; ++seed) {
    SeedState st;
    ok = prepare_seed(s, st, seed, seed == 0) && ok;
    rm_acc.push_back(st.rm_accuracy);
    if (seed == 0 && o.check) {  // the reference (policy off) is the SFT model, bit for bit
      const Matrix<T> sft_lp = continuation_log_probs(st.model, st.sft_test, o.prompt_bytes);
      st.pm->add_adapter("policy", Json{{"peft_type", "LORA"}, {"r", 8}, {"target_modules", "all-linear"}});
      st.pm->set_adapter({"sft", "policy"});
      st.model.visit_parameters([&](const std::string& n, peft::Parameter<T>& p) {
        if (n.find("lora_B.policy") != std::string::npos) p.value.setConstant(T(0.05));
      });
      const Matrix<T> pol_lp = continuation_log_probs(st.model, st.sft_test, o.prompt_bytes);
      Matrix<T> ref_lp;
      {
        auto ref = st.pm->disable_adapter("policy");
        ref_lp = continuation_log_probs(st.model, st.sft_test, o.prompt_bytes);
      }
      const bool same = ref_lp == sft_lp && pol_lp != sft_lp;
      std::printf("check: reference (policy adapter off) = the SFT model, bit for bit: %s\n", same ? "yes" : "NO");
      ok = ok && same;
      st.pm->delete_adapter("policy");
    }
    for (std::size_t m = 0; m < rows.size(); ++m) {
      const MethodRow& row = rows[m];
      if (seed == 0) {  // hyper-parameters on validation prompts
        chosen[m] = row.grid.empty() ? Hyper{} : row.grid.front();
        if (o.grid && row.grid.size() > 1) {
          double best = -1.0;
          for (const Hyper& h : row.grid) {
            const std::vector<Metrics> v = row.run(s, st, h, true);
            log_run(row.name, seed, h, "val", v);
            const Metrics& last = v.back();
            const double score = last.kl <= o.kl_budget ? last.preference : -last.kl;  // over budget: the smallest KL
            std::printf("  %-5s val: beta %.2g lr %.0e -> preference %.3f, KL %.2f%s\n", row.name, h.beta, h.lr,
                        last.preference, last.kl, last.kl <= o.kl_budget ? "" : " (over the KL budget)");
            if (score > best) {
              best = score;
              chosen[m] = h;
            }
          }
        } else if (!row.grid.empty() && !o.grid) {
          chosen[m] = row.grid[1 % row.grid.size()];
        }
      }
      const std::vector<Metrics> test = row.run(s, st, chosen[m], false);
      log_run(row.name, seed, chosen[m], "test", test);
      curves[m].push_back(test);
      const Metrics& last = test.back();
      std::printf("  %-5s seed %d: reward %+.3f, preference %.3f, KL %.3f, bits/byte %.3f, e-rate %.4f  [%.0f s]\n",
                  row.name, seed, last.reward, last.preference, last.kl, last.bpb, last.e_rate,
                  std::chrono::duration<double>(Clock::now() - t0).count());
      if (seed == 0)  // samples (test prompts, temperature 1): the SFT model's, then each method's after training
        for (const auto& ex : last.examples) {
          char head[64];
          std::snprintf(head, sizeof head, "%-5s e-rate %.3f | ", row.name, e_rate(ex, o.prompt_bytes));
          sample_lines.push_back(head + text_of(ex));
        }
    }
  }

  // Summary at the end of training: mean ± half-range over seeds.
  std::ofstream csv(o.out + "/summary.csv");
  csv << "method,beta,lr,reward,reward_spread,preference_rate,preference_spread,kl,kl_spread,bits_per_byte,bpb_spread,"
         "e_rate,e_rate_spread\n";
  std::printf(
      "\n| method | β | lr | reward (normalised) | true preference rate | KL to reference (nats) | held-out "
      "bits/byte | e-rate |\n|---|---|---|---|---|---|---|---|\n");
  std::vector<std::vector<Metrics>> mean_curves(rows.size()), spread_curves(rows.size());
  std::vector<std::string> names;
  double sft_pref = 0.5;
  for (std::size_t m = 0; m < rows.size(); ++m) {
    names.push_back(rows[m].name);
    const std::size_t evals = curves[m].front().size();
    for (std::size_t k = 0; k < evals; ++k) {
      std::vector<double> rw, pr, kl, bp, er;
      for (const auto& c : curves[m]) {
        rw.push_back(c[k].reward);
        pr.push_back(c[k].preference);
        kl.push_back(c[k].kl);
        bp.push_back(c[k].bpb);
        er.push_back(c[k].e_rate);
      }
      Metrics mean, spr;
      mean.step = spr.step = curves[m].front()[k].step;
      const Summary a = summarize(rw), b = summarize(pr), cc = summarize(kl), d = summarize(bp), e = summarize(er);
      mean.reward = a.mean, spr.reward = a.spread, mean.preference = b.mean, spr.preference = b.spread;
      mean.kl = cc.mean, spr.kl = cc.spread, mean.bpb = d.mean, spr.bpb = d.spread, mean.e_rate = e.mean,
      spr.e_rate = e.spread;
      mean_curves[m].push_back(mean);
      spread_curves[m].push_back(spr);
      if (k + 1 == evals) {
        if (m == 0) sft_pref = mean.preference;
        const bool hp = !rows[m].grid.empty();
        char beta[32] = "–", lr[32] = "–";
        if (hp) {
          std::snprintf(beta, sizeof beta, "%g", chosen[m].beta);
          std::snprintf(lr, sizeof lr, "%.0e", chosen[m].lr);
        }
        std::printf("| %s | %s | %s | %s | %s | %s | %s | %s |\n", rows[m].name, beta, lr, pm(a, 3).c_str(),
                    pm(b, 3).c_str(), pm(cc, 2).c_str(), pm(d, 3).c_str(), pm(e, 4).c_str());
        csv << rows[m].name << "," << (hp ? chosen[m].beta : NAN) << "," << (hp ? chosen[m].lr : NAN) << "," << a.mean
            << "," << a.spread << "," << b.mean << "," << b.spread << "," << cc.mean << "," << cc.spread << ","
            << d.mean << "," << d.spread << "," << e.mean << "," << e.spread << "\n";
      }
    }
  }
  const Summary acc = summarize(rm_acc);
  std::printf("\nreward model accuracy on held-out pairs: %s over %d seed(s)\n", pm(acc, 3).c_str(), o.seeds);
  write_svg(o.out + "/preference.svg", names, mean_curves, spread_curves, sft_pref, o.dpo_steps);
  {
    std::ofstream f(o.out + "/samples.txt");
    for (const auto& l : sample_lines) f << l << "\n";
  }
  std::printf("wrote %s/{summary.csv, runs.csv, preference.svg, samples.txt, reward_model/}  [%.0f s]\n", o.out.c_str(),
              std::chrono::duration<double>(Clock::now() - t0).count());
  if (o.check && !ok) {
    std::fprintf(stderr, "preference_study: check failed\n");
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "preference_study: %s\n", e.what());
    return 1;
  }
}
