// The thread's scratch (core/scratch.hpp): every block of a model, and every model on the thread,
// shares one set of temporaries, so a deeper model needs no more of it, and nothing a later call
// leaves there changes an earlier call's results.
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <peft/core/scratch.hpp>
#include <peft/loss/causal_lm.hpp>
#include <peft/models/llama.hpp>
#include <peft/models/peft_config.hpp>
#include <peft/models/transformer.hpp>

#include "llama_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;

namespace {

TransformerConfig scratch_transformer(Index layers, Index dim, NormPlacement norm) {
  TransformerConfig c;
  c.input_dim = 5;
  c.max_seq_len = 6;
  c.dim = dim;
  c.num_heads = 2;
  c.ffn_dim = 12;
  c.num_layers = layers;
  c.num_classes = 3;
  c.norm = norm;
  return c;
}

/// LoRA on every linear and bottleneck adapters (Houlsby: both sequential ones; parallel: next to
/// the FFN), moved off their identity init: between them every scratch slot of the block is used.
void attach(TransformerClassifier<double>& m, Rng& rng, AdapterPlacement placement = AdapterPlacement::Houlsby) {
  PeftConfig pc;
  LoraTargetConfig lc;
  lc.target_modules = ModuleSelector::pattern("all-linear");
  lc.lora.r = 2;
  pc.lora = lc;
  AdapterTargetConfig ac;
  ac.placement = placement;
  ac.options.bottleneck = 3;
  pc.adapter = ac;
  apply_peft(m, pc, rng);
  m.visit_parameters([&](const std::string&, Parameter<double>& p) {
    if (p.trainable()) p.value += test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.3);
  });
}

std::map<std::string, Matrix<double>> grads(Module<double>& m) {
  std::map<std::string, Matrix<double>> g;
  m.visit_parameters([&](const std::string& n, Parameter<double>& p) {
    if (p.trainable()) g[n] = p.grad;
  });
  return g;
}

struct Step {
  Matrix<double> x, dlogits;
  SequenceLayout layout{2, 4, {4, 3}};
};

Step transformer_batch(Rng& rng) {
  Step s;
  s.x = test::random_matrix<double>(8, 5, rng);
  s.dlogits = test::random_matrix<double>(2, 3, rng);
  return s;
}

/// One forward and backward alone: the reference for the interleaved runs.
std::map<std::string, Matrix<double>> alone(TransformerClassifier<double>& m, const Step& s, Matrix<double>* dx) {
  m.zero_grad();
  typename TransformerClassifier<double>::Cache c;
  m.forward(s.x, s.layout, c);
  m.backward(c, s.dlogits, dx);
  return grads(m);
}

void check_same(const std::map<std::string, Matrix<double>>& want, const std::map<std::string, Matrix<double>>& got) {
  REQUIRE(want.size() == got.size());
  for (const auto& [name, g] : want) {
    INFO(name);
    CHECK(test::rel_diff(got.at(name), g) == 0.0);  // bit for bit: the same operations on the same data
  }
}

}  // namespace

TEST_CASE("scratch: a deeper transformer needs no more scratch, and one thread's is not another's", "[scratch]") {
  for (const NormPlacement norm : {NormPlacement::Pre, NormPlacement::Post}) {
    INFO("pre-norm " << (norm == NormPlacement::Pre));
    std::size_t bytes[2] = {0, 0};
    for (int k = 0; k < 2; ++k) {
      Rng rng(7);
      TransformerClassifier<double> m(scratch_transformer(k == 0 ? 1 : 4, 8, norm), rng);
      attach(m, rng);
      const Step s = transformer_batch(rng);
      release_scratch();
      CHECK(scratch_bytes<double>() == 0);
      Matrix<double> dx;
      alone(m, s, &dx);
      bytes[k] = scratch_bytes<double>();
    }
    CHECK(bytes[0] > 0);
    CHECK(bytes[1] == bytes[0]);  // 4 blocks, the temporaries of one
  }
  // Per thread: a step on another thread leaves this thread's pool as it was.
  Rng rng(8);
  TransformerClassifier<double> m(scratch_transformer(2, 8, NormPlacement::Pre), rng);
  attach(m, rng);
  const Step s = transformer_batch(rng);
  Matrix<double> dx_here, dx_there;
  release_scratch();  // the post-norm model above used a slot this one does not
  const auto here = alone(m, s, &dx_here);
  const std::size_t mine = scratch_bytes<double>();
  std::map<std::string, Matrix<double>> there;
  std::size_t theirs = 0;
  std::thread worker([&] {
    there = alone(m, s, &dx_there);
    theirs = scratch_bytes<double>();
  });
  worker.join();
  CHECK(scratch_bytes<double>() == mine);
  CHECK(theirs == mine);
  check_same(here, there);
  CHECK(test::rel_diff(dx_there, dx_here) == 0.0);
}

TEST_CASE("scratch: models of different widths interleaved on one thread get their own results", "[scratch]") {
  // Forward A, forward B, backward B, backward A (and the other orders): every gradient equals the
  // model's own forward and backward alone, bit for bit. B is wider (other scratch keys) or the same
  // width (the same scratch matrices).
  for (const Index dim_b : {Index(8), Index(12)}) {
    INFO("B's width " << dim_b);
    Rng rng(9);
    TransformerClassifier<double> a(scratch_transformer(2, 8, NormPlacement::Pre), rng);
    TransformerClassifier<double> b(scratch_transformer(3, dim_b, NormPlacement::Post), rng);
    attach(a, rng);
    attach(b, rng, AdapterPlacement::Parallel);
    const Step sa = transformer_batch(rng), sb = transformer_batch(rng);
    Matrix<double> dxa, dxb, dxa2, dxb2;
    const auto want_a = alone(a, sa, &dxa);
    const auto want_b = alone(b, sb, &dxb);
    for (const bool b_first : {true, false}) {
      INFO("B's backward first " << b_first);
      a.zero_grad();
      b.zero_grad();
      typename TransformerClassifier<double>::Cache ca, cb;
      a.forward(sa.x, sa.layout, ca);
      b.forward(sb.x, sb.layout, cb);
      if (b_first) {
        b.backward(cb, sb.dlogits, &dxb2);
        a.backward(ca, sa.dlogits, &dxa2);
      } else {
        a.backward(ca, sa.dlogits, &dxa2);
        b.backward(cb, sb.dlogits, &dxb2);
      }
      check_same(want_a, grads(a));
      check_same(want_b, grads(b));
      CHECK(test::rel_diff(dxa2, dxa) == 0.0);
      CHECK(test::rel_diff(dxb2, dxb) == 0.0);
    }
  }
}

TEST_CASE("scratch: a deeper Llama needs no more scratch; two Llamas interleaved get their own results",
          "[scratch][llama]") {
  const SequenceLayout layout(2, 5, {5, 3});
  const std::vector<Index> ids = {1, 4, 7, 2, 9, 3, 10, 5, 0, 0};
  const std::vector<std::int64_t> labels = {-100, 4, 7, 2, 9, -100, 10, 5, -100, -100};
  const auto make = [](Index layers, std::uint64_t seed) {
    LlamaConfig c = test::tiny_llama_base();
    c.num_hidden_layers = layers;
    c.qkv_bias = true;
    Rng rng(seed);
    LlamaForCausalLM<double> m(c, rng);
    m.visit_parameters([&](const std::string&, Parameter<double>& p) {
      p.value = test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.5);
      p.set_trainable(true);
    });
    return m;
  };
  const auto step = [&](LlamaForCausalLM<double>& m) {
    m.zero_grad();
    typename LlamaForCausalLM<double>::Cache c;
    Matrix<double> logits, d;
    m.forward(ids, layout, logits, c);
    causal_lm_loss<double>(logits, labels, layout, &d);
    m.backward(c, d);
    return grads(m);
  };
  std::size_t bytes[2] = {0, 0};
  for (int k = 0; k < 2; ++k) {
    LlamaForCausalLM<double> m = make(k == 0 ? 1 : 4, 3);
    release_scratch();
    step(m);
    bytes[k] = scratch_bytes<double>();
  }
  CHECK(bytes[0] > 0);
  CHECK(bytes[1] == bytes[0]);

  LlamaForCausalLM<double> a = make(2, 4), b = make(3, 5);
  const auto want_a = step(a), want_b = step(b);
  a.zero_grad();
  b.zero_grad();
  typename LlamaForCausalLM<double>::Cache ca, cb;
  Matrix<double> za, zb, da, db;
  a.forward(ids, layout, za, ca);
  b.forward(ids, layout, zb, cb);
  causal_lm_loss<double>(za, labels, layout, &da);
  causal_lm_loss<double>(zb, labels, layout, &db);
  b.backward(cb, db);
  a.backward(ca, da);
  check_same(want_a, grads(a));
  check_same(want_b, grads(b));
}
