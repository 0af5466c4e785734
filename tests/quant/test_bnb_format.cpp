// The bitsandbytes / transformers safetensors layout of NF4 weights: read, write back byte for
// byte, reproduce the real bitsandbytes byte for byte (tests/quant/data/bnb_nf4_fixture.safetensors,
// made by benchmarks/peer/make_bnb_nf4_fixture.py with bitsandbytes 0.50.2 on CPU, see
// tests/quant/data/README.md), whole-file quantization, and every malformed input.
#include <peft/io/safetensors.hpp>
#include <peft/layers/lora_linear.hpp>
#include <peft/quant/bnb_format.hpp>
#include <peft/quant/nf4_lora_linear.hpp>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "io/io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::quant;
using peft::test::io::TempDir;

namespace {

std::string fixture_path() {
  const std::filesystem::path here = std::filesystem::path(__FILE__).parent_path();
  return (here / "data" / "bnb_nf4_fixture.safetensors").string();
}

std::vector<unsigned char> tensor_bytes(const io::SafeTensorsFile& f, const std::string& name) {
  const io::TensorInfo& t = f.info(name);
  return std::vector<unsigned char>(f.bytes(t), f.bytes(t) + t.nbytes());
}

// A raw tensor for hand-built (possibly broken) files.
struct Raw {
  std::string name;
  io::DType dtype;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;
};

void write_raw_file(const std::string& path, const std::vector<Raw>& raws) {
  std::vector<io::TensorSpec> specs;
  for (const Raw& r : raws) specs.push_back({r.name, r.dtype, r.shape});
  io::SafeTensorsWriter w(path, specs);
  for (const Raw& r : raws) w.write_raw(r.bytes.data(), r.bytes.size());
  w.commit();
}

// The entries of a valid NF4 tensor as Raw tensors, with the JSON replaceable.
std::vector<Raw> raw_entries(const std::string& prefix, const NF4Tensor& t, const std::string& json) {
  std::vector<io::TensorSpec> specs;
  add_bnb_nf4_specs(prefix, t, specs);
  std::vector<Raw> out;
  auto floats = [](const float* p, std::size_t n) {
    return std::vector<unsigned char>(reinterpret_cast<const unsigned char*>(p),
                                      reinterpret_cast<const unsigned char*>(p) + 4 * n);
  };
  for (const auto& s : specs) {
    Raw r{s.name, s.dtype, s.shape, {}};
    const std::string suffix = s.name.substr(prefix.size() + 7);
    if (suffix.empty())
      r.bytes.assign(t.packed.begin(), t.packed.end());
    else if (suffix == ".absmax")
      r.bytes = t.nested ? std::vector<unsigned char>(t.qabsmax.begin(), t.qabsmax.end())
                         : floats(t.absmax.data(), t.absmax.size());
    else if (suffix == ".quant_map")
      r.bytes = floats(t.quant_map.data(), 16);
    else if (suffix == ".nested_absmax")
      r.bytes = floats(t.nested_absmax.data(), t.nested_absmax.size());
    else if (suffix == ".nested_quant_map")
      r.bytes = floats(t.nested_quant_map.data(), 256);
    else {
      r.bytes.assign(json.begin(), json.end());
      r.shape = {static_cast<std::int64_t>(json.size())};
    }
    out.push_back(std::move(r));
  }
  return out;
}

Raw* find_raw(std::vector<Raw>& v, const std::string& suffix) {
  for (Raw& r : v)
    if (r.name.size() >= suffix.size() && r.name.compare(r.name.size() - suffix.size(), suffix.size(), suffix) == 0)
      return &r;
  return nullptr;
}

}  // namespace

TEST_CASE("Floats are written as Python's repr", "[quant][bnb]") {
  CHECK(python_float_repr(0.1) == "0.1");
  CHECK(python_float_repr(1e-05) == "1e-05");
  CHECK(python_float_repr(1.0) == "1.0");
  CHECK(python_float_repr(1e16) == "1e+16");
  CHECK(python_float_repr(1e15) == "1000000000000000.0");
  CHECK(python_float_repr(1234.5) == "1234.5");
  CHECK(python_float_repr(0.0001) == "0.0001");
  CHECK(python_float_repr(0.00012345) == "0.00012345");
  CHECK(python_float_repr(1.5e-07) == "1.5e-07");
  CHECK(python_float_repr(-2.5) == "-2.5");
  CHECK(python_float_repr(static_cast<double>(0.0123f)) == "0.012299999594688416");
  CHECK(python_float_repr(123456789012345680.0) == "1.2345678901234568e+17");
  CHECK(python_float_repr(0.0) == "0.0");
}

TEST_CASE("quant_state JSON is json.dumps of QuantState.as_dict's non-tensor fields", "[quant][bnb]") {
  NF4Tensor t;
  t.shape = {7, 33};
  t.dtype = "bfloat16";
  t.nested = true;
  t.nested_offset = 0.0123f;
  CHECK(quant_state_json(t) ==
        R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [7, 33], "nested_blocksize": 256, )"
        R"("nested_dtype": "float32", "nested_offset": 0.012299999594688416})");
  t.nested = false;
  CHECK(quant_state_json(t) == R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [7, 33]})");
}

const std::vector<std::string> kFixtureModules = {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
                                                  "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"};

// Bit patterns, so that a 1-ulp difference (or −0 against +0) fails loudly.
std::vector<std::uint32_t> float_bits(const float* p, std::size_t n) {
  std::vector<std::uint32_t> out(n);
  if (n > 0) std::memcpy(out.data(), p, 4 * n);  // an empty tensor may have no data pointer
  return out;
}

TEST_CASE("bitsandbytes' own file is read exactly and our quantizer reproduces every field bit for bit",
          "[quant][bnb][bnb_exact]") {
  const io::SafeTensorsFile f(fixture_path());
  std::vector<std::string> prefixes = bnb_4bit_prefixes(f);
  std::sort(prefixes.begin(), prefixes.end());
  REQUIRE(prefixes == kFixtureModules);
  for (const std::string& p : prefixes) {
    INFO(p);
    const NF4Tensor t = read_bnb_nf4(f, p);
    const io::TensorInfo& ref_info = f.info("reference." + p + ".weight");
    CHECK(t.shape == ref_info.shape);
    CHECK(t.dtype == (ref_info.dtype == io::DType::BF16 ? "bfloat16" : "float32"));
    // The reader keeps every byte of bnb's file: the quant_state JSON it would write is bnb's.
    const std::vector<unsigned char> js = tensor_bytes(f, p + ".weight.quant_state.bitsandbytes__nf4");
    CHECK(quant_state_json(t) == std::string(js.begin(), js.end()));

    const Matrix<float> ref = f.load<float>("reference." + p + ".weight");
    NF4Options opt;
    opt.double_quant = t.nested;
    opt.dtype = t.dtype == "bfloat16" ? "bfloat16" : "float32";
    const NF4Tensor mine = quantize_nf4(ref.data(), t.shape, opt);
    CHECK(mine.packed == t.packed);
    CHECK(float_bits(mine.absmax.data(), mine.absmax.size()) == float_bits(t.absmax.data(), t.absmax.size()));
    CHECK(mine.nested == t.nested);
    CHECK(mine.qabsmax == t.qabsmax);
    CHECK(float_bits(mine.nested_absmax.data(), mine.nested_absmax.size()) ==
          float_bits(t.nested_absmax.data(), t.nested_absmax.size()));
    CHECK(float_bits(&mine.nested_offset, 1) == float_bits(&t.nested_offset, 1));
    if (t.nested) CHECK(float_bits(mine.nested_quant_map.data(), 256) == float_bits(t.nested_quant_map.data(), 256));
    CHECK(quant_state_json(mine) == quant_state_json(t));
    // Dequantized weights are within the NF4 bound of the originals.
    const Matrix<float> deq = dequantize_nf4<float>(t);
    for (Index i = 0; i < ref.size(); ++i) {
      const float a = t.block_absmax(static_cast<std::size_t>(i) / 64);
      CHECK(std::abs(deq.data()[i] - ref.data()[i]) <= 0.16f * a + 1e-6f);
    }
  }
  // The corner cases the fixture was built to hold are there.
  const NF4Tensor q = read_bnb_nf4(f, "model.layers.0.self_attn.q_proj");
  CHECK(q.qabsmax.size() == 302);    // 301 full blocks and a ragged one of 32: a ragged nested group of 46
  CHECK((q.packed[320] >> 4) == 7);  // block 10 is all zero: the CPU kernel writes the code of 0
  CHECK(q.packed.back() == 0x77);    // the ragged last block is all zero too
  const NF4Tensor k = read_bnb_nf4(f, "model.layers.0.self_attn.k_proj");
  CHECK(k.nested_absmax == std::vector<float>{0.0f});  // one block: absmax − mean(absmax) = 0
  CHECK(k.qabsmax == std::vector<std::uint8_t>{0});
  const NF4Tensor v = read_bnb_nf4(f, "model.layers.0.self_attn.v_proj");
  CHECK(!v.nested);
  CHECK(v.numel() % 2 == 1);
}

TEST_CASE("peft quantize writes the bytes transformers + bitsandbytes save for the same weights",
          "[quant][bnb][bnb_exact]") {
  const io::SafeTensorsFile f(fixture_path());
  TempDir dir;
  // The input checkpoint: the reference weights under their module names, the bias as it is.
  std::vector<io::TensorSpec> specs;
  std::vector<const io::TensorInfo*> sources;
  for (const std::string& p : kFixtureModules) {
    const io::TensorInfo& r = f.info("reference." + p + ".weight");
    specs.push_back({p + ".weight", r.dtype, r.shape});
    sources.push_back(&r);
  }
  const io::TensorInfo& bias = f.info("model.layers.0.self_attn.q_proj.bias");
  specs.push_back({bias.name, bias.dtype, bias.shape});
  sources.push_back(&bias);
  {
    io::SafeTensorsWriter w(dir.file("in.safetensors"), specs, {{"format", "pt"}});
    for (const io::TensorInfo* s : sources) w.write_raw(f.bytes(*s), static_cast<std::size_t>(s->nbytes()));
    w.commit();
  }
  // v_proj is the one module bitsandbytes stored without double quantization.
  QuantizeFileOptions opt;
  opt.exclude = R"(.*v_proj\.weight)";
  quantize_safetensors(dir.file("in.safetensors"), dir.file("dq.safetensors"), opt);
  opt.exclude = "";
  opt.include = R"(.*v_proj\.weight)";
  opt.nf4.double_quant = false;
  quantize_safetensors(dir.file("in.safetensors"), dir.file("plain.safetensors"), opt);
  const io::SafeTensorsFile dq(dir.file("dq.safetensors"));
  const io::SafeTensorsFile plain(dir.file("plain.safetensors"));
  std::size_t compared = 0;
  for (const io::TensorInfo& t : f.tensors()) {
    if (t.name.rfind("reference.", 0) == 0 || t.name == "torch_cpu_sum") continue;
    INFO(t.name);
    const io::SafeTensorsFile& out = t.name.find("v_proj") != std::string::npos ? plain : dq;
    REQUIRE(out.contains(t.name));
    CHECK(out.info(t.name).dtype == t.dtype);
    CHECK(out.info(t.name).shape == t.shape);
    CHECK(tensor_bytes(out, t.name) == tensor_bytes(f, t.name));
    ++compared;
  }
  CHECK(compared == 3 * 6 + 4 + 1);  // three DQ modules, one plain, the bias
}

TEST_CASE("torch_cpu_sum is torch.sum on CPU bit for bit, serial and split over threads", "[quant][bnb][bnb_exact]") {
  // The vector and thread counts of benchmarks/peer/make_bnb_nf4_fixture.py (torch_sums()).
  const io::SafeTensorsFile f(fixture_path());
  const Matrix<float> sums = f.load<float>("torch_cpu_sum");
  const int threads[] = {1, 2, 3, 4, 8};
  REQUIRE(sums.size() == 5);
  std::vector<float> x(100003);
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = static_cast<float>(static_cast<double>((i * 2654435761ULL) % 4294967296ULL % 1048576ULL + 65536ULL) /
                              134217728.0);  // exact: 21 significant bits over 2^27
  for (int k = 0; k < 5; ++k) {
    INFO("threads " << threads[k]);
    const float mine = torch_cpu_sum(x.data(), x.size(), threads[k]);
    CHECK(float_bits(&mine, 1) == float_bits(sums.data() + k, 1));
  }
  // The chunking matters: the serial sum and the sum split over two threads differ.
  CHECK(sums.data()[0] != sums.data()[1]);
}

TEST_CASE("A bitsandbytes 4-bit checkpoint is a QLoRA base: NF4LoRALinear on it trains like LoRA on its dequantization",
          "[quant][bnb][nf4_lora]") {
  const io::SafeTensorsFile f(fixture_path());
  const std::string p = "model.layers.0.self_attn.q_proj";
  const RowVector<double> b = f.load<double>(p + ".bias");
  NF4LoRALinear<double> q(read_bnb_nf4(f, p), b, p);
  q.set_tile_rows(40);  // 96 rows: two full tiles and a ragged one
  Rng rng(7);
  LoraConfig c;
  c.r = 4;
  c.alpha = 8.0;
  c.init = LoraInit::None;  // B != 0: the adapter path contributes
  q.add_adapter("default", c, rng);

  LoRALinear<double> dense(Linear<double>(dequantize_nf4<double>(q.quantized_weight()), b), "dense");
  dense.freeze_base();
  LoraAdapter<double>& d = dense.add_adapter("default", c, rng);
  d.A.value = q.adapter("default").A.value;
  d.B.value = q.adapter("default").B.value;

  const Matrix<double> x = test::random_matrix<double>(5, q.in_features(), rng);
  const Matrix<double> dy = test::random_matrix<double>(5, q.out_features(), rng);
  NF4LoRALinear<double>::Cache cq;
  LoRALinear<double>::Cache cd;
  const Matrix<double> yq = q.forward(x, cq), yd = dense.forward(x, cd);
  CHECK(test::rel_diff(yq, yd) < 1e-12);
  Matrix<double> dxq, dxd;
  q.zero_grad();
  dense.zero_grad();
  q.backward(cq, dy, &dxq);
  dense.backward(cd, dy, &dxd);
  CHECK(test::rel_diff(dxq, dxd) < 1e-12);
  CHECK(test::rel_diff(q.adapter("default").A.grad, d.A.grad) < 1e-12);
  CHECK(test::rel_diff(q.adapter("default").B.grad, d.B.grad) < 1e-12);
  // And the file's base is what it claims: within the NF4 error bound of the original weight.
  CHECK(test::rel_diff(dequantize_nf4<double>(q.quantized_weight()), f.load<double>("reference." + p + ".weight")) <
        0.15);
}

TEST_CASE("NF4 save -> read is the identity for our own tensors", "[quant][bnb]") {
  Rng rng(51);
  const Matrix<double> w = test::random_matrix<double>(33, 70, rng, 0.1);
  TempDir dir;
  for (bool dq : {true, false}) {
    NF4Options opt;
    opt.double_quant = dq;
    opt.blocksize = 128;
    const NF4Tensor t = quantize_nf4<double>(w, opt);
    save_bnb_nf4(dir.file("w.safetensors"), {{"enc.fc", &t}});
    const io::SafeTensorsFile f(dir.file("w.safetensors"));
    CHECK(f.info("enc.fc.weight").shape == std::vector<std::int64_t>{(33 * 70 + 1) / 2, 1});
    const NF4Tensor back = read_bnb_nf4(f, "enc.fc");
    CHECK(back.packed == t.packed);
    CHECK(back.absmax == t.absmax);
    CHECK(back.qabsmax == t.qabsmax);
    CHECK(back.nested_absmax == t.nested_absmax);
    CHECK(back.nested_offset == t.nested_offset);
    CHECK(back.nested_quant_map == t.nested_quant_map);
    CHECK(back.shape == t.shape);
    CHECK(back.blocksize == 128);
    CHECK(dequantize_nf4<double>(back) == dequantize_nf4<double>(t));
  }
}

TEST_CASE("Whole-file quantization: Linear weights to NF4, everything else copied", "[quant][bnb]") {
  Rng rng(52);
  TempDir dir;
  const Matrix<float> q = test::random_matrix<float>(16, 64, rng, 0.05);
  const Matrix<float> bias = test::random_matrix<float>(1, 16, rng);
  const Matrix<float> emb = test::random_matrix<float>(10, 64, rng);
  const Matrix<float> head = test::random_matrix<float>(10, 64, rng);
  auto named = [](const char* name, std::vector<std::int64_t> shape, const float* data, io::DType dtype) {
    return io::NamedTensor<float>(name, std::move(shape), data, dtype);
  };
  std::vector<io::NamedTensor<float>> tensors;
  tensors.push_back(named("model.layers.0.q.weight", {16, 64}, q.data(), io::DType::F32));
  tensors.push_back(named("model.layers.0.q.bias", {16}, bias.data(), io::DType::F32));
  tensors.push_back(named("model.embed_tokens.weight", {10, 64}, emb.data(), io::DType::F32));
  tensors.push_back(named("lm_head.weight", {10, 64}, head.data(), io::DType::F32));
  tensors.push_back(named("model.layers.0.k.weight", {16, 64}, q.data(), io::DType::BF16));
  io::save_safetensors<float>(dir.file("in.safetensors"), tensors, {{"format", "pt"}});
  const QuantizeFileReport rep = quantize_safetensors(dir.file("in.safetensors"), dir.file("out.safetensors"));
  CHECK(rep.quantized == std::vector<std::string>{"model.layers.0.q", "model.layers.0.k"});
  CHECK(rep.copied == std::vector<std::string>{"model.layers.0.q.bias", "model.embed_tokens.weight", "lm_head.weight"});
  CHECK(rep.input_bytes == 16 * 64 * 4 + 16 * 64 * 2);
  const io::SafeTensorsFile in(dir.file("in.safetensors"));
  const io::SafeTensorsFile out(dir.file("out.safetensors"));
  CHECK(out.metadata().at("format") == "pt");
  for (const std::string& n : rep.copied) CHECK(tensor_bytes(in, n) == tensor_bytes(out, n));
  const NF4Tensor tq = read_bnb_nf4(out, "model.layers.0.q");
  CHECK(tq.packed == quantize_nf4<float>(q).packed);
  CHECK(tq.dtype == "float32");
  const NF4Tensor tk = read_bnb_nf4(out, "model.layers.0.k");
  CHECK(tk.dtype == "bfloat16");
  CHECK(tk.packed == quantize_nf4<float>(in.load<float>("model.layers.0.k.weight")).packed);
  QuantizeFileOptions bad;
  bad.include = "(";
  PEFT_REQUIRE_THROWS_WITH(quantize_safetensors(dir.file("in.safetensors"), dir.file("x.safetensors"), bad),
                           ConfigError, "include pattern: invalid regular expression \"(\"");
}

TEST_CASE("Malformed bitsandbytes entries give named errors", "[quant][bnb][errors]") {
  Rng rng(53);
  const Matrix<float> w = test::random_matrix<float>(8, 16, rng);
  const NF4Tensor t = quantize_nf4<float>(w);
  const std::string good = quant_state_json(t);
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  auto read_with = [&](const std::vector<Raw>& raws) {
    write_raw_file(path, raws);
    const io::SafeTensorsFile f(path);
    return read_bnb_nf4(f, "m");
  };
  auto with_json = [&](const std::string& js) { return raw_entries("m", t, js); };
  auto replace = [&](std::string s, const std::string& from, const std::string& to) {
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  // A compact JSON (other writers) still reads.
  CHECK(
      read_with(with_json(replace(replace(good, "\"blocksize\": 64", "\"blocksize\":64"), ", \"dtype\"", ",\"dtype\"")))
          .packed == t.packed);

  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(replace(good, "\"blocksize\": 64", "\"blocksize\": 32"))), ConfigError,
                           "blocksize must be one of 64, 128, 256, 512, 1024, 2048, 4096, got 32");
  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(replace(good, "[8, 16]", "[8, 17]"))), ShapeError,
                           "packed weight has 64 bytes, expected 68 for 136 values");
  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(replace(good, "\"nf4\"", "\"fp4\""))), IoError,
                           "quant_type \"fp4\" does not match the tensor name");
  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(replace(good, "\"float32\"", "\"int8\""))), ConfigError,
                           "dtype \"int8\" is not one of float32, float16, bfloat16");
  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(replace(good, "\"blocksize\": 64, ", ""))), IoError,
                           "quant_state JSON has no key \"blocksize\"");
  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(replace(good, "\"quant_type\"", "\"quant_kind\""))), IoError,
                           "unknown quant_state key \"quant_kind\"");
  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(good.substr(0, good.size() - 5))), IoError, "invalid JSON");
  // Hostile sizes: a shape whose product overflows int64, a block size that only fits after a cast.
  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(replace(good, "[8, 16]", "[3, 6148914691236517206]"))), ShapeError,
                           "has more than 2^50 values");
  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(replace(good, "\"blocksize\": 64", "\"blocksize\": 4294967360"))),
                           ConfigError, "quant_state \"blocksize\" is 4294967360, expected 1 .. 2^20");
  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(replace(good, "\"nested_blocksize\": 256", "\"nested_blocksize\": -1"))),
                           ConfigError, "\"nested_blocksize\" is -1");

  std::vector<Raw> raws = with_json(good);
  find_raw(raws, ".weight")->bytes.resize(60);  // truncated packed codes
  find_raw(raws, ".weight")->shape = {60, 1};
  PEFT_REQUIRE_THROWS_WITH(read_with(raws), ShapeError, "read_bnb_nf4");

  raws = with_json(good);
  find_raw(raws, ".nested_absmax")->bytes.clear();
  find_raw(raws, ".nested_absmax")->shape = {0};
  PEFT_REQUIRE_THROWS_WITH(read_with(raws), ShapeError, "nested_absmax has 0 values, expected 1");

  raws = with_json(good);
  raws.erase(raws.begin() + 3);  // nested_absmax missing
  PEFT_REQUIRE_THROWS_WITH(read_with(raws), IoError, "has no tensor \"m.weight.nested_absmax\"");

  // The code table is bitsandbytes' fixed NF4 list; any other (an FP4 map, a corrupted one) is refused.
  raws = with_json(good);
  find_raw(raws, ".quant_map")->bytes[4] ^= 0x01;
  PEFT_REQUIRE_THROWS_WITH(read_with(raws), ConfigError, "quant_map is not the NF4 code");

  raws = with_json(good);
  find_raw(raws, ".absmax")->dtype = io::DType::I8;
  PEFT_REQUIRE_THROWS_WITH(read_with(raws), IoError, "tensor \"m.weight.absmax\" has dtype I8, expected U8");

  // An fp4 checkpoint: listed, but refused with a clear message.
  NF4Tensor fp4 = t;
  fp4.quant_type = "fp4";
  std::vector<Raw> fr = raw_entries("m", t, replace(good, "\"nf4\"", "\"fp4\""));
  find_raw(fr, "bitsandbytes__nf4")->name = "m.weight.quant_state.bitsandbytes__fp4";
  PEFT_REQUIRE_THROWS_WITH(read_with(fr), ConfigError, "quant_type \"fp4\" is not supported (only \"nf4\")");
  PEFT_REQUIRE_THROWS_WITH(read_with(with_json(good)).packed.size() == 0 ? NF4Tensor() : [&] {
    const io::SafeTensorsFile f(path);
    return read_bnb_nf4(f, "other");
  }(), IoError, "no tensor \"other.weight.quant_state.bitsandbytes__nf4\"");
}
