// PeftModel (models/peft_model.hpp) with prompt learning on a LlamaForCausalLM: PROMPT_TUNING and
// PREFIX_TUNING adapters added, switched, disabled, deleted, saved and loaded in PEFT's format like
// the table's methods, with PEFT's rules (one active, no mixing with other methods, nothing to merge).
#include <peft/io/llama_checkpoint.hpp>
#include <peft/io/llama_prompt.hpp>
#include <peft/loss/causal_lm.hpp>
#include <peft/models/peft_model.hpp>
#include <peft/optim/adam.hpp>

#include <string>
#include <vector>

#include "io/io_test_utils.hpp"
#include "models/llama_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;

namespace pmlp {

const std::vector<Index> kIds = {1, 5, 2, 9, 3, 3, 7, 0, 4, 10};  // 2 sequences of 5

template <class T>
Matrix<T> logits_of(LlamaForCausalLM<T>& m) {
  typename LlamaForCausalLM<T>::Cache cache;
  return m.forward(kIds, SequenceLayout(2, 5), cache);
}

template <class T>
std::vector<std::string> trainable_names(Module<T>& m) {
  std::vector<std::string> out;
  m.visit_parameters([&](const std::string& n, Parameter<T>& p) {
    if (p.trainable()) out.push_back(n);
  });
  return out;
}

const char* kPrompt = R"({"peft_type":"PROMPT_TUNING","num_virtual_tokens":3})";
const char* kPrefix = R"({"peft_type":"PREFIX_TUNING","num_virtual_tokens":2,"prefix_projection":true,
                          "encoder_hidden_size":6})";

}  // namespace pmlp

TEMPLATE_TEST_CASE("PeftModel on a Llama: prompt and prefix adapters add, switch, disable, delete",
                   "[peft_model][llama]", float, double) {
  using T = TestType;
  Rng init(11);
  LlamaForCausalLM<T> model(test::tiny_llama_base(), init);
  const Matrix<T> base = pmlp::logits_of(model);
  PeftModel<T> pm(model, 5);
  CHECK(pm.add_adapter("p", io::Json::parse(pmlp::kPrompt)) == std::vector<std::string>{"prompt_encoder"});
  CHECK(pm.is_prompt_adapter("p"));
  REQUIRE(model.prompt_length() == 3);
  CHECK(pmlp::trainable_names(model) == std::vector<std::string>{"prompt_encoder.embedding.weight"});
  CHECK(pm.adapter_config("p").at("token_dim") == 8);
  CHECK(pm.adapter_config("p").at("task_type") == "CAUSAL_LM");
  const Matrix<T> with_p = pmlp::logits_of(model);
  REQUIRE(with_p.rows() == 2 * (3 + 5));
  // The same table set by hand on a copy of the base gives the same logits.
  {
    Rng again(11);
    LlamaForCausalLM<T> ref(test::tiny_llama_base(), again);
    Rng r(0);
    ref.add_prompt_tuning(3, r).embedding.value = model.prompt_encoder->embedding.value;
    CHECK(test::rel_diff(pmlp::logits_of(ref), with_p) == 0.0);
  }

  // A second adapter joins inactive; set_adapter switches the table the model hosts.
  CHECK(pm.add_adapter("q", io::Json::parse(pmlp::kPrefix)) == std::vector<std::string>{"prefix_encoder"});
  CHECK(pm.active_adapters() == std::vector<std::string>{"p"});
  CHECK(model.prompt_length() == 3);
  CHECK(!model.prefix_encoder);
  pm.set_adapter("q");
  CHECK(model.prompt_length() == 0);
  REQUIRE(model.prefix_length() == 2);
  CHECK(model.prefix_encoder->projected());
  CHECK(pmlp::trainable_names(model).size() == 5);  // prefix embedding + the projection MLP's two linears
  const Matrix<T> with_q = pmlp::logits_of(model);
  CHECK(with_q.rows() == 10);
  CHECK(test::rel_diff(with_q, base) > 1e-3);
  pm.set_adapter("p");
  CHECK(test::rel_diff(pmlp::logits_of(model), with_p) == 0.0);
  PEFT_REQUIRE_THROWS_WITH(pm.set_adapter({"p", "q"}), ConfigError, "only one can be active");

  // Disabled: the plain model; enabled again: the active prompt.
  {
    auto off = pm.disable_adapters();
    CHECK(model.prompt_length() == 0);
    CHECK(test::rel_diff(pmlp::logits_of(model), base) < test::Tolerances<T>::rel);  // the base: frozen, same values
  }
  CHECK(test::rel_diff(pmlp::logits_of(model), with_p) == 0.0);

  // PEFT's rules: nothing to merge, no mixing with the table's methods.
  PEFT_REQUIRE_THROWS_WITH(pm.merge(), ConfigError, "no weights to merge into");
  PEFT_REQUIRE_THROWS_WITH(pm.merge_and_unload(), ConfigError, "prompt learning");
  PEFT_REQUIRE_THROWS_WITH(
      pm.add_adapter("l", io::Json::parse(R"({"peft_type":"LORA","r":2,"target_modules":"all-linear"})")), ConfigError,
      "do not mix");
  PEFT_REQUIRE_THROWS_WITH(
      pm.add_adapter("t", io::Json::parse(R"({"peft_type":"PROMPT_TUNING","num_virtual_tokens":2,"token_dim":5})")),
      ConfigError, "token_dim is 5, expected 8");
  PEFT_REQUIRE_THROWS_WITH(pm.add_adapter("t", io::Json::parse(R"({"peft_type":"PROMPT_TUNING","num_virtual_tokens":2,
                                            "prompt_tuning_init":"TEXT"})")),
                           ConfigError, "prompt_tuning_init \"TEXT\"");
  PEFT_REQUIRE_THROWS_WITH(
      pm.add_adapter("t", io::Json::parse(R"({"peft_type":"PREFIX_TUNING","num_virtual_tokens":2,"num_layers":3})")),
      ConfigError, "num_layers is 3, the model has 2");
  CHECK(test::rel_diff(pmlp::logits_of(model), with_p) == 0.0);  // a refused add changes nothing
  CHECK(pm.adapters() == std::vector<std::string>{"p", "q"});

  // Deleting the active adapter: the other becomes active (PEFT), and the model hosts it.
  std::vector<std::string> warnings;
  {
    ScopedWarningHandler h([&](const std::string& w) { warnings.push_back(w); });
    pm.delete_adapter("p");
  }
  CHECK(warnings == std::vector<std::string>{"PeftModel: adapter \"p\" was active and is deleted; the active "
                                             "adapter is now \"q\""});
  CHECK(model.prompt_length() == 0);
  CHECK(test::rel_diff(pmlp::logits_of(model), with_q) == 0.0);
  pm.unload();
  CHECK(!model.prefix_encoder);
  CHECK(test::rel_diff(pmlp::logits_of(model), base) < test::Tolerances<T>::rel);  // the base: frozen, same values
}

TEST_CASE("PeftModel on a Llama: prompt learning refused on a model that is not a LlamaForCausalLM",
          "[peft_model][llama]") {
  Rng rng(1);
  LoRALinear<float> lin(4, 3, rng);
  lin.set_name("fc");
  PeftModel<float> pm(lin);
  PEFT_REQUIRE_THROWS_WITH(pm.add_adapter("p", io::Json::parse(pmlp::kPrompt)), ConfigError,
                           "PROMPT_TUNING needs a LlamaForCausalLM");
}

TEST_CASE("PeftModel on a Llama: prompt and prefix adapters save in PEFT's format and load back; PEFT's loads",
          "[peft_model][llama]") {
  using T = double;
  test::io::TempDir tmp;
  Rng init(3);
  LlamaForCausalLM<T> model(test::tiny_llama_base(), init);
  PeftModel<T> pm(model, 9);
  pm.add_adapter("default", io::Json::parse(pmlp::kPrompt));
  pm.add_adapter("pre", io::Json::parse(pmlp::kPrefix));
  // Train one AdamW step on the active prompt: its table changes, the base does not.
  const Matrix<T> w0 = model.model.layers[0].self_attn.q_proj.weight.value;
  const Matrix<T> p0 = model.prompt_encoder->embedding.value;
  {
    AdamW<T> opt(model, AdamWOptions{1e-2, 0.9, 0.999, 1e-8, 0.0});
    const SequenceLayout layout(2, 5);
    std::vector<std::int64_t> labels(pmlp::kIds.begin(), pmlp::kIds.end());
    typename LlamaForCausalLM<T>::Cache cache;
    Matrix<T> logits, dlogits;
    model.forward(pmlp::kIds, layout, logits, cache);
    causal_lm_loss<T>(logits, model.prompt_labels(labels, layout), model.output_layout(layout), &dlogits);
    model.backward(cache, dlogits);
    opt.step();
  }
  CHECK(test::rel_diff(model.prompt_encoder->embedding.value, p0) > 1e-4);
  CHECK(test::rel_diff(model.model.layers[0].self_attn.q_proj.weight.value, w0) == 0.0);
  const Matrix<T> with_p = pmlp::logits_of(model);
  pm.set_adapter("pre");
  const Matrix<T> with_pre = pmlp::logits_of(model);
  pm.set_adapter("default");
  pm.save_pretrained(tmp.path);  // "default" in dir/, "pre" in dir/pre/ (the inactive one, from the PeftModel)

  // The files are PEFT's: what io::load_llama_prompt_adapter (checked against PEFT) reads.
  const io::AdapterConfig c = io::read_adapter_config(tmp.path + "/pre/adapter_config.json");
  CHECK(c.peft_type == "PREFIX_TUNING");
  CHECK(c.num_virtual_tokens == 2);
  CHECK(c.token_dim == 4 * 2);  // num_key_value_heads · head_dim
  CHECK(c.task_type == "CAUSAL_LM");

  Rng init2(3);
  LlamaForCausalLM<T> fresh(test::tiny_llama_base(), init2);
  PeftModel<T> pm2(fresh);
  CHECK(pm2.load_pretrained(tmp.path) == std::vector<std::string>{"default", "pre"});
  CHECK(pm2.is_prompt_adapter("pre"));
  CHECK(test::rel_diff(pmlp::logits_of(fresh), with_p) == 0.0);
  pm2.set_adapter("pre");
  CHECK(test::rel_diff(pmlp::logits_of(fresh), with_pre) < 1e-14);  // loaded flat: PEFT's collapsed table
  CHECK(pmlp::trainable_names(fresh) == std::vector<std::string>{"prefix_encoder.embedding.weight"});

  // PEFT's own prompt-tuning directory on the fixture model, through PeftModel::load_adapter.
  LlamaForCausalLM<T> a = io::load_llama<T>(test::llama_data("llama"));
  LlamaForCausalLM<T> b = io::load_llama<T>(test::llama_data("llama"));
  io::load_llama_prompt_adapter(a, test::llama_data("llama_prompt"));
  PeftModel<T> pm3(b);
  pm3.load_adapter(test::llama_data("llama_prompt"), "peft");
  CHECK(b.prompt_length() == 4);
  typename LlamaForCausalLM<T>::Cache ca, cb;
  const std::vector<Index> ids = {3, 1, 4, 1, 5};
  CHECK(test::rel_diff(a.forward(ids, SequenceLayout(1, 5), ca), b.forward(ids, SequenceLayout(1, 5), cb)) == 0.0);
  PEFT_REQUIRE_THROWS_WITH(pm3.load_adapter(test::llama_data("llama_lora"), "lora"), ConfigError, "do not mix");
}
