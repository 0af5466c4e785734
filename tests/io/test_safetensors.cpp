// safetensors: dtype conversion, strict validation of hostile files, zero-copy views, atomic writes.
#include <peft/io/safetensors.hpp>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::raw_file;
using peft::test::io::TempDir;
using peft::test::io::write_bytes;

TEST_CASE("half: known encodings round to nearest even", "[io][dtype]") {
  CHECK(double_to_half(0.0) == 0x0000);
  CHECK(double_to_half(-0.0) == 0x8000);
  CHECK(double_to_half(1.0) == 0x3c00);
  CHECK(double_to_half(-2.0) == 0xc000);
  CHECK(double_to_half(65504.0) == 0x7bff);   // largest finite
  CHECK(double_to_half(65519.99) == 0x7bff);  // below the rounding midpoint to Inf
  CHECK(double_to_half(65520.0) == 0x7c00);   // midpoint: ties to even → Inf
  CHECK(double_to_half(1e10) == 0x7c00);
  CHECK(double_to_half(-INFINITY) == 0xfc00);
  CHECK((double_to_half(NAN) & 0x7c00) == 0x7c00);
  CHECK((double_to_half(NAN) & 0x03ff) != 0);
  CHECK(double_to_half(std::ldexp(1.0, -24)) == 0x0001);        // smallest subnormal
  CHECK(double_to_half(std::ldexp(1.0, -25)) == 0x0000);        // half of it: tie → even (0)
  CHECK(double_to_half(std::ldexp(1.5, -25)) == 0x0001);        // above the tie
  CHECK(double_to_half(std::ldexp(3.0, -25)) == 0x0002);        // 1.5 ulp: tie → even (2)
  CHECK(double_to_half(std::ldexp(1023.0, -24)) == 0x03ff);     // largest subnormal
  CHECK(double_to_half(std::ldexp(2047.0, -25)) == 0x0400);     // rounds up into the normals
  CHECK(double_to_half(1.0 + std::ldexp(1.0, -11)) == 0x3c00);  // tie between 1 and 1+2^-10 → even
  CHECK(double_to_half(1.0 + 3 * std::ldexp(1.0, -11)) == 0x3c02);
  CHECK(double_to_half(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -30)) == 0x3c01);
}

TEST_CASE("half and bfloat16: every finite code decodes and re-encodes to itself", "[io][dtype]") {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto code = static_cast<std::uint16_t>(h);
    const float f = half_to_float(code);
    const float b = bf16_to_float(code);
    if (std::isnan(f)) {
      CHECK(std::isnan(half_to_float(double_to_half(f))));
    } else if (double_to_half(f) != code) {
      FAIL("half code " << h << " decodes to " << f << " and re-encodes to " << double_to_half(f));
    }
    if (std::isnan(b)) {
      CHECK(std::isnan(bf16_to_float(double_to_bf16(b))));
    } else if (double_to_bf16(b) != code) {
      FAIL("bf16 code " << h << " decodes to " << b << " and re-encodes to " << double_to_bf16(b));
    }
  }
}

TEST_CASE("bfloat16: rounding matches torch's round-to-nearest-even", "[io][dtype]") {
  // 1 + 2^-8 is the tie between 1 and 1 + 2^-7: even is 1. 1 + 3·2^-8 ties up to 1 + 2^-6.
  CHECK(double_to_bf16(1.0) == 0x3f80);
  CHECK(double_to_bf16(1.0 + std::ldexp(1.0, -8)) == 0x3f80);
  CHECK(double_to_bf16(1.0 + 3 * std::ldexp(1.0, -8)) == 0x3f82);
  CHECK(double_to_bf16(3.4028234663852886e38) == 0x7f80);  // FLT_MAX rounds to Inf in bf16
  CHECK(double_to_bf16(std::ldexp(1.0, -133)) == 0x0001);  // smallest bf16 subnormal
  // A double just above a bf16 tie but equal to the tie once rounded to float: no double rounding.
  const double x = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  CHECK(double_to_bf16(x) == 0x3f81);
}

TEMPLATE_TEST_CASE("safetensors: every dtype round-trips through a file", "[io][safetensors]", float, double) {
  using T = TestType;
  TempDir dir;
  Rng rng(7);
  const Matrix<T> a = test::random_matrix<T>(3, 5, rng);
  Matrix<T> ints(2, 3);
  ints << -3, 0, 7, 100, -128, 127;
  Matrix<T> bytes(1, 4);
  bytes << 0, 1, 200, 255;
  const std::string path = dir.path + "/all.safetensors";
  save_safetensors<T>(path,
                      {{"f64", {3, 5}, a.data(), DType::F64},
                       {"f32", {3, 5}, a.data(), DType::F32},
                       {"f16", {3, 5}, a.data(), DType::F16},
                       {"bf16", {15}, a.data(), DType::BF16},
                       {"i64", {2, 3}, ints.data(), DType::I64},
                       {"i32", {6}, ints.data(), DType::I32},
                       {"i8", {2, 3}, ints.data(), DType::I8},
                       {"u8", {4}, bytes.data(), DType::U8},
                       {"scalar", {}, a.data(), DType::F32},
                       {"empty", {0, 4}, a.data(), DType::F32}},
                      {{"format", "pt"}});
  const SafeTensorsFile f(path);
  REQUIRE(f.tensors().size() == 10);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.data_offset() % 8 == 0);  // header padded to a multiple of 8
  const Matrix<double> ad = a.template cast<double>();
  CHECK(f.load<double>("f64").isApprox(ad, 0.0));
  CHECK((f.load<double>("f32") - ad).cwiseAbs().maxCoeff() <= 1e-6 * ad.cwiseAbs().maxCoeff());
  CHECK((f.load<double>("f16") - ad).cwiseAbs().maxCoeff() <= 1e-3 * ad.cwiseAbs().maxCoeff());
  const Matrix<T> b16 = f.load<T>("bf16");
  CHECK(b16.rows() == 1);
  CHECK(b16.cols() == 15);
  for (Index i = 0; i < 15; ++i)
    CHECK(std::abs(double(b16(0, i)) - ad(i / 5, i % 5)) <= 1e-2 * std::abs(ad(i / 5, i % 5)));
  CHECK(f.load<T>("i64") == ints);
  const Matrix<T> i32 = f.load<T>("i32");
  REQUIRE(i32.rows() == 1);
  CHECK(MatrixMap<T>(const_cast<T*>(i32.data()), 2, 3) == ints);
  CHECK(f.load<T>("i8") == ints);
  CHECK(f.load<T>("u8") == bytes);
  CHECK(f.load<T>("scalar")(0, 0) == static_cast<T>(static_cast<float>(a(0, 0))));
  CHECK(f.info("empty").numel == 0);
  CHECK(f.load<T>("empty").cols() == 4);
  // Zero-copy: the native dtype maps straight into the file.
  const std::string native = std::is_same<T, float>::value ? "f32" : "f64";
  REQUIRE(f.can_view<T>(f.info(native)));
  const auto v = f.view<T>(native);
  CHECK(reinterpret_cast<const unsigned char*>(v.data()) == f.bytes(f.info(native)));
  CHECK(v.isApprox(f.load<T>(native), 0));
  PEFT_REQUIRE_THROWS_WITH(f.view<T>("f16"), IoError, "cannot be viewed without conversion");
  PEFT_REQUIRE_THROWS_WITH(f.load<T>("nope"), IoError, "no tensor named \"nope\"");
}

TEST_CASE("safetensors: integer dtypes refuse values that do not fit", "[io][safetensors]") {
  TempDir dir;
  Matrix<float> x(1, 2);
  x << 1.5f, 2.0f;
  const std::string path = dir.path + "/bad.safetensors";
  PEFT_REQUIRE_THROWS_WITH(save_safetensors<float>(path, {{"x", {2}, x.data(), DType::I32}}), IoError,
                           "value 1.5 at element 0 does not fit I32");
  CHECK(dir.entries().empty());  // the temporary file is gone
  x << 1.0f, 300.0f;
  PEFT_REQUIRE_THROWS_WITH(save_safetensors<float>(path, {{"x", {2}, x.data(), DType::U8}}), IoError, "element 1");
  CHECK(dir.entries().empty());
}

TEST_CASE("safetensors writer: names, shapes and the declared sizes are enforced", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir.path + "/w.safetensors";
  PEFT_REQUIRE_THROWS_WITH(SafeTensorsWriter(path, {{"a", DType::F32, {2}}, {"a", DType::F32, {2}}}), IoError,
                           "duplicate tensor name \"a\"");
  PEFT_REQUIRE_THROWS_WITH(SafeTensorsWriter(path, {{"__metadata__", DType::F32, {2}}}), IoError,
                           "invalid tensor name");
  PEFT_REQUIRE_THROWS_WITH(SafeTensorsWriter(path, {{"a", DType::F32, {-1}}}), IoError, "invalid shape");
  CHECK(dir.entries().empty());
  // A finite value that would round to Inf is refused (NaN and Inf themselves are stored).
  const double over[3] = {1.0, 65520.0, 1e300};
  PEFT_REQUIRE_THROWS_WITH(save_safetensors<double>(path, {{"h", {3}, over, DType::F16}}), NumericError,
                           "value 65520 at element 1 overflows F16");
  PEFT_REQUIRE_THROWS_WITH(save_safetensors<double>(path, {{"h", {3}, over, DType::BF16}}), NumericError,
                           "value 1.0000000000000001e+300 at element 2 overflows BF16");
  PEFT_REQUIRE_THROWS_WITH(save_safetensors<double>(path, {{"h", {3}, over, DType::F32}}), NumericError,
                           "overflows F32");
  const double edge[3] = {65504.0, -65504.0, 3.4028234663852886e38};
  CHECK_NOTHROW(save_safetensors<double>(path, {{"h", {2}, edge, DType::F16}}));
  CHECK_NOTHROW(save_safetensors<double>(path, {{"h", {3}, edge, DType::F32}}));
  std::remove(path.c_str());
  CHECK(dir.entries().empty());
  {
    SafeTensorsWriter w(path, {{"a", DType::F32, {2}}, {"b", DType::F32, {1}}});
    const float v[3] = {1, 2, 3};
    PEFT_REQUIRE_THROWS_WITH(w.write<float>(v, 3), IoError, "do not fit the remaining part of tensor \"a\"");
    w.write<float>(v, 2);
    PEFT_REQUIRE_THROWS_WITH(w.commit(), IoError, "tensor \"b\" and 0 more were not written");
  }  // destroyed without commit
  CHECK(dir.entries().empty());
  {
    SafeTensorsWriter w(path, {{"a", DType::F32, {2}}, {"z", DType::F32, {0}}, {"b", DType::F16, {1}}});
    const float v[3] = {1, 2, 3};
    w.write<float>(v, 2);
    CHECK(w.next().name == "b");  // the empty tensor needs no data
    w.write<float>(v + 2, 1);
    PEFT_REQUIRE_THROWS_WITH(w.write_raw(v, 1), IoError, "more data than the declared tensors hold");
    w.commit();
  }
  CHECK(dir.entries() == std::vector<std::string>{"w.safetensors"});
  const SafeTensorsFile f(path);
  CHECK(f.load<float>("b")(0, 0) == 3.0f);
}

namespace {
/// A file with the given header JSON (unpadded) and `data_bytes` zero bytes of data.
std::string file_with(const std::string& header, std::size_t data_bytes, std::uint64_t length_override = 0) {
  std::string out(8, '\0');
  const std::uint64_t n = length_override ? length_override : header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + std::string(data_bytes, '\0');
}

void expect_rejected(const std::string& bytes, const std::string& needle) {
  INFO("expecting: " << needle);
  PEFT_REQUIRE_THROWS_WITH(
      parse_safetensors_header(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), "bad.st"), IoError,
      needle);
}
}  // namespace

TEST_CASE("safetensors reader: the corpus of broken headers is rejected with clear errors", "[io][safetensors]") {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  // The valid baseline parses.
  const std::string good = file_with(ok, 8);
  CHECK(
      parse_safetensors_header(reinterpret_cast<const unsigned char*>(good.data()), good.size(), "ok").tensors.size() ==
      1);

  expect_rejected(std::string(5, '\0'), "too short for the 8-byte header length");
  expect_rejected(file_with(ok, 8, 200000000), "exceeds the limit of 100000000 bytes");
  expect_rejected(file_with(ok, 8, ok.size() + 9), "runs past the end of the");
  expect_rejected(file_with(ok, 4), "run past the 4-byte data section");  // truncated data
  expect_rejected(file_with(" " + ok, 8), "does not start with '{'");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 8), "invalid JSON at byte");
  expect_rejected(file_with("{\"a\xff\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8),
                  "invalid UTF-8 (not a lead byte) at byte 11");
  expect_rejected(
      file_with(
          R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
          8),
      "duplicate JSON key \"a\"");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
                  "duplicate JSON key \"dtype\"");
  expect_rejected(file_with(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8),
                  "unknown or unsupported dtype \"Q4\"");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
                  "hold 8 bytes, but F32 [3] needs 12");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
                  "must be a non-negative integer");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
                  "must be a non-negative integer");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8),
                  "more elements than fit in 64 bits");
  expect_rejected(file_with(R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})", 8),
                  "overflows 64 bits");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "end before they begin");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}})", 8), "must be [begin, end]");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
                  "gap in the data section: bytes 0..4");
  expect_rejected(
      file_with(
          R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
          12),
      "overlaps tensor \"a\"");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 11),
                  "3 trailing bytes after the last tensor");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[2]}})", 8),
                  "needs \"dtype\", \"shape\" and \"data_offsets\"");
  expect_rejected(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8),
                  "unexpected field \"x\"");
  expect_rejected(file_with(R"({"a":[1]})", 0), "entry must be an object");
  expect_rejected(file_with(R"({"__metadata__":{"k":1}})", 0), "\"__metadata__\" key \"k\" must map to a string");
  expect_rejected(file_with(R"({"__metadata__":[]})", 0), "\"__metadata__\" must be an object");
  expect_rejected(file_with(R"([1,2])", 0), "does not start with '{'");
  expect_rejected(file_with(std::string(100, '['), 0), "does not start with '{'");
  // Nesting cannot go past the schema's three levels (object → entry → shape), so depth is bounded.
  expect_rejected(file_with("{\"a\":" + std::string(100, '[') + std::string(100, ']') + "}", 0),
                  "tensor \"a\": entry must be an object, got an array");
  expect_rejected(file_with("{\"a\":{\"shape\":" + std::string(100, '[') + std::string(100, ']') + "}}", 0),
                  "tensor \"a\": \"shape\" entry must be a non-negative integer, got an array");
}

TEST_CASE("safetensors reader: a header of many tensors parses in n log n, not n^2", "[io][safetensors]") {
  // 100 000 empty tensors (a hostile header can hold millions): a parser that rescans an object
  // at each new entry (nlohmann's callback parser, or ordered_json's linear key lookup) would
  // make 5e9 comparisons here.
  const int n = 100000;
  std::string h = "{";
  for (int i = 0; i < n; ++i)
    h += (i ? ",\"t" : "\"t") + std::to_string(i) + "\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}";
  h += ",\"z\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
  const std::string file = file_with(h, 8);
  const SafeTensorsHeader parsed =
      parse_safetensors_header(reinterpret_cast<const unsigned char*>(file.data()), file.size(), "many");
  CHECK(parsed.tensors.size() == static_cast<std::size_t>(n + 1));
  CHECK(parsed.tensors.back().name == "z");

  // Configs keep key order (ordered_json, linear lookup): their objects are capped instead.
  std::string cfg = "{";
  for (int i = 0; i <= static_cast<int>(kMaxOrderedJsonKeys); ++i)
    cfg += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":1";
  cfg += "}";
  PEFT_REQUIRE_THROWS_WITH(parse_json_strict(cfg, "cfg.json"), IoError, "a JSON object has more than 10000 keys");
}

TEST_CASE("safetensors reader: errors name the file on disk", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir.path + "/trunc.safetensors";
  write_bytes(path, file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 5));
  PEFT_REQUIRE_THROWS_WITH(SafeTensorsFile{path}, IoError, path);
  PEFT_REQUIRE_THROWS_WITH(SafeTensorsFile{dir.path + "/missing"}, IoError, "cannot open");
  PEFT_REQUIRE_THROWS_WITH(SafeTensorsFile{dir.path}, IoError, "not a regular file");
}

TEST_CASE("safetensors: files written by hand like the reference implementation are read", "[io][safetensors]") {
  // The fixture was written by benchmarks/peer/make_io_fixtures.py from torch tensors.
  const std::string path = test::io::data_dir() + "/small.safetensors";
  const SafeTensorsFile f(path);
  CHECK(f.metadata().at("format") == "pt");
  const Matrix<double> w = f.load<double>("w");
  REQUIRE(w.rows() == 2);
  REQUIRE(w.cols() == 3);
  for (Index i = 0; i < 6; ++i) CHECK(w(i / 3, i % 3) == static_cast<double>(i) - 2.5);
  CHECK(f.load<double>("h") == f.load<double>("w"));  // F16 holds these exactly
  CHECK(f.load<double>("b") == f.load<double>("w"));  // BF16 too
  CHECK(f.load<double>("idx")(0, 2) == 9.0);
}

TEST_CASE("safetensors reader: every byte of the declared header is checked, not just up to a NUL",
          "[io][safetensors]") {
  // nlohmann's lexer ends the input at a NUL byte: without the byte scan, the header below parsed
  // as its first 55 bytes and the garbage after the NUL was never looked at.
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  expect_rejected(file_with(ok + std::string(1, '\0') + "garbage, {\"x\": 1", 8),
                  "NUL byte (not allowed in JSON text) at byte " + std::to_string(8 + ok.size()));
  expect_rejected(file_with(ok + "   " + std::string(1, '\0'), 8), "NUL byte");  // even a NUL as padding
  // Invalid UTF-8 anywhere, including the padding, names its byte offset (header starts at byte 8).
  const std::string key = "{\"x";
  expect_rejected(file_with(key + "\xc0\xaf\":" + ok.substr(5), 8),
                  "invalid UTF-8 (not a lead byte) at byte 11");  // overlong '/'
  expect_rejected(file_with(key + "\xed\xa0\x80\":" + ok.substr(5), 8),
                  "invalid UTF-8 (bad continuation byte) at byte 11");  // surrogate
  expect_rejected(file_with(key + "\xf4\x90\x80\x80\":" + ok.substr(5), 8),
                  "invalid UTF-8 (bad continuation byte) at byte 11");  // > U+10FFFF
  expect_rejected(file_with(key + "\xe2\x82\":" + ok.substr(5), 8), "invalid UTF-8 (bad continuation byte) at byte 11");
  expect_rejected(file_with(ok + "  \xe2\x82", 8),
                  "invalid UTF-8 (truncated sequence) at byte " + std::to_string(10 + ok.size()));
  expect_rejected(file_with(ok + " \x80", 8), "invalid UTF-8 (not a lead byte)");
  expect_rejected(file_with(ok + " x", 8), "invalid JSON at byte");  // non-space garbage after the object
  // Valid multi-byte UTF-8 names and padding with spaces (and other JSON whitespace) are accepted.
  const std::string utf8 =
      "{\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
  for (const std::string& h : {utf8, utf8 + "       ", ok + " \n\t\r "}) {
    const std::string f = file_with(h, 8);
    const SafeTensorsHeader parsed =
        parse_safetensors_header(reinterpret_cast<const unsigned char*>(f.data()), f.size(), "ok");
    REQUIRE(parsed.tensors.size() == 1);
  }
  // Configs go through the same scan.
  PEFT_REQUIRE_THROWS_WITH(parse_json_strict(std::string("{\"peft_type\":\"LORA\"}\0{\"r\":-1}", 29), "c.json"),
                           IoError, "\"c.json\": NUL byte (not allowed in JSON text) at byte 20");
  PEFT_REQUIRE_THROWS_WITH(parse_json_strict("{\"k\":\"\xff\"}", "c.json"), IoError,
                           "invalid UTF-8 (not a lead byte) at byte 6");
}

TEST_CASE("safetensors writer: NaN and Inf are refused and nothing is written", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir.path + "/nf.safetensors";
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Matrix<float> a = Matrix<float>::Ones(2, 3);
  a(1, 2) = nan;
  // Native dtype (no encoding pass), and every converted float dtype, through save_safetensors.
  for (DType dt : {DType::F32, DType::F64, DType::F16, DType::BF16}) {
    INFO(dtype_name(dt));
    PEFT_REQUIRE_THROWS_WITH(save_safetensors<float>(path, {{"ok", {2}, a.data(), dt}, {"w", {2, 3}, a.data(), dt}}),
                             NumericError, "\"" + path + "\": tensor \"w\": element 5 is nan");
    CHECK(dir.entries().empty());  // the temporary is gone, no file at `path`
  }
  const double minus_inf[2] = {1.0, -std::numeric_limits<double>::infinity()};
  PEFT_REQUIRE_THROWS_WITH(save_safetensors<double>(path, {{"d", {2}, minus_inf, DType::F16}}), NumericError,
                           "tensor \"d\": element 1 is -inf");
  CHECK(dir.entries().empty());
  // Integer dtypes hold no NaN: the bits of a float NaN are an ordinary I32 (and U8) value.
  const unsigned char nan_bits[4] = {0x00, 0x00, 0xc0, 0x7f};
  {
    SafeTensorsWriter w(path, {{"i", DType::I32, {1}}, {"u", DType::U8, {4}}});
    w.write_raw(nan_bits, 4);
    w.write_raw(nan_bits, 4);
    w.commit();
  }
  CHECK(SafeTensorsFile(path).load<double>("i")(0, 0) == 2143289344.0);
  std::remove(path.c_str());
  // Streaming: raw bytes are checked on their bits, even an element split between two calls
  // (element 1 of "h" is the F16 NaN 0x7e00, written one byte at a time); a caller that catches
  // the error and carries on cannot commit.
  {
    SafeTensorsWriter w(path, {{"g", DType::F32, {1}}, {"h", DType::F16, {3}}});
    const float one = 1.0f;
    w.write<float>(&one, 1);
    const unsigned char h[6] = {0x00, 0x3c, 0x00, 0x7e, 0x00, 0x3c};
    w.write_raw(h, 3);
    PEFT_REQUIRE_THROWS_WITH(w.write_raw(h + 3, 1), NumericError, "tensor \"h\": element 1 is nan");
    w.write_raw(h + 4, 2);  // a careless caller goes on...
    PEFT_REQUIRE_THROWS_WITH(w.commit(), NumericError, "tensor \"h\": element 1 is nan");  // ...and is refused
  }
  CHECK(dir.entries().empty());
  // copy_raw passes an input's bytes through unchanged, -inf included (a tensor a merge does not
  // touch is the base model's own value, not something we computed).
  const std::string src = dir.path + "/src.bin";
  const unsigned char bf[4] = {0x80, 0x3f, 0x80, 0xff};  // BF16 1.0, -Inf
  write_bytes(src, std::string(reinterpret_cast<const char*>(bf), 4));
  {
    const MappedFile in(src);
    SafeTensorsWriter w(path, {{"b", DType::BF16, {2}}});
    w.copy_raw(in.fd(), 0, 4, in.data());
    w.commit();
  }
  {
    const SafeTensorsFile copied(path);
    CHECK(std::memcmp(copied.bytes(copied.info("b")), bf, 4) == 0);
  }
  ::unlink(path.c_str());
  // Finite values next to the limits are written.
  const float edge[4] = {std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                         std::numeric_limits<float>::denorm_min(), 0.0f};
  save_safetensors<float>(path, {{"e", {4}, edge}});
  CHECK(SafeTensorsFile(path).load<float>("e")(0, 0) == std::numeric_limits<float>::max());
}
