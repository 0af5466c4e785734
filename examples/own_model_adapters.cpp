// Several adapters on your own model with the model-level API (peft/models/peft_model.hpp): two
// LoRA adapters for two tasks, each with its own copy of the head (modules_to_save), switched with
// set_adapter, the base model back in a scope with disable_adapters(), one adapter deleted, and
// the last one merged into plain weights with merge_and_unload(). Exits non-zero unless every
// check holds. Runs in about a second.
//
//   own_model_adapters [--save-for-peft DIR]
//
// With --save-for-peft, also writes what Hugging Face PEFT needs to check this library's files
// (benchmarks/peer/check_peft_interop.py): DIR/base.safetensors (the pretrained weights under
// torch's names), DIR/adapters/ (save_pretrained: adapters "a" and "b", each with its own head)
// and DIR/probe.safetensors (an input and this program's outputs with a, with b, and disabled).
#include <peft/io/load_state.hpp>
#include <peft/models/peft_model.hpp>
#include <peft/peft.hpp>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

namespace {

using T = float;
using peft::Matrix;

/// x [rows, 16] -> fc1 -> GELU -> fc2 -> GELU -> head -> logits [rows, 4].
class Mlp : public peft::Module<T> {
 public:
  explicit Mlp(peft::Rng& rng) : fc1(16, 64, rng), fc2(64, 64, rng), head(peft::Linear<T>(64, 4, rng)) { set_name(""); }

  peft::LoRALinear<T> fc1, fc2;
  peft::ModulesToSave<T, peft::Linear<T>> head;

  struct Cache {
    peft::LoRALinear<T>::Cache c1, c2;
    peft::Linear<T>::Cache c3;
    Matrix<T> z1, h1, z2, h2;
  };

  void forward(const Matrix<T>& x, Matrix<T>& logits, Cache& c) {
    fc1.forward(x, c.z1, c.c1);
    peft::activation_forward<T>(peft::Activation::GELU, c.z1, c.h1);
    fc2.forward(c.h1, c.z2, c.c2);
    peft::activation_forward<T>(peft::Activation::GELU, c.z2, c.h2);
    head.forward(c.h2, logits, c.c3);
  }
  Matrix<T> forward(const Matrix<T>& x) {
    Matrix<T> logits;
    Cache c;
    forward(x, logits, c);
    return logits;
  }

  void backward(Cache& c, const Matrix<T>& dlogits) {
    Matrix<T> dh, dz;
    head.backward(c.c3, dlogits, &dh);
    peft::activation_backward<T>(peft::Activation::GELU, c.z2, dh, dz);
    fc2.backward(c.c2, dz, &dh);
    peft::activation_backward<T>(peft::Activation::GELU, c.z1, dh, dz);
    fc1.backward(c.c1, dz, nullptr);
  }

 protected:
  void visit_children(const ChildVisitor& fn) override {
    fn("fc1", fc1);
    fn("fc2", fc2);
    fn("head", head);
  }
};

struct Task {
  Matrix<T> teacher;
  void sample(peft::Rng& rng, int rows, Matrix<T>& x, std::vector<std::int64_t>& y) const {
    x.resize(rows, 16);
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < 16; ++j) x(i, j) = static_cast<T>(rng.normal());
    y = peft::argmax_rows<T>(Matrix<T>(x * teacher.transpose()));
  }
};

void train(Mlp& model, const Task& task, peft::Rng& rng, int steps, double lr) {
  peft::AdamW<T> opt(model, peft::AdamWOptions{lr, 0.9, 0.999, 1e-8, 0.0});  // the trainable parameters now
  Matrix<T> x, logits, dlogits;
  std::vector<std::int64_t> y;
  Mlp::Cache cache;
  model.train();
  for (int step = 1; step <= steps; ++step) {
    task.sample(rng, 64, x, y);
    opt.zero_grad();
    model.forward(x, logits, cache);
    peft::cross_entropy<T>(logits, y, &dlogits);
    model.backward(cache, dlogits);
    opt.step();
  }
}

double evaluate(Mlp& model, const Task& task, peft::Rng& rng) {
  Matrix<T> x, logits;
  std::vector<std::int64_t> y;
  Mlp::Cache cache;
  model.eval();
  task.sample(rng, 2000, x, y);
  model.forward(x, logits, cache);
  return peft::accuracy<T>(logits, y);
}

bool report(const char* what, bool ok) {
  std::printf("   %-62s %s\n", what, ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  std::string peft_dir;  // --save-for-peft DIR
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--save-for-peft") == 0 && i + 1 < argc) {
      peft_dir = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--save-for-peft DIR]\n", argv[0]);
      return 2;
    }
  }
  peft::set_warning_handler(peft::stderr_warning_handler());
  Eigen::setNbThreads(1);
  peft::Rng rng(11);
  Mlp model(rng);
  Task source{Matrix<T>::Zero(4, 16)};
  peft::init::normal<T>(source.teacher, rng, 0.0, 1.0);
  Task task_a = source, task_b = source;  // two tasks, each re-drawing two classes of the source
  peft::init::normal<T>(task_a.teacher.topRows(2), rng, 0.0, 1.0);
  peft::init::normal<T>(task_b.teacher.bottomRows(2), rng, 0.0, 1.0);

  std::printf("1) pretraining on the source task\n");
  train(model, source, rng, 500, 3e-3);
  Matrix<T> probe;
  std::vector<std::int64_t> unused;
  source.sample(rng, 128, probe, unused);
  const Matrix<T> base_out = model.forward(probe);
  const Mlp pretrained = model;  // for the bias = "all" adapter below
  if (!peft_dir.empty()) {
    std::filesystem::create_directories(peft_dir);
    peft::io::save_safetensors(model, peft_dir + "/base.safetensors");  // fc1.weight, ..., head.bias
  }

  std::printf("2) adapters \"a\" and \"b\" (LoRA r=4 on fc1, fc2; each its own head copy)\n");
  const peft::io::Json lora = {{"peft_type", "LORA"},
                               {"r", 4},
                               {"lora_alpha", 8},
                               {"target_modules", {"fc1", "fc2"}},
                               {"modules_to_save", {"head"}}};
  peft::PeftModel<T> pm(model);
  pm.add_adapter("a", lora);
  train(model, task_a, rng, 400, 1e-2);
  const Matrix<T> out_a = model.forward(probe);
  pm.add_adapter("b", lora);  // PEFT: adding does not activate
  pm.set_adapter("b");
  std::printf("   ");
  pm.print_trainable_parameters(std::cout);
  train(model, task_b, rng, 400, 1e-2);

  bool ok = true;
  pm.set_adapter("a");
  ok &= report("training b left adapter a (and a's head) bit-identical", model.forward(probe) == out_a);
  if (!peft_dir.empty()) {  // for benchmarks/peer/check_peft_interop.py
    pm.save_pretrained(peft_dir + "/adapters");
    pm.set_adapter("b");
    const Matrix<T> out_b_saved = model.forward(probe);
    pm.set_adapter("a");
    using peft::io::matrix_shape;
    peft::io::save_safetensors<T>(peft_dir + "/probe.safetensors",
                                  {{"x", matrix_shape(probe.rows(), probe.cols()), probe.data()},
                                   {"out_a", matrix_shape(out_a.rows(), out_a.cols()), out_a.data()},
                                   {"out_b", matrix_shape(out_b_saved.rows(), out_b_saved.cols()), out_b_saved.data()},
                                   {"out_base", matrix_shape(base_out.rows(), base_out.cols()), base_out.data()}});
    // A third adapter on its own copy of the pretrained model: LoRA on fc1 with bias = "all" (every
    // bias of the model trained and saved with it: "fc1.base_layer.bias", "fc2.bias", "head.bias").
    Mlp biased = pretrained;
    peft::PeftModel<T> pb(biased);
    pb.add_adapter("default", {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", {"fc1"}},
                               {"bias", "all"}});
    train(biased, task_a, rng, 200, 1e-2);
    pb.save_pretrained(peft_dir + "/adapter_bias_all");
    const Matrix<T> out_c = biased.forward(probe);
    peft::io::save_safetensors<T>(peft_dir + "/probe_bias_all.safetensors",
                                  {{"out", matrix_shape(out_c.rows(), out_c.cols()), out_c.data()}});
    std::printf("   saved base, adapters a and b, a bias=\"all\" adapter and probe outputs under %s\n",
                peft_dir.c_str());
  }
  const double acc_aa = evaluate(model, task_a, rng);
  pm.set_adapter("b");
  const double acc_bb = evaluate(model, task_b, rng);
  std::printf("   accuracy: adapter a on task a %.3f, adapter b on task b %.3f\n", acc_aa, acc_bb);
  ok &= report("each adapter solves its task", acc_aa > 0.8 && acc_bb > 0.8);

  {
    auto off = pm.disable_adapters();  // the pretrained model inside this scope
    ok &= report("disable_adapters(): the base model's outputs exactly", model.forward(probe) == base_out);
  }
  ok &= report("adapters enabled again after the scope", model.forward(probe) != base_out);

  pm.delete_adapter("a");
  ok &= report("delete_adapter(\"a\"): only b is left", pm.adapters() == std::vector<std::string>{"b"});

  const Matrix<T> out_b = model.forward(probe);
  peft::Module<T>& plain = pm.merge_and_unload();
  const Matrix<T> merged = model.forward(probe);
  const double rel = static_cast<double>((merged - out_b).norm() / out_b.norm());
  std::printf("   merge_and_unload: relative difference to the adapter's outputs %.2e\n", rel);
  ok &= report("merge_and_unload computes what the adapter did", rel < 1e-5);
  std::size_t adapter_params = 0;
  plain.visit_parameters([&](const std::string& name, peft::Parameter<T>&) {
    if (name.find("lora_") != std::string::npos || name.find("modules_to_save") != std::string::npos) ++adapter_params;
  });
  ok &= report("no adapter parameter is left", adapter_params == 0 && model.fc1.num_adapters() == 0);
  std::printf("   ");
  pm.print_trainable_parameters(std::cout);
  return ok ? 0 : 1;
}
