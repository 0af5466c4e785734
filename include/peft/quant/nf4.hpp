#pragma once
// NF4 blockwise quantization with optional double quantization, bit-compatible with bitsandbytes
// (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3).
//
// NormalFloat4: 16 code values q_k ∈ [−1, 1] (quantiles of N(0, 1), normalized; 8 non-negative,
// 7 negative, an exact 0). A weight W is flattened row-major and cut into blocks of B = 64 values
// (the last block may be shorter); per block
//   a_b = max_{i∈b} |w_i|                     (fp32 absmax)
//   k_i = NF4(w_i · (1/a_b))                  (the kernel multiplies by the fp32 reciprocal)
//   ŵ_i = q_{k_i} · a_b                       (fp32)
// NF4(x) is the CUDA kernel's decision tree dQuantizeNF4: each threshold is the fp32 literal of the
// midpoint between adjacent codes and the test is `x > t`, so a value on a threshold takes the LOWER
// index. Two codes per byte, element 2i in the high nibble, element 2i+1 in the low nibble; with an
// odd count the last low nibble holds the code of 0 (the kernel pads its load with zeros).
//
// Double quantization (compress_statistics=True): the absmax vector a is itself quantized,
//   c = mean(a),  a' = a − c,  a' → 8-bit blockwise with the dynamic map, blocks of 256,
// leaving one code byte per block plus one fp32 scale per 256 blocks and the fp32 offset c:
//   â_b = fl(fl(d_{k_b} · s_j) + c),   j = ⌊b / 256⌋.
// Storage: 4 + 32/64 = 4.5 bits per parameter plain; 4 + 8/64 + 32/(64·256) ≈ 4.127 with DQ
// (plus the two code tables, 64 + 1024 bytes per tensor); see NF4Tensor::bits_per_parameter().
//
// The mean c is accumulated in double and rounded once; torch's GPU float32 reduction may differ
// from it in the last bit, which can move the DQ codes of values sitting on a decision boundary.
// Decoding a tensor read from a file uses its stored offset and maps and is exact.
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/quant/blockwise8.hpp"

namespace peft::quant {

/// The NF4 code (bitsandbytes get_4bit_type("nf4")), index k ↦ q_k.
inline constexpr std::array<float, 16> kNF4Code = {-1.0f,
                                                   -0.6961928009986877f,
                                                   -0.5250730514526367f,
                                                   -0.39491748809814453f,
                                                   -0.28444138169288635f,
                                                   -0.18477343022823334f,
                                                   -0.09105003625154495f,
                                                   0.0f,
                                                   0.07958029955625534f,
                                                   0.16093020141124725f,
                                                   0.24611230194568634f,
                                                   0.33791524171829224f,
                                                   0.44070982933044434f,
                                                   0.5626170039176941f,
                                                   0.7229568362236023f,
                                                   1.0f};

/// Decision thresholds of dQuantizeNF4, t_k between q_k and q_{k+1} (fp32 literals from the kernel).
inline constexpr std::array<float, 15> kNF4Thresholds = {
    -0.8480964004993439f,  -0.6106329262256622f,   -0.4599952697753906f, -0.33967943489551544f, -0.23460740596055984f,
    -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,   0.2035212516784668f,
    0.2920137718319893f,   0.3893125355243683f,    0.5016634166240692f,  0.6427869200706482f,   0.8614784181118011f};

/// The NF4 code index of a normalized value x: the number of thresholds t with x > t, i.e. the
/// kernel's 4-level tree (ties go to the lower index; NaN goes to 0 like on the GPU).
inline std::uint8_t quantize_nf4_value(float x) {
  // Balanced binary search over the sorted thresholds: the same comparisons as dQuantizeNF4.
  int k = 0;
  if (x > kNF4Thresholds[7]) k = 8;
  if (x > kNF4Thresholds[static_cast<std::size_t>(k + 3)]) k += 4;
  if (x > kNF4Thresholds[static_cast<std::size_t>(k + 1)]) k += 2;
  if (x > kNF4Thresholds[static_cast<std::size_t>(k)]) k += 1;
  return static_cast<std::uint8_t>(k);
}

struct NF4Options {
  int blocksize = 64;             ///< values per absmax block (bitsandbytes: 64 .. 4096)
  bool double_quant = true;       ///< compress_statistics: quantize the absmax vector (QLoRA's DQ)
  int nested_blocksize = 256;     ///< absmax values per second-level block
  const char* dtype = "float32";  ///< recorded in quant_state "dtype": float32, float16 or bfloat16
};

namespace detail {
inline std::string nf4_shape_str(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}
}  // namespace detail

/// A 4-bit NF4 tensor in bitsandbytes' representation (QuantState + packed data).
struct NF4Tensor {
  std::vector<std::int64_t> shape;  ///< logical shape, e.g. [out, in]
  std::string dtype = "float32";    ///< quant_state "dtype"
  std::string quant_type = "nf4";
  int blocksize = 64;
  std::vector<std::uint8_t> packed;  ///< ⌈n/2⌉ bytes, element 2i in the high nibble
  std::array<float, 16> quant_map = kNF4Code;
  std::vector<float> absmax;  ///< plain: one fp32 per block; empty when nested

  bool nested = false;                ///< double quantized
  std::vector<std::uint8_t> qabsmax;  ///< nested: one 8-bit code per block
  std::vector<float> nested_absmax;   ///< nested: one fp32 scale per nested block
  std::array<float, 256> nested_quant_map{};
  int nested_blocksize = 256;
  float nested_offset = 0.0f;  ///< mean of the absmax vector
  std::string nested_dtype = "float32";

  /// Number of values; 0 for an empty (default-constructed) tensor. validate() checks that the
  /// product fits, so it cannot overflow on a validated tensor.
  std::int64_t numel() const {
    if (shape.empty()) return 0;
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  /// 2-D view [rows, cols]: rows = shape[0], cols = product of the rest (1-D: [1, n]).
  std::int64_t rows() const { return shape.size() >= 2 ? shape[0] : shape.empty() ? 0 : 1; }
  std::int64_t cols() const {
    if (shape.size() < 2) return numel();
    std::int64_t c = 1;
    for (std::size_t i = 1; i < shape.size(); ++i) c *= shape[i];
    return c;
  }
  std::size_t num_blocks() const {
    const std::size_t n = static_cast<std::size_t>(numel());
    const std::size_t b = static_cast<std::size_t>(blocksize);
    return (n + b - 1) / b;
  }

  /// The fp32 scale of block b (decoded from the DQ codes when nested).
  float block_absmax(std::size_t b) const {
    if (!nested) return absmax[b];
    // Two roundings, as dequantize_blockwise then `absmax += offset` in torch. `volatile` keeps a
    // build with FMA (-march=native, fp-contract=fast) from fusing them into one; it costs one
    // store per block of 64 values.
    volatile float scaled =
        nested_quant_map[qabsmax[b]] * nested_absmax[b / static_cast<std::size_t>(nested_blocksize)];
    return scaled + nested_offset;
  }

  /// Bytes of every buffer a file stores for this tensor: codes, scales, offset and code tables.
  std::size_t storage_bytes() const {
    std::size_t bytes = packed.size() + sizeof(float) * quant_map.size();
    if (nested)
      bytes += qabsmax.size() + sizeof(float) * (nested_absmax.size() + 1 + nested_quant_map.size());
    else
      bytes += sizeof(float) * absmax.size();
    return bytes;
  }

  /// 8 · storage_bytes / numel: ≈ 4.127 with DQ at blocksize 64, ≈ 4.5 without.
  double bits_per_parameter() const {
    const std::int64_t n = numel();
    return n == 0 ? 0.0 : 8.0 * static_cast<double>(storage_bytes()) / static_cast<double>(n);
  }

  /// Checks that every buffer has the size the shape and block sizes imply. Throws ConfigError for
  /// bad block sizes or quant types, ShapeError for inconsistent buffers; `who` names the tensor.
  void validate(const std::string& who) const {
    if (quant_type != "nf4")
      throw ConfigError(who + ": quant_type \"" + quant_type + "\" is not supported (only \"nf4\")");
    check_blocksize(who, "blocksize", blocksize);
    if (shape.empty()) throw ShapeError(who + ": shape must have at least one dimension");
    std::int64_t count = 1;
    for (auto d : shape) {
      if (d <= 0) throw ShapeError(who + ": shape has a non-positive dimension " + std::to_string(d));
      if (__builtin_mul_overflow(count, d, &count) || count > (std::int64_t{1} << 50))
        throw ShapeError(who + ": shape " + detail::nf4_shape_str(shape) + " has more than 2^50 values");
    }
    if (quant_map != kNF4Code)
      throw ConfigError(who + ": quant_map is not the NF4 code (bitsandbytes' get_4bit_type(\"nf4\"))");
    const std::size_t n = static_cast<std::size_t>(numel());
    const std::size_t want_packed = (n + 1) / 2;
    if (packed.size() != want_packed)
      throw ShapeError(who + ": packed weight has " + std::to_string(packed.size()) + " bytes, expected " +
                       std::to_string(want_packed) + " for " + std::to_string(n) + " values");
    const std::size_t blocks = num_blocks();
    if (!nested) {
      if (absmax.size() != blocks)
        throw ShapeError(who + ": absmax has " + std::to_string(absmax.size()) + " values, expected " +
                         std::to_string(blocks) + " (one per block of " + std::to_string(blocksize) + ")");
      return;
    }
    check_blocksize(who, "nested_blocksize", nested_blocksize);
    if (qabsmax.size() != blocks)
      throw ShapeError(who + ": quantized absmax has " + std::to_string(qabsmax.size()) + " values, expected " +
                       std::to_string(blocks));
    const std::size_t nb = static_cast<std::size_t>(nested_blocksize);
    const std::size_t want_nested = (blocks + nb - 1) / nb;
    if (nested_absmax.size() != want_nested)
      throw ShapeError(who + ": nested_absmax has " + std::to_string(nested_absmax.size()) + " values, expected " +
                       std::to_string(want_nested));
  }
};

/// Quantizes n = Π shape fp32 values (row-major) to NF4 (+ DQ). Non-finite input → NumericError.
inline NF4Tensor quantize_nf4(const float* x, const std::vector<std::int64_t>& shape, const NF4Options& opt = {}) {
  NF4Tensor t;
  t.shape = shape;
  t.dtype = opt.dtype;
  t.blocksize = opt.blocksize;
  check_blocksize("quantize_nf4", "blocksize", opt.blocksize);
  if (opt.double_quant) check_blocksize("quantize_nf4", "nested_blocksize", opt.nested_blocksize);
  if (shape.empty()) throw ShapeError("quantize_nf4: shape must have at least one dimension");
  for (auto d : shape)
    if (d <= 0)
      throw ShapeError("quantize_nf4: shape " + detail::nf4_shape_str(shape) + " has a non-positive dimension");
  const std::size_t n = static_cast<std::size_t>(t.numel());
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i]))
      throw NumericError("quantize_nf4: value " + std::to_string(i) + " is not finite (" + std::to_string(x[i]) + ")");

  const std::size_t bs = static_cast<std::size_t>(opt.blocksize);
  const std::size_t blocks = t.num_blocks();
  std::vector<float> amax(blocks);
  t.packed.assign((n + 1) / 2, 0);
  for (std::size_t b = 0; b < blocks; ++b) {
    const std::size_t begin = b * bs;
    const std::size_t end = std::min(n, begin + bs);
    float a = 0.0f;
    for (std::size_t i = begin; i < end; ++i) a = std::fmax(a, std::fabs(x[i]));
    amax[b] = a;
    const float inv = 1.0f / a;  // ∞ for an all-zero block: 0·∞ = NaN → code 0, decoded as −1·0 = −0
    for (std::size_t i = begin; i < end; ++i) {
      const std::uint8_t k = quantize_nf4_value(x[i] * inv);
      t.packed[i >> 1] |= static_cast<std::uint8_t>((i & 1) ? k : (k << 4));
    }
  }
  if (n & 1) t.packed[n >> 1] |= quantize_nf4_value(0.0f);  // the kernel's zero padding

  if (!opt.double_quant) {
    t.absmax = std::move(amax);
    return t;
  }
  t.nested = true;
  t.nested_blocksize = opt.nested_blocksize;
  double sum = 0.0;
  for (float a : amax) sum += a;
  t.nested_offset = static_cast<float>(sum / static_cast<double>(blocks));
  for (float& a : amax) a -= t.nested_offset;
  Blockwise8 q = quantize_blockwise8(amax.data(), blocks, opt.nested_blocksize);
  t.qabsmax = std::move(q.codes);
  t.nested_absmax = std::move(q.absmax);
  t.nested_quant_map = dynamic_map_signed();
  return t;
}

/// Quantizes a row-major matrix [out, in] (any scalar; values are taken as fp32 like bitsandbytes).
template <class T>
NF4Tensor quantize_nf4(const ConstMatrixRef<T>& w, const NF4Options& opt = {}) {
  Matrix<float> wf = w.template cast<float>();
  return quantize_nf4(wf.data(), {static_cast<std::int64_t>(w.rows()), static_cast<std::int64_t>(w.cols())}, opt);
}

/// Decodes the flattened values [first, first + count) into out[0..count): ŵ = q_k · â_b in fp32,
/// then converted to T (exact for double). No allocation; the caller validates the tensor once.
template <class T>
void dequantize_nf4_range(const NF4Tensor& t, std::int64_t first, std::int64_t count, T* out) {
  const std::int64_t bs = t.blocksize;
  const std::int64_t end = first + count;
  const float* code = t.quant_map.data();
  const std::uint8_t* p = t.packed.data();
  std::int64_t e = first;
  while (e < end) {
    const std::int64_t b = e / bs;
    const std::int64_t seg_end = std::min(end, (b + 1) * bs);
    const float s = t.block_absmax(static_cast<std::size_t>(b));
    T* o = out + (e - first);
    if (e & 1) {  // a segment starting on a low nibble (only when `first` is odd)
      *o++ = static_cast<T>(code[p[e >> 1] & 0x0F] * s);
      ++e;
    }
    for (; e + 1 < seg_end; e += 2) {  // whole bytes: high nibble, then low nibble
      const std::uint8_t byte = p[e >> 1];
      *o++ = static_cast<T>(code[byte >> 4] * s);
      *o++ = static_cast<T>(code[byte & 0x0F] * s);
    }
    if (e < seg_end) {
      *o = static_cast<T>(code[p[e >> 1] >> 4] * s);
      ++e;
    }
  }
}

/// Decodes rows [row0, row0 + n) of the 2-D view into out [n, cols] (resized only when needed).
template <class T>
void dequantize_nf4_rows(const NF4Tensor& t, Index row0, Index n, Matrix<T>& out) {
  const Index cols = static_cast<Index>(t.cols());
  if (out.rows() != n || out.cols() != cols) out.resize(n, cols);
  dequantize_nf4_range<T>(t, static_cast<std::int64_t>(row0) * cols, static_cast<std::int64_t>(n) * cols, out.data());
}

/// The whole dequantized tensor as a [rows, cols] matrix (validates the tensor first).
template <class T>
Matrix<T> dequantize_nf4(const NF4Tensor& t) {
  t.validate("dequantize_nf4");
  Matrix<T> out;
  dequantize_nf4_rows<T>(t, 0, static_cast<Index>(t.rows()), out);
  return out;
}

}  // namespace peft::quant
