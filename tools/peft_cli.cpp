// The `peft` command-line tool's commands (declared in peft_cli.hpp). Compiled once into
// peft_cli_lib, which the `peft` executable and the CLI tests both link.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <iomanip>
#include <map>
#include <new>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include <peft/core/error.hpp>
#include <peft/core/warnings.hpp>
#include <peft/io/adapter_factors.hpp>
#include <peft/io/combine_adapters.hpp>
#include <peft/io/extract_adapter.hpp>
#include <peft/io/merge_file.hpp>
#include <peft/io/methods.hpp>
#include <peft/io/peft_format.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/merge/analysis.hpp>
#include <peft/merge/combine.hpp>
#include <peft/merge/extract.hpp>
#include <peft/quant/bnb_format.hpp>
#include <peft/train/progress.hpp>
#include <peft/version.hpp>

#include "peft_cli.hpp"
#include "peft_reward.hpp"

namespace peft::cli {

using namespace peft::io;

/// Bad command line: message printed with the command's usage line.
class UsageError : public Error {
 public:
  using Error::Error;
};

/// Parsed `--key value` options and positionals.
struct Args {
  std::map<std::string, std::vector<std::string>> options;
  std::vector<std::string> positional;
  bool help = false;

  bool has(const std::string& k) const { return options.count(k) != 0; }
  const std::string& get(const std::string& k) const {
    const auto it = options.find(k);
    if (it == options.end()) throw UsageError("missing required option --" + k);
    if (it->second.size() > 1) throw UsageError("option --" + k + " given more than once");
    return it->second.front();
  }
  std::string get_or(const std::string& k, const std::string& dflt) const { return has(k) ? get(k) : dflt; }
  double number(const std::string& k, double dflt) const {
    if (!has(k)) return dflt;
    const std::string& s = get(k);
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    if (s.empty() || *end != '\0' || !std::isfinite(v))
      throw UsageError("--" + k + " needs a finite number, got \"" + s + "\"");
    return v;
  }
  long long integer(const std::string& k, long long dflt) const {
    if (!has(k)) return dflt;
    const std::string& s = get(k);
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0' || errno != 0) throw UsageError("--" + k + " needs an integer, got \"" + s + "\"");
    return v;
  }
};

/// `flags` take no value; every other `--name` takes the next argument (or `--name=value`).
inline Args parse_args(const std::vector<std::string>& argv, const std::vector<std::string>& known,
                       const std::vector<std::string>& flags = {}) {
  Args a;
  for (std::size_t i = 0; i < argv.size(); ++i) {
    const std::string& s = argv[i];
    if (s == "-h" || s == "--help") {
      a.help = true;
      continue;
    }
    if (s.rfind("--", 0) == 0 && s.size() > 2) {
      std::string key = s.substr(2), value;
      const auto eq = key.find('=');
      const bool inline_value = eq != std::string::npos;
      if (inline_value) {
        value = key.substr(eq + 1);
        key = key.substr(0, eq);
      }
      const bool is_flag = std::find(flags.begin(), flags.end(), key) != flags.end();
      if (!is_flag && std::find(known.begin(), known.end(), key) == known.end())
        throw UsageError("unknown option --" + key);
      if (is_flag) {
        if (inline_value) throw UsageError("option --" + key + " takes no value");
        a.options[key].push_back("1");
        continue;
      }
      if (!inline_value) {
        if (i + 1 >= argv.size()) throw UsageError("option --" + key + " needs a value");
        value = argv[++i];
      }
      a.options[key].push_back(value);
    } else {
      a.positional.push_back(s);
    }
  }
  return a;
}

struct Command {
  const char* name;
  const char* summary;
  const char* usage;  ///< full --help text
  std::function<int(const Args&, std::ostream&, std::ostream&)> run;
  std::vector<std::string> options;
  std::vector<std::string> flags;
};

namespace detail {

inline std::string fmt(double v, int prec = 6) {
  std::ostringstream s;
  s << std::setprecision(prec) << v;
  return s.str();
}

inline std::string human_bytes(std::uint64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  return fmt(v, 4) + " " + units[u];
}

inline NameMapping mapping_from(const Args& a) {
  NameMapping m;
  if (!a.has("map")) return m;
  for (const std::string& rule : a.options.at("map")) {
    const auto eq = rule.find('=');
    if (eq == std::string::npos) throw UsageError("--map needs FROM=TO (a prefix rewrite), got \"" + rule + "\"");
    m.prefix_rules.emplace_back(rule.substr(0, eq), rule.substr(eq + 1));
  }
  return m;
}

inline std::vector<double> parse_list(const std::string& s, const char* what) {
  std::vector<double> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const double v = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0' || !std::isfinite(v))
      throw UsageError(std::string(what) + " must be a comma-separated list of numbers, got \"" + s + "\"");
    out.push_back(v);
  }
  return out;
}

/// Natural order of dotted names: runs of digits compare as numbers, so "layers.2" < "layers.10"
/// (equal numbers with more leading zeros come later, so the order is total).
inline bool natural_less(const std::string& a, const std::string& b) {
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (digit(a[i]) && digit(b[j])) {
      std::size_t i1 = i, j1 = j;
      while (i1 < a.size() && digit(a[i1])) ++i1;
      while (j1 < b.size() && digit(b[j1])) ++j1;
      std::size_t i0 = i, j0 = j;  // skip leading zeros, then the longer number is the larger
      while (i0 + 1 < i1 && a[i0] == '0') ++i0;
      while (j0 + 1 < j1 && b[j0] == '0') ++j0;
      if (i1 - i0 != j1 - j0) return i1 - i0 < j1 - j0;
      const int c = a.compare(i0, i1 - i0, b, j0, j1 - j0);
      if (c != 0) return c < 0;
      if (i1 - i != j1 - j) return i1 - i < j1 - j;
      i = i1;
      j = j1;
    } else {
      if (a[i] != b[j]) return static_cast<unsigned char>(a[i]) < static_cast<unsigned char>(b[j]);
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

/// The base's header read with pread (see read_safetensors_header), with io::open_safetensors' message.
inline SafeTensorsHeader base_header(const std::string& path) {
  const InputFile f(path);
  unsigned char first = 0;
  if (f.size() > 0) f.read_at(0, 1, &first);
  if (first == '{' || first == '[')
    throw IoError("\"" + path + "\" is a JSON file, not a safetensors file (which starts with an 8-byte header " +
                  "length); expected the base model's .safetensors file");
  return read_safetensors_header(f);
}

/// A progress line on stderr when it is a terminal; nothing otherwise (logs, pipes, tests).
inline ProgressOptions terminal_progress(const std::ostream& err) {
  ProgressOptions o;
  o.mode = is_terminal(err) ? ProgressOptions::Mode::Interactive : ProgressOptions::Mode::Silent;
  return o;
}

// ---------------------------------------------------------------------------------------------

/// The peft_type of an adapter directory's config when it is a method of the table (LORA, VERA,
/// LOHA, LOKR, IA3); empty otherwise (prompt and prefix tuning, which add virtual tokens, not a term
/// of a linear, take the PEFT-adapter path of io/peft_format.hpp).
inline std::string table_method_of(const std::string& dir) {
  const std::string type = adapter_dir_peft_type(dir);
  return find_method_format<double>(type) != nullptr ? type : "";
}

/// `peft inspect DIR` for a table method: its config keys, then per module its tensors.
inline int inspect_method_dir(const std::string& dir, const MethodAdapterFile<double>& f, std::ostream& out) {
  out << "adapter:    " << dir << "\n";
  out << "peft_type:  " << f.format->peft_type << " (" << f.format->kind << ")\n";
  for (const std::string& k : f.format->config_keys)
    if (f.config.contains(k) && !f.config.at(k).is_null()) out << k << ": " << f.config.at(k).dump() << "\n";
  for (const auto& kv : f.model_tensors) out << "model tensor " << kv.first << " " << shape_str(kv.second) << "\n";
  out << "modules:    " << f.modules.size() << "\n\n";
  out << std::left << std::setw(10) << "params" << std::setw(13) << "norm" << std::setw(44) << "tensors"
      << "module\n";
  std::vector<std::string> paths;
  for (const auto& kv : f.modules) paths.push_back(kv.first);
  std::sort(paths.begin(), paths.end(), natural_less);
  Index total = 0;
  for (const std::string& p : paths) {
    Index n = 0;
    double sq = 0;
    std::string names;
    for (const auto& t : f.modules.at(p)) {
      n += t.second.size();
      sq += t.second.squaredNorm();
      names += (names.empty() ? "" : " ") + t.first + shape_str(t.second);
    }
    total += n;
    out << std::setw(10) << n << std::setw(13) << fmt(std::sqrt(sq), 5) << std::setw(44) << names << p << "\n";
  }
  for (const auto& kv : f.model_tensors) total += kv.second.size();
  out << "\nparameters in the file: " << total << "\n";
  return kOk;
}

inline int inspect_peft_adapter(const std::string& target, const PeftAdapter<double>& ad, std::ostream& out);

inline int cmd_inspect(const Args& a, std::ostream& out, std::ostream&) {
  if (a.positional.size() != 1) throw UsageError("inspect takes exactly one FILE or DIR");
  const std::string& target = a.positional[0];
  if (!path_exists(target)) throw IoError("\"" + target + "\" does not exist");
  if (!is_directory(target)) {
    const SafeTensorsFile f = open_safetensors(
        target, "a .safetensors file or an adapter directory (the folder holding adapter_config.json)");
    std::uint64_t params = 0;
    std::map<std::string, std::uint64_t> by_dtype;
    for (const TensorInfo& t : f.tensors()) {
      params += t.numel;
      by_dtype[dtype_name(t.dtype)] += t.numel;
    }
    out << "file:       " << target << "\n";
    out << "size:       " << human_bytes(f.file().size()) << " (header " << f.data_offset() - 8 << " bytes)\n";
    out << "tensors:    " << f.tensors().size() << "\n";
    out << "parameters: " << params;
    for (const auto& kv : by_dtype)
      out << (kv.first == by_dtype.begin()->first ? " (" : ", ") << kv.first << " " << kv.second;
    out << (by_dtype.empty() ? "" : ")") << "\n";
    if (!f.metadata().empty()) {
      out << "metadata:\n";
      for (const auto& kv : f.metadata()) out << "  " << kv.first << " = " << kv.second << "\n";
    }
    out << "\n"
        << std::left << std::setw(6) << "dtype" << std::setw(22) << "shape"
        << "name\n";
    std::vector<const TensorInfo*> sorted;
    for (const TensorInfo& t : f.tensors()) sorted.push_back(&t);
    std::sort(sorted.begin(), sorted.end(),
              [](const TensorInfo* x, const TensorInfo* y) { return natural_less(x->name, y->name); });
    for (const TensorInfo* t : sorted)
      out << std::setw(6) << dtype_name(t->dtype) << std::setw(22) << t->shape_string() << t->name << "\n";
    return kOk;
  }
  if (table_method_of(target).empty()) return inspect_peft_adapter(target, load_peft_adapter<double>(target), out);
  const MethodAdapterFile<double> f = read_method_adapter<double>(target);
  // LoRA's rows are factors: r, alpha, scaling and the analysis of s·B·A per module.
  if (f.format->peft_type == "LORA") return inspect_peft_adapter(target, lora_adapter_of(f), out);
  return inspect_method_dir(target, f, out);
}

/// `peft inspect DIR` for LoRA (a PeftAdapter of the table's LoRA row) and prompt / prefix tuning.
inline int inspect_peft_adapter(const std::string& target, const PeftAdapter<double>& ad, std::ostream& out) {
  const AdapterConfig& c = ad.config;
  out << "adapter:    " << target << "\n";
  out << "peft_type:  " << c.peft_type << (c.task_type.empty() ? "" : "  task_type: " + c.task_type) << "\n";
  if (!c.base_model_name_or_path.empty()) out << "base model: " << c.base_model_name_or_path << "\n";
  if (!c.unknown_keys.empty()) {
    out << "unknown config keys (kept):";
    for (const auto& k : c.unknown_keys) out << " " << k;
    out << "\n";
  }
  if (c.is_prompt()) {
    out << "virtual tokens: " << c.num_virtual_tokens << ", token_dim " << c.token_dim << ", layers " << c.num_layers
        << ", heads " << c.num_attention_heads << "\n";
    out << "prompt_embeddings: " << shape_str(ad.prompt_embeddings) << " = " << ad.prompt_embeddings.size()
        << " parameters, norm " << fmt(ad.prompt_embeddings.norm()) << "\n";
    return kOk;
  }
  out << "r " << c.r << ", lora_alpha " << fmt(c.lora_alpha) << (c.use_rslora ? ", rsLoRA" : "")
      << (c.use_dora ? ", DoRA" : "") << (c.fan_in_fan_out ? ", fan_in_fan_out" : "") << ", dropout "
      << fmt(c.lora_dropout) << "\n";
  out << "modules:    " << ad.lora.size() << "\n\n";
  out << std::left << std::setw(5) << "r" << std::setw(9) << "alpha" << std::setw(10) << "scaling" << std::setw(10)
      << "params" << std::setw(13) << "|dW|_F" << std::setw(10) << "num.rank" << std::setw(10) << "eff.rank"
      << "module\n";
  Index total = 0, dense = 0;
  std::vector<const LoraModuleWeights<double>*> modules;
  for (const auto& m : ad.lora) modules.push_back(&m);
  std::sort(modules.begin(), modules.end(), [](const LoraModuleWeights<double>* x, const LoraModuleWeights<double>* y) {
    return natural_less(x->path, y->path);
  });
  for (const LoraModuleWeights<double>* mp : modules) {
    const LoraModuleWeights<double>& m = *mp;
    const AdapterStats st = analyze_adapter(LoraFactors<double>{m.A, m.B, m.scaling, m.path});
    Index p = st.parameters + m.magnitude.size();
    total += p;
    dense += st.dense_parameters;
    out << std::setw(5) << m.rank() << std::setw(9) << fmt(m.alpha, 4) << std::setw(10) << fmt(m.scaling, 4)
        << std::setw(10) << p << std::setw(13) << fmt(st.frobenius_norm, 5) << std::setw(10) << st.numerical_rank
        << std::setw(10) << fmt(st.effective_rank, 3) << m.path << "\n";
  }
  for (const auto& f : ad.full) total += f.value.size();
  out << "\ntrainable parameters: " << total << " (the adapted weights hold " << dense << ")\n";
  if (!ad.full.empty()) {
    out << "full tensors (modules_to_save / bias): " << ad.full.size() << "\n";
    for (const auto& f : ad.full) {
      out << "  " << f.name << "  [";
      for (std::size_t d = 0; d < f.shape.size(); ++d) out << (d ? ", " : "") << f.shape[d];
      out << "]\n";
    }
  }
  return kOk;
}

inline int cmd_merge(const Args& a, std::ostream& out, std::ostream& err) {
  if (!a.positional.empty()) throw UsageError("unexpected argument \"" + a.positional[0] + "\"");
  const std::string base = a.get("base"), adapter = a.get("adapter"), dst = a.get("out");
  MergeFileOptions opt;
  opt.scale = a.number("scale", 1.0);
  opt.mapping = mapping_from(a);
  // The merge is bound by memory and I/O: its products are rank-r updates of a block of rows. Extra
  // GEMM threads only spin and take the CPU the kernel needs for the writes (measured on 1.26 GB:
  // about 1.5 s with one thread, 2.2 s with two).
  const int threads = Eigen::nbThreads();
  Eigen::setNbThreads(1);
  struct RestoreThreads {
    int n;
    ~RestoreThreads() { Eigen::setNbThreads(n); }
  } restore_threads{threads};
  // Compute in double only when the base stores F64 (float is exact enough for F32/F16/BF16).
  bool f64 = false;
  for (const TensorInfo& t : base_header(base).tensors) f64 = f64 || t.dtype == DType::F64;
  std::optional<Progress> progress;
  opt.on_tensor = [&](std::size_t i, std::size_t count, const TensorInfo&) {
    if (!progress) progress.emplace("merge", static_cast<Index>(count), err, terminal_progress(err));
    progress->update(static_cast<Index>(i));
  };
  MergeFileReport rep;
  if (!is_directory(adapter) || table_method_of(adapter).empty())  // refused there: no weights to merge
    rep = merge_adapter_file(base, load_peft_adapter<float>(adapter), dst, opt);
  else if (f64)
    rep = merge_method_file(base, read_method_adapter<double>(adapter), dst, opt);
  else
    rep = merge_method_file(base, read_method_adapter<float>(adapter), dst, opt);
  if (progress) {
    progress->update(progress->total());
    progress->finish();
  }
  out << "merged " << rep.merged << " tensors, replaced " << rep.replaced << ", copied " << rep.copied << " -> " << dst
      << " (" << human_bytes(rep.bytes) << ")\n";
  return kOk;
}

inline int cmd_combine(const Args& a, std::ostream& out, std::ostream& err) {
  if (a.positional.size() < 1) throw UsageError("combine needs at least one adapter directory");
  CombineAdaptersOptions opt;
  const std::string ms = a.get("method");
  if (!parse_combine_method(ms, opt.combine.method)) throw UsageError("unknown --method \"" + ms + "\"");
  const std::string dst = a.get("out");
  const std::size_t n = a.positional.size();
  opt.weights = a.has("weights") ? parse_list(a.get("weights"), "--weights") : std::vector<double>(n, 1.0);
  if (opt.weights.size() != n)
    throw UsageError("--weights has " + std::to_string(opt.weights.size()) + " values for " + std::to_string(n) +
                     " adapters");
  opt.combine.rank = static_cast<Index>(a.integer("rank", 0));
  if (opt.combine.rank < 0) throw UsageError("--rank must be >= 0 (0: the lossless rank), got " + a.get("rank"));
  opt.combine.density = a.number("density", 1.0);
  opt.combine.seed = static_cast<std::uint64_t>(a.integer("seed", 0));
  const std::string sign = a.get_or("majority-sign", "total");
  if (sign != "total" && sign != "frequency") throw UsageError("--majority-sign must be total or frequency");
  opt.combine.majority_sign = sign == "total" ? MajoritySign::Total : MajoritySign::Frequency;
  if (a.has("base")) {
    const std::string base = a.get("base");
    (void)base_header(base);  // a JSON file given by mistake gets base_header's message
    opt.shapes = module_shapes_of_safetensors(base);
  }
  // Dense methods take seconds per large module: a progress line on a terminal.
  std::optional<Progress> progress;
  opt.on_module = [&](std::size_t done, std::size_t count) {
    if (!progress) progress.emplace("combine", static_cast<Index>(count), err, terminal_progress(err));
    progress->update(static_cast<Index>(done));
  };
  const CombineAdaptersReport rep = combine_adapter_dirs<double>(a.positional, dst, opt);
  if (progress) progress->finish();
  out << "combined " << n << " adapters (" << to_string(opt.combine.method) << ") over " << rep.modules
      << " modules -> " << dst << "\nlargest truncation error |dW_target - B'A'|_F = " << fmt(rep.largest_error)
      << "\n";
  return kOk;
}

inline int cmd_extract(const Args& a, std::ostream& out, std::ostream&) {
  if (!a.positional.empty()) throw UsageError("unexpected argument \"" + a.positional[0] + "\"");
  const std::string bp = a.get("base"), tp = a.get("tuned"), dst = a.get("out");
  ExtractAdapterOptions opt;
  opt.svd.rank = static_cast<Index>(a.integer("rank", 0));
  opt.svd.energy = a.number("energy", 0.0);
  opt.svd.use_rslora = a.has("rslora");
  if (opt.svd.rank < 0) throw UsageError("--rank must be > 0, got " + a.get("rank"));
  if ((opt.svd.rank != 0) == (opt.svd.energy != 0.0)) throw UsageError("give exactly one of --rank K and --energy TAU");
  opt.fan_in_fan_out = a.has("fan-in-fan-out");
  opt.keep_full = a.has("keep-full");
  opt.exclude = a.get_or("exclude", kExtractExclude);
  opt.exclude_label = "--exclude";
  const ExtractAdapterReport rep = extract_adapter_dir(bp, tp, dst, opt);
  for (const ExtractedModule& m : rep.modules)
    out << "  " << m.path << ": rank " << m.rank << ", energy kept " << fmt(m.energy_kept, 5) << ", |dW - BA|_F "
        << fmt(m.frobenius_error, 5) << ", sigma_k+1 " << fmt(m.sigma_next, 5) << "\n";
  out << "extracted " << rep.modules.size() << " modules" << (opt.fan_in_fan_out ? " (fan_in_fan_out)" : "");
  if (!rep.kept_full.empty()) out << ", kept " << rep.kept_full.size() << " changed tensors whole";
  out << " -> " << dst << "\n";
  if (!rep.not_captured.empty()) {
    out << "note: " << rep.not_captured.size()
        << " changed tensors are not captured (vectors, or excluded by --exclude; --keep-full saves them whole):";
    for (std::size_t i = 0; i < rep.not_captured.size() && i < 8; ++i) out << (i ? ", " : " ") << rep.not_captured[i];
    if (rep.not_captured.size() > 8) out << ", ...";
    out << "\n";
  }
  return kOk;
}

inline int cmd_quantize(const Args& a, std::ostream& out, std::ostream&) {
  if (a.positional.size() != 1)
    throw UsageError("quantize needs exactly one input file, got " + std::to_string(a.positional.size()));
  const std::string src = a.positional[0], dst = a.get("out");
  quant::QuantizeFileOptions opt;
  const long long blocksize = a.integer("blocksize", opt.nf4.blocksize);
  if (blocksize <= 0 || blocksize > (1 << 20))
    throw UsageError("--blocksize must be in [1, 1048576], got " + a.get("blocksize"));
  opt.nf4.blocksize = static_cast<int>(blocksize);
  opt.nf4.double_quant = !a.has("no-double-quant");
  opt.include = a.get_or("include", opt.include);
  opt.exclude = a.get_or("exclude", opt.exclude);
  const quant::QuantizeFileReport rep = quant::quantize_safetensors(src, dst, opt);
  out << "quantized " << rep.quantized.size() << " weights to NF4"
      << (opt.nf4.double_quant ? " + double quantization" : "") << " (blocksize " << opt.nf4.blocksize << "), copied "
      << rep.copied.size() << " tensors -> " << dst << "\n";
  if (rep.input_bytes > 0)
    out << "quantized tensors: " << human_bytes(rep.input_bytes) << " -> " << human_bytes(rep.output_bytes) << " ("
        << fmt(static_cast<double>(rep.input_bytes) / static_cast<double>(rep.output_bytes), 4) << "x smaller, "
        << fmt(rep.bits_per_parameter(), 4) << " bits per parameter)\n";
  return kOk;
}

inline int cmd_reward(const Args& a, std::ostream& out, std::ostream& err) {
  if (a.positional.size() != 1)
    throw UsageError("reward needs exactly one text FILE, got " + std::to_string(a.positional.size()));
  RewardCommand c;
  c.model = a.get("model");
  c.reward = a.get("reward");
  c.tokenizer = a.get_or("tokenizer", "");
  c.input = a.positional[0];
  c.raw = a.has("raw");
  c.no_special = a.has("no-special-tokens");
  c.batch = a.integer("batch", 16);
  if (c.batch < 1 || c.batch > 4096) throw UsageError("--batch must be in [1, 4096], got " + a.get("batch"));
  return run_reward(c, out, err);
}

}  // namespace detail

/// The command table. New commands (e.g. `quantize`, owned by peft/quant) add one entry here.
inline const std::vector<Command>& commands() {
  static const std::vector<Command> table = {
      {"inspect",
       "list tensors of a safetensors file, or an adapter's config, ranks, scaling and delta norms",
       "usage: peft inspect FILE.safetensors|ADAPTER_DIR\n\n"
       "A file: size, tensor count, parameters per dtype, metadata, then dtype, shape and name of every tensor\n"
       "(in natural order: layers.2 before layers.10).\n"
       "An adapter directory (adapter_config.json + adapter_model.safetensors): the config (unknown keys are\n"
       "listed), and per LoRA module: r, alpha, scaling, parameter count, |dW|_F = |s B A|_F, numerical rank\n"
       "and entropy effective rank of dW (computed from the factors, never forming dW), in natural order.\n"
       "Only regular files are read: a FIFO or a device is refused (exit 3).\n",
       detail::cmd_inspect,
       {},
       {}},
      {"merge",
       "merge a LoRA / DoRA adapter into a safetensors model, streaming tensor by tensor",
       "usage: peft merge --base MODEL.safetensors --adapter ADAPTER_DIR --out MERGED.safetensors\n"
       "                  [--scale S] [--map FROM=TO]...\n\n"
       "W' = W + S * s * B A for every adapted module (DoRA: W' = m * V / |V|_row, V = W + S s B A), where the\n"
       "module \"p\" of the adapter (key base_model.model.p.lora_A.weight) updates the tensor \"p.weight\".\n"
       "--map FROM=TO rewrites a module-path prefix before the lookup (repeatable; first match wins).\n"
       "Memory stays bounded by a block of rows, not the model: the base is read once, front to back (pread,\n"
       "never memory-mapped), and the output is streamed to a temporary file renamed into place. Every tensor\n"
       "keeps its dtype; untouched ones are copied byte for byte. A NaN/Inf in a merged tensor aborts with\n"
       "nothing written (exit 6); so does a base truncated by another process during the merge (exit 3). A\n"
       "module whose tensor the base lacks is exit 4 (the wrong base, or a --map is needed). --out may name\n"
       "the base itself: it is replaced only at the end, and keeps its mode and owner. When stderr is a\n"
       "terminal, a progress line counts the tensors done.\n",
       detail::cmd_merge,
       {"base", "adapter", "out", "scale", "map"},
       {}},
      {"combine",
       "combine LoRA, VeRA, LoHa or LoKr adapters into one LoRA adapter (cat, svd, linear, ties, dare, ...)",
       "usage: peft combine --method METHOD [--weights w1,w2,...] [--rank K] [--density D] [--seed N]\n"
       "                    [--majority-sign total|frequency] [--base MODEL.safetensors]\n"
       "                    ADAPTER_DIR... --out OUT_DIR\n\n"
       "Methods: cat (exact, rank = sum of ranks), svd (exact sum re-compressed to rank K from the factors),\n"
       "linear, magnitude_prune, ties, dare_linear, dare_ties (on the dense deltas, as PEFT's\n"
       "add_weighted_adapter, then truncated SVD to rank K). --rank 0 (default) keeps the lossless rank.\n"
       "--density is the kept fraction for the pruning methods, --seed the DARE mask seed. Weights default\n"
       "to 1. The adapters must target the same modules. The result is a PEFT LoRA adapter with scaling 1.\n"
       "Sources may be LoRA, VeRA, LoHa or LoKr directories, mixed: each module's update is converted to LoRA\n"
       "factors exactly (VeRA at rank r, LoHa at rank <= r^2, LoKr at rank <= rank(W1) r). DoRA and (IA)^3 are\n"
       "refused (their update is not an additive s B A). A VeRA directory does not store each module's input\n"
       "size: another source of the module, or --base (the base model, read for its shapes only), gives it.\n"
       "When stderr is a terminal, a progress line counts the modules done.\n",
       detail::cmd_combine,
       {"method", "weights", "rank", "density", "seed", "majority-sign", "out", "base"},
       {}},
      {"quantize",
       "quantize the linear weights of a safetensors model to NF4 (bitsandbytes / QLoRA layout)",
       "usage: peft quantize IN.safetensors --out OUT.safetensors [--blocksize N] [--no-double-quant]\n"
       "                     [--include REGEX] [--exclude REGEX]\n\n"
       "Every 2-D floating-point tensor whose name fully matches --include (default .*\\.weight) and not\n"
       "--exclude (default: lm_head and embeddings, kept in full precision as transformers does) is replaced\n"
       "by blockwise NF4 (blocks of N = 64 values, fp32 absmax each) with double quantization of the absmax\n"
       "values (8-bit, blocks of 256) unless --no-double-quant, stored as transformers saves a bitsandbytes\n"
       "4-bit model: <p>.weight (packed uint8), .absmax, .quant_map, .nested_absmax, .nested_quant_map and\n"
       ".quant_state.bitsandbytes__nf4. Other tensors and the metadata are copied unchanged.\n",
       detail::cmd_quantize,
       {"out", "blocksize", "include", "exclude"},
       {"no-double-quant"}},
      {"extract",
       "extract a LoRA adapter from a full fine-tune (truncated SVD of W_tuned - W_base)",
       "usage: peft extract --base A.safetensors --tuned B.safetensors (--rank K | --energy TAU) [--rslora]\n"
       "                    [--fan-in-fan-out] [--exclude REGEX] [--keep-full] --out OUT_DIR\n\n"
       "For every 2-D \"*.weight\" tensor that differs, B A is the best rank-K approximation of the difference\n"
       "(or the smallest rank keeping a fraction TAU of its squared singular values); each module's error\n"
       "|dW - BA|_F and the bound sigma_k+1 are printed. The result is a PEFT adapter with scaling 1.\n"
       "--fan-in-fan-out: the weights are stored [in, out] (GPT-2 Conv1D); the config says so.\n"
       "--exclude (default: embedding tables, whose PEFT LoRA has another layout) keeps tensors out of the\n"
       "low-rank part. Changed tensors that are not extracted (biases, norms, excluded weights) are\n"
       "reported, or with --keep-full saved whole: biases of extracted modules as bias = \"lora_only\", the\n"
       "rest as modules_to_save, so that merging the adapter gives back the tuned model up to the SVD error.\n",
       detail::cmd_extract,
       {"base", "tuned", "rank", "energy", "out", "exclude"},
       {"rslora", "fan-in-fan-out", "keep-full"}},
      {"reward",
       "score lines of text with a reward model (base checkpoint + reward model directory)",
       "usage: peft reward --model BASE_DIR --reward REWARD_DIR [--tokenizer tokenizer.json] [--batch N]\n"
       "                   [--raw] [--no-special-tokens] FILE\n\n"
       "Loads the Llama-family checkpoint BASE_DIR (config.json + model.safetensors or its sharded index) and\n"
       "the reward model REWARD_DIR written by io::save_reward_model (a PEFT adapter directory for the backbone,\n"
       "reward_head.safetensors with the scalar head, reward_model.json with the normalisation statistics),\n"
       "tokenizes every non-empty line of FILE with BASE_DIR/tokenizer.json (or --tokenizer; special tokens\n"
       "such as BOS added unless --no-special-tokens) and prints one line per text: the normalised reward\n"
       "(r - mean) / std, with --raw also r, then the text, tab-separated (9 significant digits: exact in\n"
       "float). Texts are scored in right-padded batches of N (default 16); the reward is read at each\n"
       "text's last token.\n",
       detail::cmd_reward,
       {"model", "reward", "tokenizer", "batch"},
       {"raw", "no-special-tokens"}},
  };
  return table;
}

inline std::string main_help() {
  std::string s =
      "usage: peft COMMAND [OPTIONS]    (peft COMMAND --help for details)\n"
      "       peft --version\n\ncommands:\n";
  for (const Command& c : commands()) {
    std::string name = c.name;
    name.resize(10, ' ');
    s += "  " + name + c.summary + "\n";
  }
  s += "\nexit codes:\n"
       "  0  success\n"
       "  1  unexpected internal error\n"
       "  2  usage error (unknown command or option, missing or malformed value)\n"
       "  3  I/O or file-format error (missing, truncated or malformed file, not a regular file, an input\n"
       "     truncated while being read, failed write)\n"
       "  4  unsupported or inconsistent configuration (e.g. an adapter feature we do not implement, or a\n"
       "     tensor the adapter targets that the base lacks: the wrong base, or a --map is needed)\n"
       "  5  shapes that do not fit (adapter vs. base model)\n"
       "  6  NaN or Inf (e.g. produced by a merge)\n"
       "  7  out of memory\n"
       "\n"
       "Outputs are written atomically: into a temporary next to the output (.NAME.tmp-PID-XXXXXX), renamed\n"
       "into place once complete (an existing output directory is updated file by file, each file replaced\n"
       "atomically). After an error, or on SIGINT, SIGTERM or SIGHUP, the temporary is removed and what was\n"
       "there before is left as it was (a signal ends the tool with that signal's status). SIGKILL\n"
       "cannot be caught: it may leave the temporary, which the next run writing the same output removes.\n"
       "A replaced file keeps its mode and owner; new files and directories follow the umask. An existing\n"
       "output must be a regular file (a symbolic link there is replaced, its target is not written) or, for\n"
       "an output directory, a directory (or a link to one); anything else (e.g. /dev/null) is refused.\n";
  return s;
}

int run(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  if (argv.empty() || argv[0] == "-h" || argv[0] == "--help" || argv[0] == "help") {
    (argv.empty() ? err : out) << main_help();
    return argv.empty() ? kUsage : kOk;
  }
  if (argv[0] == "--version" || argv[0] == "-V") {
    out << "peft " << kVersionMajor << "." << kVersionMinor << "." << kVersionPatch << "\n";
    return kOk;
  }
  const Command* cmd = nullptr;
  for (const Command& c : commands())
    if (argv[0] == c.name) cmd = &c;
  if (cmd == nullptr) {
    err << "peft: unknown command \"" << argv[0] << "\"\n\n" << main_help();
    return kUsage;
  }
  const std::vector<std::string> rest(argv.begin() + 1, argv.end());
  // The library's warnings (core/warnings.hpp) go to this run's stderr, one "warning: ..." line each.
  const ScopedWarningHandler warnings([&err](const std::string& message) { err << "warning: " << message << "\n"; });
  try {
    const Args args = parse_args(rest, cmd->options, cmd->flags);
    if (args.help) {
      out << cmd->usage;
      return kOk;
    }
    return cmd->run(args, out, err);
  } catch (const UsageError& e) {
    err << "peft " << cmd->name << ": " << e.what() << "\n\n" << cmd->usage;
    return kUsage;
  } catch (const IoError& e) {
    err << "peft " << cmd->name << ": I/O error: " << e.what() << "\n";
    return kIo;
  } catch (const ConfigError& e) {
    err << "peft " << cmd->name << ": configuration error: " << e.what() << "\n";
    return kConfig;
  } catch (const ShapeError& e) {
    err << "peft " << cmd->name << ": shape error: " << e.what() << "\n";
    return kShape;
  } catch (const NumericError& e) {
    err << "peft " << cmd->name << ": numeric error: " << e.what() << "\n";
    return kNumeric;
  } catch (const std::bad_alloc&) {
    err << "peft " << cmd->name << ": out of memory (nothing was written)\n";
    return kOutOfMemory;
  } catch (const std::exception& e) {
    err << "peft " << cmd->name << ": internal error: " << e.what() << "\n";
    return kInternal;
  }
}

namespace {

/// SIGINT / SIGTERM / SIGHUP: remove the temporaries, then die of the same signal (SA_RESETHAND
/// has restored its default action; raised inside the handler it is pending until the handler
/// returns). SIGBUS: an input mapping lost its pages (the file was truncated): remove the
/// temporaries and exit as an I/O error. Only async-signal-safe calls.
void on_fatal_signal(int sig) {
  peft::io::remove_live_temporaries();
  if (sig == SIGBUS) {
    static const char msg[] =
        "peft: I/O error: an input file shrank while it was being read (SIGBUS); nothing was written\n";
    (void)!::write(STDERR_FILENO, msg, sizeof msg - 1);
    ::_exit(kIo);
  }
  (void)::raise(sig);
}

}  // namespace

void install_signal_handlers() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_fatal_signal;
  sa.sa_flags = SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGBUS};
  for (int sig : sigs) sigaddset(&sa.sa_mask, sig);  // one cleanup at a time
  for (int sig : sigs) {
    struct sigaction old;
    // A signal ignored at start (nohup, a shell's background job) stays ignored.
    if (sig != SIGBUS && ::sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) continue;
    (void)::sigaction(sig, &sa, nullptr);
  }
}

}  // namespace peft::cli
