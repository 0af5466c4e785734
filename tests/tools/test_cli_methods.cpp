// `peft inspect` and `peft merge` on adapter directories of the table's methods (VeRA, LoHa, LoKr,
// (IA)³) written by Hugging Face PEFT 0.21.2 (tests/data/methods): the merged file equals PEFT's
// merge_and_unload (base + get_delta_weight, or (IA)³'s scaled weights and biases).
#include "peft_cli.hpp"

#include <peft/io/safetensors.hpp>

#include <string>
#include <vector>

#include "../io/io_test_utils.hpp"
#include "cli_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;

namespace cli_methods {

std::string methods_dir() { return peft::test::io::data_dir() + "/methods"; }

const char* const kPaths[] = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                              "model.layers.0.mlp.fc1", "model.layers.0.mlp.fc2"};

}  // namespace cli_methods

TEST_CASE("peft inspect and merge: VeRA, LoHa, LoKr and (IA)^3 directories written by PEFT", "[tools][methods]") {
  using peft::test::cli::contains;
  using peft::test::cli::run_cli;
  peft::test::io::TempDir dir;
  const std::string base = cli_methods::methods_dir() + "/base.safetensors";
  for (const std::string c : {"vera", "loha", "lokr", "lokr_decompose_both", "ia3"}) {
    INFO("case " << c);
    const std::string adapter = cli_methods::methods_dir() + "/" + c;
    auto r = run_cli({"inspect", adapter});
    REQUIRE(r.code == cli::kOk);
    CHECK(contains(r.out, "modules:    4"));
    CHECK(contains(r.out, "model.layers.0.mlp.fc1"));
    const std::string out = dir.path + "/" + c + ".safetensors";
    r = run_cli({"merge", "--base", base, "--adapter", adapter, "--out", out});
    REQUIRE(r.code == cli::kOk);
    const io::SafeTensorsFile got(out), b(base), want(adapter + "/expected.safetensors");
    for (const char* p : cli_methods::kPaths) {
      const std::string w = std::string(p) + ".weight", bias = std::string(p) + ".bias";
      INFO(w);
      if (want.contains("delta." + std::string(p))) {
        const Matrix<double> expected = b.load<double>(w) + want.load<double>("delta." + std::string(p));
        CHECK((got.load<double>(w) - expected).cwiseAbs().maxCoeff() < 2e-6);
        CHECK(got.load<double>(bias) == b.load<double>(bias));
      } else {
        CHECK((got.load<double>(w) - want.load<double>("merged." + w)).cwiseAbs().maxCoeff() < 2e-6);
        const Matrix<double> eb =
            want.contains("merged." + bias) ? want.load<double>("merged." + bias) : b.load<double>(bias);
        CHECK((got.load<double>(bias) - eb).cwiseAbs().maxCoeff() < 2e-6);
      }
    }
  }
  const auto bad = run_cli({"merge", "--base", base, "--adapter", cli_methods::methods_dir() + "/vera_noproj", "--out",
                            dir.path + "/x.safetensors"});
  CHECK(bad.code != cli::kOk);
  CHECK(contains(bad.err, "save_projection=false"));
  CHECK_FALSE(peft::io::path_exists(dir.path + "/x.safetensors"));
}
