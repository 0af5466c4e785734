#pragma once
// Element types of safetensors files and conversion to and from the model scalar.
//
// Half precision (IEEE binary16: 1 sign, 5 exponent, 10 mantissa bits) and bfloat16 (1, 8, 7) are
// converted by hand. Encoding rounds to nearest, ties to even, straight from the double value (a
// float input is widened exactly first), so there is no double rounding; values past the largest
// finite number become ±Inf, tiny values become subnormals or ±0, NaN stays NaN (quiet). Decoding
// is exact. Files are little-endian (safetensors spec); on a big-endian host bytes are swapped.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "peft/core/error.hpp"

namespace peft::io {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}

inline std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::F64:
    case DType::I64: return 8;
    case DType::F32:
    case DType::I32: return 4;
    case DType::F16:
    case DType::BF16:
    case DType::I16: return 2;
    case DType::I8:
    case DType::U8:
    case DType::BOOL: return 1;
  }
  return 0;
}

inline bool dtype_is_float(DType d) {
  return d == DType::F64 || d == DType::F32 || d == DType::F16 || d == DType::BF16;
}

/// Parses a safetensors dtype string; false for names we do not know or support (F8_*, U16, ...).
inline bool parse_dtype(const std::string& s, DType& out) {
  static const struct {
    const char* n;
    DType d;
  } kTable[] = {{"F64", DType::F64}, {"F32", DType::F32},  {"F16", DType::F16}, {"BF16", DType::BF16},
                {"I64", DType::I64}, {"I32", DType::I32},  {"I16", DType::I16}, {"I8", DType::I8},
                {"U8", DType::U8},   {"BOOL", DType::BOOL}};
  for (const auto& e : kTable)
    if (s == e.n) {
      out = e.d;
      return true;
    }
  return false;
}

/// The dtype that stores T without loss (F32 for float, F64 for double).
template <class T>
constexpr DType native_dtype() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value, "T must be float or double");
  return std::is_same<T, float>::value ? DType::F32 : DType::F64;
}

inline bool host_is_little_endian() {
  const std::uint16_t probe = 1;
  unsigned char b = 0;
  std::memcpy(&b, &probe, 1);
  return b == 1;
}

namespace detail {

/// Little-endian load/store of an unsigned integer of N bytes.
template <class U>
inline U load_le(const unsigned char* p) {
  U v = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) v |= static_cast<U>(static_cast<U>(p[i]) << (8 * i));
  return v;
}

template <class U>
inline void store_le(unsigned char* p, U v) {
  for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<unsigned char>((v >> (8 * i)) & 0xffu);
}

/// Encodes a double into a small IEEE-style float with EXP exponent and MANT mantissa bits,
/// rounding to nearest even. Works on the double's bits so subnormal targets round correctly.
template <int EXP, int MANT>
inline std::uint16_t encode_small_float(double x) {
  std::uint64_t bits;
  std::memcpy(&bits, &x, 8);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 63) << (EXP + MANT));
  const int dexp = static_cast<int>((bits >> 52) & 0x7ff);
  const std::uint64_t frac = bits & ((std::uint64_t{1} << 52) - 1);
  const std::uint16_t inf = static_cast<std::uint16_t>(((1u << EXP) - 1u) << MANT);
  if (dexp == 0x7ff) {
    if (frac != 0) return static_cast<std::uint16_t>(sign | inf | (1u << (MANT - 1)));  // quiet NaN
    return static_cast<std::uint16_t>(sign | inf);
  }
  if (dexp == 0) return sign;  // ±0 or a double subnormal (< 2^-1022): far below any target subnormal
  const int bias = (1 << (EXP - 1)) - 1;
  const int emin = 1 - bias;
  const int e = dexp - 1023;
  if (e > bias) return static_cast<std::uint16_t>(sign | inf);
  const std::uint64_t m = (std::uint64_t{1} << 52) | frac;  // value = m · 2^(e−52)
  int shift = 52 - MANT;
  if (e < emin) shift += emin - e;  // subnormal target: value = k · 2^(emin−MANT)
  if (shift > 53) return sign;      // below half the smallest subnormal: rounds to 0
  std::uint64_t rounded = m >> shift;
  const std::uint64_t rem = m & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t halfway = std::uint64_t{1} << (shift - 1);
  if (rem > halfway || (rem == halfway && (rounded & 1u))) ++rounded;
  // Normal: biased exponent (e − emin + 1) above the implicit bit held in `rounded`; a carry out
  // of the mantissa bumps the exponent, and reaching the Inf pattern is the correct overflow.
  std::uint64_t h = (e < emin) ? rounded : (static_cast<std::uint64_t>(e - emin) << MANT) + rounded;
  if (h >= inf) h = inf;
  return static_cast<std::uint16_t>(sign | h);
}

}  // namespace detail

inline std::uint16_t double_to_half(double x) { return detail::encode_small_float<5, 10>(x); }
inline std::uint16_t double_to_bf16(double x) { return detail::encode_small_float<8, 7>(x); }

/// binary16 → float, exact. Branch-free (masks, no selects a compiler might turn into jumps), so
/// that loops over it vectorize: loading an F16 checkpoint is a conversion-bound loop.
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t em = h & 0x7fffu;  // exponent and fraction
  const std::uint32_t inf_nan = 0u - static_cast<std::uint32_t>(em >= 0x7c00u);
  const std::uint32_t small = 0u - static_cast<std::uint32_t>(em < 0x0400u);
  const std::uint32_t normal = (em << 13) + (112u << 23) + (inf_nan & (112u << 23));  // rebias 15 → 127 (31 → 255)
  const float sub = static_cast<float>(static_cast<std::int32_t>(em)) * 5.9604644775390625e-8f;  // em · 2^-24, exact
  std::uint32_t sub_bits;
  std::memcpy(&sub_bits, &sub, 4);
  const std::uint32_t bits = (small & sub_bits) | (~small & normal) | sign;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// bfloat16 → float: the upper half of a float's bits, exact.
inline float bf16_to_float(std::uint16_t h) {
  const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// Converts `n` elements of dtype `d` at `src` (little-endian bytes, any alignment) into T.
template <class T>
void decode_elements(DType d, const unsigned char* src, std::size_t n, T* dst) {
  using detail::load_le;
  if (d == native_dtype<T>() && host_is_little_endian()) {  // same bytes: one bulk copy
    if (n > 0) std::memcpy(dst, src, n * sizeof(T));
    return;
  }
  switch (d) {
    case DType::F64:
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint64_t b = load_le<std::uint64_t>(src + 8 * i);
        double v;
        std::memcpy(&v, &b, 8);
        dst[i] = static_cast<T>(v);
      }
      return;
    case DType::F32:
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint32_t b = load_le<std::uint32_t>(src + 4 * i);
        float v;
        std::memcpy(&v, &b, 4);
        dst[i] = static_cast<T>(v);
      }
      return;
    case DType::F16:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(half_to_float(load_le<std::uint16_t>(src + 2 * i)));
      return;
    case DType::BF16:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(bf16_to_float(load_le<std::uint16_t>(src + 2 * i)));
      return;
    case DType::I64:
      for (std::size_t i = 0; i < n; ++i)
        dst[i] = static_cast<T>(static_cast<std::int64_t>(load_le<std::uint64_t>(src + 8 * i)));
      return;
    case DType::I32:
      for (std::size_t i = 0; i < n; ++i)
        dst[i] = static_cast<T>(static_cast<std::int32_t>(load_le<std::uint32_t>(src + 4 * i)));
      return;
    case DType::I16:
      for (std::size_t i = 0; i < n; ++i)
        dst[i] = static_cast<T>(static_cast<std::int16_t>(load_le<std::uint16_t>(src + 2 * i)));
      return;
    case DType::I8:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<std::int8_t>(src[i]));
      return;
    case DType::U8:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
      return;
    case DType::BOOL:
      for (std::size_t i = 0; i < n; ++i) dst[i] = src[i] != 0 ? T(1) : T(0);
      return;
  }
}

/// Converts `n` values of T into dtype `d` (little-endian) at `dst`. Floats round to nearest even;
/// a finite value that would round to ±Inf (70000 in F16, 1e300 in F32) does not fit, nor does a
/// non-integral or out-of-range value for an integer dtype (a weight silently truncated would be
/// a bug): returns false at the first value that does not fit, with its index in *bad. NaN and
/// ±Inf themselves are stored as such.
template <class T>
bool encode_elements(DType d, const T* src, std::size_t n, unsigned char* dst, std::size_t* bad = nullptr) {
  using detail::store_le;
  auto fits = [&](std::size_t i, double lo, double hi) {
    const double v = static_cast<double>(src[i]);
    if (!(v >= lo && v <= hi) || std::floor(v) != v) {
      if (bad) *bad = i;
      return false;
    }
    return true;
  };
  switch (d) {
    case DType::F64:
      for (std::size_t i = 0; i < n; ++i) {
        const double v = static_cast<double>(src[i]);
        std::uint64_t b;
        std::memcpy(&b, &v, 8);
        store_le<std::uint64_t>(dst + 8 * i, b);
      }
      return true;
    case DType::F32:
      for (std::size_t i = 0; i < n; ++i) {
        // Round-to-nearest gives Inf from FLT_MAX + half an ulp (2^103) up; the cast would be UB.
        const double x = static_cast<double>(src[i]);
        if (std::isfinite(x) && std::fabs(x) >= 3.4028235677973366e38) {
          if (bad) *bad = i;
          return false;
        }
        const float v = static_cast<float>(src[i]);
        std::uint32_t b;
        std::memcpy(&b, &v, 4);
        store_le<std::uint32_t>(dst + 4 * i, b);
      }
      return true;
    case DType::F16:
      for (std::size_t i = 0; i < n; ++i) {
        const double x = static_cast<double>(src[i]);
        const std::uint16_t h = double_to_half(x);
        if ((h & 0x7fffu) == 0x7c00u && std::isfinite(x)) {  // rounded to ±Inf
          if (bad) *bad = i;
          return false;
        }
        store_le<std::uint16_t>(dst + 2 * i, h);
      }
      return true;
    case DType::BF16:
      for (std::size_t i = 0; i < n; ++i) {
        const double x = static_cast<double>(src[i]);
        const std::uint16_t h = double_to_bf16(x);
        if ((h & 0x7fffu) == 0x7f80u && std::isfinite(x)) {
          if (bad) *bad = i;
          return false;
        }
        store_le<std::uint16_t>(dst + 2 * i, h);
      }
      return true;
    case DType::I64:
      for (std::size_t i = 0; i < n; ++i) {
        // 2^63 is exactly representable; the upper bound must exclude it.
        if (!fits(i, -9223372036854775808.0, 9223372036854774784.0)) return false;
        store_le<std::uint64_t>(dst + 8 * i, static_cast<std::uint64_t>(static_cast<std::int64_t>(src[i])));
      }
      return true;
    case DType::I32:
      for (std::size_t i = 0; i < n; ++i) {
        if (!fits(i, -2147483648.0, 2147483647.0)) return false;
        store_le<std::uint32_t>(dst + 4 * i, static_cast<std::uint32_t>(static_cast<std::int32_t>(src[i])));
      }
      return true;
    case DType::I16:
      for (std::size_t i = 0; i < n; ++i) {
        if (!fits(i, -32768.0, 32767.0)) return false;
        store_le<std::uint16_t>(dst + 2 * i, static_cast<std::uint16_t>(static_cast<std::int16_t>(src[i])));
      }
      return true;
    case DType::I8:
      for (std::size_t i = 0; i < n; ++i) {
        if (!fits(i, -128.0, 127.0)) return false;
        dst[i] = static_cast<unsigned char>(static_cast<std::int8_t>(src[i]));
      }
      return true;
    case DType::U8:
      for (std::size_t i = 0; i < n; ++i) {
        if (!fits(i, 0.0, 255.0)) return false;
        dst[i] = static_cast<unsigned char>(src[i]);
      }
      return true;
    case DType::BOOL:
      for (std::size_t i = 0; i < n; ++i) {
        if (!fits(i, 0.0, 1.0)) return false;
        dst[i] = static_cast<unsigned char>(src[i]);
      }
      return true;
  }
  return false;
}

}  // namespace peft::io

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_IO_DTYPE_TEMPLATES(KW, T)                                               \
  KW template void decode_elements<T>(DType, const unsigned char*, std::size_t, T*); \
  KW template bool encode_elements<T>(DType, const T*, std::size_t, unsigned char*, std::size_t*);
namespace peft::io {
PEFT_IO_DTYPE_TEMPLATES(extern, float)
PEFT_IO_DTYPE_TEMPLATES(extern, double)
}  // namespace peft::io
#endif
