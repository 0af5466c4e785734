// Sliding-window attention in the Llama causal LM (models/llama.hpp: Mistral's sliding_window, Qwen2's
// use_sliding_window + layer_types) against transformers + peft (benchmarks/peer/make_llama_sliding_fixtures.py,
// tests/data/llama/{mistral_sw,qwen2_sw}*), a finite-difference check and the KV cache.
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include <peft/io/llama_checkpoint.hpp>
#include <peft/io/methods.hpp>
#include <peft/loss/causal_lm.hpp>
#include <peft/models/generation.hpp>
#include <peft/models/llama.hpp>
#include <peft/train/gradient_check.hpp>

#include "models/llama_fixture_utils.hpp"
#include "models/llama_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::llama_data;
using peft::test::randomize_llama;
using peft::test::Tolerances;
using peft::test::valid_rows_error;

namespace {

/// HF's tensors of <name>_expected.safetensors (sliding-window fixtures).
struct SwFixture {
  io::SafeTensorsFile st;
  explicit SwFixture(const std::string& name) : st(llama_data(name + "_expected.safetensors")) {}

  void batch(const std::string& ids_key, const std::string& mask_key, std::vector<Index>& ids,
             SequenceLayout& layout) const {
    peft::test::fixture_batch(st, ids_key, mask_key, ids, layout);
  }
  std::vector<std::int64_t> labels() const {
    const Matrix<double> l = st.load<double>("labels");
    std::vector<std::int64_t> out;
    for (Index b = 0; b < l.rows(); ++b)
      for (Index s = 0; s < l.cols(); ++s) out.push_back(static_cast<std::int64_t>(l(b, s)));
    return out;
  }
  /// [B, S, V] as [B·S, V].
  Matrix<double> rows(const std::string& name) const {
    const io::TensorInfo& t = st.info(name);
    const Matrix<double> m = st.load<double>(name);
    const Index n = t.shape[0] * t.shape[1];
    return Eigen::Map<const Matrix<double>>(m.data(), n, m.size() / n);
  }
  double scalar(const std::string& name) const { return st.load<double>(name)(0, 0); }
  /// Row b of a generate() output from column `from`.
  std::vector<Index> ids_row(const std::string& name, Index b, Index from) const {
    const Matrix<double> m = st.load<double>(name);
    std::vector<Index> out;
    for (Index s = from; s < m.cols(); ++s) out.push_back(static_cast<Index>(m(b, s)));
    return out;
  }
};

const char* const kSwModels[] = {"mistral_sw", "qwen2_sw"};

/// The tiny synthetic Llama with a window of 2: on every layer, or (per_layer) on layer 1 only.
LlamaConfig sw_tiny_config(bool per_layer) {
  LlamaConfig c = peft::test::tiny_llama_base();
  c.qkv_bias = true;
  c.sliding_window = 2;
  if (per_layer) c.layer_types = {"full_attention", "sliding_attention"};
  return c;
}

io::Json sw_qwen2_config() {
  return {{"model_type", "qwen2"},    {"vocab_size", 16},           {"hidden_size", 8},
          {"intermediate_size", 12},  {"num_hidden_layers", 3},     {"num_attention_heads", 2},
          {"num_key_value_heads", 1}, {"use_sliding_window", true}, {"sliding_window", 5},
          {"max_window_layers", 1}};
}

}  // namespace

TEMPLATE_TEST_CASE(
    "llama: sliding window reproduces transformers' logits and loss (Mistral; Qwen2 layer_types; "
    "right and left padding)",
    "[llama][sliding]", float, double) {
  using T = TestType;
  const bool f32 = std::is_same<T, float>::value;
  for (const std::string name : kSwModels) {
    INFO(name);
    const SwFixture fx(name);
    LlamaForCausalLM<T> model = io::load_llama<T>(llama_data(name));
    REQUIRE(model.config().sliding_window == 3);
    CHECK(model.model.layers[0].self_attn.sliding_window() == 3);
    CHECK(model.model.layers[1].self_attn.sliding_window() == (name == "qwen2_sw" ? 0 : 3));
    std::vector<Index> ids;
    SequenceLayout layout;
    fx.batch("input_ids", "attention_mask", ids, layout);
    REQUIRE(layout.seq == 9);
    REQUIRE(!layout.left_padded);
    typename LlamaForCausalLM<T>::Cache cache;
    const Matrix<T> logits = model.forward(ids, layout, cache);
    const double err = valid_rows_error(logits, fx.rows(f32 ? "logits_f32" : "logits_f64"), layout);
    CHECK(err < (f32 ? 1e-5 : 1e-12));
    const T loss = causal_lm_loss<T>(logits, fx.labels(), layout, nullptr);
    const double want = fx.scalar(f32 ? "loss_f32" : "loss_f64"), lerr = std::abs(double(loss) - want) / want;
    CHECK(lerr < (f32 ? 1e-5 : 1e-12));
    fx.batch("left_ids", "left_mask", ids, layout);
    REQUIRE(layout.left_padded);
    const Matrix<T> left = model.forward(ids, layout, cache);
    const double lerr2 = valid_rows_error(left, fx.rows(f32 ? "left_logits_f32" : "left_logits_f64"), layout);
    CHECK(lerr2 < (f32 ? 1e-5 : 1e-12));
    WARN(name << " " << (f32 ? "float" : "double") << ": right-padded logits rel err " << err << ", loss rel err "
              << lerr << ", left-padded logits rel err " << lerr2);
  }
}

TEST_CASE("llama: sliding window LoRA logits, loss and gradients equal PEFT's", "[llama][sliding]") {
  for (const std::string name : kSwModels) {
    INFO(name);
    const SwFixture fx(name);
    LlamaForCausalLM<double> model = io::load_llama<double>(llama_data(name));
    io::load_method_adapter(model, io::read_method_adapter<double>(llama_data(name + "_lora")), "default");
    std::vector<Index> ids;
    SequenceLayout layout;
    fx.batch("input_ids", "attention_mask", ids, layout);
    typename LlamaForCausalLM<double>::Cache cache;
    Matrix<double> logits, dlogits;
    model.forward(ids, layout, logits, cache);
    const double err = valid_rows_error(logits, fx.rows("lora_logits_f64"), layout);
    CHECK(err < 1e-12);
    const double loss = causal_lm_loss<double>(logits, fx.labels(), layout, &dlogits);
    CHECK(std::abs(loss - fx.scalar("lora_loss_f64")) < 1e-12 * loss);
    model.zero_grad();
    model.backward(cache, dlogits);
    int checked = 0;
    double worst = 0;
    model.visit_parameters([&](const std::string& n, Parameter<double>& p) {
      if (!p.trainable()) return;
      std::string key = n;
      key.replace(key.find(".default"), 8, "");
      const double e = peft::test::rel_diff(p.grad, fx.st.load<double>("grad.base_model.model." + key));
      worst = std::max(worst, e);
      CHECK(e < 1e-11);
      ++checked;
    });
    CHECK(checked == 8);
    WARN(name << ": LoRA logits rel err " << err << ", worst LoRA gradient rel err " << worst);
  }
}

TEST_CASE("llama: sliding window with a prefix equals PEFT's (prefix keys at positions 0 .. np - 1)",
          "[llama][sliding][prefix]") {
  const SwFixture fx("mistral_sw");
  LlamaForCausalLM<double> model = io::load_llama<double>(llama_data("mistral_sw"));
  Rng rng(3);
  model.add_prefix_tuning(2, rng);
  const Matrix<double> table = fx.st.load<double>("prefix_table");
  REQUIRE(table.rows() == 2);
  REQUIRE(table.cols() == model.prefix_encoder->embedding.value.cols());
  model.prefix_encoder->embedding.value = table;
  std::vector<Index> ids;
  SequenceLayout layout;
  fx.batch("input_ids", "attention_mask", ids, layout);
  typename LlamaForCausalLM<double>::Cache cache;
  const Matrix<double> logits = model.forward(ids, layout, cache);
  const double err = valid_rows_error(logits, fx.rows("prefix_logits_f64"), layout);
  CHECK(err < 1e-12);
  WARN("mistral_sw + prefix: logits rel err " << err);
}

TEST_CASE("llama: sliding-window gradient check in double (padding, per-layer windows, prompt and prefix)",
          "[llama][sliding]") {
  enum Kind { AllRight, PerLayerLeft, PromptRight, PrefixLeft };
  for (const Kind kind : {AllRight, PerLayerLeft, PromptRight, PrefixLeft}) {
    INFO("case " << kind);
    Rng rng(60 + kind);
    LlamaForCausalLM<double> model(sw_tiny_config(kind == PerLayerLeft), rng);
    randomize_llama(model, rng);
    peft::test::add_gradient_check_lora(model, rng);  // non-zero B
    if (kind == PromptRight) model.add_prompt_tuning(2, rng);
    if (kind == PrefixLeft) model.add_prefix_tuning(2, rng);
    model.visit_parameters([](const std::string&, Parameter<double>& p) { p.set_trainable(true); });
    SequenceLayout layout;
    const std::vector<Index> ids =
        pack_token_ids({{1, 4, 7, 2, 9, 3}, {3, 10, 5, 6}}, layout, 0, kind == PerLayerLeft || kind == PrefixLeft);
    const std::vector<std::int64_t> labels =
        model.prompt_labels(std::vector<std::int64_t>(ids.begin(), ids.end()), layout);
    const SequenceLayout out = model.output_layout(layout);
    peft::test::check_llama_gradients(model, ids, layout, labels, out);
  }
}

TEST_CASE("llama: sliding window changes what plain causal attention computes past the window", "[llama][sliding]") {
  Rng r1(70), r2(70);  // the same draws: the same weights
  LlamaForCausalLM<double> model(sw_tiny_config(false), r1);
  randomize_llama(model, r1);
  LlamaConfig full_cfg = sw_tiny_config(false);
  full_cfg.sliding_window = 0;
  LlamaForCausalLM<double> full(full_cfg, r2);
  randomize_llama(full, r2);
  const std::vector<Index> ids = {1, 4, 7, 2, 9};
  typename LlamaForCausalLM<double>::Cache c1, c2;
  const Matrix<double> a = model.forward(ids, SequenceLayout(1, 5), c1),
                       b = full.forward(ids, SequenceLayout(1, 5), c2);
  CHECK(peft::test::rel_diff(Matrix<double>(a.topRows(2)), Matrix<double>(b.topRows(2))) < 1e-14);  // inside W
  CHECK(peft::test::rel_diff(Matrix<double>(a.row(4)), Matrix<double>(b.row(4))) > 1e-3);
}

TEST_CASE("llama: sliding-window KV cache equals the full forward (left padding, prompt, prefix)",
          "[llama][sliding][generate]") {
  for (int kind = 0; kind < 4; ++kind) {
    INFO("kind " << kind);
    Rng rng(80 + kind);
    LlamaForCausalLM<double> model(sw_tiny_config(kind == 3), rng);
    randomize_llama(model, rng);
    if (kind == 1) model.add_prompt_tuning(2, rng);
    if (kind == 2) model.add_prefix_tuning(3, rng, true, 4);
    peft::test::check_kv_cache_equals_forward(model, {{1, 4, 7, 2, 9}, {3, 10, 5}}, {{6, 1, 8, 4}, {2, 2, 4, 7}});
  }
}

TEST_CASE("llama: sliding-window greedy generation equals transformers' generate (one prompt and a left-padded batch)",
          "[llama][sliding][generate]") {
  for (const std::string name : kSwModels) {
    INFO(name);
    const SwFixture fx(name);
    LlamaForCausalLM<float> model = io::load_llama<float>(llama_data(name));
    GenerationConfig gc;
    gc.max_new_tokens = 6;
    if (name == "mistral_sw") gc.eos_token_ids = {2};  // MistralConfig's eos (never generated here)
    Rng rng(1);
    const std::vector<Index> prompt = fx.ids_row("greedy_prompt", 0, 0);
    REQUIRE(prompt.size() == 4);
    CHECK(generate(model, prompt, gc, rng) == fx.ids_row("greedy_ids", 0, 0));  // 10 positions, window 3
    std::vector<Index> ids;
    SequenceLayout layout;
    fx.batch("gen_ids", "gen_mask", ids, layout);
    std::vector<std::vector<Index>> prompts(static_cast<std::size_t>(layout.batch));
    for (Index b = 0; b < layout.batch; ++b)
      for (Index t = layout.first(b); t < layout.seq; ++t)
        prompts[static_cast<std::size_t>(b)].push_back(ids[static_cast<std::size_t>(layout.row(b, t))]);
    const auto got = generate_batch(model, prompts, gc, rng);
    for (Index b = 0; b < layout.batch; ++b)
      CHECK(got[static_cast<std::size_t>(b)] == fx.ids_row("gen_greedy", b, layout.first(b)));
  }
}

TEST_CASE("llama: sliding-window config keys as transformers reads them; refusals name the key", "[llama][sliding]") {
  // Qwen2 without layer_types: the layers i >= max_window_layers slide (Qwen2Config.__post_init__).
  LlamaConfig c = io::llama_config_from_json(sw_qwen2_config(), "q");
  CHECK(c.sliding_window == 5);
  CHECK(c.layer_window(0) == 0);
  CHECK(c.layer_window(1) == 5);
  CHECK(c.layer_window(2) == 5);
  LlamaForCausalLM<float> m(c);
  CHECK(m.model.layers[0].self_attn.sliding_window() == 0);
  CHECK(m.model.layers[2].self_attn.sliding_window() == 5);
  io::Json j = sw_qwen2_config();
  j.erase("sliding_window");  // Qwen2Config's default
  CHECK(io::llama_config_from_json(j, "q").layer_window(2) == 4096);
  j = sw_qwen2_config();
  j["use_sliding_window"] = false;  // no window: every layer full
  c = io::llama_config_from_json(j, "q");
  CHECK(c.layer_window(2) == 0);
  j["layer_types"] = {"full_attention", "sliding_attention", "full_attention"};
  PEFT_REQUIRE_THROWS_WITH(io::llama_config_from_json(j, "q"), ConfigError,
                           "layer_types holds sliding_attention but use_sliding_window is false");
  j["use_sliding_window"] = true;
  c = io::llama_config_from_json(j, "q");  // explicit layer_types win over max_window_layers
  CHECK(c.layer_window(0) == 0);
  CHECK(c.layer_window(1) == 5);
  CHECK(c.layer_window(2) == 0);
  j["sliding_window"] = nullptr;
  PEFT_REQUIRE_THROWS_WITH(io::llama_config_from_json(j, "q"), ConfigError,
                           "layer_types holds sliding_attention but sliding_window is null");
  j = sw_qwen2_config();
  j["layer_types"] = {"sliding_attention"};
  PEFT_REQUIRE_THROWS_WITH(io::llama_config_from_json(j, "q"), ConfigError, "layer_types has 1 entries for 3 layers");
  j["layer_types"] = {"full_attention", "chunked_attention", "full_attention"};
  PEFT_REQUIRE_THROWS_WITH(io::llama_config_from_json(j, "q"), ConfigError,
                           "layer_types holds \"chunked_attention\": only full_attention layers are supported (and "
                           "sliding_attention)");
  // Mistral: every layer slides; absent → MistralConfig's 4096, null → none; layer_types not read.
  j = sw_qwen2_config();
  j["model_type"] = "mistral";
  j.erase("use_sliding_window");
  c = io::llama_config_from_json(j, "m");
  CHECK(c.layer_window(0) == 5);
  CHECK(c.layer_window(2) == 5);
  j.erase("sliding_window");
  CHECK(io::llama_config_from_json(j, "m").layer_window(0) == 4096);
  j["sliding_window"] = nullptr;
  CHECK(io::llama_config_from_json(j, "m").layer_window(0) == 0);
  j["layer_types"] = {"sliding_attention", "full_attention", "full_attention"};
  PEFT_REQUIRE_THROWS_WITH(io::llama_config_from_json(j, "m"), ConfigError,
                           "only full_attention layers are supported for model_type mistral");
  // LlamaConfig itself.
  LlamaConfig bad = sw_tiny_config(true);
  bad.sliding_window = 0;
  PEFT_REQUIRE_THROWS_WITH(bad.validate(), ConfigError,
                           "layer_types holds sliding_attention but sliding_window is not set");
  bad = sw_tiny_config(false);
  bad.max_window_layers = -1;
  PEFT_REQUIRE_THROWS_WITH(bad.validate(), ConfigError, "max_window_layers must be >= 0");
}
