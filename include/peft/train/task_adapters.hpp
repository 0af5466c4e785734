#pragma once
// One adapter per task over a frozen shared base (continual learning with isolated parameters).
//
// The progressive-network idea (Rusu et al., 2016, "Progressive Neural Networks") reduced to
// parameter-efficient fine-tuning: task t gets its own adapter (any method of the table,
// io/methods.hpp), the shared base is frozen once the first task adapter exists, and the task id
// selects the adapter at prediction. Training task t then changes only adapter t (and whatever the
// caller keeps trainable on purpose, Options::shared_trainable), so every earlier task's outputs,
// routed by their ids, stay bit for bit what they were: zero forgetting when the task id is known.
//
//   PeftModel<float> pm(net);
//   TaskAdapters<float> ta(pm, io::Json{{"peft_type", "LORA"}, {"r", 8}, {"lora_alpha", 16},
//                                       {"target_modules", {"fc1", "fc2"}}});
//   ta.add_task(1);          // adapter "task_1", the only active (and trainable) one
//   ... train ...
//   ta.route(0);             // a task without an adapter (here: the one the base learned): the base
//   ta.route(1);             // task 1's adapter
//   ta.routing_for(*host, row_tasks, routing);  // mixed batches: AdaptedLinear::forward_routed
//
// When the task id is not known at prediction (class-incremental learning), merge_tasks() combines
// the task adapters into one new adapter with the combine methods (merge/combine.hpp: cat, svd,
// linear, magnitude_prune, ties, dare_linear, dare_ties): on every host that holds them, the
// adapters' LoRA factors (AdapterMethod::to_factors: LoRA, VeRA, LoHa, LoKr) go through
// peft::combine with the given weights, and the result is added to the PeftModel as a LoRA adapter
// with unit scaling (alpha = r, rank_pattern where the hosts' ranks differ; io/combine_adapters.hpp's
// config), so it can be routed to, saved, merged or deleted like any other. The combination is the
// one peft::add_combined_adapter makes on each layer, value for value.
//
// Needs nlohmann-json (through models/peft_model.hpp), so it is not in the umbrella header.
#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/combine_adapters.hpp"
#include "peft/merge/combine.hpp"
#include "peft/models/peft_model.hpp"

namespace peft {

struct TaskAdaptersOptions {
  /// Task t's adapter is named prefix + t.
  std::string prefix = "task_";
  /// Parameters of the model that stay trainable in place, shared by every task (e.g. a
  /// classification head whose rows belong to one task each): a name matches itself and every
  /// parameter below it ("head" matches "head.weight" and "head.bias"). Everything else that is not
  /// the current task's adapter is frozen. Zero forgetting holds for these only when training a
  /// task leaves the other tasks' part of them unchanged (a task-local loss, no weight decay).
  std::vector<std::string> shared_trainable;
};

/// What merge_tasks() did.
struct TaskMergeReport {
  std::vector<std::string> sources;  ///< the task adapters combined, in order
  std::size_t modules = 0;           ///< hosts that got the merged adapter
  double largest_error = 0.0;        ///< max over hosts of ‖ΔW_target − B'A'‖_F (0 when lossless)
};

template <class T>
class TaskAdapters {
 public:
  /// Task adapters on `model` (kept by reference: it must outlive this object), each made from
  /// `adapter_config` (an adapter_config.json object: any method of the table).
  TaskAdapters(PeftModel<T>& model, io::Json adapter_config, TaskAdaptersOptions options = {})
      : model_(&model), config_(std::move(adapter_config)), opt_(std::move(options)) {
    if (!config_.is_object())
      throw ConfigError("TaskAdapters: the adapter config must be a JSON object (adapter_config.json)");
    check_adapter_name("TaskAdapters", opt_.prefix + "0");
  }

  PeftModel<T>& model() { return *model_; }
  std::string name_of(int task) const { return opt_.prefix + std::to_string(task); }
  bool has_task(int task) const { return std::find(tasks_.begin(), tasks_.end(), task) != tasks_.end(); }
  /// The tasks that have an adapter, in the order added.
  const std::vector<int>& tasks() const { return tasks_; }

  /// Adds task `task`'s adapter and routes the model to it: it is the only active adapter and,
  /// with Options::shared_trainable, the only trainable parameters (the first adapter freezes the
  /// base, as get_peft_model does). Returns the adapter's name.
  std::string add_task(int task);

  /// Routes the model to `task`: its adapter active and enabled, or, for a task without one (e.g.
  /// the task the base itself was trained on), the base model alone (adapters disabled).
  void route(int task) {
    if (task < 0) throw ConfigError("TaskAdapters::route: task " + std::to_string(task) + " is negative");
    if (has_task(task))
      route_adapter(name_of(task));
    else
      route_base();
  }
  /// Routes the model to any adapter of the PeftModel (e.g. one merge_tasks() made).
  void route_adapter(const std::string& name) {
    disabled_.reset();  // enables the adapters again
    model_->set_adapter(name);
    keep_shared_trainable();
  }
  /// The base model alone (every adapter disabled) until the next route.
  void route_base() {
    if (!disabled_) disabled_.emplace(model_->disable_adapters());
  }

  /// Per-row routing for a mixed batch on one host: out[r] is the index in host.methods() of the
  /// adapter of task row_tasks[r], or -1 (the base) for a task without an adapter, as
  /// AdaptedLinear::forward_routed takes it. Reuses out's storage.
  void routing_for(const AdaptedLinear<T>& host, const std::vector<int>& row_tasks, std::vector<int>& out) const {
    out.resize(row_tasks.size());
    for (std::size_t r = 0; r < row_tasks.size(); ++r) {
      const int t = row_tasks[r];
      if (t < 0)
        throw ConfigError("TaskAdapters::routing_for: row " + std::to_string(r) + " has task " + std::to_string(t) +
                          ", expected >= 0");
      out[r] = has_task(t) ? host.adapter_index(name_of(t)) : -1;
    }
  }

  /// Combines the adapters of `tasks` (every task adapter when empty), weight weights[i] for the
  /// i-th, into a new adapter `name` on every host that holds them (see the file comment), without
  /// routing to it. Draws nothing from the model's generator. ConfigError for an unknown task, a
  /// weight count that differs from the task count, a host holding only some of the adapters, or
  /// an adapter without a LoRA-factor form ((IA)³, DoRA).
  TaskMergeReport merge_tasks(const std::string& name, const std::vector<double>& weights,
                              const CombineOptions& options = {}, const std::vector<int>& tasks = {});

 private:
  void keep_shared_trainable() {
    if (opt_.shared_trainable.empty()) return;
    model_->base_model().visit_parameters([&](const std::string& pname, Parameter<T>& p) {
      for (const auto& s : opt_.shared_trainable)
        if (pname == s || (pname.size() > s.size() && pname.compare(0, s.size(), s) == 0 && pname[s.size()] == '.')) {
          p.set_trainable(true);
          return;
        }
    });
  }

  PeftModel<T>* model_;
  io::Json config_;
  TaskAdaptersOptions opt_;
  std::vector<int> tasks_;
  std::optional<DisabledAdapters<T>> disabled_;  ///< held while routed to the base
};

template <class T>
std::string TaskAdapters<T>::add_task(int task) {
  if (task < 0) throw ConfigError("TaskAdapters::add_task: task " + std::to_string(task) + " is negative");
  const std::string name = name_of(task);
  if (has_task(task))
    throw ConfigError("TaskAdapters::add_task: task " + std::to_string(task) + " already has adapter \"" + name + "\"");
  disabled_.reset();
  model_->add_adapter(name, config_);
  tasks_.push_back(task);
  route_adapter(name);
  return name;
}

template <class T>
TaskMergeReport TaskAdapters<T>::merge_tasks(const std::string& name, const std::vector<double>& weights,
                                             const CombineOptions& options, const std::vector<int>& tasks) {
  const std::string who = "TaskAdapters::merge_tasks(\"" + name + "\")";
  TaskMergeReport rep;
  for (int t : tasks.empty() ? tasks_ : tasks) {
    if (!has_task(t)) throw ConfigError(who + ": task " + std::to_string(t) + " has no adapter");
    rep.sources.push_back(name_of(t));
  }
  if (rep.sources.empty()) throw ConfigError(who + ": there is no task adapter to merge");
  if (weights.size() != rep.sources.size())
    throw ConfigError(who + ": " + std::to_string(weights.size()) + " weights for " +
                      std::to_string(rep.sources.size()) + " task adapters");
  if (model_->has_adapter(name)) throw ConfigError(who + ": adapter \"" + name + "\" already exists");
  std::vector<std::pair<std::string, Index>> ranks;
  std::vector<std::pair<AdaptedLinear<T>*, LoraFactors<T>>> results;
  for (auto& [path, host] : io::adapted_linears(model_->base_model())) {
    std::vector<LoraFactors<T>> fs;
    std::string missing;
    for (const auto& s : rep.sources) {
      if (!host->has_adapter(s)) {
        missing = s;
        continue;
      }
      const AdapterMethod<T>& m = host->method(s);
      if (!m.has_factors())
        throw ConfigError(who + ": adapter \"" + s + "\" on \"" + path +
                          "\" has no LoRA-factor form (its method cannot be combined)");
      fs.push_back(m.to_factors());
    }
    if (fs.empty()) continue;
    if (!missing.empty())
      throw ConfigError(who + ": \"" + path + "\" holds some of the task adapters but not \"" + missing + "\"");
    CombineResult<T> res = combine(fs, weights, options, path);
    ranks.emplace_back(path, res.factors.rank());
    rep.largest_error = std::max(rep.largest_error, res.frobenius_error);
    results.emplace_back(host, std::move(res.factors));
  }
  // add_adapter draws initial values (overwritten below): the generator is put back as it was.
  const Rng::State saved = model_->rng().state();
  model_->add_adapter(name, io::unit_scaling_adapter_config(ranks, options.use_rslora, ""));
  model_->rng().set_state(saved);
  for (auto& [host, f] : results) {
    LoraAdapter<T>& a = host->adapter(name);
    a.A.value = f.A;
    if (f.scaling == 1.0)
      a.B.value = f.B;
    else
      a.B.value = static_cast<T>(f.scaling) * f.B;
  }
  rep.modules = results.size();
  return rep;
}

}  // namespace peft
