// `peft combine` and `peft extract` on inputs whose result overflows: they exit kNumeric (6), name
// the module or tensor, and write nothing (no --out, and an existing --out left as it was).
#include "peft_cli.hpp"

#include <sys/stat.h>

#include <peft/io/file.hpp>
#include <peft/io/peft_format.hpp>
#include <peft/io/safetensors.hpp>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "../io/io_test_utils.hpp"
#include "cli_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::data_dir;
using peft::test::io::raw_file;
using peft::test::io::TempDir;
using peft::test::io::write_bytes;

namespace {

using peft::test::cli::CliResult;
using peft::test::cli::contains;
using peft::test::cli::run_cli;

/// A copy of the adapter directory `src` as `dst`, with the config's lora_alpha (16) and the
/// alpha_pattern entry of q (8) both set to `alpha`.
void copy_adapter_with_alpha(const std::string& src, const std::string& dst, const std::string& alpha) {
  REQUIRE(::mkdir(dst.c_str(), 0755) == 0);
  write_bytes(dst + "/adapter_model.safetensors", raw_file(src + "/adapter_model.safetensors"));
  std::string cfg = raw_file(src + "/adapter_config.json");
  for (const std::string& from : {std::string("\"lora_alpha\": 16"), std::string("\"q\": 8")}) {
    const std::size_t at = cfg.find(from);
    REQUIRE(at != std::string::npos);
    cfg.replace(at, from.size(), from.substr(0, from.find(':') + 2) + alpha);
  }
  write_bytes(dst + "/adapter_config.json", cfg);
}

/// Runs a command that must fail with kNumeric and checks that it wrote nothing at `out`: neither a
/// new path nor a change to an existing directory (whose one file "keep.txt" must survive as is).
void require_numeric_and_nothing_written(const TempDir& dir, const std::vector<std::string>& args,
                                         const std::string& name, const std::vector<std::string>& needles) {
  const std::string out = dir.file(name);
  CliResult r = run_cli(args);
  INFO("stderr: " << r.err);
  CHECK(r.code == cli::kNumeric);
  CHECK(contains(r.err, "numeric error"));
  for (const auto& n : needles) CHECK(contains(r.err, n));
  CHECK_FALSE(path_exists(out));

  // The same command over an existing --out directory leaves it untouched.
  REQUIRE(::mkdir(out.c_str(), 0755) == 0);
  write_bytes(out + "/keep.txt", "precious");
  r = run_cli(args);
  CHECK(r.code == cli::kNumeric);
  CHECK(dir.entries(name) == std::vector<std::string>{"keep.txt"});
  CHECK(raw_file(out + "/keep.txt") == "precious");
  peft::io::detail::remove_tree(out);
}

}  // namespace

TEST_CASE("peft combine: a huge lora_alpha is refused by every method, exit 6, nothing written", "[tools][numeric]") {
  TempDir dir;
  const std::string a = data_dir() + "/tiny_lora", huge = dir.path + "/huge";
  // lora_alpha 1e300 (and q's alpha_pattern 8 → 1e300): s = 2.5e299 is finite, but with the
  // weights w·s = 2.5e309 overflows double for every module.
  copy_adapter_with_alpha(a, huge, "1e300");
  for (const char* method : {"cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}) {
    INFO(method);
    const std::string name = std::string("out_") + method, out = dir.file(name);
    std::vector<std::string> args = {"combine", "--method", method, "--weights", "1e10,1e10", huge, a, "--out", out};
    if (std::string(method) != "cat") {
      args.insert(args.end(), {"--density", "0.5"});
    } else {
      args = {"combine", "--method", method, "--weights", "1e10", huge, "--out", out};
    }
    require_numeric_and_nothing_written(dir, args, name, {std::string("combine (") + method + ")", "layers.0.attn."});
  }
}

TEST_CASE("peft combine: svd and linear of a huge lora_alpha overflow inside the SVD, exit 6", "[tools][numeric]") {
  // Unit weights: every input, scaling and w·s is finite; the stacked factors and deltas (≈ 1e299)
  // are too, but the norms inside the SVD and Σ σ² are not. Before the fix: exit 0, NaN tensors and
  // "largest truncation error ... = 0".
  TempDir dir;
  const std::string a = data_dir() + "/tiny_lora", huge = dir.path + "/huge";
  copy_adapter_with_alpha(a, huge, "1e300");
  for (const char* method : {"svd", "linear"}) {
    INFO(method);
    const std::string name = std::string("out_") + method;
    require_numeric_and_nothing_written(
        dir, {"combine", "--method", method, "--rank", "2", huge, huge, "--out", dir.file(name)}, name,
        {std::string("combine (") + method + ")", "is not finite"});
  }
}

TEST_CASE("peft extract: a difference that overflows is refused, exit 6, nothing written", "[tools][numeric]") {
  TempDir dir;
  Rng rng(3);
  const Matrix<double> k = test::random_matrix<double>(6, 8, rng);
  SECTION("F64 weights near ±max") {
    Matrix<double> q0 = test::random_matrix<double>(6, 8, rng), q1 = q0;
    const double big = 0.9 * std::numeric_limits<double>::max();
    q0(2, 3) = big;
    q1(2, 3) = -big;  // q1 − q0 = −1.8·max: −Inf in double
    q1(0, 0) += 1.0;
    save_safetensors<double>(dir.file("base.safetensors"), {{"model.q.weight", {6, 8}, q0.data(), DType::F64},
                                                            {"model.k.weight", {6, 8}, k.data(), DType::F64}});
    save_safetensors<double>(dir.file("tuned.safetensors"), {{"model.q.weight", {6, 8}, q1.data(), DType::F64},
                                                             {"model.k.weight", {6, 8}, k.data(), DType::F64}});
    require_numeric_and_nothing_written(dir,
                                        {"extract", "--base", dir.file("base.safetensors"), "--tuned",
                                         dir.file("tuned.safetensors"), "--rank", "2", "--out", dir.file("ex")},
                                        "ex", {"the difference W_ft − W_0 overflows"});
  }
  SECTION("F32 weights ±3e38 of opposite signs in every entry") {
    // ΔW = −6e38 overflows float but not double, where the CLI computes: then the adapter must be
    // exact (rank 1), never all zero with a zero error; a refusal (exit 6, nothing written) is the
    // only other acceptable outcome.
    Matrix<float> q0 = Matrix<float>::Constant(6, 8, 3e38f), q1 = Matrix<float>::Constant(6, 8, -3e38f);
    const Matrix<float> kf = k.cast<float>();
    save_safetensors<float>(dir.file("base32.safetensors"), {{"model.q.weight", {6, 8}, q0.data(), DType::F32},
                                                             {"model.k.weight", {6, 8}, kf.data(), DType::F32}});
    save_safetensors<float>(dir.file("tuned32.safetensors"), {{"model.q.weight", {6, 8}, q1.data(), DType::F32},
                                                              {"model.k.weight", {6, 8}, kf.data(), DType::F32}});
    const std::string out = dir.path + "/ex32";
    const CliResult r = run_cli({"extract", "--base", dir.file("base32.safetensors"), "--tuned",
                                 dir.file("tuned32.safetensors"), "--rank", "1", "--out", out});
    INFO("stdout: " << r.out << "\nstderr: " << r.err);
    if (r.code == cli::kOk) {
      // ΔW = −6e38 everywhere is rank 1 and finite in double: then the adapter must reproduce it,
      // never come out all zero with a zero error.
      const PeftAdapter<double> ad = load_peft_adapter<double>(out);
      REQUIRE(ad.lora.size() == 1);
      const Matrix<double> d = ad.lora[0].scaling * ad.lora[0].B * ad.lora[0].A;
      CHECK(d.allFinite());
      CHECK(std::abs(d(0, 0) + 6e38) < 1e-6 * 6e38);
      CHECK(std::abs(d(5, 7) + 6e38) < 1e-6 * 6e38);
    } else {
      CHECK(r.code == cli::kNumeric);
      CHECK_FALSE(path_exists(out));
    }
  }
}
