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
// NF4(x) = #{t_k : x > t_k}, t_k = fl((q_k + q_{k+1}) / 2), the fp32 midpoints (the CUDA kernel's
// dQuantizeNF4 literals and the CPU backend's torch.bucketize bounds are the same 15 floats), so a
// value on a threshold takes the LOWER index. Two codes per byte, element 2i in the high nibble,
// element 2i+1 in the low nibble; with an odd count the last low nibble holds the code of 0.
// The two bitsandbytes kernels (NF4Options::kernel) differ only in corner cases:
//   BnbKernel::Cpu (bitsandbytes 0.50 CPU backend, torch ops): full blocks use x · fl(1/a_b), the
//     ragged last block uses x / a_b; a_b is clamped to ≥ 1e-38f before scaling, so an all-zero
//     block gets code 7 (the 0 entry) and, for the ragged block only, the STORED absmax is the
//     clamped 1e-38f.
//   BnbKernel::Cuda (kQuantizeBlockwise): every block uses x · fl(1/a_b); an all-zero block gives
//     0 · ∞ = NaN → code 0, decoded as −1 · 0 = −0.
//
// Double quantization (compress_statistics=True): the absmax vector a is itself quantized,
//   c = mean(a),  a' = fl(a − c),  a' → 8-bit blockwise with the dynamic map, blocks of 256,
// leaving one code byte per block plus one fp32 scale per 256 blocks and the fp32 offset c:
//   â_b = fl(fl(d_{k_b} · s_j) + c),   j = ⌊b / 256⌋.
// Storage: 4 + 32/64 = 4.5 bits per parameter plain; 4 + 8/64 + 32/(64·256) ≈ 4.127 with DQ
// (plus the two code tables, 64 + 1024 bytes per tensor); see NF4Tensor::bits_per_parameter().
//
// The mean is torch's float32 `absmax.mean()` on CPU, reproduced bit for bit: sum / n with the sum
// of aten's cascade_sum (SumKernel.cpp), see torch_cpu_sum(). torch sums in 8-lane float vectors on
// x86-64 (DEFAULT, AVX2 and AVX512 builds alike) and, above 32768 values, splits the vector over its
// intra-op threads (NF4Options::torch_threads). A mean taken on a GPU (CUDA bitsandbytes) has its
// own order and may differ from this one in the last bit, which can move a DQ code whose value
// sits on a decision boundary; decoding a tensor read from a file uses its stored offset and maps
// and is always exact.
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/separate.hpp"
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
  int blocksize = 64;                 ///< values per absmax block (bitsandbytes: 64 .. 4096)
  bool double_quant = true;           ///< compress_statistics: quantize the absmax vector (QLoRA's DQ)
  int nested_blocksize = 256;         ///< absmax values per second-level block
  const char* dtype = "float32";      ///< recorded in quant_state "dtype": float32, float16 or bfloat16
  BnbKernel kernel = BnbKernel::Cpu;  ///< whose corner cases and 8-bit rounding to reproduce
  /// torch.get_num_threads() of the run to reproduce: the DQ offset (mean of the absmax) depends on
  /// it only for tensors with at least 32768 blocks (2^21 values at blocksize 64).
  int torch_threads = 1;
};

namespace detail {
// torch's cascade_sum for a contiguous float32 vector (aten/src/ATen/native/cpu/SumKernel.cpp),
// operation for operation. W is the lane count (8: Vectorized<float> as the sum kernel uses it on
// x86-64; 1: the scalar path). Lane l of row i, column k sits at p[i·row_stride + k·col_stride + l].
template <int W>
struct TorchLanes {
  float v[W] = {};
  void add(const float* p) {
    for (int l = 0; l < W; ++l) v[l] += p[l];
  }
  void add(const TorchLanes& o) {
    for (int l = 0; l < W; ++l) v[l] += o.v[l];
  }
};

inline std::int64_t torch_ceil_log2(std::int64_t x) {
  std::int64_t r = 0;
  while ((std::int64_t{1} << r) < x) ++r;
  return r;
}

// multi_row_sum with nrows = 4: four running sums, each a cascade of 4 levels whose level j is
// flushed into level j + 1 every level_step^j rows (level_step = 2^max(4, ⌈log2 size⌉ / 4)).
template <int W>
std::array<TorchLanes<W>, 4> torch_multi_row_sum(const float* p, std::int64_t row_stride, std::int64_t col_stride,
                                                 std::int64_t size) {
  constexpr int kLevels = 4;
  const std::int64_t level_power = std::max<std::int64_t>(4, torch_ceil_log2(size) / kLevels);
  const std::int64_t level_step = std::int64_t{1} << level_power;
  const std::int64_t level_mask = level_step - 1;
  std::array<std::array<TorchLanes<W>, 4>, kLevels> acc{};
  std::int64_t i = 0;
  while (i + level_step <= size) {
    for (std::int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][static_cast<std::size_t>(k)].add(p + i * row_stride + k * col_stride);
    for (int j = 1; j < kLevels; ++j) {
      for (std::size_t k = 0; k < 4; ++k) {
        acc[static_cast<std::size_t>(j)][k].add(acc[static_cast<std::size_t>(j - 1)][k]);
        acc[static_cast<std::size_t>(j - 1)][k] = TorchLanes<W>{};
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) acc[0][static_cast<std::size_t>(k)].add(p + i * row_stride + k * col_stride);
  for (std::size_t j = 1; j < kLevels; ++j)
    for (std::size_t k = 0; k < 4; ++k) acc[0][k].add(acc[j][k]);
  return acc[0];
}

// row_sum: the row seen as [size / 4, 4] (four interleaved partial sums), the rest added to the first.
template <int W>
TorchLanes<W> torch_row_sum(const float* p, std::int64_t stride, std::int64_t size) {
  const std::int64_t size_ilp = size / 4;
  std::array<TorchLanes<W>, 4> part = torch_multi_row_sum<W>(p, 4 * stride, stride, size_ilp);
  for (std::int64_t i = size_ilp * 4; i < size; ++i) part[0].add(p + i * stride);
  for (std::size_t k = 1; k < 4; ++k) part[0].add(part[k]);
  return part[0];
}

// One serial pass: 8-lane vectors over ⌊n/8⌋·8 values, then the scalar tail, then the lanes in order.
inline float torch_serial_sum(const float* x, std::int64_t n) {
  constexpr int kLanes = 8;
  if (n < kLanes) return torch_row_sum<1>(x, 1, n).v[0];
  const std::int64_t vecs = n / kLanes;
  const TorchLanes<kLanes> lanes = torch_row_sum<kLanes>(x, kLanes, vecs);
  float acc = 0.0f;
  for (std::int64_t k = vecs * kLanes; k < n; ++k) acc += x[k];
  for (int l = 0; l < kLanes; ++l) acc += lanes.v[l];
  return acc;
}
}  // namespace detail

/// torch.sum of a contiguous float32 CPU vector, bit for bit (torch 2.x, x86-64). From 32768 values
/// on, torch splits the vector into min(threads, ⌈n/32768⌉) chunks of ⌈n/chunks⌉ values (at::parallel_for),
/// sums each, and sums the per-thread results (one slot per thread, zeros for idle ones) again.
inline float torch_cpu_sum(const float* x, std::size_t n, int threads = 1) {
  const std::int64_t count = static_cast<std::int64_t>(n);
  constexpr std::int64_t kGrain = 32768;  // at::internal::GRAIN_SIZE
  if (threads <= 1 || count < kGrain) return detail::torch_serial_sum(x, count);
  const std::int64_t used = std::min<std::int64_t>(threads, (count + kGrain - 1) / kGrain);
  const std::int64_t chunk = (count + used - 1) / used;
  std::vector<float> partial(static_cast<std::size_t>(threads), 0.0f);
  for (std::int64_t t = 0; t < used; ++t) {
    const std::int64_t begin = t * chunk;
    const std::int64_t len = std::min(count, begin + chunk) - begin;
    partial[static_cast<std::size_t>(t)] = detail::torch_serial_sum(x + begin, len);
  }
  return detail::torch_serial_sum(partial.data(), threads);
}

/// torch's float32 mean on CPU: fl(sum / n) with the cascade sum above.
inline float torch_cpu_mean(const float* x, std::size_t n, int threads = 1) {
  return torch_cpu_sum(x, n, threads) / static_cast<float>(n);
}

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
  PEFT_SEPARATE_INLINE void validate(const std::string& who) const;
};

#if PEFT_SEPARATE_BODIES  // compiled once in the project's test build (peft/core/separate.hpp)
PEFT_SEPARATE_INLINE void NF4Tensor::validate(const std::string& who) const {
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
#endif

/// Quantizes n = Π shape fp32 values (row-major) to NF4 (+ DQ). Non-finite input → NumericError.
PEFT_SEPARATE_INLINE NF4Tensor quantize_nf4(const float* x, const std::vector<std::int64_t>& shape,
                                            const NF4Options& opt = {});

#if PEFT_SEPARATE_BODIES
PEFT_SEPARATE_INLINE NF4Tensor quantize_nf4(const float* x, const std::vector<std::int64_t>& shape,
                                            const NF4Options& opt) {
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
  const bool cpu = opt.kernel == BnbKernel::Cpu;
  std::vector<float> amax(blocks);
  t.packed.assign((n + 1) / 2, 0);
  for (std::size_t b = 0; b < blocks; ++b) {
    const std::size_t begin = b * bs;
    const std::size_t end = std::min(n, begin + bs);
    float a = 0.0f;
    for (std::size_t i = begin; i < end; ++i) a = std::fmax(a, std::fabs(x[i]));
    // CPU: absmax.clamp(min=1e-38) scales (an all-zero block → 0 · 1e38 = 0 → code 7); the ragged
    // block keeps the clamped value as its absmax and divides. CUDA: 1/0 = ∞, 0·∞ = NaN → code 0.
    const bool ragged = end - begin < bs;
    const float scale = cpu ? std::fmax(a, 1e-38f) : a;
    amax[b] = cpu && ragged ? scale : a;
    const bool divide = cpu && ragged;
    const float inv = 1.0f / scale;
    for (std::size_t i = begin; i < end; ++i) {
      const std::uint8_t k = quantize_nf4_value(divide ? x[i] / scale : x[i] * inv);
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
  t.nested_offset = torch_cpu_mean(amax.data(), blocks, opt.torch_threads);
  for (float& a : amax) a -= t.nested_offset;
  Blockwise8 q = quantize_blockwise8(amax.data(), blocks, opt.nested_blocksize, opt.kernel);
  t.qabsmax = std::move(q.codes);
  t.nested_absmax = std::move(q.absmax);
  t.nested_quant_map = dynamic_map_signed();
  return t;
}
#endif

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
