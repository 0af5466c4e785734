// `peft inspect`, `peft merge` and `peft combine` on adapter directories of the table's methods
// (VeRA, LoHa, LoKr, (IA)³) written by Hugging Face PEFT 0.21.2 (tests/data/methods): the merged
// file equals PEFT's merge_and_unload (base + get_delta_weight, or (IA)³'s scaled weights and
// biases); the combined LoRA adapter's update is the weighted sum of PEFT's deltas.
#include "peft_cli.hpp"

#include <peft/io/peft_format.hpp>
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

TEST_CASE("peft combine: VeRA, LoHa and LoKr directories written by PEFT, refusing (IA)^3", "[tools][methods]") {
  using peft::test::cli::contains;
  using peft::test::cli::run_cli;
  peft::test::io::TempDir dir;
  const std::string m = cli_methods::methods_dir(), base = m + "/base.safetensors";
  // linear of 2·VeRA − LoHa + 0.5·LoKr: the result's s·B·A is that sum of PEFT's own deltas.
  const std::string out = dir.path + "/combined";
  auto r = run_cli({"combine", "--method", "linear", "--weights", "2,-1,0.5", "--base", base, m + "/vera", m + "/loha",
                    m + "/lokr", "--out", out});
  REQUIRE(r.code == cli::kOk);
  CHECK(contains(r.out, "combined 3 adapters (linear) over 4 modules -> " + out));
  const io::PeftAdapter<double> got = io::load_peft_adapter<double>(out);
  const io::SafeTensorsFile vera(m + "/vera/expected.safetensors"), loha(m + "/loha/expected.safetensors"),
      lokr(m + "/lokr/expected.safetensors");
  for (const char* p : cli_methods::kPaths) {
    INFO(p);
    const std::string key = "delta." + std::string(p);
    const Matrix<double> want = 2.0 * vera.load<double>(key) - loha.load<double>(key) + 0.5 * lokr.load<double>(key);
    const io::LoraModuleWeights<double>* c = got.find(p);
    REQUIRE(c != nullptr);
    CHECK((c->scaling * c->B * c->A - want).cwiseAbs().maxCoeff() < 1e-5);
  }
  // VeRA alone: its modules' input sizes come from --base; without it, exit 4 saying so.
  r = run_cli({"combine", "--method", "svd", "--base", base, m + "/vera", "--out", dir.path + "/vera"});
  REQUIRE(r.code == cli::kOk);
  r = run_cli({"combine", "--method", "svd", m + "/vera", m + "/vera", "--out", dir.path + "/nobase"});
  CHECK(r.code == cli::kConfig);
  CHECK(contains(r.err, "its input size is not stored in the adapter directory"));
  CHECK(contains(r.err, "--base"));
  CHECK_FALSE(peft::io::path_exists(dir.path + "/nobase"));
  // (IA)^3 is a scaling, not an additive delta: refused by name.
  r = run_cli({"combine", "--method", "linear", m + "/loha", m + "/ia3", "--out", dir.path + "/ia3"});
  CHECK(r.code == cli::kConfig);
  CHECK(contains(r.err, "is an (IA)^3 adapter: it scales the base weight's rows or columns"));
  CHECK_FALSE(peft::io::path_exists(dir.path + "/ia3"));
  // A LoRA adapter of other modules does not match.
  r = run_cli({"combine", "--method", "linear", m + "/loha", peft::test::io::data_dir() + "/tiny_lora", "--out",
               dir.path + "/mixed"});
  CHECK(r.code == cli::kConfig);
  CHECK(contains(r.err, "has no module"));
  CHECK_FALSE(peft::io::path_exists(dir.path + "/mixed"));
}
