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
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "peft/core/error.hpp"

namespace peft {

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
    for (; n >= 64; p += 64, n -= 64) compress(p);  // whole blocks straight from the input
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
  static std::uint32_t rotr(std::uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void compress(const std::uint8_t* block) {
    static constexpr std::uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    std::uint32_t w[64];
    for (int t = 0; t < 16; ++t) {
      const std::uint8_t* b = block + 4 * t;
      w[t] = (std::uint32_t{b[0]} << 24) | (std::uint32_t{b[1]} << 16) | (std::uint32_t{b[2]} << 8) | b[3];
    }
    for (int t = 16; t < 64; ++t) {
      const std::uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      const std::uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = s1 + w[t - 7] + s0 + w[t - 16];
    }
    std::uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int t = 0; t < 64; ++t) {
      const std::uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[t] + w[t];
      const std::uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h_[0] += a;
    h_[1] += b;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    h_[5] += f;
    h_[6] += g;
    h_[7] += h;
  }

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
