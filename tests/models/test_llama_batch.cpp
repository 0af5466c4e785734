// Left padding, batched and mixed-adapter generation, prompt and prefix tuning on the Llama causal LM
// (models/llama.hpp, models/generation.hpp, io/llama_prompt.hpp) against transformers + peft
// (benchmarks/peer/make_llama_batch_fixtures.py → tests/data/llama/llama_batch_expected.safetensors,
// llama_prompt/, llama_prefix/).
#include <unistd.h>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include <peft/io/llama_checkpoint.hpp>
#include <peft/io/llama_prompt.hpp>
#include <peft/io/methods.hpp>
#include <peft/loss/causal_lm.hpp>
#include <peft/models/generation.hpp>
#include <peft/models/llama.hpp>
#include <peft/train/gradient_check.hpp>

#include "models/llama_fixture_utils.hpp"
#include "models/llama_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {

/// HF's tensors of llama_batch_expected.safetensors.
struct LbFixture {
  io::SafeTensorsFile st{peft::test::llama_data("llama_batch_expected.safetensors")};

  void batch(const std::string& ids_key, const std::string& mask_key, std::vector<Index>& ids,
             SequenceLayout& layout) const {
    peft::test::fixture_batch(st, ids_key, mask_key, ids, layout);
  }
  /// [B, S, V] as [B·S, V].
  Matrix<double> rows(const std::string& name) const {
    const io::TensorInfo& t = st.info(name);
    const Matrix<double> m = st.load<double>(name);
    const Index n = t.shape[0] * t.shape[1];
    return Eigen::Map<const Matrix<double>>(m.data(), n, m.size() / n);
  }
  /// Row b of HF's generate() output [B, P + N] without padding: from column pad_left, the prompt up
  /// to column P, then the generated ids up to and including the first eos (id 2).
  std::vector<Index> ids_row(const std::string& name, Index b, Index pad_left, Index P) const {
    const Matrix<double> m = st.load<double>(name);
    std::vector<Index> out;
    for (Index s = pad_left; s < m.cols(); ++s) {
      out.push_back(static_cast<Index>(m(b, s)));
      if (s >= P && out.back() == 2) break;
    }
    return out;
  }
};

LlamaConfig lb_tiny_config() {
  LlamaConfig c = peft::test::tiny_llama_base();
  c.qkv_bias = c.o_bias = true;
  return c;
}

template <class T>
LlamaForCausalLM<T> lb_random_model(Rng& rng) {
  LlamaForCausalLM<T> m(lb_tiny_config(), rng);
  m.visit_parameters([&](const std::string& n, Parameter<T>& p) {
    for (Index i = 0; i < p.value.size(); ++i)
      p.value.data()[i] = static_cast<T>(n.find("norm") != std::string::npos ? 1.0 + 0.3 * rng.normal(0.0, 1.0)
                                                                             : 0.5 * rng.normal(0.0, 1.0));
  });
  return m;
}

/// The same sequences right- and left-padded.
const std::vector<std::vector<Index>> kLbSeqs = {{1, 4, 7, 2, 9}, {3, 10, 5}};

}  // namespace

TEMPLATE_TEST_CASE("llama: left padding reproduces HF's logits (position ids from the mask)", "[llama][batch]", float,
                   double) {
  using T = TestType;
  const bool f32 = std::is_same<T, float>::value;
  const LbFixture fx;
  std::vector<Index> ids;
  SequenceLayout layout;
  fx.batch("left_ids", "left_mask", ids, layout);
  REQUIRE(layout.left_padded);
  REQUIRE(layout.first(1) == 3);
  LlamaForCausalLM<T> model = io::load_llama<T>(peft::test::llama_data("llama"));
  typename LlamaForCausalLM<T>::Cache cache;
  const Matrix<T> logits = model.forward(ids, layout, cache);
  const double err = peft::test::valid_rows_error(logits, fx.rows(f32 ? "left_logits_f32" : "left_logits_f64"), layout);
  CHECK(err < (f32 ? 1e-5 : 1e-12));
  WARN("left padding, " << (f32 ? "float" : "double") << ": logits rel err " << err);
}

TEST_CASE("llama: left and right padding give the same logits, loss and gradients", "[llama][batch]") {
  Rng rng(21);
  LlamaForCausalLM<double> model = lb_random_model<double>(rng);
  SequenceLayout right, left;
  const std::vector<Index> ir = pack_token_ids(kLbSeqs, right), il = pack_token_ids(kLbSeqs, left, 0, true);
  CHECK(il == std::vector<Index>{1, 4, 7, 2, 9, 0, 0, 3, 10, 5});
  std::vector<std::int64_t> yr(ir.begin(), ir.end()), yl(il.begin(), il.end());
  typename LlamaForCausalLM<double>::Cache cr, cl;
  Matrix<double> zr, zl, dr, dl;
  model.forward(ir, right, zr, cr);
  model.forward(il, left, zl, cl);
  const double lr = causal_lm_loss<double>(zr, yr, right, &dr), ll = causal_lm_loss<double>(zl, yl, left, &dl);
  CHECK(std::abs(lr - ll) < 1e-13 * lr);
  CHECK(peft::test::rel_diff(Matrix<double>(zl.bottomRows(3)), Matrix<double>(zr.middleRows(5, 3))) < 1e-13);
  std::map<std::string, Matrix<double>> g;
  model.zero_grad();
  model.backward(cr, dr);
  model.visit_parameters([&](const std::string& n, Parameter<double>& p) { g[n] = p.grad; });
  model.zero_grad();
  model.backward(cl, dl);
  model.visit_parameters(
      [&](const std::string& n, Parameter<double>& p) { CHECK(peft::test::rel_diff(p.grad, g[n]) < 1e-12); });
  PEFT_REQUIRE_THROWS_WITH(
      prepend_rows<double>(Matrix<double>::Zero(10, 2), left, Matrix<double>::Zero(1, 2), zr, right, 1), ShapeError,
      "left-padded sequence batches are read only by the causal LM");
}

TEST_CASE("llama: gradient check in double with left padding, prompt tuning and prefix tuning", "[llama][batch]") {
  enum Kind { Left, PromptLeft, PrefixProjected, PrefixFlatLeft };
  for (const Kind kind : {Left, PromptLeft, PrefixProjected, PrefixFlatLeft}) {
    INFO("case " << kind);
    Rng rng(30 + kind);
    LlamaForCausalLM<double> model = lb_random_model<double>(rng);
    io::Json cfg = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 3}, {"target_modules", {"q_proj", "down_proj"}}};
    io::apply_method<double>(model, cfg, "default", rng);
    if (kind == PromptLeft) model.add_prompt_tuning(2, rng);
    if (kind == PrefixProjected) model.add_prefix_tuning(3, rng, true, 5);
    if (kind == PrefixFlatLeft) model.add_prefix_tuning(2, rng);
    model.visit_parameters([&](const std::string& n, Parameter<double>& p) {
      if (n.find("lora_B") != std::string::npos || n.find("transform") != std::string::npos)
        p.value = peft::test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.5);
      p.set_trainable(true);
    });
    SequenceLayout layout;
    const std::vector<Index> ids = pack_token_ids(kLbSeqs, layout, 0, kind != PrefixProjected);
    const std::vector<std::int64_t> labels0(ids.begin(), ids.end());
    const std::vector<std::int64_t> labels = model.prompt_labels(labels0, layout);
    const SequenceLayout out = model.output_layout(layout);
    REQUIRE(static_cast<Index>(labels.size()) == out.rows());
    peft::test::check_llama_gradients(model, ids, layout, labels, out);
  }
}

TEST_CASE("llama: batched KV cache (left padding, prompt, prefix) equals the full forward",
          "[llama][batch][generate]") {
  for (int kind = 0; kind < 3; ++kind) {
    INFO("kind " << kind);
    Rng rng(40 + kind);
    LlamaForCausalLM<double> model = lb_random_model<double>(rng);
    if (kind == 1) model.add_prompt_tuning(2, rng);
    if (kind == 2) model.add_prefix_tuning(3, rng, true, 4);
    // Prompts (left-padded) + 3 more tokens each; the cache is full afterwards.
    LlamaKVCache<double> kv = peft::test::check_kv_cache_equals_forward(model, kLbSeqs, {{6, 1, 8}, {2, 2, 4}});
    Matrix<double> got;
    PEFT_REQUIRE_THROWS_WITH(model.forward_cached({1, 2}, SequenceLayout(2, 1), kv, got), ShapeError,
                             "exceed the KV cache capacity");
  }
}

TEST_CASE("llama: batched greedy generation equals HF's and each row alone; per-row adapters (PEFT adapter_names)",
          "[llama][batch][generate]") {
  const LbFixture fx;
  std::vector<Index> ids;
  SequenceLayout layout;
  fx.batch("gen_ids", "gen_mask", ids, layout);
  std::vector<std::vector<Index>> prompts(static_cast<std::size_t>(layout.batch));
  for (Index b = 0; b < layout.batch; ++b)
    for (Index t = layout.first(b); t < layout.seq; ++t)
      prompts[static_cast<std::size_t>(b)].push_back(ids[static_cast<std::size_t>(layout.row(b, t))]);
  GenerationConfig gc;
  gc.max_new_tokens = 6;
  gc.eos_token_ids = {2};
  Rng rng(1);
  LlamaForCausalLM<float> model = io::load_llama<float>(peft::test::llama_data("llama"));
  const auto got = generate_batch(model, prompts, gc, rng);
  for (Index b = 0; b < layout.batch; ++b) {
    INFO("row " << b);
    const auto& row = got[static_cast<std::size_t>(b)];
    CHECK(row == fx.ids_row("gen_greedy", b, layout.first(b), layout.seq));
    CHECK(row == generate(model, prompts[static_cast<std::size_t>(b)], gc, rng));
  }
  // Mixed adapters: rows 0 and 2 with the LoRA, row 1 without.
  io::load_method_adapter(model, io::read_method_adapter<float>(peft::test::llama_data("llama_lora")), "default");
  const std::vector<std::string> names = {"default", "__base__", "default"};
  const auto mixed = generate_batch(model, prompts, gc, rng, names);
  auto hosts = io::adapted_linears<float>(model);
  for (Index b = 0; b < layout.batch; ++b) {
    INFO("row " << b);
    CHECK(mixed[static_cast<std::size_t>(b)] == fx.ids_row("gen_mixed", b, layout.first(b), layout.seq));
    const bool base = names[static_cast<std::size_t>(b)] == "__base__";
    for (auto& [path, host] : hosts) host->disable_adapters(base);
    CHECK(mixed[static_cast<std::size_t>(b)] == generate(model, prompts[static_cast<std::size_t>(b)], gc, rng));
  }
  for (auto& [path, host] : hosts) host->disable_adapters(false);
  CHECK(mixed[1] != generate(model, prompts[1], gc, rng));  // the adapter matters for row 1
  PEFT_REQUIRE_THROWS_WITH(generate_batch(model, prompts, gc, rng, {"default", "nope", "none"}), ConfigError,
                           "no linear holds adapter \"nope\"");
}

TEST_CASE("llama: batched generation in double equals each row alone (prompt and prefix tuning too)",
          "[llama][batch][generate]") {
  for (int kind = 0; kind < 3; ++kind) {
    INFO("kind " << kind);
    Rng rng(50 + kind);
    LlamaForCausalLM<double> model = lb_random_model<double>(rng);
    if (kind == 1) model.add_prompt_tuning(2, rng);
    if (kind == 2) model.add_prefix_tuning(2, rng);
    GenerationConfig gc;
    gc.max_new_tokens = 5;
    gc.eos_token_ids = {3};
    const std::vector<std::vector<Index>> prompts = {{1, 4, 7, 2}, {9}, {5, 6}};
    const auto got = generate_batch(model, prompts, gc, rng);
    for (std::size_t b = 0; b < prompts.size(); ++b) CHECK(got[b] == generate(model, prompts[b], gc, rng));
    // Sampling: seeded, reproducible.
    gc.do_sample = true;
    gc.top_k = 4;
    Rng a(9), c(9);
    CHECK(generate_batch(model, prompts, gc, a) == generate_batch(model, prompts, gc, c));
  }
}

TEST_CASE("llama: PEFT prompt tuning adapter loads to PEFT's logits; save + reload", "[llama][prompt]") {
  const LbFixture fx;
  std::vector<Index> ids;
  SequenceLayout layout;
  fx.batch("right_ids", "right_mask", ids, layout);
  REQUIRE(!layout.left_padded);
  LlamaForCausalLM<double> model = io::load_llama<double>(peft::test::llama_data("llama"));
  const io::AdapterConfig c = io::load_llama_prompt_adapter(model, peft::test::llama_data("llama_prompt"));
  CHECK(c.peft_type == "PROMPT_TUNING");
  REQUIRE(model.prompt_length() == 4);
  typename LlamaForCausalLM<double>::Cache cache;
  const Matrix<double> logits = model.forward(ids, layout, cache);
  const SequenceLayout out = model.output_layout(layout);
  const double err = peft::test::valid_rows_error(logits, fx.rows("prompt_logits_f64"), out);
  CHECK(err < 1e-12);
  WARN("PEFT prompt tuning: logits rel err " << err);

  char tmpl[] = "/tmp/peft_llama_prompt_XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  io::save_llama_prompt_adapter(std::string(tmpl) + "/p", model, "llama");
  LlamaForCausalLM<double> again = io::load_llama<double>(peft::test::llama_data("llama"));
  io::load_llama_prompt_adapter(again, std::string(tmpl) + "/p");
  CHECK(peft::test::rel_diff(again.forward(ids, layout, cache), logits) == 0.0);
  PEFT_REQUIRE_THROWS_WITH(io::load_llama_prompt_adapter(again, peft::test::llama_data("llama_lora")), ConfigError,
                           "expected PROMPT_TUNING or PREFIX_TUNING");
  io::detail::remove_tree(tmpl);
}

TEST_CASE(
    "llama: prefix tuning with PEFT's projection reproduces PEFT's logits, loss and gradients; its saved "
    "directory loads flat to the same logits",
    "[llama][prompt]") {
  const LbFixture fx;
  std::vector<Index> ids;
  SequenceLayout layout;
  fx.batch("right_ids", "right_mask", ids, layout);
  LlamaForCausalLM<double> model = io::load_llama<double>(peft::test::llama_data("llama"));
  Rng rng(3);
  PrefixAttention<double>& p = model.add_prefix_tuning(3, rng, true, 12);
  // PEFT's trained parameters (prefix_param.<name>: embedding.weight, transform.{0,2}.{weight,bias}).
  int set = 0;
  p.visit_parameters([&](const std::string& n, Parameter<double>& q) {
    const Matrix<double> v = fx.st.load<double>("prefix_param." + n);
    REQUIRE(v.size() == q.value.size());
    q.value = Eigen::Map<const Matrix<double>>(v.data(), q.value.rows(), q.value.cols());
    ++set;
  });
  CHECK(set == 5);
  std::vector<std::int64_t> labels(ids.begin(), ids.end());
  for (Index b = 0; b < layout.batch; ++b)
    for (Index t = layout.length(b); t < layout.seq; ++t) labels[static_cast<std::size_t>(layout.row(b, t))] = -100;
  typename LlamaForCausalLM<double>::Cache cache;
  Matrix<double> logits, dlogits;
  model.forward(ids, layout, logits, cache);
  const double err = peft::test::valid_rows_error(logits, fx.rows("prefix_logits_f64"), layout);
  CHECK(err < 1e-12);
  const double loss = causal_lm_loss<double>(logits, labels, layout, &dlogits);
  CHECK(std::abs(loss - fx.st.load<double>("prefix_loss_f64")(0, 0)) < 1e-12 * loss);
  model.zero_grad();
  model.backward(cache, dlogits);
  double worst = 0;
  p.visit_parameters([&](const std::string& n, Parameter<double>& q) {
    INFO(n);
    const Matrix<double> w = fx.st.load<double>("prefix_grad." + n);
    const double e = peft::test::rel_diff(
        q.grad, Matrix<double>(Eigen::Map<const Matrix<double>>(w.data(), q.grad.rows(), q.grad.cols())));
    worst = std::max(worst, e);
    CHECK(e < 1e-10);
  });
  WARN("PEFT prefix tuning (projected): logits rel err " << err << ", worst gradient rel err " << worst);

  // PEFT's own saved directory (the projected table, float64 here), loaded flat: the trained logits;
  // PEFT's own reload keeps the table in a float32 Embedding, so its logits agree to that rounding.
  LlamaForCausalLM<double> flat = io::load_llama<double>(peft::test::llama_data("llama"));
  const io::AdapterConfig c = io::load_llama_prompt_adapter(flat, peft::test::llama_data("llama_prefix"));
  CHECK(c.prefix_projection);
  CHECK(!flat.prefix_encoder->projected());
  CHECK(peft::test::valid_rows_error(flat.forward(ids, layout, cache), fx.rows("prefix_logits_f64"), layout) < 1e-12);
  CHECK(peft::test::valid_rows_error(flat.forward(ids, layout, cache), fx.rows("prefix_reload_logits_f64"), layout) <
        1e-7);
  // Ours saved (the projected table, as PEFT) reloads to the same logits.
  char tmpl[] = "/tmp/peft_llama_prefix_XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  io::save_llama_prompt_adapter(std::string(tmpl) + "/x", model);
  LlamaForCausalLM<double> again = io::load_llama<double>(peft::test::llama_data("llama"));
  io::load_llama_prompt_adapter(again, std::string(tmpl) + "/x", true);
  CHECK(again.prefix_encoder->embedding.trainable());
  CHECK(peft::test::rel_diff(again.forward(ids, layout, cache), logits) < 1e-14);
  io::detail::remove_tree(tmpl);
}

TEST_CASE("llama: quantize on load gives an NF4 base (QLoRA) that equals its dequantized dense model", "[llama][nf4]") {
  const LbFixture fx;
  std::vector<Index> ids;
  SequenceLayout layout;
  fx.batch("left_ids", "left_mask", ids, layout);
  io::LlamaLoadOptions opt;
  opt.quantize_nf4 = true;
  LlamaForCausalLM<float> q = io::load_llama<float>(peft::test::llama_data("llama"), opt);
  LlamaForCausalLM<float> dense = io::load_llama<float>(peft::test::llama_data("llama"));
  LlamaForCausalLM<float> deq = io::load_llama<float>(peft::test::llama_data("llama"));
  auto qh = io::adapted_linears<float>(q);
  auto dh = io::adapted_linears<float>(deq);
  REQUIRE(qh.size() == dh.size());
  int nq = 0;
  for (std::size_t i = 0; i < qh.size(); ++i) {
    REQUIRE(qh[i].first == dh[i].first);
    if (!qh[i].second->quantized()) continue;
    ++nq;
    dh[i].second->weight.value = qh[i].second->dequantized_weight();  // the dense model of the NF4 values
  }
  CHECK(nq == 14);  // 7 linears × 2 layers; lm_head stays dense
  CHECK(!q.lm_head.quantized());
  typename LlamaForCausalLM<float>::Cache cache;
  const Matrix<float> zq = q.forward(ids, layout, cache), zd = deq.forward(ids, layout, cache),
                      z = dense.forward(ids, layout, cache);
  const double to_deq = peft::test::valid_rows_error(zq, zd.cast<double>(), layout),
               to_dense = peft::test::valid_rows_error(zq, z.cast<double>(), layout);
  CHECK(to_deq < 1e-5);
  CHECK(to_dense > 1e-3);  // 4 bits per weight do change the logits ...
  CHECK(to_dense < 0.3);   // ... but not beyond recognition
  WARN("NF4 on load: logits vs dequantized dense " << to_deq << ", vs the float model " << to_dense);

  // QLoRA: LoRA on the NF4 base trains (loss falls under SGD); quantizing a host with adapters is refused.
  Rng rng(7);
  io::Json cfg = {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", "all-linear"}};
  io::apply_method<float>(q, cfg, "default", rng);
  std::vector<std::int64_t> labels(ids.begin(), ids.end());
  Matrix<float> logits, dlogits;
  float first = 0, last = 0;
  for (int step = 0; step < 8; ++step) {
    q.forward(ids, layout, logits, cache);
    last = causal_lm_loss<float>(logits, labels, layout, &dlogits);
    if (step == 0) first = last;
    q.zero_grad();
    q.backward(cache, dlogits);
    q.visit_parameters([](const std::string&, Parameter<float>& p) {
      if (p.trainable()) p.value -= 0.5f * p.grad;
    });
  }
  CHECK(last < 0.9f * first);
  io::apply_method<float>(dense, cfg, "default", rng);
  PEFT_REQUIRE_THROWS_WITH(io::quantize_llama_nf4(dense), ConfigError, "already holds adapters");
}

TEST_CASE(
    "llama: a bitsandbytes 4-bit checkpoint loads to an NF4 base (bitsandbytes' weights and logits); quantize "
    "on load gives the same bits",
    "[llama][nf4]") {
  const LbFixture fx;
  std::vector<Index> ids;
  SequenceLayout layout;
  fx.batch("left_ids", "left_mask", ids, layout);
  LlamaForCausalLM<float> b = io::load_llama<float>(peft::test::llama_data("llama_bnb"));
  io::LlamaLoadOptions opt;
  opt.quantize_nf4 = true;
  LlamaForCausalLM<float> q = io::load_llama<float>(peft::test::llama_data("llama"), opt);
  auto bh = io::adapted_linears<float>(b);
  auto qh = io::adapted_linears<float>(q);
  REQUIRE(bh.size() == qh.size());
  int nq = 0;
  for (std::size_t i = 0; i < bh.size(); ++i) {
    INFO(bh[i].first);
    CHECK(bh[i].second->quantized() == qh[i].second->quantized());
    if (!bh[i].second->quantized()) continue;
    ++nq;
    CHECK((bh[i].second->dequantized_weight().array() == qh[i].second->dequantized_weight().array()).all());
  }
  CHECK(nq == 14);
  typename LlamaForCausalLM<float>::Cache cache;
  const double err =
      peft::test::valid_rows_error(b.forward(ids, layout, cache), fx.rows("bnb_left_logits_f32"), layout);
  CHECK(err < 1e-5);
  WARN("bitsandbytes 4-bit checkpoint: logits rel err " << err);
  io::Json cfg = io::parse_json_strict(io::read_text_file(peft::test::llama_data("llama_bnb/config.json")), "config");
  CHECK(io::llama_config_from_json(cfg, "config").hidden_size == 32);
  cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4";
  PEFT_REQUIRE_THROWS_WITH(io::llama_config_from_json(cfg, "config"), ConfigError,
                           "only bitsandbytes 4-bit nf4 checkpoints are supported");
}
