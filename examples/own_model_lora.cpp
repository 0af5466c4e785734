// LoRA on your own model with the model-level API (peft/models/peft_model.hpp): a small MLP whose
// linears are LoRALinear hosts and whose head is a ModulesToSave, pretrained on a synthetic task,
// then adapted to a shifted task by a LoRA adapter (and a trainable copy of the head) with AdamW
// and a warmup + cosine learning-rate schedule. Prints the loss and PEFT's trainable-parameter
// line; exits non-zero unless the adapter learns. Runs in about a second.
#include <peft/models/peft_model.hpp>
#include <peft/peft.hpp>

#include <cstdio>
#include <iostream>
#include <vector>

namespace {

using T = float;
using peft::Matrix;

/// x [rows, 16] -> fc1 -> GELU -> fc2 -> GELU -> head -> logits [rows, 4].
class Mlp : public peft::Module<T> {
 public:
  explicit Mlp(peft::Rng& rng) : fc1(16, 64, rng), fc2(64, 64, rng), head(peft::Linear<T>(64, 4, rng)) { set_name(""); }

  peft::LoRALinear<T> fc1, fc2;                  // adapter hosts
  peft::ModulesToSave<T, peft::Linear<T>> head;  // one copy per adapter (modules_to_save)

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
    head.forward(c.h2, logits, c.c3);  // the active adapter's copy of the head
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

/// Trains `model` for `steps` steps; with a schedule, lr = base_lr · schedule(step). Returns
/// {first loss, last loss}.
std::pair<double, double> train(Mlp& model, peft::Optimizer<T>& opt, const Task& task, peft::Rng& rng, int steps,
                                const char* tag, const peft::Schedule* schedule = nullptr, double base_lr = 0.0) {
  Matrix<T> x, logits, dlogits;
  std::vector<std::int64_t> y;
  Mlp::Cache cache;
  double first = 0.0, last = 0.0;
  model.train();
  for (int step = 1; step <= steps; ++step) {
    if (schedule != nullptr) opt.set_lr(base_lr * schedule->multiplier(step - 1));
    task.sample(rng, 64, x, y);
    opt.zero_grad();
    model.forward(x, logits, cache);
    const double loss = peft::cross_entropy<T>(logits, y, &dlogits);
    model.backward(cache, dlogits);
    opt.step();
    if (step == 1) first = loss;
    last = loss;
    if (step == 1 || step % (steps / 5) == 0) std::printf("  %s step %4d  loss %.4f\n", tag, step, loss);
  }
  return {first, last};
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
  peft::set_warning_handler(peft::stderr_warning_handler());
  Eigen::setNbThreads(1);
  peft::Rng rng(7);
  Mlp model(rng);
  Task source{Matrix<T>::Zero(4, 16)}, target{Matrix<T>::Zero(4, 16)};
  peft::init::normal<T>(source.teacher, rng, 0.0, 1.0);
  target.teacher = source.teacher;  // the target task: two classes re-drawn
  peft::init::normal<T>(target.teacher.topRows(2), rng, 0.0, 1.0);

  std::printf("1) pretraining every weight on the source task\n");
  {
    peft::AdamW<T> opt(model, peft::AdamWOptions{3e-3, 0.9, 0.999, 1e-8, 0.0});
    train(model, opt, source, rng, 600, "pretrain");
  }
  const double before = evaluate(model, target, rng);
  std::printf("   target accuracy before adapting: %.3f\n", before);

  std::printf("2) a LoRA adapter (r=4, alpha=8) on fc1 and fc2, the head in modules_to_save\n");
  peft::PeftModel<T> pm(model);  // the first adapter freezes every other parameter
  pm.add_adapter("default", peft::io::Json{{"peft_type", "LORA"},
                                           {"r", 4},
                                           {"lora_alpha", 8},
                                           {"target_modules", {"fc1", "fc2"}},
                                           {"modules_to_save", {"head"}}});
  std::printf("   ");
  pm.print_trainable_parameters(std::cout);

  std::printf("3) AdamW (lr 1e-2) with 30 warmup steps and a cosine decay over 600 steps\n");
  const int steps = 600;
  const double lr = 1e-2;
  peft::AdamW<T> opt(model, peft::AdamWOptions{lr, 0.9, 0.999, 1e-8, 0.0});
  const peft::CosineSchedule schedule(30, steps);
  const auto [first, last] = train(model, opt, target, rng, steps, "lora", &schedule, lr);
  const double after = evaluate(model, target, rng);
  const bool learned = last < 0.5 * first && after > before + 0.1;
  std::printf("   target accuracy %.3f (was %.3f), loss %.4f -> %.4f (%s)\n", after, before, first, last,
              learned ? "ok" : "NOT LEARNING");
  return learned ? 0 : 1;
}
