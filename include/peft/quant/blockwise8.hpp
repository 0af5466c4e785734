#pragma once
// 8-bit blockwise quantization with the signed dynamic map, as bitsandbytes uses it for the second
// level of QLoRA's double quantization (Dettmers et al. 2023, "QLoRA", §3; the dynamic data type of
// Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning").
//
// Dynamic map (bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)):
//   for i = 0..6:  b = linspace(0.1, 1, 2^i + 1),  m_k = (b_k + b_{k+1}) / 2  (2^i means)
//                  values ±10^(i−6) · m_k
//   plus 0 and 1, sorted: 2·(1+2+…+64) + 2 = 256 values in [−0.993, 1].
// We evaluate linspace and the means in exact (double) arithmetic and round once to float. torch
// evaluates them in float32 with a SIMD-width-dependent schedule, so a few entries of the map torch
// builds differ from ours by 1 ulp (90 of 256 with torch 1.13 on AVX2, all within 6e-8). A file
// always stores the map it was quantized with (`nested_quant_map`), and we decode with that map, so
// reading is exact; only freshly re-quantized codes can differ, for values within 1 ulp of a decision
// boundary.
//
// Blockwise quantization (kQuantizeBlockwise, General8bit): per block of `blocksize` values
//   absmax_b = max |x|,   q = dQuantize(code, x · (1/absmax_b)),   x̂ = code[q] · absmax_b,
// where dQuantize is the CUDA kernel's 7-step binary search followed by a midpoint test, reproduced
// step by step here (it is nearest-value except that exact midpoints resolve by the search path).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/error.hpp"

namespace peft::quant {

/// bitsandbytes' signed 8-bit dynamic map, 256 sorted float values (see the file comment).
inline const std::array<float, 256>& dynamic_map_signed() {
  static const std::array<float, 256> kMap = [] {
    std::array<float, 256> m{};
    std::size_t k = 0;
    for (int i = 0; i < 7; ++i) {
      const int n = (1 << i) + 1;  // linspace points; n − 1 means
      const double scale = std::pow(10.0, i - 6);
      for (int j = 0; j + 1 < n; ++j) {
        const double lo = 0.1 + 0.9 * j / (n - 1);
        const double hi = 0.1 + 0.9 * (j + 1) / (n - 1);
        const double mean = 0.5 * (lo + hi);
        m[k++] = static_cast<float>(scale * mean);
        m[k++] = static_cast<float>(-scale * mean);
      }
    }
    m[k++] = 0.0f;
    m[k++] = 1.0f;
    std::sort(m.begin(), m.end());
    return m;
  }();
  return kMap;
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

/// Quantizes x[0..n) in blocks (quantize_blockwise with the dynamic map).
inline Blockwise8 quantize_blockwise8(const float* x, std::size_t n, int blocksize,
                                      const std::array<float, 256>& code = dynamic_map_signed()) {
  check_blocksize("quantize_blockwise8", "blocksize", blocksize);
  Blockwise8 out;
  out.blocksize = blocksize;
  const std::size_t bs = static_cast<std::size_t>(blocksize);
  const std::size_t blocks = (n + bs - 1) / bs;
  out.codes.resize(n);
  out.absmax.resize(blocks);
  for (std::size_t b = 0; b < blocks; ++b) {
    const std::size_t begin = b * bs;
    const std::size_t end = std::min(n, begin + bs);
    float amax = 0.0f;
    for (std::size_t i = begin; i < end; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    out.absmax[b] = amax;
    const float inv = 1.0f / amax;  // the kernel multiplies by the reciprocal, it does not divide
    for (std::size_t i = begin; i < end; ++i) out.codes[i] = quantize_dynamic(code.data(), x[i] * inv);
  }
  return out;
}

}  // namespace peft::quant
