// lm_finetune: fine-tuning a Llama-architecture causal language model with every kind of method of
// the library, two ways (README.md in this directory has the commands and the table it produced).
//
// 1. No download (default): a small LlamaForCausalLM is trained from scratch on the English texts of
//    Debian's `fortunes` package (byte tokenizer), then adapted to German (`fortunes-de`) from a small
//    target corpus by each row of method_rows() (full fine-tuning, LoRA, DoRA, QLoRA on an NF4 base,
//    (IA)³, prompt tuning, prefix tuning). Learning rates are chosen on a validation split from a small grid (seed 0),
//    then every method runs with its chosen rate for each seed; the table gives mean ± spread of held-out bits per byte
//    on the target, the source's bits per byte after adaptation (forgetting: the adapter active and disabled),
//    trainable %, training tokens/s and peak memory; samples before and after; CSV + SVG.
// 2. A checkpoint you have (`--model DIR --data FILE`): a Hugging Face Llama-family checkpoint
//    (config.json + safetensors + tokenizer.json) fine-tuned on your text with LoRA or QLoRA; the
//    adapter is saved as a PEFT directory (loads in Hugging Face PEFT onto the same base) and sampled.
#include <malloc.h>

#include <peft/io/llama_checkpoint.hpp>
#include <peft/io/tokenizer.hpp>
#include <peft/loss/causal_lm.hpp>
#include <peft/models/generation.hpp>
#include <peft/models/peft_model.hpp>
#include <peft/optim/adam.hpp>
#include <peft/optim/clip.hpp>
#include <peft/optim/schedule.hpp>
#include <peft/quant/nf4_lora_linear.hpp>
#include <peft/train/memory.hpp>

#include <dirent.h>
#include <sys/stat.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
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

// ------------------------------------------------------------------------------------------------
// The methods compared (scratch mode). One row per method: its adapter_config.json for
// PeftModel::add_adapter (null: full fine-tuning), whether the base is quantized to NF4 first
// (QLoRA), and the learning-rate grid searched on the validation split. Any method PeftModel adds
// to a LlamaForCausalLM from its config (the table's methods, prompt and prefix tuning) is one row.
// ------------------------------------------------------------------------------------------------
struct MethodRow {
  const char* name;
  const char* config;  ///< adapter_config.json; nullptr: full fine-tuning
  bool nf4_base;       ///< quantize every linear but lm_head to NF4 first (QLoRA)
  std::vector<double> lrs;
};

const std::vector<MethodRow>& method_rows() {
  static const std::vector<MethodRow> rows = {
      {"full", nullptr, false, {1e-4, 3e-4, 1e-3}},
      {"lora",
       R"({"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":"all-linear"})",
       false,
       {1e-3, 3e-3, 1e-2}},
      {"dora",
       R"({"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":"all-linear","use_dora":true})",
       false,
       {1e-3, 3e-3, 1e-2}},
      {"qlora",
       R"({"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":"all-linear"})",
       true,
       {1e-3, 3e-3, 1e-2}},
      {"ia3",
       R"({"peft_type":"IA3","target_modules":["k_proj","v_proj","down_proj"],"feedforward_modules":["down_proj"]})",
       false,
       {3e-3, 1e-2, 3e-2}},
      // Prompt learning: 16 virtual tokens (a quarter of a 64-token window); prefix tuning through
      // PEFT's projection MLP (prefix_projection; encoder_hidden_size: PEFT's default, token_dim).
      // Their grids sit higher: these methods train a few parameters from a random start (PEFT's
      // own examples use 3e-2 for prompt tuning, 1e-2 for prefix tuning).
      {"prompt", R"({"peft_type":"PROMPT_TUNING","num_virtual_tokens":16})", false, {1e-2, 3e-2, 1e-1}},
      {"prefix",
       R"({"peft_type":"PREFIX_TUNING","num_virtual_tokens":16,"prefix_projection":true})",
       false,
       {3e-3, 1e-2, 3e-2}},
  };
  return rows;
}

// ------------------------------------------------------------------------------------------------
// Options.
// ------------------------------------------------------------------------------------------------
struct Options {
  // scratch mode
  std::string source_dir = "/usr/share/games/fortunes";
  std::string target_dir = "/usr/share/games/fortunes/de";
  std::string out = "lm_finetune_out";
  std::vector<std::string> methods;  // empty: every row
  int seeds = 2;
  int grid = 3;  // learning rates tried per method (the middle one alone when 1)
  Index hidden = 128, layers = 2, heads = 4, kv_heads = 2, intermediate = 256;
  Index seq = 64, batch = 16;
  int pretrain_steps = 600, adapt_steps = 100;
  Index target_train_bytes = 40000, eval_bytes = 10000;
  bool check = false, quick = false;
  int threads = 1;
  // checkpoint mode
  std::string model_dir, data_file, tokenizer_file, adapter_out, method = "lora", prompt;
  int steps = -1;
  double lr = 2e-4;
  int sample_tokens = 120;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "%s\nusage: lm_finetune [--quick|--full] [--seeds N] [--methods a,b] [--out DIR] [--check]\n"
               "                    [--source-dir DIR] [--target-dir DIR]\n"
               "       lm_finetune --model DIR --data FILE [--tokenizer FILE] [--method lora|qlora]\n"
               "                   [--out ADAPTER_DIR] [--steps N] [--lr X] [--seq N] [--batch N] [--prompt TEXT]\n"
               "                   [--sample-tokens N] [--threads N] [--check]\n",
               why.c_str());
  std::exit(2);
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  bool out_given = false;
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
      o.grid = 1;
      o.hidden = 64;
      o.layers = 2;
      o.heads = 4;
      o.kv_heads = 2;
      o.intermediate = 128;
      o.seq = 64;
      o.batch = 8;
      o.pretrain_steps = 100;
      o.adapt_steps = 20;
      o.target_train_bytes = 20000;
      o.eval_bytes = 3000;
    } else if (a == "--full") {
      o.seeds = 3;
      o.pretrain_steps = 2000;
      o.adapt_steps = 300;
      o.eval_bytes = 40000;
    } else if (a == "--seeds") {
      o.seeds = static_cast<int>(number());
    } else if (a == "--grid") {
      o.grid = static_cast<int>(number());
    } else if (a == "--methods") {
      o.methods = split_commas(value());
    } else if (a == "--out") {
      o.out = o.adapter_out = value();
      out_given = true;
    } else if (a == "--threads") {
      o.threads = static_cast<int>(number());
    } else if (a == "--check") {
      o.check = true;
    } else if (a == "--source-dir") {
      o.source_dir = value();
    } else if (a == "--target-dir") {
      o.target_dir = value();
    } else if (a == "--pretrain-steps") {
      o.pretrain_steps = static_cast<int>(number());
    } else if (a == "--adapt-steps") {
      o.adapt_steps = static_cast<int>(number());
    } else if (a == "--model") {
      o.model_dir = value();
    } else if (a == "--data") {
      o.data_file = value();
    } else if (a == "--tokenizer") {
      o.tokenizer_file = value();
    } else if (a == "--method") {
      o.method = value();
      if (o.method != "lora" && o.method != "qlora") usage("--method must be lora or qlora");
    } else if (a == "--steps") {
      o.steps = static_cast<int>(number());
    } else if (a == "--lr") {
      o.lr = std::atof(value().c_str());
      if (!(o.lr > 0)) usage("--lr must be > 0");
    } else if (a == "--seq") {
      o.seq = number();
    } else if (a == "--batch") {
      o.batch = number();
    } else if (a == "--prompt") {
      o.prompt = value();
    } else if (a == "--sample-tokens") {
      o.sample_tokens = static_cast<int>(number());
    } else if (a == "--help" || a == "-h") {
      usage("lm_finetune: fine-tune a Llama-architecture language model");
    } else {
      usage("unknown option " + a);
    }
  }
  if (!o.model_dir.empty() && !out_given) o.adapter_out = "lm_finetune_adapter";
  if (o.model_dir.empty() != o.data_file.empty()) usage("--model and --data go together");
  if (o.grid > 3) o.grid = 3;
  return o;
}

// ------------------------------------------------------------------------------------------------
// Data: fortune files are records separated by lines holding a single "%".
// ------------------------------------------------------------------------------------------------
std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw peft::IoError("lm_finetune: cannot read \"" + path + "\"");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

/// The records of the fortune files of `dir` (plain files without an extension, sorted by name;
/// ASCII-art collections and records with overstriking or tabs skipped: they are not prose).
std::vector<std::string> read_fortunes(const std::string& dir, const std::vector<std::string>& only) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      if (n.empty() || n[0] == '.' || n.find('.') != std::string::npos) continue;
      if (n.find("art") != std::string::npos || n == "banner") continue;
      if (!only.empty() && std::find(only.begin(), only.end(), n) == only.end()) continue;
      if (is_regular_file(dir + "/" + n)) names.push_back(n);
    }
    ::closedir(d);
  }
  if (names.empty())
    throw peft::IoError("lm_finetune: no fortune files in \"" + dir + "\" (Debian: apt install fortunes)");
  std::sort(names.begin(), names.end());
  std::vector<std::string> records;
  for (const std::string& n : names) {
    std::istringstream in(read_file(dir + "/" + n));
    std::string line, rec;
    auto flush = [&]() {
      const bool prose = rec.size() > 20 && rec.find('\b') == std::string::npos &&
                         rec.find('\t') == std::string::npos &&
                         peft::io::detail::tok::first_invalid_utf8(rec) == std::string::npos;
      if (prose) records.push_back(rec);
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
  return records;
}

/// Token streams of one corpus: train / validation / test, each the records' tokens followed by the
/// separator token, and the UTF-8 bytes each split holds.
struct Corpus {
  std::vector<Index> train, val, test;
};

std::vector<Index> tokens_of(const Tokenizer& tok, const std::vector<std::string>& records, Index sep,
                             Index max_bytes) {
  std::vector<Index> out;
  Index bytes = 0;
  for (const std::string& r : records) {
    if (max_bytes > 0 && bytes >= max_bytes) break;
    for (std::int32_t id : tok.encode(r, false)) out.push_back(id);
    if (sep >= 0) out.push_back(sep);
    bytes += static_cast<Index>(r.size());
  }
  return out;
}

/// Record i goes to test when i % 10 == 0, to validation when i % 10 == 1, else to train: a fixed
/// split, interleaved over the files.
Corpus split_corpus(const Tokenizer& tok, const std::vector<std::string>& records, Index sep, Index train_bytes,
                    Index eval_bytes) {
  std::vector<std::string> tr, va, te;
  for (std::size_t i = 0; i < records.size(); ++i) (i % 10 == 0 ? te : i % 10 == 1 ? va : tr).push_back(records[i]);
  return Corpus{tokens_of(tok, tr, sep, train_bytes), tokens_of(tok, va, sep, eval_bytes),
                tokens_of(tok, te, sep, eval_bytes)};
}

// ------------------------------------------------------------------------------------------------
// Training and evaluation.
// ------------------------------------------------------------------------------------------------
struct TrainStats {
  double tokens_per_s = 0.0;
  double seconds = 0.0;
  double first_loss = 0.0, last_loss = 0.0;
};

/// AdamW (no weight decay) with 10 % warmup and cosine decay, gradient norm clipped at 1, on random
/// windows of `seq` tokens of `stream`. Buffers are made once and reused every step.
TrainStats train(LlamaForCausalLM<T>& model, const std::vector<Index>& stream, int steps, double lr, Index batch,
                 Index seq, std::uint64_t seed) {
  if (static_cast<Index>(stream.size()) <= seq)
    throw peft::ConfigError("lm_finetune: training text shorter than --seq");
  peft::Rng rng(seed);
  peft::AdamW<T> opt(model, peft::AdamWOptions{lr, 0.9, 0.999, 1e-8, 0.0});
  const peft::CosineSchedule schedule(std::max(1, steps / 10), steps);
  const auto params = peft::trainable_parameters(model);
  const peft::SequenceLayout layout(batch, seq);
  const peft::SequenceLayout out_layout = model.output_layout(layout);  // + a prompt's virtual tokens
  std::vector<Index> ids(static_cast<std::size_t>(batch * seq));
  std::vector<std::int64_t> labels(ids.size()), out_labels;
  Matrix<T> logits, dlogits;
  typename LlamaForCausalLM<T>::Cache cache;
  TrainStats st;
  model.train();
  const auto t0 = Clock::now();
  for (int step = 0; step < steps; ++step) {
    for (Index b = 0; b < batch; ++b) {
      const Index start = static_cast<Index>(rng.uniform_int(stream.size() - static_cast<std::size_t>(seq)));
      std::copy_n(stream.begin() + start, seq, ids.begin() + b * seq);
    }
    std::copy(ids.begin(), ids.end(), labels.begin());
    out_labels = model.prompt_labels(labels, layout);  // -100 at a prompt's virtual tokens
    peft::apply_schedule(opt, schedule, step);
    opt.zero_grad();
    model.forward(ids, layout, logits, cache);
    const double loss = peft::causal_lm_loss<T>(logits, out_labels, out_layout, &dlogits);
    model.backward(cache, dlogits);
    peft::clip_grad_norm(params, 1.0);
    opt.step();
    if (step == 0) st.first_loss = loss;
    st.last_loss = loss;
  }
  st.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  st.tokens_per_s = static_cast<double>(steps) * static_cast<double>(batch * seq) / st.seconds;
  model.eval();
  return st;
}

/// Bits per byte of `stream` under the model: non-overlapping windows of `seq` tokens, every token
/// but a window's first predicted; Σ nll / (ln 2 · bytes of the predicted tokens' text).
double bits_per_byte(LlamaForCausalLM<T>& model, const Tokenizer& tok, const std::vector<Index>& stream, Index seq) {
  model.eval();
  const Index n = static_cast<Index>(stream.size());
  const Index windows = std::max<Index>(1, n / seq);
  const Index len = std::min(seq, n);
  const Index batch = std::min<Index>(windows, 16);
  Matrix<T> logits;
  typename LlamaForCausalLM<T>::Cache cache;
  double nll = 0.0;
  std::int64_t bytes = 0;
  for (Index w0 = 0; w0 < windows; w0 += batch) {
    const Index B = std::min(batch, windows - w0);
    std::vector<Index> ids(stream.begin() + w0 * len, stream.begin() + (w0 + B) * len);
    std::vector<std::int64_t> labels(ids.begin(), ids.end());
    const peft::SequenceLayout layout(B, len);
    model.forward(ids, layout, logits, cache);
    peft::CausalLMStats s;
    peft::causal_lm_loss<T>(logits, model.prompt_labels(labels, layout), model.output_layout(layout), nullptr, &s);
    nll += s.nll_sum;
    for (Index b = 0; b < B; ++b)
      for (Index t = 1; t < len; ++t) {
        const auto id = static_cast<std::int32_t>(ids[static_cast<std::size_t>(b * len + t)]);
        if (!tok.is_special(id)) bytes += static_cast<std::int64_t>(tok.decode({id}).size());
      }
  }
  return peft::bits_per_byte(nll, bytes);
}

std::string sample(LlamaForCausalLM<T>& model, const Tokenizer& tok, const std::string& prompt, int tokens,
                   std::uint64_t seed, const std::vector<Index>& eos = {}) {
  std::vector<Index> ids;
  for (std::int32_t id : tok.encode(prompt, false)) ids.push_back(id);
  peft::GenerationConfig gc;
  gc.max_new_tokens = tokens;
  gc.do_sample = true;
  gc.temperature = 0.8;
  gc.top_k = 40;
  gc.eos_token_ids = eos;
  peft::Rng rng(seed);
  const std::vector<Index> out = peft::generate(model, ids, gc, rng);
  std::vector<std::int32_t> gen(out.begin(), out.end());
  return tok.decode(gen, true);
}

/// QLoRA's base: every linear but lm_head replaced by an NF4-base host of its weight (bitsandbytes'
/// Linear4bit with double quantization, blocksize 64).
void quantize_base(LlamaForCausalLM<T>& model) {
  for (auto& [path, host] : peft::io::adapted_linears<T>(model)) {
    if (path == "lm_head") continue;
    peft::RowVector<T> bias;
    if (host->has_bias()) bias = host->bias.value.row(0);
    const peft::Linear<T> dense(host->weight.value, bias);
    *host = peft::quantize_linear<T>(dense);
  }
  model.set_name(model.name());
}

/// Parameters of the model as it trains: every scalar of a dense tensor, and every element of an
/// NF4 base (so that trainable % has the dense model's size below it for QLoRA too).
peft::ParameterCount parameter_count(LlamaForCausalLM<T>& model) {
  peft::ParameterCount c = peft::count_parameters(model);
  for (auto& [path, host] : peft::io::adapted_linears<T>(model))
    if (host->quantized()) c.total += static_cast<Index>(host->quantized_weight().numel());
  return c;
}

/// Bytes the training state takes by the library's own accounting: every parameter value (an NF4
/// base: its storage), plus a gradient and AdamW's two moments per trainable scalar.
double state_megabytes(LlamaForCausalLM<T>& model) {
  double bytes = 0.0;
  model.visit_parameters([&](const std::string&, peft::Parameter<T>& p) {
    bytes += static_cast<double>(p.value.size()) * sizeof(T) * (p.trainable() ? 4.0 : 1.0);
  });
  for (auto& [path, host] : peft::io::adapted_linears<T>(model))
    if (host->quantized()) bytes += static_cast<double>(host->quantized_weight().storage_bytes());
  return bytes / 1e6;
}

// ------------------------------------------------------------------------------------------------
// Scratch mode.
// ------------------------------------------------------------------------------------------------
struct RunResult {
  std::string method;
  int seed = 0;
  double lr = 0.0;
  double val_bpb = 0.0, target_bpb = 0.0, source_bpb = 0.0, source_bpb_disabled = NAN;
  double trainable_pct = 0.0, tokens_per_s = 0.0, peak_rss_mb = NAN, state_mb = 0.0;
  double init_target_bpb = NAN;  ///< prompt learning with --check: German bits/byte at the random init
  std::string sample;
};

/// Prompt and prefix tuning start from random virtual tokens, which make the model worse at first.
bool is_prompt_learning(const MethodRow& row) {
  return row.config != nullptr && std::string(row.config).find("_TUNING\"") != std::string::npos;
}

struct Summary {
  double mean = 0.0, spread = 0.0;  // spread: half the range over seeds
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
  if (std::isnan(s.mean)) return "n/a";
  std::snprintf(buf, sizeof buf, "%.*f ± %.*f", prec, s.mean, prec, s.spread);
  return buf;
}

struct Scratch {
  const Options& o;
  Tokenizer tok = Tokenizer::bytes({"<|endoftext|>"});
  Index eos = 256;
  Corpus source, target;
  LlamaForCausalLM<T> base;
  double base_source_bpb = 0.0, base_target_bpb = 0.0;

  explicit Scratch(const Options& opt) : o(opt) {}

  RunResult run(const MethodRow& row, double lr, int seed) {
    RunResult r;
    r.method = row.name;
    r.seed = seed;
    r.lr = lr;
    ::malloc_trim(0);  // freed pages back to the system, so the high-water mark below is this run's
    const bool rss = peft::reset_peak_rss();
    const std::int64_t rss0 = peft::current_rss_bytes();
    LlamaForCausalLM<T> model = base;
    std::unique_ptr<peft::PeftModel<T>> pm;
    if (row.nf4_base) quantize_base(model);
    if (row.config != nullptr) {
      pm = std::make_unique<peft::PeftModel<T>>(model, 0x5eedULL + static_cast<std::uint64_t>(seed));
      pm->add_adapter("default", Json::parse(row.config));
    }
    if (o.check && is_prompt_learning(row)) r.init_target_bpb = bits_per_byte(model, tok, target.test, o.seq);
    const peft::ParameterCount pc = parameter_count(model);
    r.trainable_pct = pc.trainable_percent();
    r.state_mb = state_megabytes(model);
    const TrainStats st =
        train(model, target.train, o.adapt_steps, lr, o.batch, o.seq, 1000 + static_cast<std::uint64_t>(seed));
    if (rss && rss0 > 0) r.peak_rss_mb = static_cast<double>(peft::peak_rss_bytes() - rss0) / 1e6;
    r.tokens_per_s = st.tokens_per_s;
    r.val_bpb = bits_per_byte(model, tok, target.val, o.seq);
    r.target_bpb = bits_per_byte(model, tok, target.test, o.seq);
    r.source_bpb = bits_per_byte(model, tok, source.test, o.seq);
    if (pm) {
      auto off = pm->disable_adapters();
      r.source_bpb_disabled = bits_per_byte(model, tok, source.test, o.seq);
    }
    r.sample = sample(model, tok, "Der ", o.quick ? 60 : 160, 77, {eos});
    return r;
  }
};

std::string csv_escape(const std::string& s) {
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

void write_svg(const std::string& path, const std::vector<std::string>& names,
               const std::vector<std::pair<Summary, Summary>>& target_source, double base_target, double base_source) {
  const int W = 720, H = 360, left = 70, top = 40, plot_h = 250;
  const int group_w = (W - left - 20) / static_cast<int>(names.size() + 1);
  double ymax = std::max(base_target, base_source);
  for (const auto& ts : target_source)
    ymax = std::max({ymax, ts.first.mean + ts.first.spread, ts.second.mean + ts.second.spread});
  ymax = std::ceil(ymax * 2.0) / 2.0;
  std::ofstream f(path);
  f << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
    << "' font-family='sans-serif' font-size='12'>\n"
    << "<rect width='100%' height='100%' fill='white'/>\n"
    << "<text x='" << W / 2
    << "' y='20' text-anchor='middle' font-size='14'>Held-out bits per byte after adapting to German "
    << "(lower is better; mean ± half-range over seeds)</text>\n";
  auto y_of = [&](double v) { return top + plot_h - v / ymax * plot_h; };
  for (double v = 0; v <= ymax + 1e-9; v += 0.5) {
    f << "<line x1='" << left << "' x2='" << W - 20 << "' y1='" << y_of(v) << "' y2='" << y_of(v)
      << "' stroke='#ddd'/>\n"
      << "<text x='" << left - 6 << "' y='" << y_of(v) + 4 << "' text-anchor='end'>" << v << "</text>\n";
  }
  f << "<text x='16' y='" << top + plot_h / 2 << "' transform='rotate(-90 16 " << top + plot_h / 2
    << ")' text-anchor='middle'>bits per byte</text>\n";
  const int bw = group_w / 3;
  auto bar = [&](int x, const Summary& s, const char* color) {
    f << "<rect x='" << x << "' y='" << y_of(s.mean) << "' width='" << bw << "' height='" << y_of(0) - y_of(s.mean)
      << "' fill='" << color << "'/>\n";
    if (s.spread > 0)
      f << "<line x1='" << x + bw / 2 << "' x2='" << x + bw / 2 << "' y1='" << y_of(s.mean - s.spread) << "' y2='"
        << y_of(s.mean + s.spread) << "' stroke='black' stroke-width='1.5'/>\n";
  };
  for (std::size_t i = 0; i <= names.size(); ++i) {
    const int x = left + 10 + static_cast<int>(i) * group_w;
    const bool is_base = i == 0;
    const Summary t = is_base ? Summary{base_target, 0} : target_source[i - 1].first;
    const Summary s = is_base ? Summary{base_source, 0} : target_source[i - 1].second;
    bar(x, t, "#d95f02");
    bar(x + bw, s, "#1b9e77");
    f << "<text x='" << x + bw << "' y='" << top + plot_h + 16 << "' text-anchor='middle'>"
      << (is_base ? std::string("base") : names[i - 1]) << "</text>\n";
  }
  const int ly = top + plot_h + 40;
  f << "<rect x='" << left << "' y='" << ly - 10 << "' width='12' height='12' fill='#d95f02'/><text x='" << left + 18
    << "' y='" << ly << "'>German (target), held out</text>\n"
    << "<rect x='" << left + 220 << "' y='" << ly - 10 << "' width='12' height='12' fill='#1b9e77'/><text x='"
    << left + 238 << "' y='" << ly << "'>English (source), held out, adapter active: forgetting</text>\n"
    << "</svg>\n";
}

int run_scratch(const Options& o) {
  const auto t_start = Clock::now();
  Scratch s(o);
  // English prose collections (the source) and every German collection (the target).
  const std::vector<std::string> english = {"fortunes",  "wisdom", "literature", "humorists", "people",
                                            "science",   "work",   "education",  "love",      "politics",
                                            "men-women", "pets",   "food"};
  const std::vector<std::string> en_records = read_fortunes(o.source_dir, english);
  const std::vector<std::string> de_records = read_fortunes(o.target_dir, {});
  s.source = split_corpus(s.tok, en_records, s.eos, 0, o.eval_bytes);
  s.target = split_corpus(s.tok, de_records, s.eos, o.target_train_bytes, o.eval_bytes);
  std::printf("source: %zu English records (%s), train %zu tokens; target: %zu German records (%s), train %zu tokens\n",
              en_records.size(), o.source_dir.c_str(), s.source.train.size(), de_records.size(), o.target_dir.c_str(),
              s.target.train.size());
  std::printf("held out: %zu / %zu tokens (source / target test), validation %zu target tokens\n", s.source.test.size(),
              s.target.test.size(), s.target.val.size());

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
  s.base = LlamaForCausalLM<T>(c, init_rng);
  const peft::ParameterCount pc = peft::count_parameters(s.base);
  std::printf(
      "model: LlamaForCausalLM, hidden %ld, %ld layers, %ld heads (%ld kv), intermediate %ld, vocab %ld (bytes + "
      "<|endoftext|>): %s parameters; %d threads\n",
      static_cast<long>(c.hidden_size), static_cast<long>(c.num_hidden_layers),
      static_cast<long>(c.num_attention_heads), static_cast<long>(c.kv_heads()), static_cast<long>(c.intermediate_size),
      static_cast<long>(c.vocab_size), peft::with_thousands(pc.total).c_str(), Eigen::nbThreads());
  const double uniform_bpb = std::log2(static_cast<double>(c.vocab_size));
  const TrainStats pre = train(s.base, s.source.train, o.pretrain_steps, 2e-3, o.batch, o.seq, 1);
  s.base_source_bpb = bits_per_byte(s.base, s.tok, s.source.test, o.seq);
  s.base_target_bpb = bits_per_byte(s.base, s.tok, s.target.test, o.seq);
  std::printf(
      "pretrained %d steps on English (%.0f tokens/s, %.1f s): loss %.3f -> %.3f; held-out bits/byte: English "
      "%.3f, German %.3f (uniform: %.2f)\n",
      o.pretrain_steps, pre.tokens_per_s, pre.seconds, pre.first_loss, pre.last_loss, s.base_source_bpb,
      s.base_target_bpb, uniform_bpb);
  const std::string before_en = sample(s.base, s.tok, "The ", o.quick ? 60 : 160, 77, {s.eos});
  const std::string before_de = sample(s.base, s.tok, "Der ", o.quick ? 60 : 160, 77, {s.eos});
  std::printf("sample before, prompt \"The \":\n%s\nsample before, prompt \"Der \":\n%s\n", before_en.c_str(),
              before_de.c_str());

  std::vector<MethodRow> rows;
  for (const MethodRow& r : method_rows())
    if (o.methods.empty() || std::find(o.methods.begin(), o.methods.end(), r.name) != o.methods.end())
      rows.push_back(r);
  if (rows.empty()) usage("--methods selects none of full, lora, dora, qlora, ia3, prompt, prefix");

  std::vector<RunResult> all;
  std::vector<std::vector<RunResult>> finals(rows.size());
  std::vector<double> chosen(rows.size());
  for (std::size_t m = 0; m < rows.size(); ++m) {
    const MethodRow& row = rows[m];
    std::vector<double> grid = row.lrs;
    if (o.grid == 1) grid = {row.lrs[1]};
    if (o.grid == 2) grid = {row.lrs[0], row.lrs[1]};
    RunResult best;
    best.val_bpb = INFINITY;
    for (double lr : grid) {  // seed 0 on the validation split
      RunResult r = s.run(row, lr, 0);
      std::printf("  %-6s lr %.0e seed 0: validation %.4f, test %.4f bits/byte (%.0f tokens/s)\n", row.name, lr,
                  r.val_bpb, r.target_bpb, r.tokens_per_s);
      std::fflush(stdout);
      all.push_back(r);
      if (r.val_bpb < best.val_bpb) best = r;
    }
    chosen[m] = best.lr;
    finals[m].push_back(best);  // seed 0 at the chosen rate is already run
    for (int seed = 1; seed < o.seeds; ++seed) {
      RunResult r = s.run(row, best.lr, seed);
      std::printf("  %-6s lr %.0e seed %d: validation %.4f, test %.4f bits/byte\n", row.name, best.lr, seed, r.val_bpb,
                  r.target_bpb);
      all.push_back(r);
      finals[m].push_back(r);
    }
  }

  // ---- the table ----
  std::printf(
      "\nmethod | lr (validation) | German bits/byte (held out) | English bits/byte, adapter active | "
      "English, adapter disabled | trainable %% | train tokens/s | peak RSS added (MB) | state (MB)\n");
  std::printf("base (English only) | - | %.3f | %.3f | - | - | %.0f | - | -\n", s.base_target_bpb, s.base_source_bpb,
              pre.tokens_per_s);
  std::vector<std::pair<Summary, Summary>> bars;
  std::vector<std::string> names;
  std::ofstream csv(o.out + "/summary.csv");
  csv << "method,lr,seeds,target_bpb_mean,target_bpb_spread,source_bpb_mean,source_bpb_spread,"
         "source_bpb_disabled_mean,trainable_pct,tokens_per_s_mean,peak_rss_added_mb_mean,state_mb\n";
  csv << "base,,," << s.base_target_bpb << ",0," << s.base_source_bpb << ",0,,,,,\n";
  for (std::size_t m = 0; m < rows.size(); ++m) {
    std::vector<double> tb, sb, sd, tps, rss;
    for (const RunResult& r : finals[m]) {
      tb.push_back(r.target_bpb);
      sb.push_back(r.source_bpb);
      if (!std::isnan(r.source_bpb_disabled)) sd.push_back(r.source_bpb_disabled);
      tps.push_back(r.tokens_per_s);
      if (!std::isnan(r.peak_rss_mb)) rss.push_back(r.peak_rss_mb);
    }
    const Summary t = summarize(tb), so = summarize(sb), d = sd.empty() ? Summary{NAN, 0} : summarize(sd),
                  sp = summarize(tps), mem = rss.empty() ? Summary{NAN, 0} : summarize(rss);
    const RunResult& f = finals[m].front();
    std::printf("%s | %.0e | %s | %s | %s | %.2f | %.0f | %s | %.2f\n", rows[m].name, chosen[m], pm(t, 3).c_str(),
                pm(so, 3).c_str(), pm(d, 3).c_str(), f.trainable_pct, sp.mean,
                std::isnan(mem.mean) ? "n/a" : pm(mem, 1).c_str(), f.state_mb);
    csv << rows[m].name << "," << chosen[m] << "," << finals[m].size() << "," << t.mean << "," << t.spread << ","
        << so.mean << "," << so.spread << "," << (std::isnan(d.mean) ? std::string() : std::to_string(d.mean)) << ","
        << f.trainable_pct << "," << sp.mean << "," << (std::isnan(mem.mean) ? std::string() : std::to_string(mem.mean))
        << "," << f.state_mb << "\n";
    bars.push_back({t, so});
    names.push_back(rows[m].name);
  }
  std::ofstream runs(o.out + "/runs.csv");
  runs << "method,seed,lr,val_bpb,target_bpb,source_bpb,source_bpb_disabled,trainable_pct,tokens_per_s,peak_rss_added_"
          "mb,"
          "state_mb,sample\n";
  for (const RunResult& r : all)
    runs << r.method << "," << r.seed << "," << r.lr << "," << r.val_bpb << "," << r.target_bpb << "," << r.source_bpb
         << "," << (std::isnan(r.source_bpb_disabled) ? std::string() : std::to_string(r.source_bpb_disabled)) << ","
         << r.trainable_pct << "," << r.tokens_per_s << ","
         << (std::isnan(r.peak_rss_mb) ? std::string() : std::to_string(r.peak_rss_mb)) << "," << r.state_mb << ","
         << csv_escape(r.sample) << "\n";
  write_svg(o.out + "/bits_per_byte.svg", names, bars, s.base_target_bpb, s.base_source_bpb);
  std::ofstream samples(o.out + "/samples.txt");
  samples << "== base, prompt \"The \" ==\n" << before_en << "\n\n== base, prompt \"Der \" ==\n" << before_de << "\n\n";
  std::printf("\nsamples after adapting (seed 0, chosen lr, prompt \"Der \", temperature 0.8, top-k 40):\n");
  for (std::size_t m = 0; m < rows.size(); ++m) {
    samples << "== " << rows[m].name << ", prompt \"Der \" ==\n" << finals[m].front().sample << "\n\n";
    std::printf("-- %s:\n%s\n", rows[m].name, finals[m].front().sample.c_str());
  }
  const double total_s = std::chrono::duration<double>(Clock::now() - t_start).count();
  std::printf("\nwrote %s/{summary.csv,runs.csv,bits_per_byte.svg,samples.txt}; total %.1f s\n", o.out.c_str(),
              total_s);

  if (o.check) {  // what must hold whatever the sizes
    bool ok = true;
    auto expect = [&](bool cond, const std::string& what) {
      if (!cond) {
        std::printf("CHECK FAILED: %s\n", what.c_str());
        ok = false;
      }
    };
    expect(s.base_source_bpb < uniform_bpb - 2.0, "pretraining brings English bits/byte 2 below uniform");
    for (std::size_t m = 0; m < rows.size(); ++m) {
      const RunResult& f = finals[m].front();
      // Prompt learning: training lowers German bits/byte from the random prompt's (in --quick's 20
      // steps a random prompt does not get back below the base model; in the default run it does).
      if (is_prompt_learning(rows[m]))
        expect(f.target_bpb < f.init_target_bpb,
               std::string(rows[m].name) + " training lowers German bits/byte from its random init");
      else
        expect(f.target_bpb < s.base_target_bpb, std::string(rows[m].name) + " lowers German bits/byte");
      if (!std::isnan(f.source_bpb_disabled) && !rows[m].nf4_base)
        expect(std::abs(f.source_bpb_disabled - s.base_source_bpb) < 1e-9,
               std::string(rows[m].name) + " disabled gives the base model's English bits/byte");
      if (rows[m].nf4_base && !std::isnan(f.source_bpb_disabled))  // NF4 base: close to, not equal to, the dense base
        expect(std::abs(f.source_bpb_disabled - s.base_source_bpb) < 0.1,
               std::string(rows[m].name) + " disabled (NF4 base) is within 0.1 bits/byte of the dense base");
      expect(rows[m].config == nullptr ? std::abs(f.trainable_pct - 100.0) < 1e-9 : f.trainable_pct < 20.0,
             std::string(rows[m].name) + " trainable %");
    }
    std::printf("checks: %s\n", ok ? "all hold" : "FAILED");
    return ok ? 0 : 1;
  }
  return 0;
}

// ------------------------------------------------------------------------------------------------
// Checkpoint mode.
// ------------------------------------------------------------------------------------------------
int run_checkpoint(const Options& o) {
  const auto t_start = Clock::now();
  peft::io::LlamaLoadReport report;
  LlamaForCausalLM<T> model = peft::io::load_llama<T>(o.model_dir, &report);
  const peft::LlamaConfig& c = model.config();
  const std::string tok_path = o.tokenizer_file.empty() ? o.model_dir + "/tokenizer.json" : o.tokenizer_file;
  const Tokenizer tok = Tokenizer::from_file(tok_path);
  if (static_cast<Index>(tok.vocab_size()) > c.vocab_size)
    throw peft::ConfigError("lm_finetune: tokenizer \"" + tok_path + "\" has " + std::to_string(tok.vocab_size()) +
                            " tokens, the model's vocab_size is " + std::to_string(c.vocab_size));
  const double load_s = std::chrono::duration<double>(Clock::now() - t_start).count();
  std::printf("loaded %s (%s, hidden %ld, %ld layers, vocab %ld: %s parameters) in %.2f s; tokenizer %s\n",
              o.model_dir.c_str(), c.model_type.c_str(), static_cast<long>(c.hidden_size),
              static_cast<long>(c.num_hidden_layers), static_cast<long>(c.vocab_size),
              peft::with_thousands(peft::count_parameters(model).total).c_str(), load_s, tok_path.c_str());

  // The text: paragraphs (blank-line separated); every 10th held out (at least one).
  const std::string text = read_file(o.data_file);
  std::vector<std::string> paragraphs;
  {
    std::string cur;
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) {
        if (!cur.empty()) paragraphs.push_back(cur);
        cur.clear();
      } else {
        cur += line + "\n";
      }
    }
    if (!cur.empty()) paragraphs.push_back(cur);
  }
  if (paragraphs.size() < 2)
    throw peft::ConfigError("lm_finetune: \"" + o.data_file + "\" needs at least 2 paragraphs");
  std::vector<std::string> tr, te;
  for (std::size_t i = 0; i < paragraphs.size(); ++i)
    (i % 10 == 9 || (i + 1 == paragraphs.size() && te.empty()) ? te : tr).push_back(paragraphs[i]);
  const std::vector<Index> train_ids = tokens_of(tok, tr, -1, 0), test_ids = tokens_of(tok, te, -1, 0);
  const Index seq = std::min<Index>({o.seq, c.max_position_embeddings, static_cast<Index>(train_ids.size()) - 1});
  if (seq < 2) throw peft::ConfigError("lm_finetune: the training text has fewer than 3 tokens");
  for (Index id : train_ids)
    if (id >= c.vocab_size) throw peft::ConfigError("lm_finetune: token id " + std::to_string(id) + " >= vocab_size");
  const int steps = o.steps > 0 ? o.steps : 200;
  std::printf("data %s: %zu paragraphs, %zu train / %zu held-out tokens; sequences of %ld, batch %ld, %d steps\n",
              o.data_file.c_str(), paragraphs.size(), train_ids.size(), test_ids.size(), static_cast<long>(seq),
              static_cast<long>(o.batch), steps);
  std::string prompt = o.prompt;
  if (prompt.empty()) {  // the first words of the held-out text
    const std::string& h = te.front();
    std::size_t cut = std::min<std::size_t>(h.size(), 24);
    while (cut > 0 && h[cut - 1] != ' ') --cut;
    prompt = cut > 0 ? h.substr(0, cut) : h.substr(0, std::min<std::size_t>(h.size(), 8));
  }
  const double before = bits_per_byte(model, tok, test_ids, seq);
  const std::string sample_before = sample(model, tok, prompt, o.sample_tokens, 7);

  if (o.method == "qlora") quantize_base(model);
  peft::PeftModel<T> pm(model);
  const Json config = {{"peft_type", "LORA"},
                       {"r", 8},
                       {"lora_alpha", 16},
                       {"lora_dropout", 0.0},
                       {"target_modules", "all-linear"},
                       {"base_model_name_or_path", o.model_dir}};
  pm.add_adapter("default", config);
  // PEFT's line, with an NF4 base counted by its elements (PEFT's own count of a 4-bit model differs).
  std::printf("%s: %s\n", o.method.c_str(), peft::trainable_parameters_line(parameter_count(model)).c_str());
  const TrainStats st = train(model, train_ids, steps, o.lr, o.batch, seq, 1);
  const double after = bits_per_byte(model, tok, test_ids, seq);
  std::printf("trained %d steps: loss %.3f -> %.3f, %.0f tokens/s; held-out bits/byte %.4f -> %.4f\n", steps,
              st.first_loss, st.last_loss, st.tokens_per_s, before, after);
  pm.save_pretrained(o.adapter_out);
  std::printf("saved the adapter to %s/ (adapter_config.json, adapter_model.safetensors)\n", o.adapter_out.c_str());
  const std::string sample_after = sample(model, tok, prompt, o.sample_tokens, 7);
  std::printf("sample before (prompt \"%s\"):\n%s\nsample after:\n%s\n", prompt.c_str(), sample_before.c_str(),
              sample_after.c_str());

  if (o.check) {  // the saved adapter, loaded onto a fresh base, gives the trained model's logits
    LlamaForCausalLM<T> fresh = peft::io::load_llama<T>(o.model_dir);
    if (o.method == "qlora") quantize_base(fresh);
    peft::PeftModel<T> pm2(fresh);
    pm2.load_pretrained(o.adapter_out);
    const Index len = std::min<Index>(seq, static_cast<Index>(test_ids.size()));
    const std::vector<Index> ids(test_ids.begin(), test_ids.begin() + len);
    const peft::SequenceLayout layout(1, len);
    typename LlamaForCausalLM<T>::Cache c1, c2;
    Matrix<T> a, b;
    model.forward(ids, layout, a, c1);
    fresh.forward(ids, layout, b, c2);
    const double diff = (a - b).cwiseAbs().maxCoeff(), scale = a.cwiseAbs().maxCoeff();
    const bool same = diff <= 1e-5 * std::max(1.0, scale);
    const bool learned = after < before;
    std::printf("check: reloaded adapter logits max |diff| %.2e (%s); held-out bits/byte %s\n", diff,
                same ? "same" : "DIFFERENT", learned ? "lower" : "NOT LOWER");
    return same && learned ? 0 : 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  peft::set_warning_handler(peft::stderr_warning_handler());
  // One thread by default: the matrices are small, and on a busy machine OpenMP's barriers stall
  // (--threads 2 helps on an idle one).
  Eigen::setNbThreads(o.threads);
  try {
    if (!o.model_dir.empty()) return run_checkpoint(o);
    ::mkdir(o.out.c_str(), 0755);
    return run_scratch(o);
  } catch (const peft::Error& e) {
    std::fprintf(stderr, "lm_finetune: %s\n", e.what());
    return 1;
  }
}
