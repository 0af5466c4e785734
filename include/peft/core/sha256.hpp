#pragma once
// SHA-256 (FIPS 180-4, §6.2), streaming: feed any number of byte ranges with update(), then
// finish() once. Used to bind an adapter's config to the weights file it was written with
// (io/peft_format.hpp), so a torn pair from a crash is refused instead of loaded.
//
// Per 512-bit block, with the message schedule
//   W_t = M_t (t < 16),  W_t = σ1(W_{t-2}) + W_{t-7} + σ0(W_{t-15}) + W_{t-16} (16 ≤ t < 64),
//   σ0(x) = ROTR7 ⊕ ROTR18 ⊕ SHR3,  σ1(x) = ROTR17 ⊕ ROTR19 ⊕ SHR10,
// 64 rounds of
//   T1 = h + Σ1(e) + Ch(e, f, g) + K_t + W_t,  T2 = Σ0(a) + Maj(a, b, c),
//   Σ0(a) = ROTR2 ⊕ ROTR13 ⊕ ROTR22,  Σ1(e) = ROTR6 ⊕ ROTR11 ⊕ ROTR25,
// and the chaining values H += (a, ..., h). The message is padded with 0x80, zeros and its bit
// length as a 64-bit big-endian integer to a multiple of 64 bytes.
//
// Two implementations of the block function share the same state (H as eight uint32):
//   * detail::sha256_blocks_portable, the scalar code above, everywhere;
//   * detail::sha256_blocks_shani, the x86 SHA extensions (SHA-NI: sha256rnds2 / msg1 / msg2), compiled for
//     x86-64 GCC and clang with a per-function target attribute, so the header needs no -msha and the binary
//     still runs on CPUs without them. detail::sha256_blocks picks it at run time when CPUID reports SHA,
//     SSSE3 and SSE4.1 (detected once): ~1.7 GB/s against ~0.25 GB/s scalar on a 256 MB buffer.
// detail::sha256_force_portable() turns the fast path off (tests compare the two paths with it).
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "peft/core/error.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PEFT_SHA256_HAVE_SHANI 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define PEFT_SHA256_HAVE_SHANI 0
#endif

namespace peft {
namespace detail {

// Round constants K: the first 32 bits of the fractional parts of the cube roots of the first 64 primes.
// 16-byte aligned so the SHA-NI path may read them four at a time (it still uses unaligned loads).
alignas(16) inline constexpr std::uint32_t sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline std::uint32_t sha256_rotr(std::uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

/// The scalar block function: folds `nblocks` 64-byte blocks at `p` into `state` (H0..H7).
inline void sha256_blocks_portable(std::uint32_t* state, const std::uint8_t* p, std::size_t nblocks) {
  for (; nblocks > 0; --nblocks, p += 64) {
    std::uint32_t w[64];
    for (int t = 0; t < 16; ++t) {
      const std::uint8_t* b = p + 4 * t;
      w[t] = (std::uint32_t{b[0]} << 24) | (std::uint32_t{b[1]} << 16) | (std::uint32_t{b[2]} << 8) | b[3];
    }
    for (int t = 16; t < 64; ++t) {
      const std::uint32_t s0 = sha256_rotr(w[t - 15], 7) ^ sha256_rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      const std::uint32_t s1 = sha256_rotr(w[t - 2], 17) ^ sha256_rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = s1 + w[t - 7] + s0 + w[t - 16];
    }
    std::uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    std::uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int t = 0; t < 64; ++t) {
      const std::uint32_t t1 =
          h + (sha256_rotr(e, 6) ^ sha256_rotr(e, 11) ^ sha256_rotr(e, 25)) + ((e & f) ^ (~e & g)) + sha256_k[t] + w[t];
      const std::uint32_t t2 =
          (sha256_rotr(a, 2) ^ sha256_rotr(a, 13) ^ sha256_rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
  }
}

#if PEFT_SHA256_HAVE_SHANI
// Every function that uses the SHA-NI intrinsics carries this attribute (helpers included: GCC will not
// inline an intrinsic into a function compiled for a narrower target).
#define PEFT_SHA256_SHANI_TARGET __attribute__((target("sha,sse4.1,ssse3")))

// Four rounds t .. t+3. sha256rnds2(cdgh, abef, wk) performs two rounds on the state held as
// {ABEF, CDGH} (A in the highest lane) using W_t + K_t from the two low lanes of wk, and returns the
// new ABEF; the old ABEF is then the new CDGH. Moving the upper two W+K words down (shuffle 0x0E) and
// calling it again with the roles swapped gives the next two rounds.
PEFT_SHA256_SHANI_TARGET inline void sha256_shani_rounds4(__m128i& abef, __m128i& cdgh, __m128i w,
                                                          const std::uint32_t* k) {
  __m128i wk = _mm_add_epi32(w, _mm_loadu_si128(reinterpret_cast<const __m128i*>(k)));
  cdgh = _mm_sha256rnds2_epu32(cdgh, abef, wk);  // rounds t, t+1: cdgh now holds the new ABEF
  wk = _mm_shuffle_epi32(wk, 0x0E);              // W+K for t+2, t+3 into the low lanes
  abef = _mm_sha256rnds2_epu32(abef, cdgh, wk);  // rounds t+2, t+3: back in the original roles
}

// The next four schedule words W_t .. W_{t+3} from the previous sixteen, given as four vectors
// w0 = W_{t-16..t-13}, w1 = W_{t-12..t-9}, w2 = W_{t-8..t-5}, w3 = W_{t-4..t-1}:
//   msg1(w0, w1)      = W_{t-16+i} + σ0(W_{t-15+i})              (i = 0..3)
//   alignr(w3, w2, 4) = W_{t-7+i}                                  (w2's top three words, w3's lowest)
//   msg2(x, w3)       = x_i + σ1(W_{t-2+i}), where W_{t+2}, W_{t+3} need the W_t, W_{t+1} it just made.
PEFT_SHA256_SHANI_TARGET inline __m128i sha256_shani_schedule(__m128i w0, __m128i w1, __m128i w2, __m128i w3) {
  const __m128i x = _mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8(w3, w2, 4));
  return _mm_sha256msg2_epu32(x, w3);
}

/// The SHA-NI block function: same contract as sha256_blocks_portable. Call only where
/// sha256_cpu_has_shani() is true.
PEFT_SHA256_SHANI_TARGET inline void sha256_blocks_shani(std::uint32_t* state, const std::uint8_t* p,
                                                         std::size_t nblocks) {
  // Message words are big-endian: reverse the bytes of each 32-bit lane.
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);

  // state[0..7] = A..H. Lanes are listed low to high: dcba = {A, B, C, D}, hgfe = {E, F, G, H}.
  // sha256rnds2 wants abef = {F, E, B, A} and cdgh = {H, G, D, C}.
  __m128i dcba = _mm_loadu_si128(reinterpret_cast<const __m128i*>(state));
  __m128i hgfe = _mm_loadu_si128(reinterpret_cast<const __m128i*>(state + 4));
  dcba = _mm_shuffle_epi32(dcba, 0xB1);              // {B, A, D, C}
  hgfe = _mm_shuffle_epi32(hgfe, 0x1B);              // {H, G, F, E}
  __m128i abef = _mm_alignr_epi8(dcba, hgfe, 8);     // {F, E, B, A}
  __m128i cdgh = _mm_blend_epi16(hgfe, dcba, 0xF0);  // {H, G, D, C}

  for (; nblocks > 0; --nblocks, p += 64) {
    const __m128i abef_in = abef, cdgh_in = cdgh;

    // Rounds 0..15 use the message words themselves.
    __m128i w0 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), bswap);
    __m128i w1 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)), bswap);
    __m128i w2 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32)), bswap);
    __m128i w3 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 48)), bswap);
    sha256_shani_rounds4(abef, cdgh, w0, sha256_k + 0);
    sha256_shani_rounds4(abef, cdgh, w1, sha256_k + 4);
    sha256_shani_rounds4(abef, cdgh, w2, sha256_k + 8);
    sha256_shani_rounds4(abef, cdgh, w3, sha256_k + 12);

    // Rounds 16..63: each group of four replaces the oldest schedule vector with the next four words,
    // so w0..w3 rotate roles; three passes of four groups.
    for (int t = 16; t < 64; t += 16) {
      w0 = sha256_shani_schedule(w0, w1, w2, w3);
      sha256_shani_rounds4(abef, cdgh, w0, sha256_k + t);
      w1 = sha256_shani_schedule(w1, w2, w3, w0);
      sha256_shani_rounds4(abef, cdgh, w1, sha256_k + t + 4);
      w2 = sha256_shani_schedule(w2, w3, w0, w1);
      sha256_shani_rounds4(abef, cdgh, w2, sha256_k + t + 8);
      w3 = sha256_shani_schedule(w3, w0, w1, w2);
      sha256_shani_rounds4(abef, cdgh, w3, sha256_k + t + 12);
    }

    // H += (a, ..., h): lane-wise, the order is the same on both sides.
    abef = _mm_add_epi32(abef, abef_in);
    cdgh = _mm_add_epi32(cdgh, cdgh_in);
  }

  // Back to A..H order (the inverse of the shuffles above).
  dcba = _mm_shuffle_epi32(abef, 0x1B);                    // {A, B, E, F}
  hgfe = _mm_shuffle_epi32(cdgh, 0xB1);                    // {G, H, C, D}
  const __m128i abcd = _mm_blend_epi16(dcba, hgfe, 0xF0);  // {A, B, C, D}
  const __m128i efgh = _mm_alignr_epi8(hgfe, dcba, 8);     // {E, F, G, H}
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state), abcd);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state + 4), efgh);
}
#undef PEFT_SHA256_SHANI_TARGET
#endif  // PEFT_SHA256_HAVE_SHANI

/// Whether this CPU has the SHA extensions (and the SSSE3 / SSE4.1 shuffles the fast path uses); asked
/// once. CPUID rather than __builtin_cpu_supports("sha"), which clang 14 rejects as an unknown feature.
inline bool sha256_cpu_has_shani() {
#if PEFT_SHA256_HAVE_SHANI
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return false;
    const bool ssse3 = (ecx & (1u << 9)) != 0, sse41 = (ecx & (1u << 19)) != 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
    const bool sha = (ebx & (1u << 29)) != 0;  // CPUID.(EAX=7, ECX=0):EBX.SHA[bit 29]
    return ssse3 && sse41 && sha;
  }();
  return has;
#else
  return false;
#endif
}

/// Set to true to hash with the scalar code even where SHA-NI is available (for tests and
/// benchmarks). Both paths keep the same state, so flipping it between update() calls is harmless.
inline std::atomic<bool>& sha256_force_portable() {
  static std::atomic<bool> force{false};
  return force;
}

/// Whether sha256_blocks currently takes the SHA-NI path.
inline bool sha256_uses_shani() {
  return sha256_cpu_has_shani() && !sha256_force_portable().load(std::memory_order_relaxed);
}

/// Folds `nblocks` 64-byte blocks at `p` into `state`, on the fastest path this CPU has.
inline void sha256_blocks(std::uint32_t* state, const std::uint8_t* p, std::size_t nblocks) {
#if PEFT_SHA256_HAVE_SHANI
  if (sha256_uses_shani()) {
    sha256_blocks_shani(state, p, nblocks);
    return;
  }
#endif
  sha256_blocks_portable(state, p, nblocks);
}

}  // namespace detail

class Sha256 {
 public:
  using Digest = std::array<std::uint8_t, 32>;

  Sha256() = default;

  /// Appends `n` bytes to the message.
  void update(const void* data, std::size_t n) {
    if (finished_) throw ConfigError("Sha256: update after finish");
    const auto* p = static_cast<const std::uint8_t*>(data);
    length_ += n;
    if (fill_ > 0) {  // complete a partial block first
      const std::size_t take = n < 64 - fill_ ? n : 64 - fill_;
      std::memcpy(buffer_.data() + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ < 64) return;
      compress(buffer_.data());
      fill_ = 0;
    }
    const std::size_t whole = n / 64;  // whole blocks straight from the input
    if (whole > 0) detail::sha256_blocks(h_.data(), p, whole);
    p += 64 * whole;
    n -= 64 * whole;
    if (n > 0) std::memcpy(buffer_.data(), p, n);
    fill_ = n;
  }
  void update(std::string_view s) { update(s.data(), s.size()); }

  /// Pads the message and returns the digest; the object takes no more input afterwards.
  Digest finish() {
    if (finished_) throw ConfigError("Sha256: finish called twice");
    const std::uint64_t bits = length_ * 8;
    buffer_[fill_++] = 0x80;
    if (fill_ > 56) {  // no room for the length: one more block
      std::memset(buffer_.data() + fill_, 0, 64 - fill_);
      compress(buffer_.data());
      fill_ = 0;
    }
    std::memset(buffer_.data() + fill_, 0, 56 - fill_);
    for (int i = 0; i < 8; ++i)
      buffer_[56 + static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(bits >> (56 - 8 * i));
    compress(buffer_.data());
    finished_ = true;
    Digest out{};
    for (std::size_t i = 0; i < 8; ++i)
      for (std::size_t k = 0; k < 4; ++k) out[4 * i + k] = static_cast<std::uint8_t>(h_[i] >> (24 - 8 * k));
    return out;
  }

  /// Lower-case hexadecimal, as sha256sum prints it.
  static std::string hex(const Digest& d) {
    static const char* digits = "0123456789abcdef";
    std::string s(64, '0');
    for (std::size_t i = 0; i < d.size(); ++i) {
      s[2 * i] = digits[d[i] >> 4];
      s[2 * i + 1] = digits[d[i] & 15];
    }
    return s;
  }

 private:
  void compress(const std::uint8_t* block) { detail::sha256_blocks(h_.data(), block, 1); }

  // Initial hash value H(0): the first 32 bits of the fractional parts of √2, √3, ..., √19.
  std::array<std::uint32_t, 8> h_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::array<std::uint8_t, 64> buffer_{};
  std::size_t fill_ = 0;
  std::uint64_t length_ = 0;
  bool finished_ = false;
};

/// SHA-256 of `bytes` as 64 lower-case hex digits.
inline std::string sha256_hex(std::string_view bytes) {
  Sha256 h;
  h.update(bytes);
  return Sha256::hex(h.finish());
}

/// SHA-256 of `n` bytes at `data`, as 64 lower-case hex digits.
inline std::string sha256_hex(const void* data, std::size_t n) {
  Sha256 h;
  h.update(data, n);
  return Sha256::hex(h.finish());
}

}  // namespace peft
