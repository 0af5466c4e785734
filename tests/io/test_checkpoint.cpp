// Checkpoints: scalars and tensors round-trip exactly; resuming training (adapter weights, Adam
// state, step, dropout and data generators) continues bit-identically.
#include <peft/io/checkpoint.hpp>
#include <peft/layers/lora_linear.hpp>
#include <peft/optim/adam.hpp>
#include <peft/optim/sgd.hpp>
#include <peft/train/batches.hpp>

#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::TempDir;

TEMPLATE_TEST_CASE("checkpoint: tensors and typed scalars round-trip exactly", "[io][checkpoint]", float, double) {
  using T = TestType;
  TempDir dir;
  Rng rng(1);
  Checkpoint<T> ck;
  const Matrix<T> a = test::random_matrix<T>(3, 4, rng);
  const Matrix<T> v = test::random_matrix<T>(1, 5, rng);
  ck.put_tensor("a", a);
  ck.put_tensor("v", v, true);
  ck.put_tensor("empty", Matrix<T>(0, 0));
  ck.put_int("step", -1234567890123LL);
  ck.put_double("lr", 0.1);
  ck.put_double("tiny", std::numeric_limits<double>::denorm_min());
  ck.put_double("inf", std::numeric_limits<double>::infinity());
  ck.put_string("note", "a \"quoted\" ünïcode string");
  Rng g(99);
  g.next_u64();
  ck.put_rng("data", g);
  ck.save(dir.path + "/c.safetensors");
  const Checkpoint<T> back = Checkpoint<T>::load(dir.path + "/c.safetensors");
  CHECK(back.tensor("a") == a);
  CHECK(back.tensor("v") == v);
  CHECK(back.tensor("empty").size() == 0);
  CHECK(back.get_int("step") == -1234567890123LL);
  CHECK(back.get_double("lr") == 0.1);
  CHECK(back.get_double("tiny") == std::numeric_limits<double>::denorm_min());
  CHECK(back.get_double("inf") == std::numeric_limits<double>::infinity());
  CHECK(back.get_string("note") == "a \"quoted\" ünïcode string");
  Rng h(0);
  back.get_rng("data", h);
  CHECK(h.state() == g.state());
  CHECK(h.next_u64() == g.next_u64());
  PEFT_REQUIRE_THROWS_WITH(back.get_int("lr"), ConfigError, "no scalar \"lr\" of type i:");
  PEFT_REQUIRE_THROWS_WITH(back.tensor("b"), ConfigError, "no tensor \"b\"");
  CHECK(dir.entries() == std::vector<std::string>{"c.safetensors"});
}

TEST_CASE("checkpoint: foreign or tampered files are rejected", "[io][checkpoint]") {
  TempDir dir;
  const Matrix<float> a = Matrix<float>::Ones(2, 2);
  save_safetensors<float>(dir.path + "/plain.safetensors", {{"a", {2, 2}, a.data()}});
  PEFT_REQUIRE_THROWS_WITH(Checkpoint<float>::load(dir.path + "/plain.safetensors"), IoError,
                           "is not a peft checkpoint");
  save_safetensors<float>(dir.path + "/v2.safetensors", {{"a", {2, 2}, a.data()}}, {{"peft.checkpoint", "2"}});
  PEFT_REQUIRE_THROWS_WITH(Checkpoint<float>::load(dir.path + "/v2.safetensors"), IoError, "format version \"2\"");
  save_safetensors<float>(dir.path + "/bad.safetensors", {{"a", {2, 2}, a.data()}},
                          {{"peft.checkpoint", "1"}, {"i:step", "12x"}, {"rng:r", "zz"}});
  const Checkpoint<float> c = Checkpoint<float>::load(dir.path + "/bad.safetensors");
  PEFT_REQUIRE_THROWS_WITH(c.get_int("step"), IoError, "scalar \"step\" = \"12x\" is not an integer");
  Rng r;
  PEFT_REQUIRE_THROWS_WITH(c.get_rng("r", r), IoError, "is not 64 hex digits");
  save_safetensors<float>(dir.path + "/tag.safetensors", {{"a", {2, 2}, a.data()}},
                          {{"peft.checkpoint", "1"}, {"step", "1"}});
  PEFT_REQUIRE_THROWS_WITH(Checkpoint<float>::load(dir.path + "/tag.safetensors"), IoError, "has no type tag");
  // A double checkpoint does not silently load as float.
  Checkpoint<double> d;
  d.put_tensor("a", Matrix<double>::Ones(1, 1));
  d.save(dir.path + "/d.safetensors");
  PEFT_REQUIRE_THROWS_WITH(Checkpoint<float>::load(dir.path + "/d.safetensors"), IoError, "is F64, expected F32");
}

namespace {
/// One LoRA layer with dropout trained with AdamW on a fixed regression set, in shuffled
/// mini-batches (BatchSampler, 5 batches per epoch): what a resumed run must reproduce is the
/// weights, the optimizer, the step, the dropout generator and the position in the data order.
struct Run {
  Rng init{42};
  LoRALinear<double> layer{6, 5, init, true, "layer"};
  Rng data_rng{7};
  const Matrix<double> x_all = test::random_matrix<double>(20, 6, data_rng);
  const Matrix<double> y_all = test::random_matrix<double>(20, 5, data_rng);
  BatchSampler sampler{20, 4, /*seed=*/9};
  std::int64_t step = 0;

  Run() {
    layer.freeze_base();
    LoraConfig c;
    c.r = 2;
    c.alpha = 3;
    c.dropout = 0.25;
    c.init = LoraInit::None;
    layer.add_adapter("default", c, init);
  }

  template <class Opt>
  void train(Opt& opt, int steps) {
    typename LoRALinear<double>::Cache cache;
    std::vector<Index> batch;
    for (int s = 0; s < steps; ++s, ++step) {
      if (!sampler.next(batch)) {  // epoch over: a new permutation
        sampler.start_epoch();
        sampler.next(batch);
      }
      Matrix<double> x(static_cast<Index>(batch.size()), 6), t(static_cast<Index>(batch.size()), 5);
      for (std::size_t i = 0; i < batch.size(); ++i) {
        x.row(static_cast<Index>(i)) = x_all.row(batch[i]);
        t.row(static_cast<Index>(i)) = y_all.row(batch[i]);
      }
      const Matrix<double> y = layer.forward(x, cache);
      const Matrix<double> dy = (y - t) / 4.0;
      opt.zero_grad();
      layer.backward(cache, dy, nullptr);
      opt.step();
    }
  }

  template <class Opt>
  Checkpoint<double> snapshot(Opt& opt) {
    Checkpoint<double> ck;
    save_parameters(layer, ck);
    save_optimizer_state(opt, ck);
    save_sampler_state(sampler, ck, "sampler.train");
    ck.put_int("step", step);
    ck.put_rng("rng.dropout", layer.rng());
    return ck;
  }

  template <class Opt>
  void restore(Opt& opt, const Checkpoint<double>& ck) {
    CHECK(restore_parameters(layer, ck) == 2);  // lora_A and lora_B (the base is frozen)
    load_optimizer_state(opt, ck);
    load_sampler_state(sampler, ck, "sampler.train");
    step = ck.get_int("step");
    ck.get_rng("rng.dropout", layer.rng());
  }
};
}  // namespace

TEST_CASE("checkpoint: resuming AdamW training continues bit-identically", "[io][checkpoint]") {
  TempDir dir;
  Run straight;
  AdamW<double> opt_s(straight.layer, AdamWOptions{0.05, 0.9, 0.999, 1e-8, 0.01});
  straight.train(opt_s, 8);

  Run first;
  AdamW<double> opt_f(first.layer, AdamWOptions{0.05, 0.9, 0.999, 1e-8, 0.01});
  first.train(opt_f, 3);
  opt_f.set_lr(0.03);  // as a schedule would; must be restored too
  opt_s.set_lr(0.05);
  first.snapshot(opt_f).save(dir.path + "/ck.safetensors");

  Run resumed;                                            // same construction, then everything replaced from the file
  resumed.sampler = BatchSampler(20, 4, /*seed=*/12345);  // even another seed: the file decides
  AdamW<double> opt_r(resumed.layer, AdamWOptions{0.05, 0.9, 0.999, 1e-8, 0.01});
  resumed.restore(opt_r, Checkpoint<double>::load(dir.path + "/ck.safetensors"));
  CHECK(opt_r.lr(0) == 0.03);
  CHECK(resumed.step == 3);
  opt_r.set_lr(0.05);
  resumed.train(opt_r, 5);
  // The straight run used lr 0.05 throughout; so did the resumed one after the restore check.
  const auto& a = resumed.layer.adapters()[0];
  const auto& b = straight.layer.adapters()[0];
  CHECK(a.A.value == b.A.value);  // bit-identical
  CHECK(a.B.value == b.B.value);
  CHECK(opt_r.step_count("lora_A.default.weight") == 8);
  CHECK(opt_r.state("lora_A.default.weight")->exp_avg_sq == opt_s.state("lora_A.default.weight")->exp_avg_sq);
  CHECK(resumed.layer.rng().state() == straight.layer.rng().state());
  CHECK(resumed.sampler.state().position == straight.sampler.state().position);  // 8 steps: epoch 2, batch 3
}

TEST_CASE("checkpoint: a batch sampler resumes mid-epoch, then every later epoch is the same", "[io][checkpoint]") {
  TempDir dir;
  BatchSampler a(11, 3, 5);
  std::vector<Index> batch;
  for (int i = 0; i < 6; ++i)  // one epoch (4 batches) and two batches of the next
    if (!a.next(batch)) {
      a.start_epoch();
      a.next(batch);
    }
  Checkpoint<float> ck;
  save_sampler_state(a, ck);
  ck.save(dir.path + "/s.safetensors");
  BatchSampler b(11, 3, 77);
  load_sampler_state(b, Checkpoint<float>::load(dir.path + "/s.safetensors"));
  std::vector<Index> next_a, next_b;
  for (int i = 0; i < 10; ++i) {  // across two epoch boundaries
    for (auto* s : {&a, &b}) {
      if (!s->next(batch)) {
        s->start_epoch();
        s->next(batch);
      }
      auto& out = s == &a ? next_a : next_b;
      out.insert(out.end(), batch.begin(), batch.end());
    }
  }
  CHECK(next_a == next_b);
  BatchSampler other(12, 3, 5);
  PEFT_REQUIRE_THROWS_WITH(
      load_sampler_state(other, ck), ConfigError,
      "checkpoint sampler \"sampler\" is over 11 indices in batches of 3, this one over 12 in batches of 3");
}

TEST_CASE("checkpoint: SGD momentum state and mismatches", "[io][checkpoint]") {
  Run r;
  SGD<double> opt(r.layer, SGDOptions{0.1, 0.9});
  r.train(opt, 2);
  Checkpoint<double> ck = r.snapshot(opt);
  CHECK(ck.has_tensor("optim.state.lora_B.default.weight.momentum_buffer"));
  Run other;
  SGD<double> opt2(other.layer, SGDOptions{0.1, 0.9});
  other.restore(opt2, ck);
  CHECK(opt2.state("lora_B.default.weight")->momentum_buffer == opt.state("lora_B.default.weight")->momentum_buffer);

  // A parameter of another shape: nothing is restored.
  Rng rng(1);
  LoRALinear<double> wide(7, 5, rng, true, "layer");
  LoraConfig c2;
  c2.r = 2;
  wide.add_adapter("default", c2);
  const Matrix<double> before = wide.weight.value;
  Checkpoint<double> full;
  save_parameters(r.layer, full, "param.", false);
  PEFT_REQUIRE_THROWS_WITH(restore_parameters(wide, full), ShapeError,
                           "parameter \"weight\" has shape [5, 7], checkpoint has [5, 6]");
  CHECK(wide.weight.value == before);
  full.put_tensor("param.nope", Matrix<double>::Ones(1, 1));
  PEFT_REQUIRE_THROWS_WITH(restore_parameters(r.layer, full), ConfigError, "\"param.nope\" names no parameter");
  Checkpoint<double> empty;
  PEFT_REQUIRE_THROWS_WITH(load_optimizer_state(opt2, empty), ConfigError, "no scalar \"optim.group.default.lr\"");
}

namespace {

/// A deep, bit-exact copy of an Adam optimizer's state: per group lr / initial lr / weight decay,
/// per parameter steps, has_state and both moments.
struct AdamSnapshot {
  std::vector<double> hyper;
  std::vector<std::int64_t> counts;
  std::vector<Matrix<double>> moments;

  template <class Opt>
  explicit AdamSnapshot(const Opt& opt) {
    for (std::size_t g = 0; g < opt.num_groups(); ++g) {
      hyper.push_back(opt.lr(g));
      hyper.push_back(opt.initial_lr(g));
      hyper.push_back(opt.weight_decay(g));
      for (const auto& e : opt.groups()[g].entries) {
        counts.push_back(e.steps);
        counts.push_back(e.has_state ? 1 : 0);
        moments.push_back(e.state.exp_avg);
        moments.push_back(e.state.exp_avg_sq);
      }
    }
  }
};

bool bit_identical(const Matrix<double>& a, const Matrix<double>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 ||  // an empty matrix has no data pointer
          std::memcmp(a.data(), b.data(), sizeof(double) * static_cast<std::size_t>(a.size())) == 0);
}

bool bit_identical(const AdamSnapshot& a, const AdamSnapshot& b) {
  bool same = std::memcmp(a.hyper.data(), b.hyper.data(), sizeof(double) * a.hyper.size()) == 0 &&
              a.hyper.size() == b.hyper.size() && a.counts == b.counts && a.moments.size() == b.moments.size();
  for (std::size_t i = 0; same && i < a.moments.size(); ++i) same = bit_identical(a.moments[i], b.moments[i]);
  return same;
}

}  // namespace

TEST_CASE("checkpoint: a failing optimizer load leaves the optimizer bit-identical", "[io][checkpoint]") {
  Run r;
  AdamW<double> opt(r.layer, AdamWOptions{0.05, 0.9, 0.999, 1e-8, 0.01});
  r.train(opt, 3);
  const Checkpoint<double> good = r.snapshot(opt);
  r.train(opt, 2);  // the live state now differs from the file in every field a load replaces
  opt.set_lr(0.02);
  opt.set_weight_decay(0, 0.03);
  const AdamSnapshot before(opt);
  REQUIRE(before.counts.size() == 8);                // weight, bias (frozen: no state), lora_A, lora_B
  const std::string last = "lora_B.default.weight";  // the last entry: every other one is read before it

  struct Tamper {
    const char* what;
    std::function<void(Checkpoint<double>&)> edit;
    const char* message;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<Tamper> cases = {
      {"NaN lr", [&](Checkpoint<double>& c) { c.put_double("optim.group.default.lr", nan); },
       "\"optim.group.default.lr\" must be finite and >= 0, got nan"},
      {"negative lr", [&](Checkpoint<double>& c) { c.put_double("optim.group.default.lr", -0.1); },
       "\"optim.group.default.lr\" must be finite and >= 0, got -0.1"},
      {"negative initial lr", [&](Checkpoint<double>& c) { c.put_double("optim.group.default.initial_lr", -1.0); },
       "\"optim.group.default.initial_lr\" must be finite and >= 0"},
      {"infinite weight decay",
       [&](Checkpoint<double>& c) {
         c.put_double("optim.group.default.weight_decay", std::numeric_limits<double>::infinity());
       },
       "\"optim.group.default.weight_decay\" must be finite and >= 0"},
      {"negative step count", [&](Checkpoint<double>& c) { c.put_int("optim.steps." + last, -3); },
       "\"optim.steps.lora_B.default.weight\" must be >= 0, got -3"},
      {"has_state 2", [&](Checkpoint<double>& c) { c.put_int("optim.has_state." + last, 2); }, "must be 0 or 1, got 2"},
      {"NaN moment",
       [&](Checkpoint<double>& c) {
         Matrix<double> m = c.tensor("optim.state." + last + ".exp_avg_sq");
         m(1, 0) = nan;
         c.put_tensor("optim.state." + last + ".exp_avg_sq", m);
       },
       "\"optim.state.lora_B.default.weight.exp_avg_sq\" contains NaN or Inf"},
      {"moment of another shape",
       [&](Checkpoint<double>& c) { c.put_tensor("optim.state." + last + ".exp_avg", Matrix<double>::Zero(2, 2)); },
       "has shape [2, 2], parameter \"lora_B.default.weight\" has [5, 2]"},
  };
  for (const Tamper& t : cases) {
    INFO(t.what);
    Checkpoint<double> bad = good;
    t.edit(bad);
    PEFT_REQUIRE_THROWS_WITH(load_optimizer_state(opt, bad), peft::Error, t.message);
    CHECK(bit_identical(AdamSnapshot(opt), before));
  }
  // The untampered file loads, and then the optimizer holds the file's state.
  load_optimizer_state(opt, good);
  CHECK(opt.lr(0) == 0.05);
  CHECK(opt.step_count(last) == 3);
}

TEST_CASE("checkpoint: failing parameter, generator and sampler loads change nothing", "[io][checkpoint]") {
  Run r;
  SGD<double> opt(r.layer, SGDOptions{0.1, 0.9});
  r.train(opt, 2);
  const Checkpoint<double> good = r.snapshot(opt);
  r.train(opt, 3);
  const auto& a = r.layer.adapters()[0];
  const Matrix<double> a_before = a.A.value, b_before = a.B.value;

  // Parameters: the valid lora_A and lora_B come first in the file; the bad tensor after them.
  Checkpoint<double> bad = good;
  bad.put_tensor("param.lora_A.default.weight", Matrix<double>::Zero(2, 6));  // valid, different values
  bad.put_tensor("param.zzz", Matrix<double>::Ones(1, 1));
  PEFT_REQUIRE_THROWS_WITH(restore_parameters(r.layer, bad), ConfigError, "\"param.zzz\" names no parameter");
  CHECK(bit_identical(a.A.value, a_before));
  CHECK(bit_identical(a.B.value, b_before));

  // Generator: an all-zero xoshiro state (it would output zeros forever) is refused.
  Rng zero_rng;
  zero_rng.set_state(Rng::State{});
  Checkpoint<double> zc = good;
  zc.put_rng("zero", zero_rng);
  zc.put_rng("sampler.train.epoch", zero_rng);
  Rng g(5);
  const Rng::State g_before = g.state();
  PEFT_REQUIRE_THROWS_WITH(
      zc.get_rng("zero", g), IoError,
      "scalar \"zero\" = \"" + std::string(64, '0') + "\" is not a generator state (all zero is not one)");
  CHECK(g.state() == g_before);

  // Sampler: a position outside the epoch, a mismatched size, a bad generator: state unchanged.
  const BatchSampler::State s_before = r.sampler.state();
  const auto sampler_same = [&] {
    const BatchSampler::State s = r.sampler.state();
    return s.position == s_before.position && s.epoch_rng == s_before.epoch_rng;
  };
  bad = good;
  bad.put_int("sampler.train.position", 21);
  PEFT_REQUIRE_THROWS_WITH(load_sampler_state(r.sampler, bad, "sampler.train"), ConfigError,
                           "state position 21 is outside [0, 20]");
  CHECK(sampler_same());
  bad = good;
  bad.put_int("sampler.train.size", 19);
  PEFT_REQUIRE_THROWS_WITH(load_sampler_state(r.sampler, bad, "sampler.train"), ConfigError, "is over 19 indices");
  CHECK(sampler_same());
  PEFT_REQUIRE_THROWS_WITH(load_sampler_state(r.sampler, zc, "sampler.train"), IoError, "all zero is not one");
  CHECK(sampler_same());
}
