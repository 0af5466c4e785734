// Llama-family causal LMs (models/llama.hpp, io/llama_checkpoint.hpp, loss/causal_lm.hpp) against
// fixtures written by transformers + peft (benchmarks/peer/make_llama_fixtures.py, tests/data/llama/).
#include <unistd.h>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <peft/io/llama_checkpoint.hpp>
#include <peft/io/methods.hpp>
#include <peft/loss/causal_lm.hpp>
#include <peft/loss/cross_entropy.hpp>
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

/// The fixture batch and HF's outputs (tests/data/llama/<name>_expected.safetensors).
struct LlamaFixture {
  io::SafeTensorsFile st;
  Index B = 0, S = 0;
  std::vector<Index> ids;
  std::vector<std::int64_t> labels;
  SequenceLayout layout;

  explicit LlamaFixture(const std::string& name) : st(llama_data(name + "_expected.safetensors")) {
    const io::TensorInfo& t = st.info("input_ids");
    B = t.shape[0];
    S = t.shape[1];
    const Matrix<double> id = st.load<double>("input_ids"), mask = st.load<double>("attention_mask"),
                         lab = st.load<double>("labels");
    std::vector<Index> lengths;
    for (Index b = 0; b < B; ++b) {
      lengths.push_back(static_cast<Index>(mask.row(b).sum()));
      for (Index s = 0; s < S; ++s) {
        ids.push_back(static_cast<Index>(id(b, s)));
        labels.push_back(static_cast<std::int64_t>(lab(b, s)));
      }
    }
    layout = SequenceLayout(B, S, lengths);
  }
  /// A [B, S, ...] tensor as [B·S, rest].
  Matrix<double> rows(const std::string& name) const {
    const io::TensorInfo& t = st.info(name);
    Matrix<double> m = st.load<double>(name);
    const Index n = t.shape.size() == 3 ? t.shape[0] * t.shape[1] : t.rows();
    Matrix<double> out = Eigen::Map<const Matrix<double>>(m.data(), n, m.size() / n);
    return out;
  }
  double scalar(const std::string& name) const { return st.load<double>(name)(0, 0); }
};

/// A tiny config with everything switched on: GQA, q/k/v/o biases, mlp biases, llama3 rope.
LlamaConfig tiny_llama_config(bool tied) {
  LlamaConfig c = peft::test::tiny_llama_base();
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  c.tie_word_embeddings = tied;
  c.rope.type = "llama3";
  c.rope.factor = 4.0;
  c.rope.low_freq_factor = 1.0;
  c.rope.high_freq_factor = 4.0;
  c.rope.original_max_position_embeddings = 24;
  return c;
}

}  // namespace

TEST_CASE("llama: rope llama3 frequencies follow HF's three bands", "[llama]") {
  RopeConfig r;
  r.theta = 10000.0;
  r.type = "llama3";
  r.factor = 8.0;
  r.original_max_position_embeddings = 64;
  const std::vector<double> f = rope_inverse_frequencies(r, 16);
  REQUIRE(f.size() == 8);
  CHECK(f[0] == 1.0);                                                         // wavelength 6.3 < 16: kept
  CHECK(f[7] == Approx(std::pow(10000.0, -14.0 / 16) / 8.0).epsilon(1e-15));  // long wavelength: / factor
  const double f1 = std::pow(10000.0, -2.0 / 16), wl = 2 * 3.14159265358979323846 / f1;
  const double s = (64.0 / wl - 1.0) / 3.0;
  CHECK(f[1] == Approx((1 - s) * f1 / 8.0 + s * f1).epsilon(1e-15));  // between: smoothed
  r.type = "yarn";
  PEFT_REQUIRE_THROWS_WITH(rope_inverse_frequencies(r, 16), ConfigError, "rope_type \"yarn\"");
}

TEMPLATE_TEST_CASE("llama: fixture logits and loss (llama, single file; qwen2, sharded + tied + bias)", "[llama]",
                   float, double) {
  using T = TestType;
  const bool f32 = std::is_same<T, float>::value;
  for (const std::string name : {"llama", "qwen2"}) {
    INFO(name);
    const LlamaFixture fx(name);
    io::LlamaLoadReport report;
    LlamaForCausalLM<T> model = io::load_llama<T>(llama_data(name), &report);
    CHECK(report.files.size() == (name == "qwen2" ? 2u : 1u));
    CHECK(model.tied() == (name == "qwen2"));
    typename LlamaForCausalLM<T>::Cache cache;
    const Matrix<T> logits = model.forward(fx.ids, fx.layout, cache);
    const double err = valid_rows_error(logits, fx.rows(f32 ? "logits_f32" : "logits_f64"), fx.layout);
    CHECK(err < (f32 ? 1e-5 : 1e-12));
    const T loss = causal_lm_loss<T>(logits, fx.labels, fx.layout, nullptr);
    const double want = fx.scalar(f32 ? "loss_f32" : "loss_f64");
    CHECK(std::abs(double(loss) - want) / want < (f32 ? 1e-5 : 1e-12));
    WARN(name << " " << (f32 ? "float" : "double") << ": logits rel err " << err << ", loss rel err "
              << std::abs(double(loss) - want) / want);
  }
}

TEST_CASE("llama: PEFT LoRA adapter loads to HF's logits, loss and gradients; save + reload", "[llama]") {
  for (const std::string name : {"llama", "qwen2"}) {
    INFO(name);
    const LlamaFixture fx(name);
    LlamaForCausalLM<double> model = io::load_llama<double>(llama_data(name));
    const auto file = io::read_method_adapter<double>(llama_data(name + "_lora"));
    const std::vector<std::string> paths = io::load_method_adapter(model, file, "default");
    REQUIRE(paths.size() == 4);
    CHECK(paths[0] == "model.layers.0.self_attn.q_proj");
    typename LlamaForCausalLM<double>::Cache cache;
    Matrix<double> logits, dlogits;
    model.forward(fx.ids, fx.layout, logits, cache);
    const double err = valid_rows_error(logits, fx.rows("lora_logits_f64"), fx.layout);
    CHECK(err < 1e-12);
    const double loss = causal_lm_loss<double>(logits, fx.labels, fx.layout, &dlogits);
    CHECK(std::abs(loss - fx.scalar("lora_loss_f64")) < 1e-12 * loss);
    model.zero_grad();
    model.backward(cache, dlogits);
    int checked = 0;
    double worst = 0;
    model.visit_parameters([&](const std::string& n, Parameter<double>& p) {
      if (!p.trainable()) return;
      // model.layers.0.self_attn.q_proj.lora_A.default.weight → base_model.model.<...>.lora_A.weight
      std::string key = n;
      key.replace(key.find(".default"), 8, "");
      const Matrix<double> want = fx.st.load<double>("grad.base_model.model." + key);
      const double e = peft::test::rel_diff(p.grad, want);
      worst = std::max(worst, e);
      CHECK(e < 1e-11);
      ++checked;
    });
    CHECK(checked == 8);
    WARN(name << ": LoRA logits rel err " << err << ", worst LoRA gradient rel err " << worst);

    // Save as a PEFT directory, reload onto a fresh model: same logits.
    char tmpl[] = "/tmp/peft_llama_XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    const std::string out = std::string(tmpl) + "/adapter";
    io::save_method_adapter(out, model, "default", file.config);
    LlamaForCausalLM<double> again = io::load_llama<double>(llama_data(name));
    io::load_method_adapter(again, io::read_method_adapter<double>(out), "default");
    typename LlamaForCausalLM<double>::Cache c2;
    const Matrix<double> l2 = again.forward(fx.ids, fx.layout, c2);
    CHECK(peft::test::rel_diff(l2, logits) == 0.0);
    io::detail::remove_tree(tmpl);

    // Disabled adapters: the base model's logits; merged: the adapter's.
    for (auto& [path, host] : io::adapted_linears<double>(model)) host->disable_adapters(true);
    CHECK(valid_rows_error(model.forward(fx.ids, fx.layout, cache), fx.rows("logits_f64"), fx.layout) < 1e-12);
    for (auto& [path, host] : io::adapted_linears<double>(model)) {
      host->disable_adapters(false);
      if (host->num_adapters() > 0) host->merge();
    }
    CHECK(valid_rows_error(model.forward(fx.ids, fx.layout, cache), fx.rows("lora_logits_f64"), fx.layout) < 1e-12);
  }
}

TEST_CASE("llama: apply_method targets checkpoint names; all-linear leaves lm_head out", "[llama]") {
  LlamaForCausalLM<float> model = io::load_llama<float>(llama_data("llama"));
  Rng rng(3);
  io::Json cfg = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"q_proj", "v_proj"}}};
  const auto qv = io::apply_method<float>(model, cfg, "qv", rng);
  REQUIRE(qv.size() == 4);
  CHECK(qv[1] == "model.layers.0.self_attn.v_proj");
  cfg["target_modules"] = "all-linear";
  const auto all = io::apply_method<float>(model, cfg, "all", rng);
  CHECK(all.size() == 14);  // 7 per layer, no lm_head
  for (const auto& p : all) CHECK(p != "lm_head");
  CHECK(model.linear_names().back() == std::make_pair(std::string("lm_head"), false));
}

TEST_CASE("llama: gradient check in double (GQA, biases, llama3 rope, padding, tied and untied)", "[llama]") {
  for (const bool tied : {false, true}) {
    INFO("tied " << tied);
    Rng rng(11);
    LlamaForCausalLM<double> model(tiny_llama_config(tied), rng);
    randomize_llama(model, rng);
    peft::test::add_gradient_check_lora(model, rng);  // non-zero B, alpha != r; every parameter trainable
    const SequenceLayout layout(2, 5, {5, 3});
    const std::vector<Index> ids = {1, 4, 7, 2, 9, 3, 10, 5, 0, 0};
    const std::vector<std::int64_t> labels = {-100, 4, 7, 2, 9, -100, 10, 5, -100, -100};
    peft::test::check_llama_gradients(model, ids, layout, labels, layout);
  }
}

TEST_CASE("llama: two forwards with two caches, then two backwards", "[llama]") {
  Rng rng(5);
  LlamaForCausalLM<double> model(tiny_llama_config(false), rng);
  randomize_llama(model, rng);
  const SequenceLayout l1(1, 4), l2(2, 3, {3, 2});
  const std::vector<Index> i1 = {1, 2, 3, 4}, i2 = {5, 6, 7, 8, 9, 0};
  const std::vector<std::int64_t> y1 = {1, 2, 3, 4}, y2 = {5, 6, 7, 8, 9, -100};
  typename LlamaForCausalLM<double>::Cache c1, c2;
  Matrix<double> z1, z2, d1, d2;
  model.forward(i1, l1, z1, c1);
  model.forward(i2, l2, z2, c2);
  causal_lm_loss<double>(z1, y1, l1, &d1);
  causal_lm_loss<double>(z2, y2, l2, &d2);
  model.zero_grad();
  model.backward(c1, d1);
  model.backward(c2, d2);
  std::map<std::string, Matrix<double>> both;
  model.visit_parameters([&](const std::string& n, Parameter<double>& p) { both[n] = p.grad; });
  model.zero_grad();
  model.forward(i1, l1, z1, c1);
  model.backward(c1, d1);
  model.forward(i2, l2, z2, c2);
  model.backward(c2, d2);
  model.visit_parameters(
      [&](const std::string& n, Parameter<double>& p) { CHECK(peft::test::rel_diff(p.grad, both[n]) < 1e-13); });
}

TEST_CASE("llama: causal LM loss is transformers' shifted mean; perplexity, bits per byte", "[llama]") {
  Rng rng(2);
  const SequenceLayout layout(2, 3, {3, 2});
  const Matrix<double> logits = peft::test::random_matrix<double>(6, 5, rng);
  const std::vector<std::int64_t> labels = {-100, 2, 4, 1, 3, 0};  // row 5 is padding: never a target
  Matrix<double> d;
  CausalLMStats stats;
  const double loss = causal_lm_loss<double>(logits, labels, layout, &d, &stats);
  // Shifted by hand: row (b, t) predicts labels[b, t + 1]; the last row of each sequence nothing.
  const std::vector<std::int64_t> shifted = {2, 4, -100, 3, -100, -100};
  Matrix<double> d2;
  const double ref = cross_entropy<double>(logits, shifted, &d2);
  CHECK(loss == Approx(ref).epsilon(1e-14));
  CHECK(peft::test::rel_diff(d, d2) < 1e-14);
  CHECK(stats.tokens == 3);
  CHECK(perplexity(stats) == Approx(std::exp(ref)).epsilon(1e-14));
  CHECK(bits_per_byte(stats, 10) == Approx(3 * ref / (std::log(2.0) * 10)).epsilon(1e-14));
  PEFT_REQUIRE_THROWS_WITH(causal_lm_loss<double>(logits, {0, 9, 0, 0, 0, 0}, layout, nullptr), ShapeError,
                           "label at sequence 0, position 1 is 9");
  PEFT_REQUIRE_THROWS_WITH(bits_per_byte(1.0, 0), ConfigError, "byte count");
}

namespace {
/// A copy of the llama fixture directory with config.json replaced by `edit(config)` and / or the
/// weights rewritten by `tensors(map)`; returns its path.
std::string edited_checkpoint(const std::function<void(io::Json&)>& edit,
                              const std::function<void(std::map<std::string, Matrix<float>>&)>& tensors = {}) {
  char tmpl[] = "/tmp/peft_llama_ckpt_XXXXXX";
  if (mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp");
  const std::string dir = tmpl;
  io::Json cfg = io::parse_json_strict(io::read_text_file(llama_data("llama/config.json")), "config");
  edit(cfg);
  io::write_file_atomic(dir + "/config.json", cfg.dump(2));
  const io::SafeTensorsFile st(llama_data("llama/model.safetensors"));
  std::map<std::string, Matrix<float>> m;
  std::map<std::string, bool> vec;
  for (const auto& t : st.tensors()) {
    m[t.name] = st.load<float>(t.name);
    vec[t.name] = t.shape.size() == 1;
  }
  if (tensors) tensors(m);
  std::vector<io::NamedTensor<float>> out;
  for (const auto& kv : m)
    out.push_back({kv.first, io::matrix_shape(kv.second.rows(), kv.second.cols(), vec.count(kv.first) && vec[kv.first]),
                   kv.second.data(), io::DType::BF16});
  io::save_safetensors(dir + "/model.safetensors", out);
  return dir;
}
}  // namespace

TEST_CASE("llama: checkpoint refusals name the key", "[llama]") {
  auto refuses = [](const std::function<void(io::Json&)>& edit, const std::string& needle) {
    const std::string dir = edited_checkpoint(edit);
    INFO(needle);
    PEFT_REQUIRE_THROWS_WITH(io::load_llama<float>(dir), ConfigError, needle);
    io::detail::remove_tree(dir);
  };
  refuses([](io::Json& c) { c["model_type"] = "gemma"; }, "model_type \"gemma\"");
  refuses([](io::Json& c) { c["rope_parameters"]["rope_type"] = "yarn"; }, "rope_parameters.rope_type \"yarn\"");
  refuses([](io::Json& c) { c["hidden_act"] = "gelu"; }, "hidden_act \"gelu\"");
  refuses([](io::Json& c) { c["num_local_experts"] = 8; }, "\"num_local_experts\"");
  refuses(
      [](io::Json& c) {
        c["layer_types"] = {"full_attention", "sliding_attention"};
      },
      "layer_types holds \"sliding_attention\": only full_attention layers are supported for model_type llama");
  refuses([](io::Json& c) { c["rope_parameters"].erase("factor"); }, "needs \"factor\"");
  refuses([](io::Json& c) { c["num_key_value_heads"] = 3; }, "not a multiple of num_key_value_heads");
  refuses([](io::Json& c) { c["vocab_size"] = std::int64_t(1) << 40; }, "vocab_size must be in [1, kMaxDimension");
  {
    const std::string dir = edited_checkpoint([](io::Json& c) { c["hidden_size"] = 32.5; });
    PEFT_REQUIRE_THROWS_WITH(io::load_llama<float>(dir), IoError, "key \"hidden_size\" must be an integer");
    io::detail::remove_tree(dir);
  }

  // 4.x style rope keys load too; BF16 weights are converted (to the BF16-rounded values).
  const std::string v4 = edited_checkpoint([](io::Json& c) {
    io::Json rp = c["rope_parameters"];
    c["rope_theta"] = rp["rope_theta"];
    rp.erase("rope_theta");
    c["rope_scaling"] = rp;
    c.erase("rope_parameters");
  });
  const LlamaForCausalLM<float> bf = io::load_llama<float>(v4);
  CHECK(bf.config().rope.type == "llama3");
  CHECK(bf.config().rope.original_max_position_embeddings == 64);
  io::detail::remove_tree(v4);

  // Mistral's sliding window: every layer slides; sequences longer than the window run
  // (tests/models/test_llama_sliding.cpp checks them against transformers).
  const std::string mistral = edited_checkpoint([](io::Json& c) {
    c["model_type"] = "mistral";
    c["sliding_window"] = 4;
  });
  LlamaForCausalLM<float> mm = io::load_llama<float>(mistral);
  CHECK(mm.model.layers[1].self_attn.sliding_window() == 4);
  typename LlamaForCausalLM<float>::Cache cache;
  CHECK(mm.forward({1, 2, 3, 4, 5}, SequenceLayout(1, 5), cache).rows() == 5);
  io::detail::remove_tree(mistral);

  auto bad_tensors = [](const std::function<void(std::map<std::string, Matrix<float>>&)>& edit,
                        const std::string& needle, bool shape) {
    const std::string dir = edited_checkpoint([](io::Json&) {}, edit);
    INFO(needle);
    if (shape)
      PEFT_REQUIRE_THROWS_WITH(io::load_llama<float>(dir), ShapeError, needle);
    else
      PEFT_REQUIRE_THROWS_WITH(io::load_llama<float>(dir), ConfigError, needle);
    io::detail::remove_tree(dir);
  };
  bad_tensors([](auto& m) { m.erase("model.layers.1.mlp.up_proj.weight"); },
              "missing tensor \"model.layers.1.mlp.up_proj.weight\"", false);
  bad_tensors([](auto& m) { m["model.layers.0.extra.weight"] = Matrix<float>::Zero(2, 2); },
              "unexpected tensor \"model.layers.0.extra.weight\"", false);
  bad_tensors([](auto& m) { m["model.layers.0.self_attn.k_proj.weight"] = Matrix<float>::Zero(16, 32); },
              "tensor \"model.layers.0.self_attn.k_proj.weight\" has shape [16, 32], the model expects [32, 32]", true);
  PEFT_REQUIRE_THROWS_WITH(io::load_llama<float>(llama_data("nope")), IoError, "is not a directory");
}

TEST_CASE("llama: KV-cached forward equals the full forward", "[llama][generate]") {
  Rng rng(8);
  for (const bool tied : {false, true}) {
    LlamaForCausalLM<double> model(tiny_llama_config(tied), rng);
    randomize_llama(model, rng);
    io::Json cfg = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 3}, {"target_modules", "all-linear"}};
    io::apply_method<double>(model, cfg, "default", rng);
    model.visit_parameters([&](const std::string& n, Parameter<double>& p) {
      if (n.find("lora_B") != std::string::npos)
        p.value = peft::test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.5);
    });
    const std::vector<Index> ids = {3, 1, 4, 1, 5, 9, 2};
    typename LlamaForCausalLM<double>::Cache cache;
    const Matrix<double> full = model.forward(ids, SequenceLayout(1, 7), cache);
    LlamaKVCache<double> kv = model.make_kv_cache(7);
    Matrix<double> a, b;
    model.forward_cached({3, 1, 4}, kv, a);  // a prompt, then one token at a time
    CHECK(peft::test::rel_diff(a, Matrix<double>(full.topRows(3))) < 1e-13);
    for (Index t = 3; t < 7; ++t) {
      model.forward_cached({ids[static_cast<std::size_t>(t)]}, kv, b);
      CHECK(peft::test::rel_diff(b, Matrix<double>(full.row(t))) < 1e-13);
    }
    PEFT_REQUIRE_THROWS_WITH(model.forward_cached({1}, kv, b), ShapeError, "exceed the KV cache capacity 7");
  }
}

TEST_CASE("llama: greedy generation reproduces transformers' generate (adapter active, disabled, merged)",
          "[llama][generate]") {
  for (const std::string name : {"llama", "qwen2"}) {
    INFO(name);
    const LlamaFixture fx(name);
    const Matrix<double> p = fx.st.load<double>("greedy_prompt"), g = fx.st.load<double>("greedy_ids"),
                         lg = fx.st.load<double>("lora_greedy_ids");
    std::vector<Index> prompt, want, want_lora;
    for (Index i = 0; i < p.cols(); ++i) prompt.push_back(static_cast<Index>(p(0, i)));
    for (Index i = 0; i < g.cols(); ++i) want.push_back(static_cast<Index>(g(0, i)));
    for (Index i = 0; i < lg.cols(); ++i) want_lora.push_back(static_cast<Index>(lg(0, i)));
    GenerationConfig gc;
    gc.max_new_tokens = g.cols() - p.cols();
    Rng rng(1);
    LlamaForCausalLM<float> model = io::load_llama<float>(llama_data(name));
    CHECK(generate(model, prompt, gc, rng) == want);
    io::load_method_adapter(model, io::read_method_adapter<float>(llama_data(name + "_lora")), "default");
    CHECK(generate(model, prompt, gc, rng) == want_lora);
    auto hosts = io::adapted_linears<float>(model);
    for (auto& [path, host] : hosts) host->disable_adapters(true);
    CHECK(generate(model, prompt, gc, rng) == want);
    for (auto& [path, host] : hosts) {
      host->disable_adapters(false);
      if (host->num_adapters() > 0) host->merge();
    }
    CHECK(generate(model, prompt, gc, rng) == want_lora);
    // Stops at an eos id (kept in the output): the first generated occurrence of want_lora[5].
    gc.eos_token_ids = {want_lora[5]};
    std::size_t stop = prompt.size();
    while (want_lora[stop] != want_lora[5]) ++stop;
    CHECK(generate(model, prompt, gc, rng) == std::vector<Index>(want_lora.begin(), want_lora.begin() + stop + 1));
  }
}

TEST_CASE("llama: sampling processors (repetition penalty, temperature, top-k, top-p) and seeded draws",
          "[llama][generate]") {
  GenerationConfig gc;
  Rng rng(3);
  RowVector<double> z(5);
  z << 2.0, -1.0, 0.5, 1.9, -3.0;
  gc.repetition_penalty = 2.0;
  RowVector<double> r = z;
  CHECK(next_token(r, {0, 1, 0}, gc, rng) == 3);  // 2 → 1, −1 → −2: token 3 wins
  CHECK(r(0) == 1.0);
  CHECK(r(1) == -2.0);
  CHECK(r(2) == 0.5);
  gc.repetition_penalty = 1.0;
  gc.do_sample = true;
  gc.top_k = 1;  // top-1 sampling is greedy
  for (int i = 0; i < 20; ++i) {
    r = z;
    CHECK(next_token(r, {}, gc, rng) == 0);
  }
  gc.top_k = 2;
  int counts[5] = {0, 0, 0, 0, 0};
  for (int i = 0; i < 2000; ++i) {
    r = z;
    ++counts[next_token(r, {}, gc, rng)];
  }
  CHECK(counts[1] + counts[2] + counts[4] == 0);
  CHECK(std::abs(counts[0] / 2000.0 - 1.0 / (1.0 + std::exp(-0.1))) < 0.04);  // p0 = σ(2 − 1.9)
  // top-p: probabilities of z; with p = 0.5 only the most probable ids up to mass 0.5 survive.
  gc.top_k = 0;
  gc.top_p = 0.5;
  r = z;
  next_token(r, {}, gc, rng);
  CHECK(std::isfinite(r(0)));
  CHECK(std::isfinite(r(3)));  // ascending cumulative mass 0.003, 0.026, 0.128, 0.542: ids 3 and 0 kept
  CHECK(!std::isfinite(r(2)));
  CHECK(!std::isfinite(r(4)));
  // Seeded: the same seed gives the same sequence.
  Rng a(42), b(42);
  LlamaForCausalLM<float> model = io::load_llama<float>(llama_data("llama"));
  gc.top_p = 0.9;
  gc.temperature = 0.7;
  gc.top_k = 20;
  gc.max_new_tokens = 8;
  CHECK(generate(model, {1, 2, 3}, gc, a) == generate(model, {1, 2, 3}, gc, b));
  gc.temperature = 0.0;
  PEFT_REQUIRE_THROWS_WITH(generate(model, {1}, gc, a), ConfigError, "temperature must be > 0");
}
