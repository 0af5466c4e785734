// Train, save, inspect, merge: the file round trip of a LoRA adapter on your own model.
//
//   own_model_save DIR            pretrain a small MLP, save its weights (DIR/base.safetensors),
//                                 fine-tune a LoRA adapter with its own head, save it as a Hugging
//                                 Face PEFT directory (DIR/adapter, PeftModel::save_pretrained), and
//                                 the adapted model's outputs on a probe batch (DIR/expected.safetensors)
//   peft inspect DIR/adapter      what the directory holds (method, rank, modules, tensors)
//   peft merge --base DIR/base.safetensors --adapter DIR/adapter --out DIR/merged.safetensors
//   own_model_save --check DIR    load DIR/merged.safetensors into a plain model (no adapter, no
//                                 head copies) with io::load_safetensors and compare its outputs
//                                 with the adapted model's
//
// ctest runs the four steps in this order (examples/run_own_model_save.cmake). Exits non-zero when
// the adapter does not learn or the merged model differs.
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

/// x [rows, 8] -> fc1 -> tanh -> fc2 -> tanh -> head -> logits [rows, 3]. Linears are adapter hosts,
/// the head a ModulesToSave (one copy per adapter).
class Mlp : public peft::Module<T> {
 public:
  explicit Mlp(peft::Rng& rng) : fc1(8, 32, rng), fc2(32, 32, rng), head(peft::Linear<T>(32, 3, rng)) { set_name(""); }

  peft::LoRALinear<T> fc1, fc2;
  peft::ModulesToSave<T, peft::Linear<T>> head;

  struct Cache {
    peft::LoRALinear<T>::Cache c1, c2;
    peft::Linear<T>::Cache c3;
    Matrix<T> z1, h1, z2, h2;
  };

  void forward(const Matrix<T>& x, Matrix<T>& logits, Cache& c) {
    fc1.forward(x, c.z1, c.c1);
    peft::activation_forward<T>(peft::Activation::Tanh, c.z1, c.h1);
    fc2.forward(c.h1, c.z2, c.c2);
    peft::activation_forward<T>(peft::Activation::Tanh, c.z2, c.h2);
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
    peft::activation_backward<T>(peft::Activation::Tanh, c.z2, dh, dz);
    fc2.backward(c.c2, dz, &dh);
    peft::activation_backward<T>(peft::Activation::Tanh, c.z1, dh, dz);
    fc1.backward(c.c1, dz, nullptr);
  }

 protected:
  void visit_children(const ChildVisitor& fn) override {
    fn("fc1", fc1);
    fn("fc2", fc2);
    fn("head", head);
  }
};

/// Labels of a random linear teacher: y = argmax(x Tᵀ).
void sample(const Matrix<T>& teacher, peft::Rng& rng, int rows, Matrix<T>& x, std::vector<std::int64_t>& y) {
  x.resize(rows, 8);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < 8; ++j) x(i, j) = static_cast<T>(rng.normal());
  y = peft::argmax_rows<T>(Matrix<T>(x * teacher.transpose()));
}

double train(Mlp& model, const Matrix<T>& teacher, peft::Rng& rng, int steps, double lr) {
  peft::AdamW<T> opt(model, peft::AdamWOptions{lr, 0.9, 0.999, 1e-8, 0.0});
  peft::CosineSchedule schedule(steps / 10, steps);
  Matrix<T> x, logits, dlogits;
  std::vector<std::int64_t> y;
  Mlp::Cache cache;
  double loss = 0.0;
  model.train();
  for (int step = 0; step < steps; ++step) {
    peft::apply_schedule(opt, schedule, step);
    sample(teacher, rng, 64, x, y);
    opt.zero_grad();
    model.forward(x, logits, cache);
    loss = peft::cross_entropy<T>(logits, y, &dlogits);
    model.backward(cache, dlogits);
    opt.step();
  }
  model.eval();
  return loss;
}

double accuracy(Mlp& model, const Matrix<T>& teacher, peft::Rng& rng) {
  Matrix<T> x;
  std::vector<std::int64_t> y;
  sample(teacher, rng, 2000, x, y);
  return peft::accuracy<T>(model.forward(x), y);
}

Matrix<T> probe_batch() {
  peft::Rng rng(99);
  Matrix<T> x(32, 8);
  for (peft::Index i = 0; i < x.rows(); ++i)
    for (peft::Index j = 0; j < x.cols(); ++j) x(i, j) = static_cast<T>(rng.normal());
  return x;
}

int save(const std::string& dir) {
  std::filesystem::create_directories(dir);
  peft::Rng rng(5);
  Mlp model(rng);
  Matrix<T> source(3, 8), target(3, 8);
  peft::init::normal<T>(source, rng, 0.0, 1.0);
  target = source;
  peft::init::normal<T>(target.topRows(1), rng, 0.0, 1.0);  // the target task re-draws one class

  train(model, source, rng, 400, 3e-3);
  std::printf("pretrained: source accuracy %.3f, target accuracy %.3f\n", accuracy(model, source, rng),
              accuracy(model, target, rng));
  peft::io::save_safetensors(model, dir + "/base.safetensors");  // fc1.weight, fc1.bias, ..., head.bias

  peft::PeftModel<T> pm(model);
  pm.add_adapter("default", peft::io::Json{{"peft_type", "LORA"},
                                           {"r", 4},
                                           {"lora_alpha", 8},
                                           {"target_modules", {"fc1", "fc2"}},
                                           {"modules_to_save", {"head"}}});
  pm.print_trainable_parameters(std::cout);
  const double loss = train(model, target, rng, 300, 1e-2);
  const double acc = accuracy(model, target, rng);
  std::printf("LoRA fine-tune: final loss %.4f, target accuracy %.3f\n", loss, acc);
  pm.save_pretrained(dir + "/adapter");

  const Matrix<T> x = probe_batch();
  const Matrix<T> y = model.forward(x);
  peft::io::save_safetensors<T>(dir + "/expected.safetensors",
                                {{"logits", peft::io::matrix_shape(y.rows(), y.cols()), y.data()}});
  std::printf("saved %s/base.safetensors, %s/adapter/, %s/expected.safetensors\n", dir.c_str(), dir.c_str(),
              dir.c_str());
  return acc > 0.8 ? 0 : 1;
}

int check(const std::string& dir) {
  peft::Rng rng(0);
  Mlp plain(rng);  // other random weights: everything must come from the file
  const peft::io::LoadStateReport rep = peft::io::load_safetensors(plain, dir + "/merged.safetensors");
  std::printf("loaded %zu tensors from %s/merged.safetensors (missing %zu, unexpected %zu)\n", rep.loaded.size(),
              dir.c_str(), rep.missing.size(), rep.unexpected.size());
  const peft::io::SafeTensorsFile expected(dir + "/expected.safetensors");
  const Matrix<T> want = expected.load<T>("logits");
  const Matrix<T> got = plain.forward(probe_batch());
  const double rel = static_cast<double>((got - want).norm() / want.norm());
  std::printf("merged model vs adapted model: relative difference %.2e\n", rel);
  return rel < 1e-5 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  peft::set_warning_handler(peft::stderr_warning_handler());
  Eigen::setNbThreads(1);
  try {
    if (argc == 2 && std::strcmp(argv[1], "--check") != 0) return save(argv[1]);
    if (argc == 3 && std::strcmp(argv[1], "--check") == 0) return check(argv[2]);
  } catch (const peft::Error& e) {
    std::fprintf(stderr, "own_model_save: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "usage: %s DIR | --check DIR\n", argv[0]);
  return 2;
}
