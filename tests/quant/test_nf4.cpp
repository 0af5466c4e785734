// NF4 + double quantization against an independent, deliberately naive re-implementation of the
// published algorithm (bitsandbytes quantize_4bit / quantize_blockwise, QLoRA §3).
#include <peft/quant/blockwise8.hpp>
#include <peft/quant/nf4.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::quant;

namespace {

// Nearest value of a sorted code by linear scan; on an exact tie the lower index wins.
template <std::size_t N>
int nearest_index(const std::array<float, N>& code, float x) {
  int best = 0;
  double best_d = std::abs(static_cast<double>(x) - code[0]);
  for (std::size_t k = 1; k < N; ++k) {
    const double d = std::abs(static_cast<double>(x) - code[k]);
    if (d < best_d) {
      best_d = d;
      best = static_cast<int>(k);
    }
  }
  return best;
}

std::vector<float> random_values(std::size_t n, Rng& rng, double stddev = 0.02) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(rng.normal(0.0, stddev));
  return v;
}

// The slow reference: per block absmax, normalize by the fp32 reciprocal, nearest NF4 code,
// nibbles packed high-first, the pad nibble of an odd count is the code of 0.
struct Reference {
  std::vector<std::uint8_t> packed;
  std::vector<float> absmax;
};
Reference reference_nf4(const std::vector<float>& x, std::size_t bs) {
  Reference r;
  const std::size_t n = x.size();
  std::vector<int> codes(n + 1, nearest_index(kNF4Code, 0.0f));
  for (std::size_t b = 0; b * bs < n; ++b) {
    float a = 0.0f;
    for (std::size_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) a = std::max(a, std::abs(x[i]));
    r.absmax.push_back(a);
    for (std::size_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i)
      codes[i] = nearest_index(kNF4Code, x[i] * (1.0f / a));
  }
  for (std::size_t i = 0; i < n; i += 2) r.packed.push_back(static_cast<std::uint8_t>(codes[i] * 16 + codes[i + 1]));
  return r;
}

double max_gap(const float* code, std::size_t n) {
  double g = 0.0;
  for (std::size_t k = 0; k + 1 < n; ++k) g = std::max(g, static_cast<double>(code[k + 1]) - code[k]);
  return g;
}

}  // namespace

TEST_CASE("NF4 thresholds are the midpoints of adjacent codes and ties go to the lower index", "[quant][nf4]") {
  for (std::size_t k = 0; k < 15; ++k) {
    const double mid = 0.5 * (static_cast<double>(kNF4Code[k]) + kNF4Code[k + 1]);
    CHECK(std::abs(kNF4Thresholds[k] - mid) < 1e-7);
    CHECK(quantize_nf4_value(kNF4Thresholds[k]) == k);  // exactly on the threshold: lower index
    CHECK(quantize_nf4_value(std::nextafter(kNF4Thresholds[k], 2.0f)) == k + 1);
  }
  for (std::size_t k = 0; k < 16; ++k) CHECK(quantize_nf4_value(kNF4Code[k]) == k);
  CHECK(quantize_nf4_value(-5.0f) == 0);
  CHECK(quantize_nf4_value(5.0f) == 15);
  CHECK(quantize_nf4_value(std::numeric_limits<float>::quiet_NaN()) == 0);
}

TEST_CASE("NF4 packed bytes and absmax equal the naive published algorithm", "[quant][nf4]") {
  Rng rng(7);
  for (std::int64_t cols : {64, 96, 33}) {  // aligned, blocks across rows, ragged + odd count
    const std::int64_t rows = 7;
    const std::vector<float> x = random_values(static_cast<std::size_t>(rows * cols), rng);
    for (int bs : {64, 128}) {
      NF4Options opt;
      opt.blocksize = bs;
      opt.double_quant = false;
      const NF4Tensor t = quantize_nf4(x.data(), {rows, cols}, opt);
      const Reference ref = reference_nf4(x, static_cast<std::size_t>(bs));
      INFO("cols " << cols << " blocksize " << bs);
      CHECK(t.packed == ref.packed);
      CHECK(t.absmax == ref.absmax);
      CHECK(t.num_blocks() == ref.absmax.size());
      CHECK_NOTHROW(t.validate("t"));
    }
  }
}

TEST_CASE("NF4 known values round-trip exactly", "[quant][nf4]") {
  // Every code value times a block scale, in both nibble positions and across two blocks.
  std::vector<float> x;
  for (float scale : {2.5f, 0.03125f})
    for (int rep = 0; rep < 4; ++rep)
      for (std::size_t k = 0; k < 16; ++k) x.push_back(kNF4Code[(k + static_cast<std::size_t>(rep)) % 16] * scale);
  NF4Options opt;
  opt.double_quant = false;
  const NF4Tensor t = quantize_nf4(x.data(), {2, 64}, opt);
  CHECK(t.absmax[0] == 2.5f);
  CHECK(t.absmax[1] == 0.03125f);
  CHECK(t.packed[0] == 0x01);  // elements 0, 1 = codes 0, 1: high nibble first
  CHECK(t.packed[7] == 0xEF);
  const Matrix<float> back = dequantize_nf4<float>(t);
  for (std::size_t i = 0; i < x.size(); ++i) CHECK(back.data()[i] == x[i]);
}

TEMPLATE_TEST_CASE("NF4 dequantization error is within half the largest code gap times absmax", "[quant][nf4]", float,
                   double) {
  Rng rng(8);
  const Matrix<TestType> w = test::random_matrix<TestType>(24, 40, rng, 0.05);  // 960 values, 15 blocks
  NF4Options opt;
  opt.double_quant = false;
  const NF4Tensor t = quantize_nf4<TestType>(w, opt);
  const Matrix<TestType> back = dequantize_nf4<TestType>(t);
  const double half_gap = 0.5 * max_gap(kNF4Code.data(), 16);
  CHECK(half_gap == Approx(0.5 * (1.0 - 0.6961928009986877)).epsilon(1e-7));
  for (Index i = 0; i < w.size(); ++i) {
    const double a = t.absmax[static_cast<std::size_t>(i) / 64];
    const double err = std::abs(static_cast<double>(back.data()[i]) - static_cast<float>(w.data()[i]));
    CHECK(err <= half_gap * a * (1.0 + 1e-6));
  }
}

TEST_CASE("Ragged last block: a short block with its own absmax, odd count padded with the code of 0", "[quant][nf4]") {
  Rng rng(9);
  std::vector<float> x = random_values(64 + 5, rng);
  x[66] = 3.0f;  // the absmax of the 5-value block only
  NF4Options opt;
  opt.double_quant = false;
  const NF4Tensor t = quantize_nf4(x.data(), {69}, opt);
  REQUIRE(t.absmax.size() == 2);
  CHECK(t.absmax[1] == 3.0f);
  CHECK(t.absmax[0] < 1.0f);
  REQUIRE(t.packed.size() == 35);
  CHECK((t.packed[34] & 0x0F) == 7);  // code of 0.0
  CHECK((t.packed[33] >> 4) == 15);   // element 66 (even): high nibble of byte 33, code of +1
  std::vector<float> back(69);
  dequantize_nf4_range<float>(t, 0, 69, back.data());
  CHECK(back[66] == 3.0f);
  // Decoding an odd-starting sub-range gives the same values as the full decode.
  std::vector<float> part(20);
  dequantize_nf4_range<float>(t, 51, 20 - 2, part.data());
  for (int i = 0; i < 18; ++i) CHECK(part[static_cast<std::size_t>(i)] == back[static_cast<std::size_t>(51 + i)]);
}

TEST_CASE("All-zero blocks decode to zero (up to the DQ error of their absmax)", "[quant][nf4]") {
  std::vector<float> x(128, 0.0f);
  x[100] = 1.0f;
  const NF4Tensor t = quantize_nf4(x.data(), {2, 64}, {64, false});
  const Matrix<double> back = dequantize_nf4<double>(t);
  CHECK(back.row(0).cwiseAbs().maxCoeff() == 0.0);
  CHECK(back(1, 36) == 1.0);
  // With DQ the zero absmax is itself stored to 8 bits around the mean 0.5: |â_0| ≤ half-gap · 0.5.
  const NF4Tensor dq = quantize_nf4(x.data(), {2, 64});
  CHECK(std::abs(dq.block_absmax(0)) <= 0.5 * max_gap(dynamic_map_signed().data(), 256) * 0.5);
  // bitsandbytes' CPU kernel writes the code of 0 for an all-zero block, so it decodes to exact zeros;
  // the CUDA kernel's 0 · (1/0) = NaN gives code 0 (−1), decoded as −â.
  CHECK((dq.packed[0] >> 4) == 7);
  CHECK(dequantize_nf4<double>(dq).row(0).cwiseAbs().maxCoeff() == 0.0);
  NF4Options cuda;
  cuda.kernel = BnbKernel::Cuda;
  const NF4Tensor dq_cuda = quantize_nf4(x.data(), {2, 64}, cuda);
  CHECK((dq_cuda.packed[0] >> 4) == 0);
  CHECK(dequantize_nf4<double>(dq_cuda).row(0).cwiseAbs().maxCoeff() == std::abs(dq_cuda.block_absmax(0)));
}

TEST_CASE("A zero ragged block: the CPU kernel stores the clamped absmax 1e-38, the CUDA kernel 0", "[quant][nf4]") {
  std::vector<float> x(64 + 6, 0.0f);
  x[3] = 0.5f;
  NF4Options opt;
  opt.double_quant = false;
  const NF4Tensor cpu = quantize_nf4(x.data(), {70}, opt);
  REQUIRE(cpu.absmax.size() == 2);
  CHECK(cpu.absmax[0] == 0.5f);
  CHECK(cpu.absmax[1] == 1e-38f);  // absmax.clamp(min=1e-38) is what bitsandbytes stores
  for (std::size_t i = 32; i < 35; ++i) CHECK(cpu.packed[i] == 0x77);
  opt.kernel = BnbKernel::Cuda;
  const NF4Tensor cuda = quantize_nf4(x.data(), {70}, opt);
  CHECK(cuda.absmax[1] == 0.0f);
  for (std::size_t i = 32; i < 35; ++i) CHECK(cuda.packed[i] == 0x00);
  CHECK(dequantize_nf4<float>(cpu).row(0).tail(6).cwiseAbs().maxCoeff() == 0.0f);
  CHECK(dequantize_nf4<float>(cuda).row(0).tail(6).cwiseAbs().maxCoeff() == 0.0f);
}

TEST_CASE("Dynamic map follows create_dynamic_map(signed=True)", "[quant][dq]") {
  const auto& m = dynamic_map_signed();
  CHECK(std::is_sorted(m.begin(), m.end()));
  CHECK(m.front() == Approx(-0.99296875).epsilon(1e-6));  // −(0.9859375 + 1)/2, the last mean of exponent 0
  CHECK(m.back() == 1.0f);
  CHECK(std::count(m.begin(), m.end(), 0.0f) == 1);
  // Independent evaluation: for exponent e = 10^(i−6) and 2^i linspace intervals of [0.1, 1],
  // the midpoints ±e·(0.1 + 0.9·(j + 0.5)/2^i).
  std::vector<double> ref = {0.0, 1.0};
  for (int i = 0; i < 7; ++i)
    for (int j = 0; j < (1 << i); ++j) {
      const double v = std::pow(10.0, i - 6) * (0.1 + 0.9 * (j + 0.5) / (1 << i));
      ref.push_back(v);
      ref.push_back(-v);
    }
  std::sort(ref.begin(), ref.end());
  REQUIRE(ref.size() == 256);
  // torch's float32 arithmetic rounds each linspace point, mean and product: within 1 ulp of the
  // exact map, and not equal to its rounding in 72 entries (the "1 ulp off" symptom).
  std::size_t differ = 0;
  for (std::size_t k = 0; k < 256; ++k) {
    const float exact = static_cast<float>(ref[k]);
    CHECK(std::abs(m[k] - exact) <= std::abs(exact) * 1.2e-7f);
    differ += m[k] != exact;
  }
  CHECK(differ == 72);
  // Bit patterns of torch 2.15's create_dynamic_map() on x86-64 AVX512 (the full map is checked
  // against bitsandbytes' file in test_bnb_format.cpp).
  auto bits = [](float v) {
    std::uint32_t u;
    std::memcpy(&u, &v, 4);
    return u;
  };
  CHECK(bits(m[129]) == 911874708u);  // 3.250000190746505e-06; the exactly rounded value is 1 ulp lower
  CHECK(bits(m[200]) == 1047474995u);
  CHECK(bits(m[254]) == 1065235251u);  // 0.992968738079071
}

TEST_CASE("8-bit blockwise quantization picks the nearest dynamic-map value (CPU: up to its table's resolution)",
          "[quant][dq]") {
  Rng rng(10);
  std::vector<float> x = random_values(600 + 256, rng, 1.0);
  std::fill(x.begin() + 600, x.end(), 0.0f);  // the last block (768 .. 855) is all zero
  const Blockwise8 cuda = quantize_blockwise8(x.data(), x.size(), 256, BnbKernel::Cuda);
  const Blockwise8 cpu = quantize_blockwise8(x.data(), x.size(), 256, BnbKernel::Cpu);
  REQUIRE(cpu.absmax.size() == 4);
  CHECK(cpu.absmax == cuda.absmax);
  const auto& m = dynamic_map_signed();
  std::size_t same = 0;
  for (std::size_t i = 0; i < 600; ++i) {
    const float a = cuda.absmax[i / 256];
    const float v = x[i] * (1.0f / a);
    const int best = nearest_index(m, v);
    CHECK(cuda.codes[i] == best);
    // The CPU kernel looks v up in a table of 65536 cells of width 2/65535: its code is the nearest
    // to some point of v's cell, so it is at most one cell width farther than the nearest.
    CHECK(std::abs(v - m[cpu.codes[i]]) <= std::abs(v - m[static_cast<std::size_t>(best)]) + 2.0f / 65535.0f);
    same += cpu.codes[i] == best;
  }
  CHECK(same > 550);  // away from 0 the cells are far finer than the map
  for (std::size_t i = 768; i < x.size(); ++i) CHECK(cpu.codes[i] == 0);  // block 3 is all zero
  PEFT_REQUIRE_THROWS_WITH(quantize_blockwise8(x.data(), x.size(), 100), ConfigError, "got 100");
}

TEST_CASE("Double quantization: mean offset, 8-bit codes per 256 blocks, bounded absmax error", "[quant][dq]") {
  Rng rng(11);
  const std::vector<float> x = random_values(64 * 600 + 10, rng);  // 601 blocks → 3 nested blocks
  const NF4Tensor plain = quantize_nf4(x.data(), {static_cast<std::int64_t>(x.size())}, {64, false});
  const NF4Tensor dq = quantize_nf4(x.data(), {static_cast<std::int64_t>(x.size())}, {64, true});
  REQUIRE(dq.nested);
  CHECK(dq.packed == plain.packed);  // DQ changes only how the scales are stored
  REQUIRE(dq.qabsmax.size() == 601);
  REQUIRE(dq.nested_absmax.size() == 3);
  double mean = 0.0;
  for (float a : plain.absmax) mean += a;
  mean /= 601.0;
  // torch's float32 mean (cascade sum, then ÷ n): within a few ulp of the exact mean.
  CHECK(dq.nested_offset == torch_cpu_mean(plain.absmax.data(), 601));
  CHECK(std::abs(dq.nested_offset - mean) <= 4e-7 * mean);
  const auto& m = dynamic_map_signed();
  const double half_gap = 0.5 * max_gap(m.data(), 256);
  for (std::size_t b = 0; b < 601; ++b) {
    const float centered = plain.absmax[b] - dq.nested_offset;
    // Scale of the nested block: max |centered| over its 256 entries, computed the slow way.
    float s = 0.0f;
    for (std::size_t c = (b / 256) * 256; c < std::min<std::size_t>(601, (b / 256 + 1) * 256); ++c)
      s = std::max(s, std::abs(plain.absmax[c] - dq.nested_offset));
    CHECK(dq.nested_absmax[b / 256] == s);
    CHECK(std::abs(centered * (1.0f / s) - m[dq.qabsmax[b]]) <=
          std::abs(centered * (1.0f / s) - m[static_cast<std::size_t>(nearest_index(m, centered * (1.0f / s)))]) +
              2.0f / 65535.0f);
    CHECK(std::abs(dq.block_absmax(b) - plain.absmax[b]) <= half_gap * s + 1e-7);
  }
  // Memory: 4 + 8/64 + 32/(64·256) bits per value, plus the two code tables.
  const double n = static_cast<double>(x.size());
  CHECK(dq.storage_bytes() == (x.size() + 1) / 2 + 601 + 4 * 3 + 4 + 64 + 1024);
  CHECK(plain.storage_bytes() == (x.size() + 1) / 2 + 4 * 601 + 64);
  CHECK(dq.bits_per_parameter() == Approx(8.0 * static_cast<double>(dq.storage_bytes()) / n));
}

TEST_CASE("Bits per parameter of a 4096 x 4096 layer: 4.127 with DQ, 4.5 without", "[quant][dq]") {
  NF4Tensor t;
  t.shape = {4096, 4096};
  t.packed.resize(4096 * 4096 / 2);
  t.nested = true;
  t.qabsmax.resize(t.num_blocks());
  t.nested_absmax.resize(t.num_blocks() / 256);
  CHECK_NOTHROW(t.validate("t"));
  CHECK(t.bits_per_parameter() == Approx(4.127).margin(5e-4));
  t.nested = false;
  t.absmax.resize(t.num_blocks());
  CHECK(t.bits_per_parameter() == Approx(4.5).margin(5e-4));
}

TEST_CASE("NF4 rejects bad input with named errors", "[quant][nf4][errors]") {
  std::vector<float> x(128, 0.5f);
  PEFT_REQUIRE_THROWS_WITH(quantize_nf4(x.data(), {2, 64}, {100, true}), ConfigError, "blocksize must be one of");
  PEFT_REQUIRE_THROWS_WITH(quantize_nf4(x.data(), {2, 64}, {64, true, 300}), ConfigError, "nested_blocksize");
  PEFT_REQUIRE_THROWS_WITH(quantize_nf4(x.data(), {0, 64}), ShapeError, "non-positive");
  x[3] = std::numeric_limits<float>::infinity();
  PEFT_REQUIRE_THROWS_WITH(quantize_nf4(x.data(), {2, 64}), NumericError, "value 3 is not finite");
  x[3] = 0.5f;
  NF4Tensor t = quantize_nf4(x.data(), {2, 64});
  NF4Tensor bad = t;
  bad.packed.pop_back();
  PEFT_REQUIRE_THROWS_WITH(bad.validate("layers.0.q"), ShapeError,
                           "layers.0.q: packed weight has 63 bytes, expected 64");
  bad = t;
  bad.qabsmax.push_back(0);
  PEFT_REQUIRE_THROWS_WITH(bad.validate("w"), ShapeError, "quantized absmax has 3 values, expected 2");
  bad = t;
  bad.nested_absmax.clear();
  PEFT_REQUIRE_THROWS_WITH(bad.validate("w"), ShapeError, "nested_absmax has 0 values, expected 1");
  bad = t;
  bad.quant_type = "fp4";
  PEFT_REQUIRE_THROWS_WITH(bad.validate("w"), ConfigError, "quant_type \"fp4\" is not supported");
  bad = t;
  bad.blocksize = 32;
  PEFT_REQUIRE_THROWS_WITH(dequantize_nf4<float>(bad), ConfigError, "blocksize must be one of 64");
  bad = t;
  bad.nested = false;
  PEFT_REQUIRE_THROWS_WITH(bad.validate("w"), ShapeError, "absmax has 0 values, expected 2");
}
