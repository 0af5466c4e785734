// Streaming merge of a PEFT adapter into a safetensors model file.
#include <peft/io/merge_file.hpp>

#include <cstdio>
#include <string>
#include <vector>

#include "io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::data_dir;
using peft::test::io::raw_file;
using peft::test::io::TempDir;

namespace {
double max_abs_diff(const Matrix<double>& a, const Matrix<double>& b) { return (a - b).cwiseAbs().maxCoeff(); }
}  // namespace

TEST_CASE("merge file: LoRA with rank/alpha patterns equals the torch reference", "[io][merge]") {
  TempDir dir;
  const std::string out = dir.path + "/merged.safetensors";
  const PeftAdapter<float> ad = load_peft_adapter<float>(data_dir() + "/tiny_lora");
  MergeFileOptions opt;
  opt.block_bytes = 64;  // several row blocks per tensor
  const MergeFileReport rep = merge_adapter_file(data_dir() + "/tiny_base.safetensors", ad, out, opt);
  CHECK(rep.merged == 4);
  CHECK(rep.copied == 5);
  const SafeTensorsFile got(out), want(data_dir() + "/tiny_lora.merged.safetensors"),
      base(data_dir() + "/tiny_base.safetensors");
  REQUIRE(got.tensors().size() == base.tensors().size());
  CHECK(got.metadata() == base.metadata());
  for (const TensorInfo& t : base.tensors()) {
    INFO(t.name);
    CHECK(got.info(t.name).shape == t.shape);
    CHECK(got.info(t.name).dtype == t.dtype);
    CHECK(max_abs_diff(got.load<double>(t.name), want.load<double>(t.name)) < 1e-5);
  }
  // Untouched tensors are byte-identical.
  CHECK(std::equal(got.bytes(got.info("lm_head.weight")), got.bytes(got.info("lm_head.weight")) + 320,
                   base.bytes(base.info("lm_head.weight"))));
  CHECK(dir.entries() == std::vector<std::string>{"merged.safetensors"});
}

TEST_CASE("merge file: DoRA with rsLoRA equals the torch reference", "[io][merge]") {
  TempDir dir;
  const std::string out = dir.path + "/merged.safetensors";
  const PeftAdapter<double> ad = load_peft_adapter<double>(data_dir() + "/tiny_dora");
  merge_adapter_file(data_dir() + "/tiny_base.safetensors", ad, out);
  const SafeTensorsFile got(out), want(data_dir() + "/tiny_dora.merged.safetensors");
  for (const TensorInfo& t : want.tensors()) {
    INFO(t.name);
    CHECK(max_abs_diff(got.load<double>(t.name), want.load<double>(t.name)) < 1e-5);
  }
}

TEST_CASE("merge file: scale 0 reproduces the base; fan_in_fan_out adds the transpose", "[io][merge]") {
  TempDir dir;
  PeftAdapter<double> ad = load_peft_adapter<double>(data_dir() + "/tiny_lora");
  MergeFileOptions opt;
  opt.scale = 0.0;
  merge_adapter_file(data_dir() + "/tiny_base.safetensors", ad, dir.path + "/same.safetensors", opt);
  CHECK(raw_file(dir.path + "/same.safetensors") == raw_file(data_dir() + "/tiny_base.safetensors"));

  // A [in, out] base (GPT-2 Conv1D layout) for one square-free module.
  const SafeTensorsFile base(data_dir() + "/tiny_base.safetensors");
  const Matrix<double> w = base.load<double>("model.layers.0.attn.q.weight");  // [6, 8]
  const Matrix<double> wt = w.transpose();
  save_safetensors<double>(dir.path + "/conv1d.safetensors",
                           {{"model.layers.0.attn.q.weight", {8, 6}, wt.data(), DType::F32}});
  PeftAdapter<double> one = ad;
  one.lora = {*ad.find("model.layers.0.attn.q")};
  one.config.fan_in_fan_out = true;
  merge_adapter_file(dir.path + "/conv1d.safetensors", one, dir.path + "/conv1d_merged.safetensors");
  const LoraModuleWeights<double>& m = one.lora[0];
  const Matrix<double> expected = (w + m.scaling * m.B * m.A).transpose();
  CHECK(max_abs_diff(
            SafeTensorsFile(dir.path + "/conv1d_merged.safetensors").load<double>("model.layers.0.attn.q.weight"),
            expected) < 1e-5);
  // Without fan_in_fan_out the [8, 6] tensor does not fit.
  one.config.fan_in_fan_out = false;
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(dir.path + "/conv1d.safetensors", one, dir.path + "/x.safetensors"),
                           ShapeError, "has shape [8, 6], but adapter module \"model.layers.0.attn.q\" needs [6, 8]");
}

TEST_CASE("merge file: F16 and BF16 bases keep their dtype, rounded once", "[io][merge]") {
  TempDir dir;
  const SafeTensorsFile base(data_dir() + "/tiny_base.safetensors");
  const Matrix<float> w = base.load<float>("model.layers.0.attn.v.weight");
  for (DType dt : {DType::F16, DType::BF16}) {
    save_safetensors<float>(dir.path + "/h.safetensors", {{"model.layers.0.attn.v.weight", {6, 8}, w.data(), dt}});
    PeftAdapter<float> ad = load_peft_adapter<float>(data_dir() + "/tiny_lora");
    ad.lora = {*ad.find("model.layers.0.attn.v")};
    merge_adapter_file(dir.path + "/h.safetensors", ad, dir.path + "/hm.safetensors");
    const SafeTensorsFile got(dir.path + "/hm.safetensors");
    CHECK(got.info("model.layers.0.attn.v.weight").dtype == dt);
    const Matrix<float> wh = SafeTensorsFile(dir.path + "/h.safetensors").load<float>("model.layers.0.attn.v.weight");
    const auto& m = ad.lora[0];
    const Matrix<float> exact = wh + static_cast<float>(m.scaling) * m.B * m.A;
    const Matrix<float> g = got.load<float>("model.layers.0.attn.v.weight");
    const double ulp = dt == DType::F16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);  // half an ulp, relative
    for (Index i = 0; i < g.size(); ++i) CHECK(std::abs(g(i) - exact(i)) <= ulp * std::abs(exact(i)) * 1.0001 + 1e-7);
  }
}

TEST_CASE("merge file: an adapter that does not fit, or a NaN, writes nothing", "[io][merge]") {
  TempDir dir;
  const std::string out = dir.path + "/out.safetensors";
  PeftAdapter<float> ad = load_peft_adapter<float>(data_dir() + "/tiny_lora");

  // A base without the targeted tensors.
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(data_dir() + "/small.safetensors", ad, out), ConfigError,
                           "has no tensor \"model.layers.0.attn.q.weight\" for adapter module");
  // A mapping that sends two modules to one tensor.
  MergeFileOptions opt;
  opt.mapping.custom = [](const std::string&) { return std::string("model.layers.0.attn.q"); };
  PeftAdapter<float> two = ad;
  two.lora = {*ad.find("model.layers.0.attn.q"), *ad.find("model.layers.0.attn.q")};
  two.lora[1].path = "other";
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(data_dir() + "/tiny_base.safetensors", two, out, opt), ConfigError,
                           "two adapter modules map to");
  // An integer tensor cannot be merged into: a base whose targeted weight is I32.
  {
    const LoraModuleWeights<float>& q = *ad.find("model.layers.0.attn.q");
    const std::vector<std::int64_t> shape{q.B.rows(), q.A.cols()};
    TempDir int_dir;  // not `dir`: the test ends by checking that nothing was left there
    const std::string int_base = int_dir.path + "/int.safetensors";
    SafeTensorsWriter w(int_base, {{"model.layers.0.attn.q.weight", DType::I32, shape}});
    const std::vector<std::int32_t> zeros(static_cast<std::size_t>(shape[0] * shape[1]), 0);
    w.write_raw(zeros.data(), zeros.size() * sizeof(std::int32_t));
    w.commit();
    PeftAdapter<float> only_q = ad;
    only_q.lora = {q};
    PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(int_base, only_q, out), ShapeError,
                             "tensor \"model.layers.0.attn.q.weight\" is I32, not a float type");
  }
  // NaN produced mid-stream (the last LoRA tensor): the partial output is removed.
  PeftAdapter<float> bad = ad;
  bad.lora.back().B(0, 0) = std::numeric_limits<float>::infinity();
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(data_dir() + "/tiny_base.safetensors", bad, out), NumericError,
                           "gets NaN or Inf at [0, ");
  // Huge scale overflows float.
  MergeFileOptions big;
  big.scale = 1e38;
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(data_dir() + "/tiny_base.safetensors", ad, out, big), NumericError,
                           "nothing was written");
  // A merged value beyond F16's range would be stored as Inf: refused, nothing written.
  const Matrix<float> wv =
      SafeTensorsFile(data_dir() + "/tiny_base.safetensors").load<float>("model.layers.0.attn.v.weight");
  const std::string half = dir.path + "/half.safetensors";
  save_safetensors<float>(half, {{"model.layers.0.attn.v.weight", {6, 8}, wv.data(), DType::F16}});
  PeftAdapter<float> loud = ad;
  loud.lora = {*ad.find("model.layers.0.attn.v")};
  MergeFileOptions huge;
  huge.scale = 1e9;
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(half, loud, out, huge), NumericError, "overflows F16");
  std::remove(half.c_str());
  // DoRA on a transposed (fan_in_fan_out) base has no per-output-row norm to take; a magnitude of
  // the wrong length would index out of bounds.
  PeftAdapter<float> dora = load_peft_adapter<float>(data_dir() + "/tiny_dora");
  dora.lora = {dora.lora.front()};
  PeftAdapter<float> dora_fan = dora;
  dora_fan.config.fan_in_fan_out = true;
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(data_dir() + "/tiny_base.safetensors", dora_fan, out), ConfigError,
                           "is DoRA (lora_magnitude_vector) with fan_in_fan_out = true");
  PeftAdapter<float> dora_short = dora;
  dora_short.lora[0].magnitude.conservativeResize(1, dora_short.lora[0].magnitude.cols() - 1);
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(data_dir() + "/tiny_base.safetensors", dora_short, out), ShapeError,
                           "expected " + std::to_string(dora.lora[0].B.rows()) + " (one per output row)");
  // A tensor of the right name but the wrong shape.
  const std::string wrong = dir.path + "/wrong.safetensors";
  const Matrix<float> w5 = Matrix<float>::Zero(6, 5);
  save_safetensors<float>(wrong, {{"model.layers.0.attn.v.weight", {6, 5}, w5.data(), DType::F32}});
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(wrong, loud, out), ShapeError,
                           "tensor \"model.layers.0.attn.v.weight\" has shape [6, 5], but adapter module "
                           "\"model.layers.0.attn.v\" needs [6, 8]");
  std::remove(wrong.c_str());
  // A prompt adapter has nothing to merge.
  const PeftAdapter<float> prompt = load_peft_adapter<float>(data_dir() + "/tiny_prompt");
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(data_dir() + "/tiny_base.safetensors", prompt, out), ConfigError,
                           "no weights to merge");
  CHECK(dir.entries().empty());
}
