// ModulesToSave<T, M> (layers/modules_to_save.hpp): PEFT's ModulesToSaveWrapper as a host type.
#include <peft/layers/linear.hpp>
#include <peft/layers/modules_to_save.hpp>

#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

namespace {

template <class T>
std::vector<std::string> mts_names(Module<T>& m) {
  std::vector<std::string> out;
  m.visit_parameters([&](const std::string& n, Parameter<T>&) { out.push_back(n); });
  return out;
}

/// A model holding one host at "head".
template <class T>
class MtsModel : public Module<T> {
 public:
  explicit MtsModel(Rng& rng) : head(Linear<T>(4, 2, rng)) { this->set_name("net"); }
  ModulesToSave<T, Linear<T>> head;

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override { fn("head", head); }
};

}  // namespace

TEMPLATE_TEST_CASE("ModulesToSave: names, copies, active module and trainable flags", "[modules_to_save]", float,
                   double) {
  using T = TestType;
  Rng rng(11);
  MtsModel<T> m(rng);
  // No copy: the original's own names (a pretrained base loads unchanged), flags untouched.
  CHECK(mts_names(m) == std::vector<std::string>{"head.weight", "head.bias"});
  CHECK(m.head.original().name() == "net.head");
  CHECK(&m.head.active() == &m.head.original());
  CHECK(m.head.original().weight.trainable());
  CHECK(modules_to_save_hosts(m).size() == 1);

  m.head.add_copy("a");
  CHECK(m.head.active_copy() == "a");
  CHECK(&m.head.active() == &m.head.copy("a"));
  CHECK(mts_names(m) == std::vector<std::string>{"head.original_module.weight", "head.original_module.bias",
                                                 "head.modules_to_save.a.weight", "head.modules_to_save.a.bias"});
  CHECK(m.head.copy("a").name() == "net.head.modules_to_save.a");
  CHECK_FALSE(m.head.original().weight.trainable());
  CHECK(m.head.copy("a").weight.trainable());
  m.head.copy("a").weight.value.setConstant(T(2));
  m.head.add_copy("b");  // a copy of the original, not of a's copy
  CHECK(m.head.copy("b").weight.value == m.head.original().weight.value);
  CHECK(m.head.names() == std::vector<std::string>{"a", "b"});
  CHECK_FALSE(m.head.copy("a").weight.trainable());
  m.head.set_active("a");
  CHECK(m.head.copy("a").weight.trainable());
  CHECK_FALSE(m.head.copy("b").weight.trainable());
  m.head.set_active("");  // none: the original is used
  CHECK(&m.head.active() == &m.head.original());
  m.head.set_active("a");
  m.head.disable();
  CHECK(&m.head.active() == &m.head.original());
  m.head.disable(false);
  CHECK(&m.head.active() == &m.head.copy("a"));

  // Forward goes through the active copy.
  const Matrix<T> x = Matrix<T>::Ones(3, 4);
  typename Linear<T>::Cache c;
  const Matrix<T> y = m.head.forward(x, c);
  CHECK(y == m.head.copy("a").forward(x, c));

  PEFT_REQUIRE_THROWS_WITH(m.head.add_copy("a"), ConfigError, "ModulesToSave \"net.head\": adapter \"a\" already has");
  PEFT_REQUIRE_THROWS_WITH(m.head.copy("zz"), ConfigError, "adapter \"zz\" has no copy (copies: \"a\", \"b\")");
  PEFT_REQUIRE_THROWS_WITH(m.head.add_copy("x.y"), ConfigError, "must not contain '.'");

  // File names: this adapter's copy under the module's own name, nothing of the others.
  const auto hosts = modules_to_save_hosts(m);
  std::string saved;
  REQUIRE(saved_tensor_name(hosts, "head.modules_to_save.a.weight", "a", &saved));
  CHECK(saved == "head.weight");
  CHECK_FALSE(saved_tensor_name(hosts, "head.modules_to_save.b.weight", "a", &saved));
  CHECK_FALSE(saved_tensor_name(hosts, "head.original_module.weight", "a", &saved));
  REQUIRE(saved_tensor_name(hosts, "other.weight", "a", &saved));
  CHECK(saved == "other.weight");

  // Copies and moves keep every copy, deep.
  MtsModel<T> copy = m;
  CHECK(mts_names(copy) == mts_names(m));
  CHECK(&copy.head.active() == &copy.head.copy("a"));
  copy.head.copy("a").weight.value.setZero();
  CHECK(m.head.copy("a").weight.value(0, 0) == T(2));
  MtsModel<T> moved = std::move(copy);
  CHECK(moved.head.copy("a").weight.value(0, 0) == T(0));
  CHECK(moved.head.names() == std::vector<std::string>{"a", "b"});

  m.head.delete_copy("a");
  CHECK(m.head.active_copy().empty());
  CHECK(&m.head.active() == &m.head.original());
  m.head.set_active("b");
  m.head.unload();  // merge_and_unload: the active copy becomes the module
  CHECK(m.head.num_copies() == 0);
  CHECK(mts_names(m) == std::vector<std::string>{"head.weight", "head.bias"});
  CHECK(m.head.original().name() == "net.head");
}
