#include <peft/layers/activations.hpp>
#include <peft/layers/lora_linear.hpp>
#include <peft/merge/combine.hpp>
#include <peft/optim/adam.hpp>
#include <peft/train/task_adapters.hpp>

#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

namespace {

/// 5 → 7 → 3 MLP with two adapter hosts and a plain head-free output (file-local to this test).
template <class T>
class TaskAdaptersMlp : public Module<T> {
 public:
  explicit TaskAdaptersMlp(Rng& rng) : fc1(5, 7, rng), fc2(7, 3, rng) {}
  LoRALinear<T> fc1, fc2;

  void forward(const Matrix<T>& x, Matrix<T>& y) {
    fc1.forward(x, z1_, c1_);
    activation_forward<T>(Activation::Tanh, z1_, a1_);
    fc2.forward(a1_, y, c2_);
  }
  void backward(const Matrix<T>& dy) {
    fc2.backward(c2_, dy, &d1_);
    activation_backward<T>(Activation::Tanh, z1_, d1_, d1_);
    fc1.backward(c1_, d1_, nullptr);
  }
  /// Mixed batch: row r through task row_tasks[r]'s adapter (inference).
  void forward_routed(const Matrix<T>& x, const TaskAdapters<T>& ta, const std::vector<int>& row_tasks, Matrix<T>& y) {
    ta.routing_for(fc1, row_tasks, route_);
    fc1.forward_routed(x, route_, z1_, ws_);
    activation_forward<T>(Activation::Tanh, z1_, a1_);
    ta.routing_for(fc2, row_tasks, route_);
    fc2.forward_routed(a1_, route_, y, ws_);
  }

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("fc1", fc1);
    fn("fc2", fc2);
  }

 private:
  typename LoRALinear<T>::Cache c1_, c2_;
  RoutedWorkspace<T> ws_;
  std::vector<int> route_;
  Matrix<T> z1_, a1_, d1_;
};

/// A few Adam steps of MSE towards `target` on whatever is trainable.
template <class T>
void ta_train(TaskAdaptersMlp<T>& m, const Matrix<T>& x, const Matrix<T>& target, int steps) {
  Adam<T> opt(trainable_parameters(m), AdamOptions{0.05});
  Matrix<T> y, dy;
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    m.forward(x, y);
    dy = (T(2) / static_cast<T>(y.size())) * (y - target);
    m.backward(dy);
    opt.step();
  }
}

io::Json ta_lora_config() {
  return io::Json{{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"fc1", "fc2"}}};
}

}  // namespace

TEMPLATE_TEST_CASE("TaskAdapters: routed by task id, earlier tasks' outputs are unchanged bit for bit",
                   "[train][continual][task_adapters]", float, double) {
  using T = TestType;
  Rng rng(1414);
  TaskAdaptersMlp<T> net(rng);
  std::vector<Matrix<T>> x, target;
  for (int t = 0; t < 3; ++t) {
    x.push_back(test::random_matrix<T>(8, 5, rng));
    target.push_back(test::random_matrix<T>(8, 3, rng));
  }
  PeftModel<T> pm(net, 7);
  TaskAdapters<T> ta(pm, ta_lora_config());
  ta_train(net, x[0], target[0], 10);  // task 0: the base itself

  std::vector<Matrix<T>> before(3);
  Matrix<T> y;
  CHECK(ta.add_task(1) == "task_1");
  ta_train(net, x[1], target[1], 10);
  for (int t = 0; t < 2; ++t) {
    ta.route(t);
    net.forward(x[static_cast<std::size_t>(t)], before[static_cast<std::size_t>(t)]);
  }
  ta.add_task(2);
  for (const auto& np : trainable_parameters(net))  // only task 2's adapter trains
    CHECK(np.name.find("task_2") != std::string::npos);
  CHECK(count_parameters(net).trainable == (2 * 5 + 7 * 2) + (2 * 7 + 3 * 2));  // A and B of fc1, of fc2
  ta.route(2);
  Matrix<T> untrained;
  net.forward(x[2], untrained);
  ta_train(net, x[2], target[2], 10);
  net.forward(x[2], y);
  CHECK((y - untrained).norm() > T(1e-2));  // task 2 did learn
  for (int t = 0; t < 2; ++t) {
    ta.route(t);
    net.forward(x[static_cast<std::size_t>(t)], y);
    CHECK(y == before[static_cast<std::size_t>(t)]);  // bitwise: zero forgetting
  }
  ta.route(1);
  CHECK(pm.active_adapters() == std::vector<std::string>{"task_1"});
  ta.route(0);
  CHECK(pm.adapters_disabled());

  // Mixed batch: one row per task in one forward equals each task routed alone.
  Matrix<T> mixed(6, 5);
  const std::vector<int> row_tasks{2, 0, 1, 1, 2, 0};
  for (Index r = 0; r < 6; ++r)
    mixed.row(r) = x[static_cast<std::size_t>(row_tasks[static_cast<std::size_t>(r)])].row(r);
  Matrix<T> routed;
  net.forward_routed(mixed, ta, row_tasks, routed);
  for (Index r = 0; r < 6; ++r) {
    ta.route(row_tasks[static_cast<std::size_t>(r)]);
    Matrix<T> one;
    net.forward(Matrix<T>(mixed.row(r)), one);
    CHECK((routed.row(r) - one.row(0)).norm() <= test::Tolerances<T>::rel * (1 + one.norm()));
  }
}

TEST_CASE("TaskAdapters: merge_tasks is the combine method applied layer by layer",
          "[train][continual][task_adapters]") {
  using T = double;
  Rng rng(1415);
  TaskAdaptersMlp<T> net(rng);
  PeftModel<T> pm(net, 9);
  TaskAdaptersOptions opt;
  opt.prefix = "t";
  TaskAdapters<T> ta(pm, ta_lora_config(), opt);
  for (int t = 1; t <= 3; ++t) {
    ta.add_task(t);
    ta_train(net, test::random_matrix<T>(8, 5, rng), test::random_matrix<T>(8, 3, rng), 5);
  }
  const Matrix<T> x = test::random_matrix<T>(4, 5, rng);
  const std::vector<double> w{0.5, -0.25, 1.0};
  std::vector<CombineOptions> methods(4);
  methods[0].method = CombineMethod::Svd;
  methods[0].rank = 3;  // truncated: an error to report
  methods[1].method = CombineMethod::Linear;
  methods[2].method = CombineMethod::Ties;
  methods[2].density = 0.5;
  methods[3].method = CombineMethod::DareLinear;
  methods[3].density = 0.7;
  methods[3].seed = 11;
  for (const CombineOptions& co : methods) {
    INFO(to_string(co.method));
    TaskAdaptersMlp<T> by_hand = net;  // the same weights and adapters, combined layer by layer below
    const Rng::State gen = pm.rng().state();
    const TaskMergeReport rep = ta.merge_tasks("merged", w, co);
    CHECK(pm.rng().state() == gen);
    CHECK(rep.sources == std::vector<std::string>{"t1", "t2", "t3"});
    CHECK(rep.modules == 2);
    double largest = 0;
    for (LoRALinear<T>* layer : {&by_hand.fc1, &by_hand.fc2}) {
      const CombineResult<T> res = add_combined_adapter(*layer, "merged", {"t1", "t2", "t3"}, w, co);
      largest = std::max(largest, res.frobenius_error);
    }
    CHECK(rep.largest_error == largest);
    if (co.method == CombineMethod::Svd) CHECK(rep.largest_error > 0);
    CHECK(net.fc1.delta_weight("merged") == by_hand.fc1.delta_weight("merged"));
    CHECK(net.fc2.delta_weight("merged") == by_hand.fc2.delta_weight("merged"));
    ta.route_adapter("merged");
    Matrix<T> y, y_hand;
    net.forward(x, y);
    by_hand.fc1.set_active("merged");
    by_hand.fc2.set_active("merged");
    by_hand.forward(x, y_hand);
    CHECK(y == y_hand);
    ta.route(3);
    pm.delete_adapter("merged");
  }
  // Two of the three tasks, the others untouched.
  const TaskMergeReport two = ta.merge_tasks("two", {1.0, 1.0}, {}, {1, 3});
  CHECK(two.sources == std::vector<std::string>{"t1", "t3"});
  const Matrix<T> exact = net.fc2.delta_weight("t1") + net.fc2.delta_weight("t3");
  CHECK((net.fc2.delta_weight("two") - exact).norm() <= 1e-12 * exact.norm());

  PEFT_REQUIRE_THROWS_WITH(ta.merge_tasks("x", {1.0}), ConfigError, "1 weights for 3 task adapters");
  PEFT_REQUIRE_THROWS_WITH(ta.merge_tasks("x", {1.0}, {}, {4}), ConfigError, "task 4 has no adapter");
  PEFT_REQUIRE_THROWS_WITH(ta.merge_tasks("two", {1.0, 1.0, 1.0}), ConfigError, "adapter \"two\" already exists");
  PEFT_REQUIRE_THROWS_WITH(ta.add_task(2), ConfigError, "task 2 already has adapter \"t2\"");
  PEFT_REQUIRE_THROWS_WITH(ta.route(-1), ConfigError, "task -1 is negative");
  TaskAdaptersMlp<T> empty_net(rng);
  PeftModel<T> empty_pm(empty_net);
  TaskAdapters<T> none(empty_pm, ta_lora_config());
  PEFT_REQUIRE_THROWS_WITH(none.merge_tasks("x", {}), ConfigError, "there is no task adapter to merge");
  TaskAdapters<T> ia3(empty_pm, io::Json{{"peft_type", "IA3"}, {"target_modules", {"fc1"}}});
  ia3.add_task(0);
  PEFT_REQUIRE_THROWS_WITH(ia3.merge_tasks("x", {1.0}), ConfigError, "has no LoRA-factor form");
}

TEST_CASE("TaskAdapters: shared trainable parameters stay trainable, the rest is frozen",
          "[train][continual][task_adapters]") {
  Rng rng(1416);
  TaskAdaptersMlp<float> net(rng);
  PeftModel<float> pm(net);
  TaskAdaptersOptions opt;
  opt.shared_trainable = {"fc2"};  // fc2's base weight and bias, and (prefix) its adapters
  TaskAdapters<float> ta(pm, io::Json{{"peft_type", "LORA"}, {"r", 2}, {"target_modules", {"fc1"}}}, opt);
  ta.add_task(0);
  ta.add_task(1);
  std::vector<std::string> names;
  for (const auto& np : trainable_parameters(net)) names.push_back(np.name);
  CHECK(names ==
        std::vector<std::string>{"fc1.lora_A.task_1.weight", "fc1.lora_B.task_1.weight", "fc2.weight", "fc2.bias"});
  CHECK_FALSE(net.fc1.weight.trainable());
}
