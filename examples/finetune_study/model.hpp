#pragma once
// The networks the study fine-tunes, behind one small interface so every strategy is written once.
//
// Strategies address parts of a network by parameter-name patterns (as Hugging Face PEFT's
// target_modules do); each network says which names are its head, and in which order its blocks
// unfreeze. The head is one 10-way linear: rows 0-4 score the source classes, rows 5-9 the target.
#include <memory>
#include <string>
#include <vector>

#include <peft/core/module.hpp>
#include <peft/core/rng.hpp>
#include <peft/layers/lora_linear.hpp>
#include <peft/optim/param_groups.hpp>

#include "data.hpp"

namespace study {

class Net : public peft::Module<float> {
 public:
  /// logits [rows, 10] for images x [rows, pixels]; keeps what backward needs inside the net.
  virtual void forward(const Mat& x, Mat& logits) = 0;
  /// logits [rows, 10] with nothing kept for backward (evaluation): the values forward() computes
  /// in eval mode, through the layers' inference paths and buffers of their own, so evaluating
  /// between training steps leaves the training buffers (and the last forward's cache) alone.
  virtual void forward_inference(const Mat& x, Mat& logits) = 0;
  /// Backward of the last forward: accumulates the gradients of the trainable parameters.
  virtual void backward(const Mat& dlogits) = 0;
  /// A deep copy (the pretrained model is copied once per strategy).
  virtual std::unique_ptr<Net> clone() const = 0;

  virtual std::string describe() const = 0;
  virtual int num_layers() const = 0;

  /// Dotted name of the 10-way classifier ("head", "classifier"); its parameters are <name>.weight/.bias.
  virtual std::string head_name() const = 0;
  /// Regexes covering every non-head parameter, top of the network first (gradual unfreezing).
  virtual std::vector<std::string> unfreeze_order() const = 0;
  /// Layer index of non-block parameters for layer-wise learning rates (embedding: −1, ...).
  virtual std::vector<peft::LayerRule> layer_rules() const = 0;

  /// Attaches PEFT modules to the backbone (every method freezes nothing itself; see strategies).
  virtual void add_lora(const peft::LoraConfig& config, peft::Rng& rng) = 0;
  virtual void add_adapters(Index bottleneck, peft::Rng& rng) = 0;
  virtual void add_ia3() = 0;
  /// Prompt and prefix tuning need a sequence model; false when this net cannot host them.
  virtual bool supports_prompts() const = 0;
  virtual void add_soft_prompt(Index tokens, peft::Rng& rng) = 0;
  virtual void add_prefix(Index tokens, peft::Rng& rng) = 0;

  /// Disables (true) or re-enables every module added by add_*: the network then computes what the
  /// pretrained one did (PEFT's disable_adapters), which the study checks bit for bit.
  virtual void set_peft_disabled(bool disabled) = 0;

  /// Regex of every parameter added by add_* (what PEFT strategies train besides the head).
  static std::string peft_pattern() { return ".*(lora_[AB]|adapter_|ia3_l|prompt_encoder|prefix_encoder).*"; }
};

struct NetOptions {
  std::string arch = "transformer";  ///< "transformer" or "mlp"
  Index width = 64;
  Index layers = 2;
  Index heads = 4;
  Index patch = 7;
  Index ffn = 128;
};

/// The architectures compiled into this binary ("mlp" always; "transformer" when peft provides it).
std::string available_architectures();
std::unique_ptr<Net> make_net(const NetOptions& options, Index height, Index width, peft::Rng& rng);

}  // namespace study
