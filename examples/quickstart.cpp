// Quickstart: pretrain a small MLP, freeze it, attach LoRA to its hidden layers, adapt it to a
// shifted task, then merge the adapters and check that merged and unmerged outputs agree.
// Runs in about a second on its built-in synthetic data.
#include <peft/peft.hpp>

#include <cstdio>
#include <vector>

namespace {

using T = float;
using peft::Matrix;

/// x [rows, 16] -> fc1 -> GELU -> fc2 -> GELU -> head -> logits [rows, 4]. Every linear is a
/// LoRALinear: with no adapter attached it is a plain Linear.
class Mlp : public peft::Module<T> {
 public:
  explicit Mlp(peft::Rng& rng) : fc1(16, 64, rng), fc2(64, 64, rng), head(64, 4, rng) { set_name(""); }

  peft::LoRALinear<T> fc1, fc2, head;

  struct Cache {
    peft::LoRALinear<T>::Cache c1, c2, c3;
    Matrix<T> z1, h1, z2, h2;
  };

  void forward(const Matrix<T>& x, Matrix<T>& logits, Cache& c) {
    fc1.forward(x, c.z1, c.c1);
    peft::activation_forward<T>(peft::Activation::GELU, c.z1, c.h1);
    fc2.forward(c.h1, c.z2, c.c2);
    peft::activation_forward<T>(peft::Activation::GELU, c.z2, c.h2);
    head.forward(c.h2, logits, c.c3);
  }

  void backward(Cache& c, const Matrix<T>& dlogits) {
    Matrix<T> dh, dz;
    head.backward(c.c3, dlogits, &dh);
    peft::activation_backward<T>(peft::Activation::GELU, c.z2, dh, dz);
    fc2.backward(c.c2, dz, &dh);
    peft::activation_backward<T>(peft::Activation::GELU, c.z1, dh, dz);
    fc1.backward(c.c1, dz, nullptr);  // no one needs dX of the input
  }

 protected:
  void visit_children(const ChildVisitor& fn) override {
    fn("fc1", fc1);
    fn("fc2", fc2);
    fn("head", head);
  }
};

/// A synthetic 4-class task: the label of x ~ N(0, I) is argmax(x · teacherᵀ).
struct Task {
  Matrix<T> teacher;
  void sample(peft::Rng& rng, int rows, Matrix<T>& x, std::vector<std::int64_t>& y) const {
    x.resize(rows, 16);
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < 16; ++j) x(i, j) = static_cast<T>(rng.normal());
    y = peft::argmax_rows<T>(Matrix<T>(x * teacher.transpose()));
  }
};

struct Losses {
  double first = 0.0, last = 0.0;
};

Losses train(Mlp& model, peft::Optimizer<T>& opt, const Task& task, peft::Rng& rng, int steps, const char* tag) {
  Matrix<T> x, logits, dlogits;
  std::vector<std::int64_t> y;
  Mlp::Cache cache;
  Losses losses;
  model.train();
  for (int step = 1; step <= steps; ++step) {
    task.sample(rng, 64, x, y);
    opt.zero_grad();  // the optimizer's list of trainable parameters: no name lookups per step
    model.forward(x, logits, cache);
    const double loss = peft::cross_entropy<T>(logits, y, &dlogits);
    model.backward(cache, dlogits);
    opt.step();
    if (step == 1) losses.first = loss;
    losses.last = loss;
    if (step == 1 || step % (steps / 5) == 0) std::printf("  %s step %4d  loss %.4f\n", tag, step, loss);
  }
  return losses;
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

}  // namespace

int main() {
  peft::set_warning_handler(peft::stderr_warning_handler());  // the library's warnings: "warning: ..." on stderr
  Eigen::setNbThreads(1);  // matrices this small run faster on one thread than with OpenMP's barriers
  peft::Rng rng(7);
  Mlp model(rng);
  Task source{Matrix<T>::Zero(4, 16)}, target{Matrix<T>::Zero(4, 16)};
  peft::init::normal<T>(source.teacher, rng, 0.0, 1.0);
  target.teacher = source.teacher;  // the target task: the same teacher with two classes re-drawn
  peft::init::normal<T>(target.teacher.topRows(2), rng, 0.0, 1.0);

  std::printf("1) pretraining every weight on the source task\n");
  peft::AdamW<T> pretrain_opt(model, peft::AdamWOptions{3e-3, 0.9, 0.999, 1e-8, 0.0});
  train(model, pretrain_opt, source, rng, 600, "pretrain");
  const double target_before = evaluate(model, target, rng);
  std::printf("   source accuracy %.3f, target accuracy %.3f\n", evaluate(model, source, rng), target_before);

  std::printf("2) freezing the model and attaching LoRA (r=4, alpha=8) to fc1 and fc2\n");
  peft::freeze(model);
  model.fc1.add_adapter("default", peft::LoraConfig{4, 8.0});
  model.fc2.add_adapter("default", peft::LoraConfig{4, 8.0});
  const peft::ParameterCount count = peft::count_parameters(model);
  std::printf("   trainable %lld of %lld parameters (%.2f%%)\n", static_cast<long long>(count.trainable),
              static_cast<long long>(count.total), count.trainable_percent());
  for (const auto& p : peft::trainable_parameters(model)) std::printf("   trainable: %s\n", p.name.c_str());

  std::printf("3) training only the adapters on the target task\n");
  peft::AdamW<T> opt(model, peft::AdamWOptions{1e-2, 0.9, 0.999, 1e-8, 0.0});
  const Losses lora = train(model, opt, target, rng, 600, "lora");
  const double target_after = evaluate(model, target, rng);
  const bool learned = lora.last < 0.5 * lora.first && target_after > target_before + 0.1;
  std::printf("   target accuracy %.3f (was %.3f), loss %.4f -> %.4f (%s)\n", target_after, target_before, lora.first,
              lora.last, learned ? "ok" : "NOT LEARNING");

  std::printf("4) merging the adapters into the base weights\n");
  Matrix<T> x, before, after;
  std::vector<std::int64_t> y;
  target.sample(rng, 256, x, y);
  Mlp::Cache cache;
  model.eval();
  model.forward(x, before, cache);
  model.fc1.merge();
  model.fc2.merge();
  model.forward(x, after, cache);
  const double rel = static_cast<double>((after - before).norm() / before.norm());
  std::printf("   merged vs. unmerged logits: relative difference %.2e (%s)\n", rel, rel < 1e-5 ? "ok" : "MISMATCH");
  return rel < 1e-5 && learned ? 0 : 1;
}
