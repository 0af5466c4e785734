// The `peft` tool, run in-process: every command's output, exit codes, --help, and that failures
// leave nothing behind.
#include "peft_cli.hpp"

#include <peft/io/peft_format.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/merge/analysis.hpp>
#include <peft/merge/combine.hpp>
#include <peft/quant/bnb_format.hpp>

#include <algorithm>
#include <cmath>
#include <iomanip>
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
}  // namespace

TEST_CASE("peft: help and usage errors", "[tools]") {
  CliResult r = run_cli({});
  CHECK(r.code == cli::kUsage);
  CHECK(contains(r.err, "exit codes:"));
  r = run_cli({"--help"});
  CHECK(r.code == cli::kOk);
  for (const char* c : {"inspect", "merge", "combine", "extract", "quantize"}) {
    CHECK(contains(r.out, c));
    const CliResult h = run_cli({c, "--help"});
    CHECK(h.code == cli::kOk);
    CHECK(contains(h.out, std::string("usage: peft ") + c));
  }
  r = run_cli({"frobnicate"});
  CHECK(r.code == cli::kUsage);
  CHECK(contains(r.err, "unknown command \"frobnicate\""));
  r = run_cli({"merge", "--base", "x", "--bogus", "1"});
  CHECK(r.code == cli::kUsage);
  CHECK(contains(r.err, "unknown option --bogus"));
  CHECK(contains(r.err, "usage: peft merge"));
  r = run_cli({"merge", "--base", "x", "--adapter"});
  CHECK(r.code == cli::kUsage);
  CHECK(contains(r.err, "--adapter needs a value"));
  r = run_cli({"merge", "--base", "x", "--adapter", "y"});
  CHECK(r.code == cli::kUsage);
  CHECK(contains(r.err, "missing required option --out"));
  r = run_cli({"merge", "--base=x", "--adapter=y", "--out=z", "--scale=abc"});
  CHECK(r.code == cli::kUsage);
  CHECK(contains(r.err, "--scale needs a finite number"));
  r = run_cli({"extract", "--base", "a", "--tuned", "b", "--out", "c"});
  CHECK(r.code == cli::kUsage);
  CHECK(contains(r.err, "exactly one of --rank K and --energy TAU"));
  r = run_cli({"combine", "--method", "average", "a", "--out", "c"});
  CHECK(r.code == cli::kUsage);
  CHECK(contains(r.err, "unknown --method \"average\""));
}

TEST_CASE("peft inspect: a file and an adapter directory", "[tools]") {
  CliResult r = run_cli({"inspect", data_dir() + "/tiny_base.safetensors"});
  REQUIRE(r.code == cli::kOk);
  CHECK(contains(r.out, "tensors:    9"));
  CHECK(contains(r.out, "parameters: 384 (F32 384)"));
  CHECK(contains(r.out, "format = pt"));
  CHECK(contains(r.out, "[10, 8]"));
  r = run_cli({"inspect", data_dir() + "/tiny_lora"});
  REQUIRE(r.code == cli::kOk);
  CHECK(contains(r.out, "peft_type:  LORA"));
  CHECK(contains(r.out, "unknown config keys (kept): unknown_future_key"));
  CHECK(contains(r.out, "model.layers.1.attn.v"));
  CHECK(contains(r.out, "trainable parameters: 196"));  // 3 modules · 4·14 + 2·14
  {
    // Each module's row: |dW|_F and the effective rank equal analyze_adapter's.
    const PeftAdapter<double> ad = load_peft_adapter<double>(data_dir() + "/tiny_lora");
    std::istringstream lines(r.out);
    std::vector<std::string> rows;
    for (std::string line; std::getline(lines, line);) rows.push_back(line);
    for (const auto& m : ad.lora) {
      const AdapterStats st = analyze_adapter(LoraFactors<double>{m.A, m.B, m.scaling, m.path});
      std::ostringstream norm, eff;
      norm << std::setprecision(5) << st.frobenius_norm;
      eff << std::setprecision(3) << st.effective_rank;
      const std::string suffix = " " + m.path;
      const auto row = std::find_if(rows.begin(), rows.end(), [&](const std::string& l) {
        return l.size() > suffix.size() && l.compare(l.size() - suffix.size(), suffix.size(), suffix) == 0;
      });
      REQUIRE(row != rows.end());
      INFO(*row);
      CHECK(contains(*row, " " + norm.str() + " "));
      CHECK(contains(*row, " " + std::to_string(st.numerical_rank) + " "));
      CHECK(contains(*row, " " + eff.str() + " "));
    }
  }
  r = run_cli({"inspect", data_dir() + "/tiny_prompt"});
  REQUIRE(r.code == cli::kOk);
  CHECK(contains(r.out, "prompt_embeddings: [5, 8] = 40 parameters"));
  r = run_cli({"inspect", data_dir() + "/nope.safetensors"});
  CHECK(r.code == cli::kIo);
  CHECK(contains(r.err, "does not exist"));
}

TEST_CASE("peft merge: equals the torch reference; failures write nothing", "[tools]") {
  TempDir dir;
  const std::string out = dir.path + "/m.safetensors";
  CliResult r = run_cli(
      {"merge", "--base", data_dir() + "/tiny_base.safetensors", "--adapter", data_dir() + "/tiny_lora", "--out", out});
  REQUIRE(r.code == cli::kOk);
  CHECK(contains(r.out, "merged 4 tensors, replaced 0, copied 5"));
  const SafeTensorsFile got(out), want(data_dir() + "/tiny_lora.merged.safetensors");
  for (const auto& t : want.tensors())
    CHECK((got.load<double>(t.name) - want.load<double>(t.name)).cwiseAbs().maxCoeff() < 1e-5);

  // --map: the same adapter against a base whose names lack the "model." prefix.
  const SafeTensorsFile base(data_dir() + "/tiny_base.safetensors");
  std::vector<Matrix<float>> keep;
  std::vector<NamedTensor<float>> renamed;
  keep.reserve(base.tensors().size());
  for (const auto& t : base.tensors()) {
    keep.push_back(base.load<float>(t.name));
    const std::string n = t.name.rfind("model.", 0) == 0 ? "net." + t.name.substr(6) : t.name;
    renamed.emplace_back(n, t.shape, keep.back().data());
  }
  save_safetensors<float>(dir.path + "/renamed.safetensors", renamed);
  r = run_cli(
      {"merge", "--base", dir.path + "/renamed.safetensors", "--adapter", data_dir() + "/tiny_lora", "--out", out});
  CHECK(r.code == cli::kConfig);  // a missing tensor: the wrong base, or a --map is needed
  CHECK(contains(r.err, "configuration error: merge: base \"" + dir.path +
                            "/renamed.safetensors\" has no tensor "
                            "\"model.layers.0.attn.q.weight\" for adapter module \"model.layers.0.attn.q\""));
  CHECK(contains(r.err, "a name mapping is needed"));
  r = run_cli({"merge", "--base", dir.path + "/renamed.safetensors", "--adapter", data_dir() + "/tiny_lora", "--map",
               "model.=net.", "--out", dir.path + "/m2.safetensors"});
  REQUIRE(r.code == cli::kOk);
  CHECK(SafeTensorsFile(dir.path + "/m2.safetensors").load<float>("net.layers.1.attn.v.weight") ==
        got.load<float>("model.layers.1.attn.v.weight"));

  // NaN in the merge → exit 6, nothing written.
  const std::string bad = dir.path + "/bad";
  ::mkdir(bad.c_str(), 0755);
  write_bytes(bad + "/adapter_config.json", raw_file(data_dir() + "/tiny_lora/adapter_config.json"));
  PeftAdapter<float> ad = load_peft_adapter<float>(data_dir() + "/tiny_lora");
  r = run_cli({"merge", "--base", data_dir() + "/tiny_base.safetensors", "--adapter", data_dir() + "/tiny_lora",
               "--scale", "1e38", "--out", dir.path + "/nan.safetensors"});
  CHECK(r.code == cli::kNumeric);
  CHECK(contains(r.err, "NaN or Inf"));
  CHECK(!path_exists(dir.path + "/nan.safetensors"));
  // Broken adapter config → exit 3; unsupported feature → exit 4.
  write_bytes(bad + "/adapter_config.json", R"({"peft_type":"LORA","r":[4]})");
  write_bytes(bad + "/adapter_model.safetensors", raw_file(data_dir() + "/tiny_lora/adapter_model.safetensors"));
  r = run_cli({"merge", "--base", data_dir() + "/tiny_base.safetensors", "--adapter", bad, "--out",
               dir.path + "/x.safetensors"});
  CHECK(r.code == cli::kIo);
  CHECK(contains(r.err, "key \"r\" must be a positive integer"));
  write_bytes(bad + "/adapter_config.json", R"({"peft_type":"LORA","r":4,"lora_bias":true})");
  r = run_cli({"merge", "--base", data_dir() + "/tiny_base.safetensors", "--adapter", bad, "--out",
               dir.path + "/x.safetensors"});
  CHECK(r.code == cli::kConfig);
  // Truncated base → exit 3.
  const std::string whole = raw_file(data_dir() + "/tiny_base.safetensors");
  write_bytes(dir.path + "/trunc.safetensors", whole.substr(0, whole.size() - 7));
  r = run_cli({"merge", "--base", dir.path + "/trunc.safetensors", "--adapter", data_dir() + "/tiny_lora", "--out",
               dir.path + "/x.safetensors"});
  CHECK(r.code == cli::kIo);
  CHECK(contains(r.err, "run past the"));
  CHECK(!path_exists(dir.path + "/x.safetensors"));
  const auto entries = dir.entries();
  for (const auto& e : entries) CHECK(e.find(".tmp-") == std::string::npos);
}

TEST_CASE("peft combine and extract: adapters that PEFT can load, equal to the math", "[tools]") {
  TempDir dir;
  const std::string a = data_dir() + "/tiny_lora";
  // Two rank-4 adapters on [6, 8] layers: Σ r = 8 > min(out, in) = 6 is legal (as in PEFT), exact
  // but wasteful, so cat warns on stderr through the library's warning sink.
  CliResult r = run_cli({"combine", "--method", "cat", "--weights", "0.5,2", a, a, "--out", dir.path + "/cat8"});
  REQUIRE(r.code == cli::kOk);
  CHECK(contains(r.err, "warning: "));
  CHECK(contains(r.err, "exceeds min(out, in) = 6"));
  CHECK(load_peft_adapter<double>(dir.path + "/cat8").config.r == 8);
  r = run_cli({"combine", "--method", "cat", "--weights", "2.5", a, "--out", dir.path + "/cat"});
  REQUIRE(r.code == cli::kOk);
  const PeftAdapter<double> src = load_peft_adapter<double>(a);
  const PeftAdapter<double> cat = load_peft_adapter<double>(dir.path + "/cat");
  CHECK(cat.config.r == 4);
  CHECK(cat.config.rank_pattern.size() == 1);  // layer 1's v keeps rank 2
  for (const auto& m : src.lora) {
    const auto* c = cat.find(m.path);
    REQUIRE(c != nullptr);
    CHECK(c->rank() == m.rank());
    CHECK(c->scaling == 1.0);
    const Matrix<double> expect = 2.5 * m.scaling * m.B * m.A;
    CHECK(test::rel_diff(Matrix<double>(c->B * c->A), expect) < 1e-6);
  }
  // svd to rank 4: Σ w_i ΔW = 2 ΔW has rank ≤ 4, so the re-compression is exact.
  r = run_cli({"combine", "--method", "svd", "--rank", "4", a, a, "--out", dir.path + "/svd"});
  REQUIRE(r.code == cli::kOk);
  const PeftAdapter<double> svd = load_peft_adapter<double>(dir.path + "/svd");
  for (const auto& m : src.lora) {
    const auto* c = svd.find(m.path);
    REQUIRE(c != nullptr);
    CHECK(c->rank() == 4);
    CHECK(test::rel_diff(Matrix<double>(c->scaling * c->B * c->A), Matrix<double>(2.0 * m.scaling * m.B * m.A)) < 1e-6);
  }
  // The dense methods: the CLI's adapter equals the library's combine() on the same factors (so
  // --weights, --rank, --density, --seed and --majority-sign reach it).
  for (const char* method : {"linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"}) {
    INFO(method);
    const std::string out = dir.path + "/" + method;
    r = run_cli({"combine", "--method", method, "--weights", "0.7,-0.4", "--rank", "3", "--density", "0.6", "--seed",
                 "5", "--majority-sign", "frequency", a, a, "--out", out});
    REQUIRE(r.code == cli::kOk);
    const PeftAdapter<double> got = load_peft_adapter<double>(out);
    CombineOptions opt;
    parse_combine_method(method, opt.method);
    opt.rank = 3;
    opt.density = 0.6;
    opt.seed = 5;
    opt.majority_sign = MajoritySign::Frequency;
    for (const auto& m : src.lora) {
      const LoraFactors<double> f{m.A, m.B, m.scaling, m.path};
      const CombineResult<double> want = combine(std::vector<LoraFactors<double>>{f, f}, {0.7, -0.4}, opt);
      const auto* c = got.find(m.path);
      REQUIRE(c != nullptr);
      CHECK(test::rel_diff(Matrix<double>(c->scaling * c->B * c->A), want.factors.delta()) < 1e-6);
    }
  }
  // An adapter with full tensors (modules_to_save) is refused rather than silently dropped.
  PeftAdapter<double> with_head = src;
  with_head.full.push_back({"classifier.weight", {2, 8}, Matrix<double>::Ones(2, 8)});
  save_peft_adapter(dir.path + "/head", with_head);
  r = run_cli({"combine", "--method", "linear", a, dir.path + "/head", "--out", dir.path + "/dropped"});
  CHECK(r.code == cli::kConfig);
  CHECK(contains(r.err, "also holds 1 full tensors (modules_to_save, e.g. \"classifier.weight\")"));
  CHECK(!path_exists(dir.path + "/dropped"));
  r = run_cli({"combine", "--method", "cat", a, data_dir() + "/tiny_dora", "--out", dir.path + "/bad"});
  CHECK(r.code == cli::kConfig);
  CHECK(contains(r.err, "DoRA"));
  CHECK(!path_exists(dir.path + "/bad"));

  // extract: tuned = the merged fixture; rank 4 recovers ΔW (rank ≤ 4) exactly up to float storage.
  r = run_cli({"extract", "--base", data_dir() + "/tiny_base.safetensors", "--tuned",
               data_dir() + "/tiny_lora.merged.safetensors", "--rank", "4", "--out", dir.path + "/ex"});
  REQUIRE(r.code == cli::kOk);
  const PeftAdapter<double> ex = load_peft_adapter<double>(dir.path + "/ex");
  CHECK(ex.lora.size() == 4);
  for (const auto& m : src.lora) {
    const auto* e = ex.find(m.path);
    REQUIRE(e != nullptr);
    const Matrix<double> expect = m.scaling * m.B * m.A;
    CHECK(test::rel_diff(Matrix<double>(e->scaling * e->B * e->A), expect) < 1e-5);
  }
  r = run_cli({"extract", "--base", data_dir() + "/tiny_base.safetensors", "--tuned", data_dir() + "/small.safetensors",
               "--rank", "2", "--out", dir.path + "/ex2"});
  CHECK(r.code == cli::kConfig);  // the two files hold different tensors
  CHECK(contains(r.err, "has no tensor"));
  CHECK(!path_exists(dir.path + "/ex2"));
}

TEST_CASE("peft extract: embeddings, biases and norms; fan_in_fan_out; merge gives the tuned model back", "[tools]") {
  TempDir dir;
  Rng rng(12);
  const Matrix<float> emb0 = test::random_matrix<float>(10, 8, rng), q0 = test::random_matrix<float>(6, 8, rng);
  const Matrix<float> b0 = test::random_matrix<float>(1, 6, rng), n0 = test::random_matrix<float>(1, 8, rng);
  const Matrix<float> k0 = test::random_matrix<float>(6, 8, rng);  // unchanged
  const Matrix<float> delta = test::random_matrix<float>(6, 2, rng) * test::random_matrix<float>(2, 8, rng);  // rank 2
  const Matrix<float> emb1 = emb0 + test::random_matrix<float>(10, 8, rng, 0.1), q1 = q0 + delta;
  const Matrix<float> b1 = (b0.array() + 0.5f).matrix(), n1 = (n0.array() * 1.5f).matrix();
  const auto save = [&](const std::string& path, const Matrix<float>& e, const Matrix<float>& q, const Matrix<float>& b,
                        const Matrix<float>& n, bool fan) {
    const Matrix<float> qs = fan ? Matrix<float>(q.transpose()) : q, ks = fan ? Matrix<float>(k0.transpose()) : k0;
    save_safetensors<float>(path, {{"model.embed_tokens.weight", {10, 8}, e.data(), DType::F32},
                                   {"model.layers.0.q.weight", {qs.rows(), qs.cols()}, qs.data(), DType::F32},
                                   {"model.layers.0.q.bias", {6}, b.data(), DType::F32},
                                   {"model.layers.0.k.weight", {ks.rows(), ks.cols()}, ks.data(), DType::F32},
                                   {"model.layers.0.norm.weight", {8}, n.data(), DType::F32}});
  };
  save(dir.path + "/base.safetensors", emb0, q0, b0, n0, false);
  save(dir.path + "/tuned.safetensors", emb1, q1, b1, n1, false);
  const std::string base = dir.path + "/base.safetensors", tuned = dir.path + "/tuned.safetensors";

  // By default only q becomes low rank; the embedding (another LoRA layout in PEFT), the bias and
  // the norm are named as not captured.
  CliResult r = run_cli({"extract", "--base", base, "--tuned", tuned, "--rank", "2", "--out", dir.path + "/lowrank"});
  REQUIRE(r.code == cli::kOk);
  CHECK(contains(r.out, "model.layers.0.q: rank 2"));
  CHECK(contains(r.out, "note: 3 changed tensors are not captured"));
  CHECK(contains(r.out, "model.embed_tokens.weight"));
  const PeftAdapter<double> lowrank = load_peft_adapter<double>(dir.path + "/lowrank");
  REQUIRE(lowrank.lora.size() == 1);
  CHECK(lowrank.full.empty());

  // --keep-full: the rest is saved whole (bias as lora_only, embedding and norm as modules_to_save),
  // and merging the adapter into the base reproduces the tuned file.
  r = run_cli({"extract", "--base", base, "--tuned", tuned, "--rank", "2", "--keep-full", "--out", dir.path + "/full"});
  REQUIRE(r.code == cli::kOk);
  CHECK(contains(r.out, "kept 3 changed tensors whole"));
  const PeftAdapter<double> full = load_peft_adapter<double>(dir.path + "/full");
  CHECK(full.config.bias == "lora_only");
  CHECK(full.config.modules_to_save == std::vector<std::string>{"model.embed_tokens", "model.layers.0.norm"});
  CHECK(full.full.size() == 3);
  r = run_cli({"merge", "--base", base, "--adapter", dir.path + "/full", "--out", dir.path + "/merged.safetensors"});
  REQUIRE(r.code == cli::kOk);
  const SafeTensorsFile merged(dir.path + "/merged.safetensors"), want(tuned);
  for (const TensorInfo& t : want.tensors()) {
    INFO(t.name);
    CHECK(test::rel_diff(merged.load<double>(t.name), want.load<double>(t.name)) < 1e-5);
  }

  // GPT-2 Conv1D layout: weights stored [in, out]; the adapter says fan_in_fan_out and merges back.
  save(dir.path + "/base_t.safetensors", emb0, q0, b0, n0, true);
  save(dir.path + "/tuned_t.safetensors", emb0, q1, b0, n0, true);
  r = run_cli({"extract", "--base", dir.path + "/base_t.safetensors", "--tuned", dir.path + "/tuned_t.safetensors",
               "--rank", "2", "--fan-in-fan-out", "--out", dir.path + "/conv1d"});
  REQUIRE(r.code == cli::kOk);
  const PeftAdapter<double> conv = load_peft_adapter<double>(dir.path + "/conv1d");
  CHECK(conv.config.fan_in_fan_out);
  REQUIRE(conv.lora.size() == 1);
  CHECK(conv.lora[0].A.cols() == 8);  // A [r, in], B [out, r] as for any PEFT LoRA
  CHECK(conv.lora[0].B.rows() == 6);
  CHECK(test::rel_diff(Matrix<double>(conv.lora[0].B * conv.lora[0].A), delta.cast<double>()) < 1e-5);
  r = run_cli({"merge", "--base", dir.path + "/base_t.safetensors", "--adapter", dir.path + "/conv1d", "--out",
               dir.path + "/merged_t.safetensors"});
  REQUIRE(r.code == cli::kOk);
  CHECK(test::rel_diff(SafeTensorsFile(dir.path + "/merged_t.safetensors").load<double>("model.layers.0.q.weight"),
                       Matrix<double>(q1.transpose().cast<double>())) < 1e-5);

  // Bad values are usage errors; nothing is written.
  r = run_cli({"extract", "--base", base, "--tuned", tuned, "--rank", "-1", "--out", dir.path + "/neg"});
  CHECK(r.code == cli::kUsage);
  CHECK(contains(r.err, "--rank must be > 0, got -1"));
  r = run_cli(
      {"extract", "--base", base, "--tuned", tuned, "--rank", "2", "--exclude", ".*", "--out", dir.path + "/none"});
  CHECK(r.code == cli::kConfig);
  CHECK(contains(r.err, "outside --exclude"));
  CHECK(!path_exists(dir.path + "/neg"));
  CHECK(!path_exists(dir.path + "/none"));
}

TEST_CASE("peft quantize: NF4 weights in the bitsandbytes layout, other tensors copied", "[tools][quant]") {
  TempDir dir;
  const std::string src = data_dir() + "/tiny_base.safetensors", dst = dir.path + "/q.safetensors";
  CliResult r = run_cli({"quantize", src, "--out", dst, "--blocksize", "64"});
  REQUIRE(r.code == cli::kOk);
  CHECK(contains(r.out, "weights to NF4 + double quantization (blocksize 64)"));
  CHECK(contains(r.out, " bits per parameter)"));
  const SafeTensorsFile in(src), out(dst);
  const std::vector<std::string> prefixes = quant::bnb_4bit_prefixes(out);
  REQUIRE(!prefixes.empty());
  for (const std::string& p : prefixes) {
    // Each quantized weight decodes to within NF4's error bound of the original.
    const quant::NF4Tensor q = quant::read_bnb_nf4(out, p);
    const Matrix<float> w = in.load<float>(p + ".weight");
    const Matrix<float> deq = quant::dequantize_nf4<float>(q);
    REQUIRE(deq.rows() == w.rows());
    REQUIRE(deq.cols() == w.cols());
    CHECK((deq - w).cwiseAbs().maxCoeff() <= 0.2f * w.cwiseAbs().maxCoeff());
  }
  for (const auto& t : in.tensors())  // everything not quantized is still there, unchanged
    if (std::find(prefixes.begin(), prefixes.end(), t.name.substr(0, t.name.rfind('.'))) == prefixes.end())
      CHECK(out.load<double>(t.name) == in.load<double>(t.name));

  r = run_cli({"quantize", src, "--out", dir.path + "/x.safetensors", "--blocksize", "0"});
  CHECK(r.code == cli::kUsage);
  CHECK(contains(r.err, "--blocksize must be in [1, 1048576], got 0"));
  r = run_cli({"quantize", dir.path + "/missing.safetensors", "--out", dir.path + "/x.safetensors"});
  CHECK(r.code == cli::kIo);
  r = run_cli({"quantize", src, "--out", dir.path + "/x.safetensors", "--include", "("});
  CHECK(r.code == cli::kConfig);
  CHECK(!std::ifstream(dir.path + "/x.safetensors").good());
}
