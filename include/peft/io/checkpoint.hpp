#pragma once
// Training checkpoints: a bag of named tensors and named scalars in one safetensors file.
//
// Tensors are stored in T's native dtype (F32 / F64), so values come back bit for bit. Scalars
// live in the file's `__metadata__` (a string → string map) with a type tag:
//   "i:<name>"   int64 in decimal
//   "f:<name>"   double as a C99 hex float ("%a"), which strtod reads back exactly
//   "s:<name>"   string
//   "rng:<name>" the 4 words of a peft::Rng (xoshiro256**) state in hex
//   "l:<name>"   a list of int64 in decimal, comma-separated (e.g. a replay buffer's item ids)
// plus "peft.checkpoint" = "1" (format version). Adapter weights, optimizer state (see
// save_optimizer_state / load_optimizer_state), the data order (save_sampler_state,
// save_episode_sampler_state), a replay buffer (save_object_state: any object whose State lists its
// fields), the step and every generator's state together make resuming continue bit-identically:
// the same numbers in the same order.
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/module.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/types.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/meta/episodes.hpp"
#include "peft/optim/optimizer.hpp"
#include "peft/train/batches.hpp"

namespace peft::io {

template <class T>
class Checkpoint {
 public:
  struct Tensor {
    Matrix<T> value;
    bool vector = false;  ///< saved as a 1-D tensor [cols]
  };

  // ---- tensors ----
  void put_tensor(const std::string& name, const ConstMatrixRef<T>& value, bool vector = false) {
    check_name(name);
    if (vector && value.rows() != 1)
      throw ShapeError("Checkpoint: vector tensor \"" + name + "\" must be one row, got " + shape_str(value));
    auto it = index_.find(name);
    if (it == index_.end()) {
      index_[name] = tensors_.size();
      tensors_.emplace_back(name, Tensor{value, vector});
    } else {
      tensors_[it->second].second = Tensor{value, vector};
    }
  }
  bool has_tensor(const std::string& name) const { return index_.count(name) != 0; }
  const Matrix<T>& tensor(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) throw ConfigError("Checkpoint" + where() + ": no tensor \"" + name + "\"");
    return tensors_[it->second].second.value;
  }
  /// Tensors in insertion (file) order.
  const std::vector<std::pair<std::string, Tensor>>& tensors() const { return tensors_; }

  // ---- scalars ----
  void put_int(const std::string& name, std::int64_t v) { scalars_["i:" + checked(name)] = std::to_string(v); }
  void put_double(const std::string& name, double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%a", v);
    scalars_["f:" + checked(name)] = buf;
  }
  void put_string(const std::string& name, const std::string& v) { scalars_["s:" + checked(name)] = v; }
  void put_rng(const std::string& name, const Rng& rng) {
    std::string s;
    for (std::uint64_t w : rng.state()) {
      char buf[20];
      std::snprintf(buf, sizeof buf, "%016" PRIx64, w);
      s += buf;
    }
    scalars_["rng:" + checked(name)] = s;
  }

  void put_ints(const std::string& name, const std::vector<std::int64_t>& v) {
    std::string s;
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (i > 0) s += ',';
      s += std::to_string(v[i]);
    }
    scalars_["l:" + checked(name)] = s;
  }

  bool has_int(const std::string& name) const { return scalars_.count("i:" + name) != 0; }
  bool has_ints(const std::string& name) const { return scalars_.count("l:" + name) != 0; }
  bool has_double(const std::string& name) const { return scalars_.count("f:" + name) != 0; }
  bool has_string(const std::string& name) const { return scalars_.count("s:" + name) != 0; }
  bool has_rng(const std::string& name) const { return scalars_.count("rng:" + name) != 0; }

  std::int64_t get_int(const std::string& name) const {
    const std::string& s = scalar("i:", name);
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (errno != 0 || end == s.c_str() || *end != '\0') bad_scalar(name, s, "an integer");
    return static_cast<std::int64_t>(v);
  }
  double get_double(const std::string& name) const {
    const std::string& s = scalar("f:", name);
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    if (end == s.c_str() || *end != '\0') bad_scalar(name, s, "a number");
    return v;
  }
  const std::string& get_string(const std::string& name) const { return scalar("s:", name); }
  std::vector<std::int64_t> get_ints(const std::string& name) const {
    const std::string& s = scalar("l:", name);
    std::vector<std::int64_t> out;
    const char* p = s.c_str();
    while (*p != '\0') {
      char* end = nullptr;
      errno = 0;
      const long long v = std::strtoll(p, &end, 10);
      if (errno != 0 || end == p || (*end != ',' && *end != '\0') || (*end == ',' && end[1] == '\0'))
        bad_scalar(name, s, "a comma-separated list of integers");
      out.push_back(static_cast<std::int64_t>(v));
      p = *end == ',' ? end + 1 : end;
    }
    return out;
  }
  void get_rng(const std::string& name, Rng& rng) const {
    const std::string& s = scalar("rng:", name);
    if (s.size() != 64) bad_scalar(name, s, "64 hex digits");
    Rng::State st{};
    for (std::size_t i = 0; i < 4; ++i) {
      std::uint64_t w = 0;
      for (std::size_t k = 0; k < 16; ++k) {
        const char c = s[16 * i + k];
        int d = 0;
        if (c >= '0' && c <= '9')
          d = c - '0';
        else if (c >= 'a' && c <= 'f')
          d = c - 'a' + 10;
        else
          bad_scalar(name, s, "64 hex digits");
        w = (w << 4) | static_cast<std::uint64_t>(d);
      }
      st[i] = w;
    }
    // xoshiro256** from the all-zero state outputs zeros forever: never a state a run saved.
    if (st[0] == 0 && st[1] == 0 && st[2] == 0 && st[3] == 0)
      bad_scalar(name, s, "a generator state (all zero is not one)");
    rng.set_state(st);
  }

  // ---- files ----
  /// Writes the checkpoint atomically (temporary file + fsync + rename).
  void save(const std::string& path) const {
    std::vector<NamedTensor<T>> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_)
      out.push_back({kv.first, matrix_shape(kv.second.value.rows(), kv.second.value.cols(), kv.second.vector),
                     kv.second.value.data(), native_dtype<T>()});
    std::map<std::string, std::string> meta = scalars_;
    meta["peft.checkpoint"] = "1";
    save_safetensors<T>(path, out, meta);
  }

  static Checkpoint load(const std::string& path) {
    const SafeTensorsFile f(path);
    const auto it = f.metadata().find("peft.checkpoint");
    if (it == f.metadata().end())
      throw IoError("\"" + path + "\" is not a peft checkpoint (no \"peft.checkpoint\" metadata)");
    if (it->second != "1")
      throw IoError("\"" + path + "\": unsupported checkpoint format version \"" + it->second + "\"");
    Checkpoint c;
    c.path_ = path;
    for (const auto& kv : f.metadata()) {
      if (kv.first == "peft.checkpoint") continue;
      const bool tagged = kv.first.rfind("i:", 0) == 0 || kv.first.rfind("f:", 0) == 0 ||
                          kv.first.rfind("s:", 0) == 0 || kv.first.rfind("rng:", 0) == 0 ||
                          kv.first.rfind("l:", 0) == 0;
      if (!tagged) throw IoError("\"" + path + "\": metadata key \"" + kv.first + "\" has no type tag");
      c.scalars_[kv.first] = kv.second;
    }
    for (const TensorInfo& t : f.tensors()) {
      if (t.dtype != native_dtype<T>())
        throw IoError("\"" + path + "\": tensor \"" + t.name + "\" is " + dtype_name(t.dtype) + ", expected " +
                      dtype_name(native_dtype<T>()) + " (a checkpoint resumes with the scalar type it was saved with)");
      if (t.shape.size() > 2)
        throw IoError("\"" + path + "\": tensor \"" + t.name + "\" has rank " + std::to_string(t.shape.size()));
      c.put_tensor(t.name, f.load<T>(t.name), t.shape.size() == 1);
    }
    return c;
  }

 private:
  static void check_name(const std::string& name) {
    if (name.empty() || name == "__metadata__") throw ConfigError("Checkpoint: invalid name \"" + name + "\"");
  }
  static const std::string& checked(const std::string& name) {
    check_name(name);
    return name;
  }
  std::string where() const { return path_.empty() ? "" : " \"" + path_ + "\""; }
  const std::string& scalar(const char* tag, const std::string& name) const {
    const auto it = scalars_.find(tag + name);
    if (it == scalars_.end()) throw ConfigError("Checkpoint" + where() + ": no scalar \"" + name + "\" of type " + tag);
    return it->second;
  }
  [[noreturn]] void bad_scalar(const std::string& name, const std::string& s, const char* expected) const {
    throw IoError("Checkpoint" + where() + ": scalar \"" + name + "\" = \"" + s + "\" is not " + expected);
  }

  std::vector<std::pair<std::string, Tensor>> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> scalars_;
  std::string path_;
};

/// Stores every parameter of `model` (only the trainable ones when `trainable_only`) as
/// `<prefix><dotted name>`.
template <class T>
void save_parameters(Module<T>& model, Checkpoint<T>& ck, const std::string& prefix = "param.",
                     bool trainable_only = true) {
  model.visit_parameters([&](const std::string& name, Parameter<T>& p) {
    if (!trainable_only || p.trainable()) ck.put_tensor(prefix + name, p.value, p.is_vector());
  });
}

/// Restores parameters saved by save_parameters: every `<prefix>...` tensor must name a parameter
/// of the same shape. All are checked before the first copy, so a mismatch leaves the model as it
/// was. Returns how many parameters were restored.
template <class T>
std::size_t restore_parameters(Module<T>& model, const Checkpoint<T>& ck, const std::string& prefix = "param.") {
  std::unordered_map<std::string, Parameter<T>*> idx;
  model.visit_parameters([&](const std::string& n, Parameter<T>& p) { idx[n] = &p; });
  std::vector<std::pair<Parameter<T>*, const Matrix<T>*>> plan;
  for (const auto& kv : ck.tensors()) {
    if (kv.first.rfind(prefix, 0) != 0) continue;
    const std::string name = kv.first.substr(prefix.size());
    const auto it = idx.find(name);
    if (it == idx.end())
      throw ConfigError("restore_parameters: checkpoint tensor \"" + kv.first + "\" names no parameter of the model");
    const Matrix<T>& v = kv.second.value;
    if (it->second->value.rows() != v.rows() || it->second->value.cols() != v.cols())
      throw ShapeError("restore_parameters: parameter \"" + name + "\" has shape " + shape_str(it->second->value) +
                       ", checkpoint has " + shape_str(v));
    plan.emplace_back(it->second, &v);
  }
  for (auto& s : plan) s.first->value = *s.second;
  return plan.size();
}

/// Stores the optimizer's per-group lr / initial lr / weight decay (schedules change them) and,
/// per parameter, its step count and state tensors (State::visit_tensors names them):
///   <prefix>group.<group>.lr|initial_lr|weight_decay   (doubles)
///   <prefix>steps.<param>, <prefix>has_state.<param>   (ints)
///   <prefix>state.<param>.<field>                      (tensors)
template <class T, class State>
void save_optimizer_state(BasicOptimizer<T, State>& opt, Checkpoint<T>& ck, const std::string& prefix = "optim.") {
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::string gp = prefix + "group." + opt.group_name(g) + ".";
    ck.put_double(gp + "lr", opt.lr(g));
    ck.put_double(gp + "initial_lr", opt.initial_lr(g));
    ck.put_double(gp + "weight_decay", opt.weight_decay(g));
  }
  for (auto& group : opt.groups())
    for (auto& e : group.entries) {
      ck.put_int(prefix + "steps." + e.name, e.steps);
      ck.put_int(prefix + "has_state." + e.name, e.has_state ? 1 : 0);
      if (e.has_state)
        e.state.visit_tensors(
            [&](const char* field, Matrix<T>& m) { ck.put_tensor(prefix + "state." + e.name + "." + field, m); });
    }
}

/// Restores what save_optimizer_state wrote into an optimizer built over the same parameters
/// (same group and parameter names). Everything is read and validated first (lr, initial lr and
/// weight decay finite and >= 0, step counts >= 0, has_state 0 or 1, state tensors of the
/// parameter's shape and finite); only then is anything replaced, by operations that cannot fail:
/// on error the optimizer is unchanged, bit for bit.
template <class T, class State>
void load_optimizer_state(BasicOptimizer<T, State>& opt, const Checkpoint<T>& ck,
                          const std::string& prefix = "optim.") {
  using Entry = typename BasicOptimizer<T, State>::Entry;
  const char* who = "load_optimizer_state";
  const auto hyper = [&](const std::string& key) {
    const double v = ck.get_double(key);
    if (!std::isfinite(v) || v < 0.0)
      throw ConfigError(std::string(who) + ": checkpoint scalar \"" + key + "\" must be finite and >= 0, got " +
                        check::num(v));
    return v;
  };
  std::vector<double> lr(opt.num_groups()), initial(opt.num_groups()), wd(opt.num_groups());
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::string gp = prefix + "group." + opt.group_name(g) + ".";
    lr[g] = hyper(gp + "lr");
    initial[g] = hyper(gp + "initial_lr");
    wd[g] = hyper(gp + "weight_decay");
  }
  std::vector<std::pair<Entry*, Entry>> plan;
  for (auto& group : opt.groups())
    for (auto& e : group.entries) {
      Entry fresh;
      fresh.name = e.name;
      fresh.param = e.param;
      const std::string steps_key = prefix + "steps." + e.name, has_key = prefix + "has_state." + e.name;
      fresh.steps = ck.get_int(steps_key);
      if (fresh.steps < 0)
        throw ConfigError(std::string(who) + ": checkpoint scalar \"" + steps_key + "\" must be >= 0, got " +
                          std::to_string(fresh.steps));
      const std::int64_t has = ck.get_int(has_key);
      if (has != 0 && has != 1)
        throw ConfigError(std::string(who) + ": checkpoint scalar \"" + has_key + "\" must be 0 or 1, got " +
                          std::to_string(has));
      fresh.has_state = has == 1;
      if (fresh.has_state)
        fresh.state.visit_tensors([&](const char* field, Matrix<T>& m) {
          const std::string n = prefix + "state." + e.name + "." + field;
          m = ck.tensor(n);
          if (m.size() != 0 && (m.rows() != e.param->value.rows() || m.cols() != e.param->value.cols()))
            throw ShapeError(std::string(who) + ": \"" + n + "\" has shape " + shape_str(m) + ", parameter \"" +
                             e.name + "\" has " + shape_str(e.param->value));
          if (!all_finite(m)) throw NumericError(std::string(who) + ": \"" + n + "\" contains NaN or Inf");
        });
      plan.emplace_back(&e, std::move(fresh));
    }
  // Nothing below throws: moves of validated entries, and lr / weight decay already checked.
  for (auto& p : plan) *p.first = std::move(p.second);
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    opt.groups()[g].initial_lr = initial[g];
    opt.set_lr(g, lr[g]);
    opt.set_weight_decay(g, wd[g]);
  }
}

/// Stores a BatchSampler's place in the data order: the generator at the start of its epoch
/// ("rng:<name>.epoch"), the position in the epoch and, to refuse a mismatched restore, its size
/// and batch size.
template <class T>
void save_sampler_state(const BatchSampler& s, Checkpoint<T>& ck, const std::string& name = "sampler") {
  const BatchSampler::State st = s.state();
  Rng epoch;
  epoch.set_state(st.epoch_rng);
  ck.put_rng(name + ".epoch", epoch);
  ck.put_int(name + ".position", st.position);
  ck.put_int(name + ".size", s.size());
  ck.put_int(name + ".batch_size", s.batch_size());
}

/// Restores what save_sampler_state wrote into a sampler over as many indices, in batches of the
/// same size: the rest of the epoch, and every later one, come out as in the saved run.
template <class T>
void load_sampler_state(BatchSampler& s, const Checkpoint<T>& ck, const std::string& name = "sampler") {
  const std::int64_t n = ck.get_int(name + ".size"), b = ck.get_int(name + ".batch_size");
  if (n != s.size() || b != s.batch_size())
    throw ConfigError("load_sampler_state: checkpoint sampler \"" + name + "\" is over " + std::to_string(n) +
                      " indices in batches of " + std::to_string(b) + ", this one over " + std::to_string(s.size()) +
                      " in batches of " + std::to_string(s.batch_size()));
  Rng epoch;
  ck.get_rng(name + ".epoch", epoch);
  s.set_state(BatchSampler::State{epoch.state(), static_cast<Index>(ck.get_int(name + ".position"))});
}

namespace detail {
/// Puts each field a State's visit() lists into a checkpoint as <prefix><field>.
template <class T>
struct StateWriter {
  Checkpoint<T>& ck;
  const std::string& prefix;
  void operator()(const char* field, std::vector<std::int64_t>& v) const { ck.put_ints(prefix + field, v); }
  void operator()(const char* field, std::int64_t& v) const { ck.put_int(prefix + field, v); }
  void operator()(const char* field, Rng::State& st) const {
    Rng r;
    r.set_state(st);
    ck.put_rng(prefix + field, r);
  }
};
/// Reads them back (ConfigError naming the missing field, IoError for a malformed one).
template <class T>
struct StateReader {
  const Checkpoint<T>& ck;
  const std::string& prefix;
  void operator()(const char* field, std::vector<std::int64_t>& v) const { v = ck.get_ints(prefix + field); }
  void operator()(const char* field, std::int64_t& v) const { v = ck.get_int(prefix + field); }
  void operator()(const char* field, Rng::State& st) const {
    Rng r;
    ck.get_rng(prefix + field, r);
    st = r.state();
  }
};
}  // namespace detail

/// Stores the state of an object whose `State` lists its fields by name (State::visit with integer
/// lists, integers and generator states, as an optimizer state lists its tensors), e.g. a
/// peft::ReplayBuffer: field f goes to "<name>.<f>".
template <class T, class Stateful>
void save_object_state(const Stateful& object, Checkpoint<T>& ck, const std::string& name) {
  typename Stateful::State st = object.state();
  const std::string prefix = name + ".";
  st.visit(detail::StateWriter<T>{ck, prefix});
}

/// Restores what save_object_state wrote: every field is read first, then object.set_state()
/// validates the whole state (on error the object is unchanged).
template <class T, class Stateful>
void load_object_state(Stateful& object, const Checkpoint<T>& ck, const std::string& name) {
  typename Stateful::State st = object.state();
  const std::string prefix = name + ".";
  st.visit(detail::StateReader<T>{ck, prefix});
  object.set_state(st);
}

/// Stores an EpisodeSampler's place (its generator and episode count: State::visit) and, to refuse
/// a mismatched restore, its N, K, Q and the classes it draws from.
template <class T>
void save_episode_sampler_state(const EpisodeSampler& s, Checkpoint<T>& ck, const std::string& name = "episodes") {
  save_object_state(s, ck, name);
  ck.put_int(name + ".n_way", s.n_way());
  ck.put_int(name + ".k_shot", s.k_shot());
  ck.put_int(name + ".n_query", s.n_query());
  ck.put_ints(name + ".classes", s.classes());
}

/// Restores what save_episode_sampler_state wrote into a sampler over the same labels, classes, N,
/// K and Q: the episodes that follow are those the saved run would have drawn.
template <class T>
void load_episode_sampler_state(EpisodeSampler& s, const Checkpoint<T>& ck, const std::string& name = "episodes") {
  const std::int64_t n = ck.get_int(name + ".n_way"), k = ck.get_int(name + ".k_shot"),
                     q = ck.get_int(name + ".n_query");
  const std::vector<std::int64_t> classes = ck.get_ints(name + ".classes");
  if (n != s.n_way() || k != s.k_shot() || q != s.n_query() || classes != s.classes())
    throw ConfigError("load_episode_sampler_state: checkpoint sampler \"" + name + "\" draws " + std::to_string(n) +
                      "-way " + std::to_string(k) + "-shot episodes with " + std::to_string(q) + " queries from " +
                      std::to_string(classes.size()) + " classes, this one " + std::to_string(s.n_way()) + "-way " +
                      std::to_string(s.k_shot()) + "-shot with " + std::to_string(s.n_query()) + " queries from " +
                      std::to_string(s.classes().size()) + " classes" +
                      (classes.size() == s.classes().size() ? " (other classes)" : ""));
  load_object_state(s, ck, name);
}

}  // namespace peft::io

// The test build compiles these once (tests/support/instantiations_io.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_IO_CHECKPOINT_TEMPLATES(KW, T)                                                  \
  KW template class Checkpoint<T>;                                                           \
  KW template void save_parameters<T>(Module<T>&, Checkpoint<T>&, const std::string&, bool); \
  KW template std::size_t restore_parameters<T>(Module<T>&, const Checkpoint<T>&, const std::string&);
namespace peft::io {
PEFT_IO_CHECKPOINT_TEMPLATES(extern, float)
PEFT_IO_CHECKPOINT_TEMPLATES(extern, double)
}  // namespace peft::io
#endif
