// warnings.hpp: the library's one warning sink (silent by default, a settable handler, a scoped guard).
#include <peft/core/warnings.hpp>

#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("warn is silent without a handler and reaches the installed one", "[warnings]") {
  const WarningHandler before = set_warning_handler(nullptr);  // the default: no handler
  warn("nobody listens");                                      // dropped, no crash
  std::vector<std::string> seen;
  const WarningHandler none = set_warning_handler([&](const std::string& m) { seen.push_back(m); });
  CHECK(!none);  // returns the previous handler (here: none)
  warn("LoRALinear \"q\": first");
  warn("second");
  CHECK(seen == std::vector<std::string>{"LoRALinear \"q\": first", "second"});
  CHECK(static_cast<bool>(warning_handler()));
  const WarningHandler mine = set_warning_handler(before);  // gives back ours, restores the old one
  REQUIRE(static_cast<bool>(mine));
  mine("direct");
  CHECK(seen.size() == 3);
  warn("after restore");
  CHECK(seen.size() == 3);
}

TEST_CASE("ScopedWarningHandler installs for a scope and restores the previous handler", "[warnings]") {
  std::vector<std::string> outer, inner;
  const ScopedWarningHandler o([&](const std::string& m) { outer.push_back(m); });
  warn("a");
  {
    const ScopedWarningHandler i([&](const std::string& m) { inner.push_back(m); });
    warn("b");
    {
      const ScopedWarningHandler silent(nullptr);  // an empty handler silences a scope
      warn("c");
    }
    warn("d");
  }
  warn("e");
  CHECK(outer == std::vector<std::string>{"a", "e"});
  CHECK(inner == std::vector<std::string>{"b", "d"});
}

TEST_CASE("a handler may itself warn or swap handlers (no deadlock)", "[warnings]") {
  std::vector<std::string> seen;
  const ScopedWarningHandler outer([&](const std::string& m) { seen.push_back(m); });
  {
    const ScopedWarningHandler relay([&](const std::string& m) {
      const ScopedWarningHandler sink([&](const std::string& x) { seen.push_back("relayed " + x); });
      warn(m);
    });
    warn("x");
  }
  CHECK(seen == std::vector<std::string>{"relayed x"});
  CHECK(static_cast<bool>(stderr_warning_handler()));  // the CLI's and the examples' printer exists
}
