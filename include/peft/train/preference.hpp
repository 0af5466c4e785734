#pragma once
// Direct Preference Optimization of a causal LM with adapters (Rafailov et al., 2023; the loss and
// its IPO / conservative variants are loss/preference.hpp's).
//
// The reference model is the policy's own weights with the policy adapter switched off: one forward
// with the adapters (the policy π, kept for backward) and one with adapters disabled (π_ref, nothing
// kept), so there is no second copy of the weights. By default every host's adapters are disabled
// for the reference (the base model). To start from a supervised (SFT) adapter, either
//   * keep it active and frozen next to the policy adapter (also on an NF4 base) and name the policy
//     adapter in DPOTrainOptions::reference_disabled: the reference forward switches off only that
//     one (AdaptedLinear::disable_adapter), so π_ref is exactly the SFT model; or
//   * fold it into the base first (merge_and_unload on every host, PEFT's merge_and_unload) and add
//     a fresh policy adapter: the folded weights are the base of both forwards.
//
// A batch holds 2N sequences: the N chosen answers first, then their N rejected answers in the same
// order (TRL's concatenated forward); labels are the ids with the prompt tokens (and anything else
// not to be scored) set to ignore_index, and padding is masked by the layout. Any model with
//   void forward(const std::vector<Index>&, const SequenceLayout&, Matrix<T>& logits, Cache&);
//   void backward(const Cache&, const ConstMatrixRef<T>& dlogits);
// and AdaptedLinear hosts among its modules works (models/llama.hpp's LlamaForCausalLM does).
//
// After the first call with given shapes, a step reuses its buffers (the model's own forward and
// backward allocate nothing either).
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/module.hpp"
#include "peft/core/sequence.hpp"
#include "peft/core/types.hpp"
#include "peft/layers/adapted_linear.hpp"
#include "peft/loss/preference.hpp"
#include "peft/train/reference_switch.hpp"

namespace peft {

/// Every AdaptedLinear of a module, in visiting order (the hosts a reference forward switches off).
template <class T>
std::vector<AdaptedLinear<T>*> adapter_hosts(Module<T>& model) {
  std::vector<AdaptedLinear<T>*> out;
  model.visit_modules([&](const std::string&, Module<T>& m) {
    if (auto* l = dynamic_cast<AdaptedLinear<T>*>(&m)) out.push_back(l);
  });
  return out;
}

/// One preference batch: 2N sequences, N chosen then N rejected (see the file comment).
struct PreferenceBatch {
  std::vector<Index> ids;            ///< [2N·S], padding ids valid (e.g. 0)
  std::vector<std::int64_t> labels;  ///< [2N·S], ignore_index on the prompt
  SequenceLayout layout;             ///< batch 2N, lengths without padding
};

struct DPOTrainOptions {
  DPOOptions loss;                 ///< β, sigmoid / IPO, label smoothing
  bool average_log_probs = false;  ///< length-normalised sequence log-probs (TRL does this for IPO)
  std::int64_t ignore_index = -100;
  /// The adapters switched off for the reference forward (e.g. {"policy"}, with an SFT adapter
  /// active and frozen beside it); empty: every adapter (the base model).
  std::vector<std::string> reference_disabled = {};
};

/// The DPO objective of a model whose adapters are the policy. Holds the model and its hosts by
/// reference/pointer; one instance per model.
template <class T, class Model>
class DPOObjective {
 public:
  DPOObjective(Model& model, const DPOTrainOptions& options = {})
      : model_(&model), hosts_(adapter_hosts<T>(model)), options_(options) {
    detail::check_dpo_options(options.loss);
    if (hosts_.empty())
      throw ConfigError("DPOObjective: model \"" + model.name() +
                        "\" has no AdaptedLinear host, so there is no adapter to disable for the reference");
    ref_switch_.reset(hosts_, options.reference_disabled, "DPOObjective", model_->name());
  }

  const DPOTrainOptions& options() const { return options_; }
  void set_options(const DPOTrainOptions& o) {
    detail::check_dpo_options(o.loss);
    ref_switch_.reset(hosts_, o.reference_disabled, "DPOObjective", model_->name());
    options_ = o;
  }

  /// The reference's sequence log-probs [2N, 1] (the adapters of options().reference_disabled, or
  /// every host's adapters, disabled for this forward, restored after, also on an exception). Constant while only the
  /// adapters train, so a caller may compute them once per batch and pass them to step().
  void reference_log_probs(const PreferenceBatch& batch, Matrix<T>& out) {
    check_batch(batch);
    {
      typename detail::ReferenceSwitch<T>::Scope guard(ref_switch_);
      model_->forward(batch.ids, batch.layout, ref_logits_, ref_cache_);
    }
    sequence_log_probs<T>(ref_logits_, batch.labels, batch.layout, out, ref_ws_, options_.average_log_probs,
                          options_.ignore_index);
  }

  /// Policy forward, reference forward, the loss, and (with `backward`) the policy's backward: the
  /// trainable parameters' gradients are accumulated (+=; zero them before). Returns the metrics.
  DPOStats step(const PreferenceBatch& batch, bool backward = true) {
    reference_log_probs(batch, ref_lp_);
    return step(batch, ref_lp_, backward);
  }

  /// Same, with the reference's sequence log-probs [2N, 1] given (from reference_log_probs).
  DPOStats step(const PreferenceBatch& batch, const ConstMatrixRef<T>& ref_log_probs, bool backward = true) {
    check_batch(batch);
    const Index two_n = batch.layout.batch, n = two_n / 2;
    if (ref_log_probs.rows() != two_n || ref_log_probs.cols() != 1)
      throw ShapeError("DPOObjective::step: reference log-probabilities of shape " +
                       shape_str(ref_log_probs.rows(), ref_log_probs.cols()) + ", expected " + shape_str(two_n, 1));
    model_->forward(batch.ids, batch.layout, logits_, cache_);
    sequence_log_probs<T>(logits_, batch.labels, batch.layout, lp_, ws_, options_.average_log_probs,
                          options_.ignore_index);
    DPOStats stats;
    if (dseq_.rows() != two_n || dseq_.cols() != 1) dseq_.resize(two_n, 1);
    dpo_loss<T>(lp_.topRows(n), lp_.bottomRows(n), ref_log_probs.topRows(n), ref_log_probs.bottomRows(n),
                backward ? &dchosen_ : nullptr, backward ? &drejected_ : nullptr, options_.loss, &stats);
    if (backward) {
      dseq_.topRows(n) = dchosen_;
      dseq_.bottomRows(n) = drejected_;
      sequence_log_probs_backward<T>(logits_, batch.layout, dseq_, dlogits_, ws_);
      model_->backward(cache_, dlogits_);
    }
    return stats;
  }

  /// The policy's sequence log-probs [2N, 1] of the last step.
  const Matrix<T>& policy_log_probs() const { return lp_; }
  /// The policy's per-token log-probs [2N·S, 1] of the last step and the reference's of the last
  /// reference forward (row (b, t) scores token t + 1; 0 where masked): kl_estimate's inputs.
  const Matrix<T>& policy_token_log_probs() const { return ws_.token_log_probs; }
  const Matrix<T>& reference_token_log_probs() const { return ref_ws_.token_log_probs; }

 private:
  void check_batch(const PreferenceBatch& batch) const {
    const Index two_n = batch.layout.batch;
    if (two_n <= 0 || two_n % 2 != 0)
      throw ShapeError("DPOObjective: a preference batch holds N chosen then N rejected sequences, got " +
                       std::to_string(two_n) + " sequences (expected an even number >= 2)");
    const Index rows = two_n * batch.layout.seq;
    if (static_cast<Index>(batch.ids.size()) != rows || static_cast<Index>(batch.labels.size()) != rows)
      throw ShapeError("DPOObjective: preference batch of " + std::to_string(batch.ids.size()) + " ids and " +
                       std::to_string(batch.labels.size()) + " labels, expected " + std::to_string(rows) + " (" +
                       std::to_string(two_n) + " sequences of " + std::to_string(batch.layout.seq) + ")");
  }

  Model* model_;
  std::vector<AdaptedLinear<T>*> hosts_;
  detail::ReferenceSwitch<T> ref_switch_;  ///< the reference: adapters switched off
  DPOTrainOptions options_;
  typename Model::Cache cache_, ref_cache_;
  Matrix<T> logits_, ref_logits_, lp_, ref_lp_, dchosen_, drejected_, dseq_, dlogits_;
  SequenceLogProbWorkspace<T> ws_, ref_ws_;
};

}  // namespace peft
