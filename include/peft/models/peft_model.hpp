#pragma once
// PeftModel<T>: Hugging Face PEFT's PeftModel for any model of this library: a handle on a user's
// Module<T> tree whose linears are AdaptedLinear hosts (LoRALinear) and whose modules to save are
// ModulesToSave hosts (layers/modules_to_save.hpp). It adds, switches, disables, deletes, merges,
// saves and loads named adapters of every method of the table (io/methods.hpp: LoRA, DoRA, VeRA,
// LoHa, LoKr, (IA)³) across the whole tree, with PEFT's names:
//
//   PeftModel<float> pm(model);                         // holds a reference: model must outlive pm
//   pm.add_adapter("a", lora_config);                   // PeftConfig, AdapterConfig or adapter_config.json
//   pm.add_adapter("b", io::Json{{"peft_type", "IA3"}, {"target_modules", {"fc1"}}});
//   pm.set_adapter("b");  pm.active_adapters();         // {"b"}
//   { auto off = pm.disable_adapters(); ... }           // base model in the scope, restored at its end
//   { auto ref = pm.disable_adapter("policy"); ... }    // only "policy" off, e.g. "sft" stays (DPO's reference)
//   pm.merge(); pm.unmerge(); pm.delete_adapter("a");
//   pm.print_trainable_parameters(std::cout);           // trainable params: 1,234 || all params: ...
//   pm.save_pretrained("out");  pm2.load_pretrained("out");
//   Module<float>& merged = pm.merge_and_unload();      // hosts hold only their merged base weight
//
// Rules (PEFT's):
//   * The first adapter added or loaded freezes every parameter of the model that is not an
//     adapter's (get_peft_model); only active adapters and the active copies of modules to save
//     train. add_adapter / load_adapter keep the active adapters as they are, except that the first
//     adapter becomes the active one.
//   * modules_to_save in an adapter's config: a ModulesToSave host gets a copy for that adapter;
//     any other module is trained in place, shared by every adapter (reported through peft::warn).
//     Only one active adapter may have a copy of a given module to save.
//   * bias "all" / "lora_only" in an adapter's config: every base bias, or the biases of the
//     linears that adapter adapts, train while it is active (shared by the adapters that train
//     them, as in PEFT) and are saved with it (`<path>.base_layer.bias` for an adapted linear).
//   * set_adapter while adapters are merged unmerges first and says so through peft::warn.
//   * Refused with peft::ConfigError, naming the adapter, nothing changed: an unknown or duplicate
//     adapter name, deleting a merged adapter, merging an adapter already merged or while
//     adapters are disabled, disabling adapters while some are merged.
//   * save_pretrained(dir) writes every adapter the way PEFT's save_pretrained does: the adapter
//     named "default" in dir/, any other in dir/<name>/; all of them staged and committed
//     together (io::AtomicDirectory). load_pretrained(dir) reads them back under those names.
//
// Prompt learning (PROMPT_TUNING, PREFIX_TUNING) on a LlamaForCausalLM (models/llama.hpp) goes
// through the same calls: add_adapter with {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}
// (or PREFIX_TUNING, with prefix_projection / encoder_hidden_size), set_adapter, disable_adapters
// (the plain model in the scope), delete_adapter, save_pretrained / load_pretrained in PEFT's format
// (io/llama_prompt.hpp). The model hosts one prompt or prefix at a time, the active adapter's; the
// PeftModel keeps the others (so a switch moves the tables: make the optimizer after set_adapter).
// As in PEFT: one prompt-learning adapter is active at a time, prompt learning does not mix with
// the table's methods in one PeftModel, and it has nothing to merge (merge refuses it). With a
// prompt active, forward's logits have n more rows per sequence (LlamaForCausalLM::output_layout,
// prompt_labels).
//
// Needs nlohmann-json (through io/methods.hpp), so it is not in the umbrella header.
#include <dirent.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/parameters.hpp"
#include "peft/core/warnings.hpp"
#include "peft/io/file.hpp"
#include "peft/io/llama_prompt.hpp"
#include "peft/io/methods.hpp"
#include "peft/layers/modules_to_save.hpp"
#include "peft/models/peft_config.hpp"

namespace peft {

template <class T>
class PeftModel;

/// Adapters disabled for the guard's lifetime (PEFT's `with model.disable_adapter():`); on
/// destruction, also by an exception, they are enabled again unless they were already disabled
/// when the guard was made.
template <class T>
class [[nodiscard]] DisabledAdapters {
 public:
  DisabledAdapters(PeftModel<T>& model, bool was_disabled) : model_(&model), was_disabled_(was_disabled) {}
  DisabledAdapters(DisabledAdapters&& o) noexcept : model_(o.model_), was_disabled_(o.was_disabled_) {
    o.model_ = nullptr;
  }
  DisabledAdapters(const DisabledAdapters&) = delete;
  DisabledAdapters& operator=(const DisabledAdapters&) = delete;
  DisabledAdapters& operator=(DisabledAdapters&&) = delete;
  ~DisabledAdapters() {
    if (model_ != nullptr && !was_disabled_) model_->enable_adapters();
  }

 private:
  PeftModel<T>* model_;
  bool was_disabled_;
};

/// Some adapters switched off for the guard's lifetime while the other active adapters stay on
/// (PeftModel::disable_adapters(names)): the reference of DPO / PPO, an SFT adapter active and frozen
/// with only the policy adapter off. On destruction, also by an exception, every host gets back the
/// flags it had when the guard was made (so guards nest).
template <class T>
class [[nodiscard]] SwitchedOffAdapters {
 public:
  SwitchedOffAdapters() = default;
  SwitchedOffAdapters(SwitchedOffAdapters&& o) noexcept : linears_(std::move(o.linears_)), saved_(std::move(o.saved_)) {
    o.linears_.clear();
    o.saved_.clear();
  }
  SwitchedOffAdapters(const SwitchedOffAdapters&) = delete;
  SwitchedOffAdapters& operator=(const SwitchedOffAdapters&) = delete;
  SwitchedOffAdapters& operator=(SwitchedOffAdapters&&) = delete;
  ~SwitchedOffAdapters() {
    for (auto it = linears_.rbegin(); it != linears_.rend(); ++it)  // an adapter deleted in the scope is gone
      if (it->host->has_adapter(it->adapter)) it->host->disable_adapter(it->adapter, it->was_off);
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) it->first->disable(it->second);
  }

 private:
  friend class PeftModel<T>;
  struct Entry {
    AdaptedLinear<T>* host;
    std::string adapter;
    bool was_off;
  };
  std::vector<Entry> linears_;
  std::vector<std::pair<ModulesToSaveBase*, bool>> saved_;  ///< hosts whose active copy was switched off
};

/// "1,234,567" (Python's f"{n:,d}").
inline std::string with_thousands(long long n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

/// PEFT's print_trainable_parameters line for a count:
/// "trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330".
inline std::string trainable_parameters_line(const ParameterCount& c) {
  char pct[64];
  std::snprintf(pct, sizeof pct, "%.4f", c.trainable_percent());
  return "trainable params: " + with_thousands(c.trainable) + " || all params: " + with_thousands(c.total) +
         " || trainable%: " + pct;
}

template <class T>
class PeftModel {
 public:
  /// A handle on `model` (kept by reference: it must outlive the PeftModel). Nothing changes until
  /// the first adapter is added or loaded.
  explicit PeftModel(Module<T>& model, std::uint64_t seed = 0x5eed) : model_(&model), rng_(seed) {}

  /// get_peft_model(model, config, adapter_name): the handle with a first adapter.
  PeftModel(Module<T>& model, const io::Json& config, const std::string& adapter_name = "default",
            std::uint64_t seed = 0x5eed)
      : PeftModel(model, seed) {
    add_adapter(adapter_name, config);
  }

  Module<T>& base_model() { return *model_; }
  /// Generator of new adapters' initial values.
  Rng& rng() { return rng_; }

  // ---- adapters ------------------------------------------------------------------------------

  /// Adds adapter `name` described by an adapter_config.json object (any method of the table, by
  /// its peft_type; its modules_to_save get their copies). Returns the adapted modules' paths.
  std::vector<std::string> add_adapter(const std::string& name, const io::Json& config);
  /// The same from adapter_config.json's parsed form (LoRA / DoRA).
  std::vector<std::string> add_adapter(const std::string& name, const io::AdapterConfig& config) {
    return add_adapter(name, io::to_json(config));
  }
  /// The same from a PeftConfig with one method of the table: its LoRA part or its (IA)³ part
  /// (bottleneck adapters, prefix and prompt tuning of a TransformerClassifier: apply_peft; those of
  /// a LlamaForCausalLM: the adapter_config.json form above).
  std::vector<std::string> add_adapter(const std::string& name, const PeftConfig& config);

  /// Every adapter's name, in the order added.
  std::vector<std::string> adapters() const {
    std::vector<std::string> out;
    for (const auto& a : configs_) out.push_back(a.first);
    return out;
  }
  bool has_adapter(const std::string& name) const { return find(name) != configs_.size(); }
  /// Whether `name` is a prompt-learning adapter (PROMPT_TUNING / PREFIX_TUNING).
  bool is_prompt_adapter(const std::string& name) const { return prompt_index(name) != prompt_tables_.size(); }
  /// The adapter_config.json object an adapter was added or loaded with.
  const io::Json& adapter_config(const std::string& name) const { return configs_[index_of(name)].second; }

  /// Makes exactly these adapters active (and the only trainable ones); with adapters merged, they
  /// are unmerged first (peft::warn says so).
  void set_adapter(const std::vector<std::string>& names);
  void set_adapter(const std::string& name) { set_adapter(std::vector<std::string>{name}); }
  void set_adapter(std::initializer_list<std::string> names) { set_adapter(std::vector<std::string>(names)); }
  const std::vector<std::string>& active_adapters() const { return active_; }

  /// Disables every adapter and copy of a module to save until the returned guard is destroyed
  /// (forward is the base model's). ConfigError while adapters are merged.
  DisabledAdapters<T> disable_adapters();
  /// Switches off only the named adapters until the returned guard is destroyed; the other active
  /// adapters stay on. Forward is then exactly (bit for bit) that of the model without the named
  /// adapters: e.g. `auto ref = pm.disable_adapters({"policy"});` with "sft" and "policy" active gives
  /// the SFT model. A module to save whose active copy belongs to a named adapter uses its original
  /// in the scope. Neither the active set nor any trainable flag changes, so gradients accumulated
  /// before and forwards made before stay valid. ConfigError for an unknown or merged adapter.
  SwitchedOffAdapters<T> disable_adapters(const std::vector<std::string>& names);
  SwitchedOffAdapters<T> disable_adapter(const std::string& name) {
    return disable_adapters(std::vector<std::string>{name});
  }
  /// Enables them again (what the guard does on destruction).
  void enable_adapters() { set_disabled(false); }
  bool adapters_disabled() const { return disabled_; }

  /// Removes adapter `name` from every host (and its copies of modules to save). When it was
  /// active, the remaining active adapters stay; if none remain, the first other adapter becomes
  /// active (reported through peft::warn, as PEFT does). ConfigError when it is merged.
  void delete_adapter(const std::string& name);

  // ---- merging -------------------------------------------------------------------------------

  /// Merges the named adapters (default: the active ones not yet merged) into every host's weight.
  void merge(const std::vector<std::string>& names = {});
  /// Undoes every merge.
  void unmerge() {
    for (auto& [path, host] : io::adapted_linears(*model_)) host->unmerge();
  }
  /// The adapters merged in some host, in the order first seen.
  std::vector<std::string> merged_adapters();
  bool merged() { return !merged_adapters().empty(); }

  /// PEFT's merge_and_unload: merges the active adapters, then removes every adapter from every
  /// host (each holds only its merged base weight, so forward costs what Linear costs) and
  /// replaces each module to save by the active adapter's copy. Returns the model.
  Module<T>& merge_and_unload();
  /// PEFT's unload: unmerges, removes every adapter, keeps the originals of modules to save.
  Module<T>& unload();

  // ---- parameters ----------------------------------------------------------------------------

  ParameterCount parameter_count() { return count_parameters(*model_); }
  /// "trainable params: 1,234 || all params: 5,678 || trainable%: 21.7316" (PEFT's format).
  std::string trainable_parameters() { return trainable_parameters_line(parameter_count()); }
  void print_trainable_parameters(std::ostream& os) { os << trainable_parameters() << "\n"; }

  // ---- files ---------------------------------------------------------------------------------

  /// Saves every adapter (or those named) as PEFT directories: "default" in dir/, any other in
  /// dir/<name>/. One atomic commit for all of them (see the file comment).
  void save_pretrained(const std::string& dir, const std::vector<std::string>& names = {});

  /// Loads the adapter directory `dir` (adapter_config.json + adapter_model.safetensors, any method
  /// of the table) as adapter `name` (PEFT's load_adapter). Returns the adapted modules' paths.
  std::vector<std::string> load_adapter(const std::string& dir, const std::string& name);

  /// Loads what save_pretrained wrote in `dir`: dir/ as "default" when it holds an adapter, and
  /// every subdirectory holding one under its name. Returns the names loaded.
  std::vector<std::string> load_pretrained(const std::string& dir);
  /// Loads one adapter of a save_pretrained directory: dir/ for "default", dir/<name>/ otherwise.
  std::vector<std::string> load_pretrained(const std::string& dir, const std::string& name) {
    return load_adapter(name == "default" ? dir : dir + "/" + name, name);
  }

 private:
  static constexpr const char* kWho = "PeftModel";

  std::size_t find(const std::string& name) const {
    for (std::size_t i = 0; i < configs_.size(); ++i)
      if (configs_[i].first == name) return i;
    return configs_.size();
  }
  std::size_t index_of(const std::string& name) const {
    const std::size_t i = find(name);
    if (i == configs_.size())
      throw ConfigError(std::string(kWho) + ": no adapter \"" + name + "\" (adapters: " + list(adapters()) + ")");
    return i;
  }
  static std::string list(const std::vector<std::string>& names) {
    if (names.empty()) return "none";
    std::string s;
    for (const auto& n : names) s += (s.empty() ? "\"" : ", \"") + n + "\"";
    return s;
  }
  void check_new(const std::string& name) const {
    check_adapter_name(kWho, name);
    if (has_adapter(name)) throw ConfigError(std::string(kWho) + ": adapter \"" + name + "\" already exists");
  }

  /// After an adapter joined: the first freezes the base; the active set is applied to every host.
  void joined(const std::string& name, io::Json config);
  /// Every host's active set from active_ (ModulesToSave hosts: the one active adapter with a copy).
  void apply_active();
  /// ConfigError unless at most one of `names` has a copy of each module to save.
  void check_one_copy(const std::vector<std::string>& names);
  void set_disabled(bool on);

  // ---- prompt learning on a LlamaForCausalLM (see the file comment) ----
  /// A prompt-learning adapter's table while the model does not host it (both empty while it does).
  struct PromptTable {
    std::optional<SoftPrompt<T>> prompt;
    std::optional<PrefixAttention<T>> prefix;
  };
  static bool is_prompt_type(const io::Json& config) {
    const auto it = config.find("peft_type");
    if (it == config.end() || !it->is_string()) return false;
    const std::string t = it->template get<std::string>();
    return t == "PROMPT_TUNING" || t == "PREFIX_TUNING";
  }
  std::size_t prompt_index(const std::string& name) const {
    for (std::size_t i = 0; i < prompt_tables_.size(); ++i)
      if (prompt_tables_[i].first == name) return i;
    return prompt_tables_.size();
  }
  /// The model as a LlamaForCausalLM; ConfigError naming `who` otherwise.
  LlamaForCausalLM<T>& require_llama(const std::string& who, const std::string& type);
  /// ConfigError when the adapter to add (prompt learning or not) would mix the two kinds.
  void check_kind(const std::string& who, bool prompt) const;
  /// Makes the model host the table of prompt adapter `name` ("": none), keeping the one it hosted.
  void install_prompt(const std::string& name);
  /// The model hosts the active prompt adapter's table, none while adapters are disabled.
  void sync_prompt() {
    if (prompt_tables_.empty()) return;
    std::string on;
    for (const auto& n : active_)
      if (is_prompt_adapter(n)) on = n;
    install_prompt(disabled_ ? std::string() : on);
  }
  /// Moves the prompt or prefix the model hosts now into a new table `name`, then joins it.
  std::vector<std::string> join_prompt(LlamaForCausalLM<T>& m, const std::string& name, io::Json config);
  std::vector<std::string> add_prompt_adapter(const std::string& name, const io::Json& config, const std::string& who);
  std::vector<std::string> load_prompt_adapter(const std::string& dir, const std::string& name, const std::string& who);
  void save_prompt_adapter(const std::string& dir, const std::string& name, const io::Json& config);

  /// An adapter config's `bias` ("none", "all" or "lora_only"; "none" when absent).
  static std::string bias_of(const io::Json& config) {
    const auto it = config.find("bias");
    return it != config.end() && it->is_string() ? it->template get<std::string>() : std::string("none");
  }
  /// Whether `name` is a base bias (not an adapter's tensor, not a copy or original of a module to save).
  static bool is_base_bias(const std::string& name) {
    if (name != "bias" && (name.size() < 5 || name.compare(name.size() - 5, 5, ".bias") != 0)) return false;
    for (const char* part : {"lora_", "hada_", "lokr_", "vera_", "ia3_", "modules_to_save.", "original_module."})
      if (name.find(part) != std::string::npos) return false;
    return true;
  }

  Module<T>* model_;
  Rng rng_;
  std::vector<Parameter<T>*> trained_biases_;              ///< biases an active adapter's `bias` option trains
  std::vector<std::pair<std::string, io::Json>> configs_;  ///< adapter → its adapter_config.json, in order added
  std::vector<std::string> active_;
  bool disabled_ = false;
  std::vector<std::pair<std::string, PromptTable>> prompt_tables_;  ///< prompt-learning adapters, in order added
  std::string installed_prompt_;  ///< the prompt adapter whose table the model hosts ("": none)
};

// ---- PeftModel members defined outside the class body ----

template <class T>
std::vector<std::string> PeftModel<T>::add_adapter(const std::string& name, const io::Json& config) {
  const std::string who = std::string(kWho) + "::add_adapter(\"" + name + "\")";
  check_new(name);
  if (!config.is_object()) throw ConfigError(who + ": the config must be a JSON object (adapter_config.json)");
  if (is_prompt_type(config)) return add_prompt_adapter(name, config, who);
  check_kind(who, false);
  std::vector<std::string> entries;
  if (config.contains("modules_to_save") && !config.at("modules_to_save").is_null()) {
    if (!config.at("modules_to_save").is_array())
      throw ConfigError(who + ": modules_to_save must be a list of module names");
    for (const auto& e : config.at("modules_to_save")) {
      if (!e.is_string()) throw ConfigError(who + ": modules_to_save must be a list of module names");
      entries.push_back(e.template get<std::string>());
    }
  }
  const std::vector<SavedModule<T>> saved = resolve_modules_to_save(*model_, entries, name, who);
  // bias "all" / "lora_only": the adapter trains biases as well (PEFT's get_peft_model); the hosts
  // get the adapter as with "none", and apply_active() makes the biases trainable while it is active.
  io::Json applied = config;
  const std::string bias = bias_of(config);
  if (bias == "all" || bias == "lora_only") applied["bias"] = "none";
  std::vector<std::string> paths = io::apply_method(io::linear_slots(*model_), applied, name, rng_, who);
  if (configs_.empty())  // get_peft_model: the base is frozen (adapters get their flags in apply_active)
    model_->visit_parameters([](const std::string&, Parameter<T>& p) { p.set_trainable(false); });
  add_modules_to_save(saved, name, who);
  joined(name, config);
  return paths;
}

template <class T>
std::vector<std::string> PeftModel<T>::add_adapter(const std::string& name, const PeftConfig& config) {
  const std::string who = std::string(kWho) + "::add_adapter(\"" + name + "\")";
  if (config.adapter || config.prefix || config.prompt)
    throw ConfigError(who +
                      ": bottleneck adapters, prefix and prompt tuning are not methods of the table; apply them to a "
                      "TransformerClassifier with apply_peft");
  if (config.lora && config.ia3)
    throw ConfigError(who + ": the PeftConfig has both LoRA and (IA)^3; an adapter is one method (add two adapters)");
  if (config.lora)
    return add_adapter(name, io::to_json(detail::lora_adapter_config(*config.lora, config.modules_to_save)));
  if (config.ia3) {
    const IA3TargetConfig& ic = *config.ia3;
    return add_adapter(name, io::Json{{"peft_type", "IA3"},
                                      {"target_modules", io::selector_json(ic.target_modules)},
                                      {"exclude_modules", io::selector_json(ic.exclude_modules)},
                                      {"feedforward_modules", io::selector_json(ic.feedforward_modules)},
                                      {"modules_to_save", config.modules_to_save}});
  }
  throw ConfigError(who + ": the PeftConfig has no LoRA or (IA)^3 part");
}

template <class T>
void PeftModel<T>::joined(const std::string& name, io::Json config) {
  if (config.contains(io::kPeftCppConfigKey)) config.erase(io::kPeftCppConfigKey);  // a file's digest
  configs_.emplace_back(name, std::move(config));
  if (active_.empty()) active_ = {name};
  apply_active();
  if (disabled_) set_disabled(true);  // the new adapter is disabled with the others
}

template <class T>
void PeftModel<T>::apply_active() {
  sync_prompt();
  for (auto& [path, host] : io::adapted_linears(*model_)) {
    std::vector<std::string> here;
    for (const auto& n : active_)
      if (host->has_adapter(n)) here.push_back(n);
    host->set_active(here);
  }
  for (auto& [path, host] : modules_to_save_hosts(*model_)) {
    std::string copy;
    for (const auto& n : active_)
      if (host->has_copy(n)) copy = n;
    host->set_active(copy);
  }
  // Biases: trainable while an active adapter's config says bias "all" (every base bias) or
  // "lora_only" (the biases of the linears that adapter adapts). They are shared by every adapter,
  // as in PEFT, and saved with each adapter whose config asks for them.
  for (Parameter<T>* p : trained_biases_) p->set_trainable(false);
  trained_biases_.clear();
  const auto train = [this](Parameter<T>& p) {
    if (p.size() == 0 || p.trainable()) return;
    p.set_trainable(true);
    trained_biases_.push_back(&p);
  };
  for (const auto& n : active_) {
    const std::string bias = bias_of(configs_[index_of(n)].second);
    if (bias == "lora_only") {
      for (auto& [path, host] : io::adapted_linears(*model_))
        if (host->has_bias() && host->has_adapter(n)) train(host->bias);
    } else if (bias == "all") {
      model_->visit_parameters([&](const std::string& pname, Parameter<T>& p) {
        if (is_base_bias(pname)) train(p);
      });
    }
  }
}

template <class T>
void PeftModel<T>::check_one_copy(const std::vector<std::string>& names) {
  for (auto& [path, host] : modules_to_save_hosts(*model_)) {
    std::vector<std::string> with;
    for (const auto& n : names)
      if (host->has_copy(n)) with.push_back(n);
    if (with.size() > 1)
      throw ConfigError(std::string(kWho) + ": adapters " + list(with) + " each have a copy of module to save \"" +
                        path + "\"; only one of them can be active (as in PEFT)");
  }
}

template <class T>
void PeftModel<T>::set_adapter(const std::vector<std::string>& names) {
  std::vector<std::string> next;
  for (const auto& n : names) {
    index_of(n);
    if (std::find(next.begin(), next.end(), n) == next.end()) next.push_back(n);
  }
  check_one_copy(next);
  if (!prompt_tables_.empty() && next.size() > 1)
    throw ConfigError(std::string(kWho) + ": adapters " + list(next) +
                      " are prompt-learning adapters; only one can be active at a time (as in PEFT)");
  const std::vector<std::string> merged_now = merged_adapters();
  if (!merged_now.empty()) {
    warn(std::string(kWho) + ": adapters " + list(merged_now) + " are merged; unmerging them before activating " +
         list(next) + " (an adapter cannot be set while the model is merged)");
    unmerge();
  }
  active_ = std::move(next);
  apply_active();
}

template <class T>
void PeftModel<T>::set_disabled(bool on) {
  for (auto& [path, host] : io::adapted_linears(*model_)) host->disable_adapters(on);
  for (auto& [path, host] : modules_to_save_hosts(*model_)) host->disable(on);
  disabled_ = on;
  sync_prompt();  // the plain model (no prompt / prefix) while disabled
}

template <class T>
DisabledAdapters<T> PeftModel<T>::disable_adapters() {
  const std::vector<std::string> merged_now = merged_adapters();
  if (!merged_now.empty())
    throw ConfigError(std::string(kWho) + ": cannot disable adapters while adapters " + list(merged_now) +
                      " are merged; unmerge() first");
  const bool was = disabled_;
  set_disabled(true);
  return DisabledAdapters<T>(*this, was);
}

template <class T>
SwitchedOffAdapters<T> PeftModel<T>::disable_adapters(const std::vector<std::string>& names) {
  const std::vector<std::string> merged_now = merged_adapters();
  for (const auto& n : names) {
    index_of(n);
    if (std::find(merged_now.begin(), merged_now.end(), n) != merged_now.end())
      throw ConfigError(std::string(kWho) + ": cannot disable adapter \"" + n +
                        "\" while it is merged; unmerge() first");
  }
  SwitchedOffAdapters<T> guard;
  for (auto& [path, host] : io::adapted_linears(*model_))
    for (const auto& n : names)
      if (host->has_adapter(n)) {
        guard.linears_.push_back({host, n, host->adapter_disabled(n)});
        host->disable_adapter(n, true);
      }
  for (auto& [path, host] : modules_to_save_hosts(*model_)) {
    const std::string copy = host->active_copy();
    if (!copy.empty() && std::find(names.begin(), names.end(), copy) != names.end()) {
      guard.saved_.emplace_back(host, host->disabled());
      host->disable(true);
    }
  }
  return guard;
}

template <class T>
void PeftModel<T>::delete_adapter(const std::string& name) {
  const std::size_t i = index_of(name);
  const std::vector<std::string> merged_now = merged_adapters();
  if (std::find(merged_now.begin(), merged_now.end(), name) != merged_now.end())
    throw ConfigError(std::string(kWho) + ": adapter \"" + name + "\" is merged; unmerge() before deleting it");
  for (auto& [path, host] : io::adapted_linears(*model_))
    if (host->has_adapter(name)) host->delete_adapter(name);
  for (auto& [path, host] : modules_to_save_hosts(*model_))
    if (host->has_copy(name)) host->delete_copy(name);
  const std::size_t p = prompt_index(name);
  if (p != prompt_tables_.size()) {
    if (installed_prompt_ == name) {
      dynamic_cast<LlamaForCausalLM<T>&>(*model_).remove_prompt_learning();
      installed_prompt_.clear();
      model_->set_name(model_->name());
    }
    prompt_tables_.erase(prompt_tables_.begin() + static_cast<std::ptrdiff_t>(p));
  }
  configs_.erase(configs_.begin() + static_cast<std::ptrdiff_t>(i));
  const auto it = std::find(active_.begin(), active_.end(), name);
  if (it != active_.end()) {
    active_.erase(it);
    if (active_.empty() && !configs_.empty()) {
      active_ = {configs_.front().first};
      warn(std::string(kWho) + ": adapter \"" + name + "\" was active and is deleted; the active adapter is now \"" +
           active_.front() + "\"");
    }
  }
  apply_active();
}

template <class T>
std::vector<std::string> PeftModel<T>::merged_adapters() {
  std::vector<std::string> out;
  for (auto& [path, host] : io::adapted_linears(*model_))
    for (const auto& n : host->merged_adapters())
      if (std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
  return out;
}

template <class T>
void PeftModel<T>::merge(const std::vector<std::string>& names) {
  if (disabled_) throw ConfigError(std::string(kWho) + ": adapters are disabled; enable them before merging");
  const std::vector<std::string> merged_now = merged_adapters();
  std::vector<std::string> to_merge;
  for (const auto& n : names.empty() ? active_ : names) {
    index_of(n);
    const bool done = std::find(merged_now.begin(), merged_now.end(), n) != merged_now.end();
    if (is_prompt_adapter(n))
      throw ConfigError(std::string(kWho) + ": adapter \"" + n + "\" (" +
                        configs_[index_of(n)].second.value("peft_type", std::string()) +
                        ") is prompt learning: it has no weights to merge into (PEFT cannot merge it either)");
    if (done && !names.empty()) throw ConfigError(std::string(kWho) + ": adapter \"" + n + "\" is already merged");
    if (!done && std::find(to_merge.begin(), to_merge.end(), n) == to_merge.end()) to_merge.push_back(n);
  }
  if (to_merge.empty()) return;
  for (auto& [path, host] : io::adapted_linears(*model_)) {
    std::vector<std::string> here;
    for (const auto& n : to_merge)
      if (host->has_adapter(n)) here.push_back(n);
    if (!here.empty()) host->merge(here);
  }
}

template <class T>
Module<T>& PeftModel<T>::merge_and_unload() {
  if (!prompt_tables_.empty())
    throw ConfigError(std::string(kWho) + ": adapters " + list(adapters()) +
                      " are prompt learning: nothing to merge (unload() removes them)");
  merge();
  for (auto& [path, host] : io::adapted_linears(*model_)) host->merge_and_unload(std::vector<std::string>{});
  for (auto& [path, host] : modules_to_save_hosts(*model_)) host->unload();
  configs_.clear();
  active_.clear();
  model_->set_name(model_->name());
  return *model_;
}

template <class T>
Module<T>& PeftModel<T>::unload() {
  if (disabled_) set_disabled(false);
  if (!installed_prompt_.empty()) dynamic_cast<LlamaForCausalLM<T>&>(*model_).remove_prompt_learning();
  installed_prompt_.clear();
  prompt_tables_.clear();
  for (auto& [path, host] : io::adapted_linears(*model_)) host->unload();
  for (auto& [path, host] : modules_to_save_hosts(*model_)) {
    host->set_active("");
    host->unload();
  }
  configs_.clear();
  active_.clear();
  model_->set_name(model_->name());
  return *model_;
}

template <class T>
void PeftModel<T>::save_pretrained(const std::string& dir, const std::vector<std::string>& names) {
  const std::vector<std::string> chosen = names.empty() ? adapters() : names;
  if (chosen.empty()) throw ConfigError(std::string(kWho) + "::save_pretrained: the model has no adapter to save");
  for (const auto& n : chosen) index_of(n);
  for (const auto& n : chosen) {  // only LoRA's writer holds full tensors (modules_to_save) here
    const io::Json& c = configs_[index_of(n)].second;
    const std::string type = c.value("peft_type", std::string());
    const io::MethodFormat<T>* f = io::find_method_format<T>(type);
    if (f == nullptr || f->save) continue;
    for (auto& [path, host] : modules_to_save_hosts(*model_))
      if (host->has_copy(n))
        warn(std::string(kWho) + "::save_pretrained: adapter \"" + n + "\" (" + type +
             "): its copy of module to save \"" + path + "\" is not written (this library's " + type +
             " files hold no modules_to_save tensors)");
  }
  io::AtomicDirectory out(dir);
  for (const auto& n : chosen) {
    const std::string sub = n == "default" ? out.staging() : out.staging() + "/" + n;
    if (is_prompt_adapter(n))
      save_prompt_adapter(sub, n, configs_[index_of(n)].second);
    else
      io::save_method_adapter(sub, *model_, n, configs_[index_of(n)].second);
  }
  out.commit();
}

template <class T>
std::vector<std::string> PeftModel<T>::load_adapter(const std::string& dir, const std::string& name) {
  const std::string who = std::string(kWho) + "::load_adapter(\"" + name + "\")";
  check_new(name);
  const std::string config_path = dir + "/" + io::kAdapterConfigFile;
  bool prompt = false;
  try {  // a missing or malformed config gets read_method_adapter's own error below
    prompt = io::path_exists(config_path) &&
             is_prompt_type(io::parse_json_strict(io::read_text_file(config_path, 1u << 20), config_path));
  } catch (const Error&) {
  }
  if (prompt) return load_prompt_adapter(dir, name, who);
  check_kind(who, false);
  const io::MethodAdapterFile<T> file = io::read_method_adapter<T>(dir);
  std::vector<std::string> entries;
  if (file.config.contains("modules_to_save") && file.config.at("modules_to_save").is_array())
    for (const auto& e : file.config.at("modules_to_save"))
      if (e.is_string()) entries.push_back(e.template get<std::string>());
  // Hosts named by modules_to_save get a copy even where the file holds none of their tensors.
  const std::vector<SavedModule<T>> saved = resolve_modules_to_save(*model_, entries, name, who, false);
  std::vector<std::string> paths = io::load_method_adapter(*model_, file, name);
  if (configs_.empty()) model_->visit_parameters([](const std::string&, Parameter<T>& p) { p.set_trainable(false); });
  std::vector<SavedModule<T>> rest;
  for (const auto& s : saved)
    if (s.host == nullptr || !s.host->has_copy(name)) rest.push_back(s);
  add_modules_to_save(rest, name, who);
  joined(name, file.config);
  return paths;
}

template <class T>
std::vector<std::string> PeftModel<T>::load_pretrained(const std::string& dir) {
  if (!io::is_directory(dir)) throw IoError("\"" + dir + "\" is not a directory");
  std::vector<std::string> found;
  if (io::path_exists(dir + "/" + io::kAdapterConfigFile)) found.push_back("default");
  std::vector<std::string> subs;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      if (n == "." || n == ".." || n == "default") continue;
      if (io::is_directory(dir + "/" + n) && io::path_exists(dir + "/" + n + "/" + io::kAdapterConfigFile))
        subs.push_back(n);
    }
    ::closedir(d);
  }
  std::sort(subs.begin(), subs.end());
  found.insert(found.end(), subs.begin(), subs.end());
  if (found.empty())
    throw IoError("\"" + dir + "\" holds no adapter (no " + io::kAdapterConfigFile + " in it or its subdirectories)");
  for (const auto& n : found) load_pretrained(dir, n);
  return found;
}

// ---- prompt learning on a LlamaForCausalLM ----

template <class T>
LlamaForCausalLM<T>& PeftModel<T>::require_llama(const std::string& who, const std::string& type) {
  auto* m = dynamic_cast<LlamaForCausalLM<T>*>(model_);
  if (m == nullptr)
    throw ConfigError(
        who + ": " + type +
        " needs a LlamaForCausalLM (the prompt and prefix tuning of a TransformerClassifier: apply_peft)");
  return *m;
}

template <class T>
void PeftModel<T>::check_kind(const std::string& who, bool prompt) const {
  for (const auto& [n, c] : configs_)
    if (is_prompt_adapter(n) != prompt)
      throw ConfigError(who + ": adapter \"" + n + "\" is " + (prompt ? "not " : "") +
                        "prompt learning; prompt learning and the other methods do not mix in one PeftModel (PEFT: "
                        "\"Cannot combine adapters with different peft types\")");
}

template <class T>
void PeftModel<T>::install_prompt(const std::string& name) {
  if (installed_prompt_ == name) return;
  auto& m = dynamic_cast<LlamaForCausalLM<T>&>(*model_);
  if (!installed_prompt_.empty()) {
    PromptTable& t = prompt_tables_[prompt_index(installed_prompt_)].second;
    t.prompt = std::move(m.prompt_encoder);
    t.prefix = std::move(m.prefix_encoder);
    m.remove_prompt_learning();
    installed_prompt_.clear();
  }
  if (!name.empty()) {
    PromptTable& t = prompt_tables_[prompt_index(name)].second;
    m.prompt_encoder = std::move(t.prompt);
    m.prefix_encoder = std::move(t.prefix);
    t.prompt.reset();
    t.prefix.reset();
    installed_prompt_ = name;
  }
  m.set_name(m.name());
}

template <class T>
std::vector<std::string> PeftModel<T>::join_prompt(LlamaForCausalLM<T>& m, const std::string& name, io::Json config) {
  PromptTable t;
  t.prompt = std::move(m.prompt_encoder);
  t.prefix = std::move(m.prefix_encoder);
  m.remove_prompt_learning();
  m.set_name(m.name());
  const std::vector<std::string> paths = {t.prompt ? "prompt_encoder" : "prefix_encoder"};
  prompt_tables_.emplace_back(name, std::move(t));
  if (configs_.empty())  // get_peft_model: the base is frozen (the new table is not in the model now)
    model_->visit_parameters([](const std::string&, Parameter<T>& p) { p.set_trainable(false); });
  joined(name, std::move(config));
  return paths;
}

template <class T>
std::vector<std::string> PeftModel<T>::add_prompt_adapter(const std::string& name, const io::Json& config,
                                                          const std::string& who) {
  const std::string type = config.at("peft_type").template get<std::string>();
  LlamaForCausalLM<T>& m = require_llama(who, type);
  check_kind(who, true);
  const io::AdapterConfig c = io::parse_adapter_config(config, who);
  const LlamaConfig& mc = m.config();
  const Index w = mc.kv_heads() * mc.resolved_head_dim();
  if (c.num_transformer_submodules != 1)
    throw ConfigError(who + ": num_transformer_submodules is " + std::to_string(c.num_transformer_submodules) +
                      ", expected 1 (a decoder-only model)");
  if (c.num_layers != 0 && c.num_layers != mc.num_hidden_layers)
    throw ConfigError(who + ": num_layers is " + std::to_string(c.num_layers) + ", the model has " +
                      std::to_string(mc.num_hidden_layers));
  if (!c.modules_to_save.empty()) throw ConfigError(who + ": modules_to_save with " + type + " is not supported");
  const std::string init = config.value("prompt_tuning_init", std::string("RANDOM"));
  if (type == "PROMPT_TUNING" && init != "RANDOM")
    throw ConfigError(who + ": prompt_tuning_init \"" + init +
                      "\" needs the tokenizer; add the adapter with RANDOM, then set its table "
                      "(SoftPrompt::init_from_tokens on the model's embed_tokens)");
  const Index expect_dim = type == "PROMPT_TUNING" ? mc.hidden_size : w;
  if (c.token_dim != 0 && c.token_dim != expect_dim)
    throw ConfigError(who + ": token_dim is " + std::to_string(c.token_dim) + ", expected " +
                      std::to_string(expect_dim) +
                      (type == "PROMPT_TUNING" ? " (hidden_size)" : " (num_key_value_heads · head_dim)"));
  if (type == "PREFIX_TUNING" && c.num_attention_heads != 0 && c.num_attention_heads != mc.kv_heads())
    throw ConfigError(who + ": num_attention_heads is " + std::to_string(c.num_attention_heads) +
                      ", expected num_key_value_heads " + std::to_string(mc.kv_heads()));
  Index encoder_hidden = 0;
  if (config.contains("encoder_hidden_size") && config.at("encoder_hidden_size").is_number_integer())
    encoder_hidden = config.at("encoder_hidden_size").template get<Index>();
  install_prompt("");  // the model hosts the new table alone while it is made
  try {
    if (type == "PROMPT_TUNING")
      m.add_prompt_tuning(c.num_virtual_tokens, rng_);
    else
      m.add_prefix_tuning(c.num_virtual_tokens, rng_, c.prefix_projection, encoder_hidden);
  } catch (...) {
    m.remove_prompt_learning();
    apply_active();
    throw;
  }
  // The config as PEFT completes it (PeftModel._setup_prompt_encoder).
  io::Json stored = config;
  if (!stored.contains("task_type") || stored.at("task_type").is_null()) stored["task_type"] = "CAUSAL_LM";
  stored["token_dim"] = expect_dim;
  stored["num_layers"] = mc.num_hidden_layers;
  stored["num_transformer_submodules"] = 1;
  stored["num_attention_heads"] = type == "PROMPT_TUNING" ? mc.num_attention_heads : mc.kv_heads();
  return join_prompt(m, name, std::move(stored));
}

template <class T>
std::vector<std::string> PeftModel<T>::load_prompt_adapter(const std::string& dir, const std::string& name,
                                                           const std::string& who) {
  LlamaForCausalLM<T>& m = require_llama(who, "a prompt-learning adapter (\"" + dir + "\")");
  check_kind(who, true);
  install_prompt("");
  io::AdapterConfig c;
  try {
    c = io::load_llama_prompt_adapter(m, dir, true);
  } catch (...) {
    m.remove_prompt_learning();
    apply_active();
    throw;
  }
  return join_prompt(m, name, c.raw);
}

template <class T>
void PeftModel<T>::save_prompt_adapter(const std::string& dir, const std::string& name, const io::Json& config) {
  auto& m = dynamic_cast<LlamaForCausalLM<T>&>(*model_);
  PromptTable& t = prompt_tables_[prompt_index(name)].second;
  const bool here = installed_prompt_ == name;
  const SoftPrompt<T>* prompt =
      here ? (m.prompt_encoder ? &*m.prompt_encoder : nullptr) : (t.prompt ? &*t.prompt : nullptr);
  PrefixAttention<T>* prefix =
      here ? (m.prefix_encoder ? &*m.prefix_encoder : nullptr) : (t.prefix ? &*t.prefix : nullptr);
  const auto base = config.find("base_model_name_or_path");
  io::save_llama_prompt_tables<T>(dir, m.config(), prompt, prefix,
                                  base != config.end() && base->is_string() ? base->template get<std::string>() : "");
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_io.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class PeftModel<float>;
extern template class PeftModel<double>;
}  // namespace peft
#endif
