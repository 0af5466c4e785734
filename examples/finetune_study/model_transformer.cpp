// A small vision transformer over image patches (Dosovitskiy et al., 2021, "An Image is Worth
// 16x16 Words"), built from peft::TransformerClassifier:
//
//   28×28 image → 16 patches of 7×7 pixels (row-major) → patch_embed (LoRALinear 49 → d)
//   + learned positions → N pre-norm blocks (multi-head attention, GELU feed-forward)
//   → final LayerNorm → mean over the 16 tokens → classifier (d → 10)
//
// Why this model: it is the smallest network on which every method of the study applies as
// published — LoRA on q/k/v/out and fc1/fc2, Houlsby adapters after attention and feed-forward,
// (IA)³ on keys, values and the feed-forward activation, prompt tuning (virtual tokens prepended
// to the patch sequence) and prefix tuning (virtual keys/values in every layer) — and a 2-block,
// d = 64 instance trains on a CPU in seconds.
#include <optional>
#include <utility>
#include <vector>

#include <peft/core/sequence.hpp>
#include <peft/models/transformer.hpp>

#include "model.hpp"
#include "model_registry.hpp"

namespace study {
namespace {

class TransformerNet : public Net {
 public:
  TransformerNet(Index height, Index width, const NetOptions& o, peft::Rng& rng) : width_(width), patch_(o.patch) {
    if (height % o.patch != 0 || width % o.patch != 0)
      throw peft::ConfigError("transformer: image " + std::to_string(height) + "x" + std::to_string(width) +
                              " is not divisible into " + std::to_string(o.patch) + "x" + std::to_string(o.patch) +
                              " patches");
    tokens_ = (height / o.patch) * (width / o.patch);
    peft::TransformerConfig c;
    c.input_dim = o.patch * o.patch;
    c.max_seq_len = tokens_;
    c.dim = o.width;
    c.num_heads = o.heads;
    c.ffn_dim = o.ffn;
    c.num_layers = o.layers;
    c.num_classes = kNumClasses;
    c.norm = peft::NormPlacement::Pre;
    c.pooling = peft::Pooling::Mean;
    c.activation = peft::Activation::GELU;
    model_ = peft::TransformerClassifier<float>(c, rng);
    stash_.resize(model_.layers.size());
    description_ = "ViT-style transformer: " + std::to_string(tokens_) + " patches of " + std::to_string(o.patch) +
                   "x" + std::to_string(o.patch) + ", d=" + std::to_string(o.width) + ", " + std::to_string(o.layers) +
                   " pre-norm blocks, " + std::to_string(o.heads) + " heads, FFN " + std::to_string(o.ffn) +
                   " (GELU), mean pooling";
  }

  void forward(const Mat& x, Mat& logits) override {
    patchify(x, patches_);
    if (layout_.batch != x.rows()) layout_ = peft::SequenceLayout(x.rows(), tokens_);
    model_.forward(patches_, layout_, logits, cache_);
  }

  void forward_inference(const Mat& x, Mat& logits) override {
    patchify(x, patches_inf_);
    if (layout_inf_.batch != x.rows()) layout_inf_ = peft::SequenceLayout(x.rows(), tokens_);
    model_.forward_inference(patches_inf_, layout_inf_, logits);
  }

  void backward(const Mat& dlogits) override { model_.backward(cache_, dlogits, nullptr); }

  std::unique_ptr<Net> clone() const override { return std::make_unique<TransformerNet>(*this); }
  std::string describe() const override { return description_; }
  int num_layers() const override { return static_cast<int>(model_.num_layers()); }

  std::string head_name() const override { return "classifier"; }
  std::vector<std::string> unfreeze_order() const override {
    // The final norm goes with the top block; positions go with the patch embedding.
    std::vector<std::string> order;
    for (Index i = model_.num_layers(); i-- > 0;) {
      std::string p = "layers\\." + std::to_string(i) + "\\..*";
      if (i == model_.num_layers() - 1) p = "(" + p + "|norm\\..*)";
      order.push_back(p);
    }
    order.push_back("(patch_embed|embed_positions)\\..*");
    return order;
  }
  std::vector<peft::LayerRule> layer_rules() const override {
    return {{"(patch_embed|embed_positions)\\..*", -1}, {"norm\\..*", model_.num_layers() - 1}};
  }

  void add_lora(const peft::LoraConfig& config, peft::Rng& rng) override {
    // Every linear but the classifier (PEFT's target_modules="all-linear" minus the output layer).
    model_.for_each_linear([&](const std::string&, peft::LoRALinear<float>& lin, bool is_head) {
      if (!is_head) lin.add_adapter("default", config, rng);
    });
  }
  void add_adapters(Index bottleneck, peft::Rng& rng) override {
    peft::AdapterOptions o;
    o.bottleneck = bottleneck;
    o.activation = peft::Activation::GELU;
    o.init = peft::AdapterInit::Zero;  // exact identity at the start
    model_.add_adapters(peft::AdapterPlacement::Houlsby, o, rng);
  }
  void add_ia3() override {
    for (auto& b : model_.layers) {
      b.attn.add_ia3("default", true, true);
      b.ffn.add_ia3("default");
    }
    model_.set_name(model_.name());
  }
  bool supports_prompts() const override { return true; }
  void add_soft_prompt(Index tokens, peft::Rng& rng) override {
    // Scale ~ the token embeddings' (LayerNorm'd inputs see unit-variance rows either way).
    model_.add_soft_prompt(tokens, rng, 0.5);
  }
  void add_prefix(Index tokens, peft::Rng& rng) override { model_.add_prefix(tokens, rng); }
  void set_peft_disabled(bool disabled) override {
    if (disabled == disabled_) return;
    disabled_ = disabled;
    // LoRA and (IA)^3 live in the linears, which disable them themselves; the sequential adapters
    // and the prompt / prefix tables are set aside (and put back) whole.
    model_.for_each_linear(
        [&](const std::string&, peft::LoRALinear<float>& lin, bool) { lin.disable_adapters(disabled); });
    for (std::size_t i = 0; i < model_.layers.size(); ++i) {
      std::swap(model_.layers[i].adapter_attn, stash_[i].first);
      std::swap(model_.layers[i].adapter_ffn, stash_[i].second);
    }
    std::swap(model_.prompt_encoder, prompt_stash_);
    std::swap(model_.prefix_encoder, prefix_stash_);
  }

 protected:
  void visit_children(const ChildVisitor& fn) override {
    // An empty key keeps the wrapper transparent: names are the TransformerClassifier's own
    // (Module::join drops empty components).
    fn("", model_);
  }

 private:
  /// x [B, H·W] → patches [B·T, p·p], patch (i, j) of image b at row b·T + i·(W/p) + j.
  void patchify(const Mat& x, Mat& patches) const {
    const Index per_row = width_ / patch_;
    patches.resize(x.rows() * tokens_, patch_ * patch_);
    for (Index b = 0; b < x.rows(); ++b)
      for (Index t = 0; t < tokens_; ++t) {
        const Index pi = t / per_row, pj = t % per_row;
        for (Index r = 0; r < patch_; ++r)
          patches.row(b * tokens_ + t).segment(r * patch_, patch_) =
              x.row(b).segment((pi * patch_ + r) * width_ + pj * patch_, patch_);
      }
  }

  Index width_, patch_, tokens_ = 0;
  peft::TransformerClassifier<float> model_;
  bool disabled_ = false;
  std::vector<std::pair<std::optional<peft::Adapter<float>>, std::optional<peft::Adapter<float>>>> stash_;
  std::optional<peft::SoftPrompt<float>> prompt_stash_;
  std::optional<peft::PrefixAttention<float>> prefix_stash_;
  peft::TransformerClassifier<float>::Cache cache_;
  peft::SequenceLayout layout_, layout_inf_;
  Mat patches_, patches_inf_;  ///< forward's and forward_inference's patches
  std::string description_;
};

}  // namespace

std::unique_ptr<Net> make_transformer(const NetOptions& options, Index height, Index width, peft::Rng& rng) {
  return std::make_unique<TransformerNet>(height, width, options, rng);
}

}  // namespace study
