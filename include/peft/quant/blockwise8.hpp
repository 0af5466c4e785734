#pragma once
// 8-bit blockwise quantization with the signed dynamic map, as bitsandbytes uses it for the second
// level of QLoRA's double quantization (Dettmers et al. 2023, "QLoRA", §3; the dynamic data type of
// Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning").
//
// Dynamic map (bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)):
//   for i = 0..6:  b = linspace(0.1, 1, 2^i + 1),  m_k = (b_k + b_{k+1}) / 2  (2^i means)
//                  values ±10^(i−6) · m_k
//   plus 0 and 1, sorted: 2·(1+2+…+64) + 2 = 256 values in [−0.993, 1].
// bitsandbytes evaluates this with torch in float32, and we repeat that arithmetic bit for bit:
//   step = fl(fl(1 − 0.1f) / (n − 1)),
//   b_k  = fl(0.1f + step·k)            for k < n/2   (torch's CPU linspace kernel: from the start)
//   b_k  = fl(1 − step·(n − 1 − k))     for k ≥ n/2   (from the end)
// with ONE rounding for each b_k: torch's AVX2 and AVX512 kernels (the path of any x86-64 CPU since
// 2013) are compiled with fused multiply-add. torch's portable DEFAULT kernel rounds the product
// first and builds a map that differs in 42 of 256 entries by 1 ulp; a file always stores its map
// (`nested_quant_map`) and decoding uses the stored one, so reading is exact either way. Then
// m_k = fl(b_k + b_{k+1}) / 2 and the value fl(fl32(10^(i−6)) · m_k) (torch casts the Python scalar
// to float32 before multiplying). Checked against torch 2.15 (tests/quant/data/README.md).
//
// Blockwise quantization: per block of `blocksize` values absmax_b = max |x|, each value becomes the
// 8-bit index of a map entry, x̂ = code[q] · absmax_b. Two kernels exist and pick q differently:
//   BnbKernel::Cpu  (bitsandbytes ≥ 0.50 CPU backend, cquantize_blockwise_cpu_fp32): q = LUT[j],
//     j = trunc(fl(fl(fl(clamp(x·(1/absmax_b), −1, 1) + 1) · 0.5 · 65535) + 0.5)), a 65536-entry
//     table whose entry j is the number of float midpoints fl((c_k + c_{k+1}) / 2) strictly below
//     fl(−1 + fl(2j / 65535)). It is nearest-value up to the table's resolution 2/65535 (so values
//     near 0, where map entries are closer than that, share a code); an all-zero block gets codes 0.
//   BnbKernel::Cuda (kQuantizeBlockwise, General8bit): dQuantize, the CUDA kernel's 7-step binary
//     search and midpoint test, reproduced step by step (nearest-value except that exact midpoints
//     resolve by the search path; NaN from an all-zero block falls through to index 0).
// Only the Cpu kernel is checked byte for byte against the real package (the fixture is made on CPU).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/error.hpp"

namespace peft::quant {

/// Which bitsandbytes kernel a quantizer reproduces (see the file comment and nf4.hpp).
enum class BnbKernel {
  Cpu,   ///< the CPU backend of bitsandbytes 0.50 (verified byte for byte against the real package)
  Cuda,  ///< the CUDA kernels, as their source reads (not verified on a GPU here)
};

namespace detail {
/// fl32 of a value computed exactly in double. Every use below feeds it a double expression that is
/// exact (products of floats with ≤ 29 significant bits in total, sums of close floats), so the
/// result is the float operation rounded once, whatever fp-contract or FMA the compiler applies.
inline float round_f32(double exact) { return static_cast<float>(exact); }
}  // namespace detail

/// bitsandbytes' signed 8-bit dynamic map, 256 sorted float values, bit-identical to the float32
/// map torch ≥ 2.x builds on x86-64 AVX2/AVX512 (see the file comment for the arithmetic).
inline const std::array<float, 256>& dynamic_map_signed() {
  static const std::array<float, 256> kMap = [] {
    using detail::round_f32;
    // Python's 10 ** (i − 6) as a double literal; torch casts it to float32 for the product.
    static constexpr double kScale[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
    std::array<float, 256> m{};
    std::size_t k = 0;
    const float start = 0.1f;
    const float end = 1.0f;
    for (int i = 0; i < 7; ++i) {
      const int n = (1 << i) + 1;  // linspace points; n − 1 means
      // step = fl(fl(end − start) / (n − 1)); a correctly rounded float quotient via double is exact
      // to the float result (53 ≥ 2·24 + 2 bits, so no double rounding).
      const float step = round_f32(static_cast<double>(round_f32(static_cast<double>(end) - start)) / (n - 1));
      float b[65];
      for (int j = 0; j < n; ++j)
        b[j] = j < n / 2 ? round_f32(static_cast<double>(start) + static_cast<double>(step) * j)
                         : round_f32(static_cast<double>(end) - static_cast<double>(step) * (n - 1 - j));
      const float scale = static_cast<float>(kScale[i]);
      for (int j = 0; j + 1 < n; ++j) {
        const float mean = round_f32(static_cast<double>(b[j]) + b[j + 1]) * 0.5f;  // halving is exact
        const float v = round_f32(static_cast<double>(scale) * mean);
        m[k++] = v;
        m[k++] = -v;
      }
    }
    m[k++] = 0.0f;
    m[k++] = 1.0f;
    std::sort(m.begin(), m.end());
    return m;
  }();
  return kMap;
}

/// bitsandbytes' CPU quantization table for a sorted 256-entry code (build_quantize_lut): entry j
/// is the number of float midpoints fl((c_k + c_{k+1}) / 2) strictly below fl(−1 + fl(2j / 65535)).
struct DynamicLut {
  static constexpr int kSize = 65536;
  std::array<std::uint8_t, kSize> table{};

  explicit DynamicLut(const float* code) {
    using detail::round_f32;
    float mid[255];
    for (int k = 0; k < 255; ++k) mid[k] = round_f32(0.5 * (static_cast<double>(code[k]) + code[k + 1]));
    int c = 0;
    for (int j = 0; j < kSize; ++j) {
      const float val = round_f32(-1.0 + static_cast<double>(round_f32(2.0 * j / (kSize - 1))));
      while (c < 255 && mid[c] < val) ++c;
      table[static_cast<std::size_t>(j)] = static_cast<std::uint8_t>(c);
    }
  }

  /// The code index of a normalized value x (norm_to_lut_index, then the table).
  std::uint8_t operator()(float x) const {
    using detail::round_f32;
    x = std::clamp(x, -1.0f, 1.0f);
    const float half = round_f32(static_cast<double>(x) + 1.0) * 0.5f;
    const float scaled = round_f32(static_cast<double>(half) * (kSize - 1));
    const float index = round_f32(static_cast<double>(scaled) + 0.5);
    return table[static_cast<std::size_t>(static_cast<std::uint16_t>(index))];
  }
};

/// The table of the dynamic map, built once (64 KiB).
inline const DynamicLut& dynamic_map_lut() {
  static const DynamicLut kLut(dynamic_map_signed().data());
  return kLut;
}

/// bitsandbytes' dQuantize<0>: binary search over a sorted 256-entry code, then the midpoint test.
/// A NaN input (0 · ∞ for an all-zero block) falls through every comparison to index 0, as on GPU.
inline std::uint8_t quantize_dynamic(const float* code, float x) {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = -1.0f;
  float upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return static_cast<std::uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + val) * 0.5f;
  return static_cast<std::uint8_t>(x < midpoint ? lower_pivot : pivot);
}

/// Result of 8-bit blockwise quantization: one code byte per value, one fp32 absmax per block.
struct Blockwise8 {
  std::vector<std::uint8_t> codes;
  std::vector<float> absmax;
  int blocksize = 256;
};

/// The block sizes bitsandbytes' kernels accept.
inline bool valid_blocksize(long long b) {
  return b == 64 || b == 128 || b == 256 || b == 512 || b == 1024 || b == 2048 || b == 4096;
}

inline void check_blocksize(const std::string& who, const char* what, long long b) {
  if (!valid_blocksize(b))
    throw ConfigError(who + ": " + what + " must be one of 64, 128, 256, 512, 1024, 2048, 4096, got " +
                      std::to_string(b));
}

/// Quantizes x[0..n) in blocks (quantize_blockwise with the dynamic map) the way `kernel` does.
inline Blockwise8 quantize_blockwise8(const float* x, std::size_t n, int blocksize, BnbKernel kernel = BnbKernel::Cpu) {
  check_blocksize("quantize_blockwise8", "blocksize", blocksize);
  Blockwise8 out;
  out.blocksize = blocksize;
  const std::size_t bs = static_cast<std::size_t>(blocksize);
  const std::size_t blocks = (n + bs - 1) / bs;
  out.codes.resize(n);
  out.absmax.resize(blocks);
  const float* code = dynamic_map_signed().data();
  const DynamicLut* lut = kernel == BnbKernel::Cpu ? &dynamic_map_lut() : nullptr;
  for (std::size_t b = 0; b < blocks; ++b) {
    const std::size_t begin = b * bs;
    const std::size_t end = std::min(n, begin + bs);
    float amax = 0.0f;
    for (std::size_t i = begin; i < end; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    out.absmax[b] = amax;
    if (lut != nullptr && amax == 0.0f) {  // the CPU kernel writes 0 for an all-zero block
      std::fill(out.codes.begin() + static_cast<std::ptrdiff_t>(begin),
                out.codes.begin() + static_cast<std::ptrdiff_t>(end), 0);
      continue;
    }
    const float inv = 1.0f / amax;  // both kernels multiply by the reciprocal, they do not divide
    for (std::size_t i = begin; i < end; ++i)
      out.codes[i] = lut != nullptr ? (*lut)(x[i] * inv) : quantize_dynamic(code, x[i] * inv);
  }
  return out;
}

}  // namespace peft::quant
