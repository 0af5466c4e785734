// io/extract_adapter.hpp without the CLI: which changed tensors become LoRA, which are kept whole
// (bias = "lora_only", modules_to_save) or reported, fan_in_fan_out, the report, and refusals that
// write nothing.
#include <peft/io/extract_adapter.hpp>
#include <peft/io/merge_file.hpp>

#include <string>
#include <vector>

#include "io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::TempDir;

namespace extract_adapter_test {

struct Pair {
  Matrix<float> emb0, q0, b0, n0, k0, delta, emb1, q1, b1, n1;
  explicit Pair(std::uint64_t seed) {
    Rng rng(seed);
    emb0 = test::random_matrix<float>(10, 8, rng);
    q0 = test::random_matrix<float>(6, 8, rng);
    b0 = test::random_matrix<float>(1, 6, rng);
    n0 = test::random_matrix<float>(1, 8, rng);
    k0 = test::random_matrix<float>(6, 8, rng);
    delta = test::random_matrix<float>(6, 2, rng) * test::random_matrix<float>(2, 8, rng);  // rank 2
    emb1 = emb0 + test::random_matrix<float>(10, 8, rng, 0.1);
    q1 = q0 + delta;
    b1 = (b0.array() + 0.5f).matrix();
    n1 = (n0.array() * 1.5f).matrix();
  }
  void save(const std::string& path, bool tuned, bool fan = false) const {
    const Matrix<float>& q = tuned ? q1 : q0;
    const Matrix<float> qs = fan ? Matrix<float>(q.transpose()) : q, ks = fan ? Matrix<float>(k0.transpose()) : k0;
    save_safetensors<float>(path, {{"model.embed_tokens.weight", {10, 8}, (tuned ? emb1 : emb0).data()},
                                   {"model.layers.0.q.weight", {qs.rows(), qs.cols()}, qs.data()},
                                   {"model.layers.0.q.bias", {6}, (tuned ? b1 : b0).data()},
                                   {"model.layers.0.k.weight", {ks.rows(), ks.cols()}, ks.data()},
                                   {"model.layers.0.norm.weight", {8}, (tuned ? n1 : n0).data()}});
  }
};

}  // namespace extract_adapter_test

using extract_adapter_test::Pair;

TEST_CASE("extract_adapter: low-rank modules, what is kept whole and what is reported", "[io][extract]") {
  TempDir dir;
  const Pair p(12);
  p.save(dir.file("base.safetensors"), false);
  p.save(dir.file("tuned.safetensors"), true);
  const SafeTensorsFile base(dir.file("base.safetensors")), tuned(dir.file("tuned.safetensors"));

  ExtractAdapterOptions opt;
  opt.svd.rank = 2;
  std::vector<std::size_t> progress;
  opt.on_module = [&](std::size_t done, std::size_t count) {
    progress.push_back(done);
    CHECK(count == 1);
  };
  ExtractAdapterReport rep;
  PeftAdapter<double> ad = extract_adapter(base, tuned, opt, &rep);
  CHECK(progress == std::vector<std::size_t>{1});
  REQUIRE(rep.modules.size() == 1);
  CHECK(rep.modules[0].path == "model.layers.0.q");
  CHECK(rep.modules[0].rank == 2);
  CHECK(rep.modules[0].energy_kept == Approx(1.0));
  CHECK(rep.modules[0].frobenius_error < 1e-4);
  CHECK(rep.not_captured ==
        std::vector<std::string>{"model.embed_tokens.weight", "model.layers.0.q.bias", "model.layers.0.norm.weight"});
  CHECK(rep.kept_full.empty());
  CHECK(!rep.lora_biases);
  REQUIRE(ad.lora.size() == 1);
  CHECK(ad.full.empty());
  CHECK(ad.config.r == 2);
  CHECK(ad.config.bias == "none");
  CHECK(test::rel_diff(Matrix<double>(ad.lora[0].B * ad.lora[0].A), p.delta.cast<double>()) < 1e-5);

  // keep_full: the bias of q as lora_only, the embedding and the norm as modules_to_save.
  opt.keep_full = true;
  ad = extract_adapter(base, tuned, opt, &rep);
  CHECK(rep.not_captured.empty());
  CHECK(rep.kept_full ==
        std::vector<std::string>{"model.embed_tokens.weight", "model.layers.0.q.bias", "model.layers.0.norm.weight"});
  CHECK(rep.lora_biases);
  CHECK(rep.modules_to_save == std::vector<std::string>{"model.embed_tokens", "model.layers.0.norm"});
  CHECK(ad.config.bias == "lora_only");
  CHECK(ad.config.modules_to_save == rep.modules_to_save);
  CHECK(ad.full.size() == 3);

  // The directory form; merging it into the base gives the tuned model back.
  const ExtractAdapterReport drep =
      extract_adapter_dir(dir.file("base.safetensors"), dir.file("tuned.safetensors"), dir.file("ad"), opt);
  CHECK(drep.modules.size() == 1);
  const PeftAdapter<double> loaded = load_peft_adapter<double>(dir.file("ad"));
  CHECK(loaded.config.bias == "lora_only");
  merge_adapter_file(dir.file("base.safetensors"), load_peft_adapter<float>(dir.file("ad")),
                     dir.file("merged.safetensors"));
  const SafeTensorsFile merged(dir.file("merged.safetensors"));
  for (const TensorInfo& t : tuned.tensors()) {
    INFO(t.name);
    CHECK(test::rel_diff(merged.load<double>(t.name), tuned.load<double>(t.name)) < 1e-5);
  }

  // An exclude pattern that takes everything: nothing low rank, named with the caller's label.
  opt.exclude = ".*";
  opt.exclude_label = "--exclude";
  PEFT_REQUIRE_THROWS_WITH(extract_adapter(base, tuned, opt), ConfigError,
                           "no 2-D \".weight\" tensor outside --exclude differs");
  opt.exclude = "(";
  opt.exclude_label = "the pattern";
  CHECK_THROWS_AS(extract_adapter(base, tuned, opt), ConfigError);
}

TEST_CASE("extract_adapter: fan_in_fan_out, energy, and refusals that write nothing", "[io][extract]") {
  TempDir dir;
  const Pair p(5);
  p.save(dir.file("base_t.safetensors"), false, true);
  p.save(dir.file("tuned_t.safetensors"), true, true);
  ExtractAdapterOptions opt;
  opt.svd.energy = 0.999;
  opt.fan_in_fan_out = true;
  const ExtractAdapterReport rep =
      extract_adapter_dir(dir.file("base_t.safetensors"), dir.file("tuned_t.safetensors"), dir.file("conv"), opt);
  REQUIRE(rep.modules.size() == 1);
  CHECK(rep.modules[0].rank == 2);  // ΔW has rank 2: all its energy in two values
  const PeftAdapter<double> conv = load_peft_adapter<double>(dir.file("conv"));
  CHECK(conv.config.fan_in_fan_out);
  REQUIRE(conv.lora.size() == 1);
  CHECK(conv.lora[0].A.cols() == 8);
  CHECK(conv.lora[0].B.rows() == 6);
  CHECK(test::rel_diff(Matrix<double>(conv.lora[0].B * conv.lora[0].A), p.delta.cast<double>()) < 1e-5);

  // Different tensors, different shapes, a JSON file: refused, nothing written.
  opt = {};
  opt.svd.rank = 2;
  const Matrix<float> w = Matrix<float>::Ones(6, 8), w2 = Matrix<float>::Ones(8, 6);
  save_safetensors<float>(dir.file("one.safetensors"), {{"a.weight", {6, 8}, w.data()}});
  save_safetensors<float>(dir.file("two.safetensors"),
                          {{"a.weight", {6, 8}, w.data()}, {"b.weight", {6, 8}, w.data()}});
  save_safetensors<float>(dir.file("shape.safetensors"), {{"a.weight", {8, 6}, w2.data()}});
  PEFT_REQUIRE_THROWS_WITH(
      extract_adapter_dir(dir.file("one.safetensors"), dir.file("two.safetensors"), dir.file("x"), opt), ConfigError,
      "has no tensor \"b.weight\" (the tuned model has it)");
  PEFT_REQUIRE_THROWS_WITH(
      extract_adapter_dir(dir.file("two.safetensors"), dir.file("one.safetensors"), dir.file("x"), opt), ConfigError,
      "has no tensor \"b.weight\" (the base has it)");
  PEFT_REQUIRE_THROWS_WITH(
      extract_adapter_dir(dir.file("one.safetensors"), dir.file("shape.safetensors"), dir.file("x"), opt), ShapeError,
      "tensor \"a.weight\" is [6, 8] in the base but [8, 6] in the tuned model");
  peft::test::io::write_bytes(dir.file("config.json"), "{\"r\": 8}");
  PEFT_REQUIRE_THROWS_WITH(
      extract_adapter_dir(dir.file("config.json"), dir.file("one.safetensors"), dir.file("x"), opt), IoError,
      "is a JSON file, not a safetensors file (which starts with an 8-byte header length); expected the base model's");
  PEFT_REQUIRE_THROWS_WITH(
      extract_adapter_dir(dir.file("one.safetensors"), dir.file("one.safetensors"), dir.file("x"), opt), ConfigError,
      "no 2-D \".weight\" tensor outside the exclude pattern differs");
  CHECK(!path_exists(dir.file("x")));
}
