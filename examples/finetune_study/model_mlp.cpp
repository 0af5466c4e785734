// A multilayer perceptron over raw pixels: the fallback architecture, and the one to use when a
// study should isolate LoRA/adapters/(IA)³ from attention. It cannot host prompt or prefix tuning
// (there is no sequence to prepend to).
//
//   h_0 = block_embed(x),  h_i = block_i(h_{i−1}),  logits = h_L W_headᵀ + b_head
//   block(x) = adapter( relu(x Wᵀ + b) ⊙ l )     (the adapter and the (IA)³ vector l are optional)
#include <optional>

#include <peft/layers/activations.hpp>
#include <peft/layers/adapter.hpp>
#include <peft/layers/ia3.hpp>
#include <peft/layers/linear.hpp>

#include "model.hpp"
#include "model_registry.hpp"

namespace study {
namespace {

using peft::Module;
using peft::Parameter;

class MlpBlock : public Module<float> {
 public:
  MlpBlock() = default;
  MlpBlock(Index in, Index out, peft::Rng& rng) : fc(in, out, rng) {}

  peft::LoRALinear<float> fc;
  std::optional<peft::Adapter<float>> adapter;

  struct Cache {
    peft::LoRALinear<float>::Cache fc;
    Mat z;  ///< pre-activation
    Mat a;  ///< relu(z)
    peft::Adapter<float>::Cache adapter;
  };

  void forward(const Mat& x, Mat& y, Cache& c) {
    fc.forward(x, c.z, c.fc);
    peft::activation_forward<float>(peft::Activation::ReLU, c.z, c.a);
    const Mat* out = &c.a;
    if (adapter)
      adapter->forward(*out, y, c.adapter);
    else
      y = *out;
  }

  /// The same output through the layers' inference paths (nothing kept for backward).
  void forward_inference(const Mat& x, Mat& y) {
    fc.forward_inference(x, z_inf_);
    peft::activation_forward<float>(peft::Activation::ReLU, z_inf_, a_inf_);
    if (adapter)
      adapter->forward_inference(a_inf_, y);
    else
      y = a_inf_;
  }

  /// dy is consumed (used as scratch). dx may be null.
  void backward(const Cache& c, Mat& dy, Mat* dx) {
    if (adapter) {
      adapter->backward(c.adapter, dy, &scratch_);
      dy.swap(scratch_);
    }
    peft::activation_backward<float>(peft::Activation::ReLU, c.z, dy, dy);  // dz = dy ⊙ 1[z > 0]
    fc.backward(c.fc, dy, dx);
  }

 protected:
  void visit_children(const ChildVisitor& fn) override {
    fn("fc", fc);
    if (adapter) fn("adapter", *adapter);
  }

 private:
  Mat scratch_;
  Mat z_inf_, a_inf_;  ///< forward_inference's pre-activation and relu(z)
};

bool has_trainable(Module<float>& m) {
  bool any = false;
  m.visit_parameters([&](const std::string&, Parameter<float>& p) { any = any || p.trainable(); });
  return any;
}

class MlpNet : public Net {
 public:
  MlpNet(Index pixels, const NetOptions& o, peft::Rng& rng) : embed_(pixels, o.width, rng) {
    for (Index i = 0; i < o.layers; ++i) layers_.emplace_back(o.width, o.width, rng);
    head_ = peft::Linear<float>(o.width, kNumClasses, rng);
    caches_.resize(layers_.size() + 1);
    hidden_.resize(layers_.size() + 1);
    hidden_inf_.resize(layers_.size() + 1);
    set_name("");
    description_ = "MLP " + std::to_string(pixels) + "-" + std::to_string(o.width) + "x" +
                   std::to_string(o.layers + 1) + "-10 (ReLU)";
  }

  void forward(const Mat& x, Mat& logits) override {
    embed_.forward(x, hidden_[0], caches_[0]);
    for (std::size_t i = 0; i < layers_.size(); ++i) layers_[i].forward(hidden_[i], hidden_[i + 1], caches_[i + 1]);
    head_.forward(hidden_.back(), logits, head_cache_);
  }

  void forward_inference(const Mat& x, Mat& logits) override {
    embed_.forward_inference(x, hidden_inf_[0]);
    for (std::size_t i = 0; i < layers_.size(); ++i) layers_[i].forward_inference(hidden_inf_[i], hidden_inf_[i + 1]);
    head_.forward_inference(hidden_inf_.back(), logits);
  }

  void backward(const Mat& dlogits) override {
    // Walk down only as far as the lowest block with a trainable parameter: a linear probe
    // never pays for the frozen backbone's input-gradient GEMMs.
    std::size_t lowest = layers_.size() + 1;  // block index + 1 (0 = embed), none yet
    if (has_trainable(embed_)) lowest = 0;
    for (std::size_t i = 0; i < layers_.size() && lowest > layers_.size(); ++i)
      if (has_trainable(layers_[i])) lowest = i + 1;
    head_.backward(head_cache_, dlogits, lowest <= layers_.size() ? &grad_ : nullptr);
    for (std::size_t i = layers_.size(); i-- > 0;) {
      if (i + 1 < lowest) return;
      layers_[i].backward(caches_[i + 1], grad_, i + 1 > lowest ? &grad_below_ : nullptr);
      grad_.swap(grad_below_);
    }
    if (lowest == 0) embed_.backward(caches_[0], grad_, nullptr);
  }

  std::unique_ptr<Net> clone() const override { return std::make_unique<MlpNet>(*this); }
  std::string describe() const override { return description_; }
  int num_layers() const override { return static_cast<int>(layers_.size()); }

  void add_lora(const peft::LoraConfig& config, peft::Rng& rng) override {
    embed_.fc.add_adapter("default", config, rng);
    for (auto& l : layers_) l.fc.add_adapter("default", config, rng);
    set_name("");
  }
  void add_adapters(Index bottleneck, peft::Rng& rng) override {
    peft::AdapterOptions o;
    o.bottleneck = bottleneck;
    o.init = peft::AdapterInit::Zero;  // exact identity at the start: fine-tuning starts from the pretrained function
    embed_.adapter.emplace(embed_.fc.out_features(), o, rng);
    for (auto& l : layers_) l.adapter.emplace(l.fc.out_features(), o, rng);
    set_name("");
  }
  void add_ia3() override {
    // (IA)³ on each block's linear, scaling its output before the ReLU (PEFT's is_feedforward=false).
    peft::add_ia3_adapter(embed_.fc, "default", false);
    for (auto& l : layers_) peft::add_ia3_adapter(l.fc, "default", false);
  }
  void set_peft_disabled(bool disabled) override {
    if (disabled == disabled_) return;
    disabled_ = disabled;
    embed_.fc.disable_adapters(disabled);
    for (auto& l : layers_) l.fc.disable_adapters(disabled);
    // The adapters are set aside whole (and put back).
    stash_.resize(layers_.size() + 1);
    std::swap(embed_.adapter, stash_[0]);
    for (std::size_t i = 0; i < layers_.size(); ++i) std::swap(layers_[i].adapter, stash_[i + 1]);
  }
  std::string head_name() const override { return "head"; }
  std::vector<std::string> unfreeze_order() const override {
    std::vector<std::string> order;
    for (std::size_t i = layers_.size(); i-- > 0;) order.push_back("layers\\." + std::to_string(i) + "\\..*");
    order.push_back("embed\\..*");
    return order;
  }
  std::vector<peft::LayerRule> layer_rules() const override { return {{"embed\\..*", -1}}; }
  bool supports_prompts() const override { return false; }
  void add_soft_prompt(Index, peft::Rng&) override {
    throw peft::ConfigError("MLP: prompt tuning needs a sequence model (use --arch transformer)");
  }
  void add_prefix(Index, peft::Rng&) override {
    throw peft::ConfigError("MLP: prefix tuning needs a sequence model (use --arch transformer)");
  }

 protected:
  void visit_children(const ChildVisitor& fn) override {
    fn("embed", embed_);
    for (std::size_t i = 0; i < layers_.size(); ++i) fn("layers." + std::to_string(i), layers_[i]);
    fn("head", head_);
  }

 private:
  MlpBlock embed_;
  std::vector<MlpBlock> layers_;
  peft::Linear<float> head_;
  std::vector<MlpBlock::Cache> caches_;
  std::vector<Mat> hidden_;
  std::vector<Mat> hidden_inf_;  ///< forward_inference's activations (the training ones keep their shapes)
  peft::Linear<float>::Cache head_cache_;
  Mat grad_, grad_below_;
  std::string description_;
  bool disabled_ = false;
  std::vector<std::optional<peft::Adapter<float>>> stash_;
};

}  // namespace

std::unique_ptr<Net> make_mlp(const NetOptions& options, Index height, Index width, peft::Rng& rng) {
  return std::make_unique<MlpNet>(height * width, options, rng);
}

}  // namespace study
