// SHA-256 against the FIPS 180-2 appendix vectors and hashlib, fed whole and in pieces; the SHA-NI fast
// path against the scalar one.
#include <peft/core/rng.hpp>
#include <peft/core/sha256.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

namespace {
/// Bytes (7·i + 3) mod 256, i = 0 .. n-1: crosses every padding case without being all one value.
std::string sha_test_bytes(std::size_t n) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 7 + 3) & 255);
  return s;
}

/// Forces the scalar block function (or not) for its lifetime, then restores the previous setting.
class ShaPathGuard {
 public:
  explicit ShaPathGuard(bool portable) : previous_(detail::sha256_force_portable().exchange(portable)) {}
  ~ShaPathGuard() { detail::sha256_force_portable().store(previous_); }
  ShaPathGuard(const ShaPathGuard&) = delete;
  ShaPathGuard& operator=(const ShaPathGuard&) = delete;

 private:
  bool previous_;
};

/// `n` bytes from a seeded generator.
std::string sha_random_bytes(std::size_t n, std::uint64_t seed) {
  Rng rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng.next_u64() >> 56);
  return s;
}

/// Digest of `msg` on the scalar path (`portable`) or the default one, fed in one update() call or,
/// with `chunks`, in pieces of random size: mostly short ones (partial blocks, empty updates), some
/// spanning many blocks.
std::string sha_digest_via(const std::string& msg, bool portable, Rng* chunks) {
  const ShaPathGuard guard(portable);
  Sha256 h;
  if (chunks == nullptr) {
    h.update(msg.data(), msg.size());
  } else {
    std::size_t at = 0;
    while (at < msg.size()) {
      const std::uint64_t r = chunks->next_u64();
      const std::size_t want = (r & 7) == 0 ? static_cast<std::size_t>((r >> 8) % 70000)  // many blocks
                                            : static_cast<std::size_t>((r >> 8) % 150);   // partial blocks
      const std::size_t n = want < msg.size() - at ? want : msg.size() - at;
      h.update(msg.data() + at, n);
      at += n;
    }
  }
  return Sha256::hex(h.finish());
}
}  // namespace

TEST_CASE("SHA-256 matches the FIPS 180-2 test vectors", "[sha256]") {
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // One million 'a', fed in uneven pieces so partial blocks are completed across calls.
  Sha256 h;
  const std::string chunk(997, 'a');
  std::size_t left = 1000000;
  while (left > 0) {
    const std::size_t n = left < chunk.size() ? left : chunk.size();
    h.update(chunk.data(), n);
    left -= n;
  }
  CHECK(Sha256::hex(h.finish()) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  CHECK(sha256_hex(std::string(1000000, 'a')) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("SHA-256 pads every length around the block boundary like hashlib", "[sha256]") {
  // hashlib.sha256(bytes((7*i+3) & 255 for i in range(n))).hexdigest()
  const std::vector<std::pair<std::size_t, const char*>> cases = {
      {55, "e7313d333c272e639f790978283f9eb392e843d0f29b7016828bb1daa4aac70b"},
      {56, "4324d65f3c103567f5589c710bc08f8523f929a9272e3af36fc968e52abc6c27"},
      {57, "35df609437dcfea3279283ab79fd554e2bf78f8f7ae2de532d8ee300b09e8f73"},
      {63, "81c80242132f230c3bd41b3e63bbcff16107339549214a99614ff26664625055"},
      {64, "39e3d7b6b5d075d37d053ad89b24b41bef4f3c29760c84447cab3f3be1882241"},
      {65, "aacca6ff74fdbb296d165a45cecfa04e5127bc008770fbbdd48006f2d2fae95e"},
      {119, "9ce7368e4daf32341631b492e80359dc9f594b48453cd0dd5bf0b19279cc177e"},
      {120, "7836b787757e95e58b3ca5aec90b1b004e8deba1e50e9675af9cabf1a13a04b5"},
      {128, "d2742f1f4ac6bb7ca2b239ee18402ba8b3f9f8e652d2a72973c2b9ba11c08cf6"}};
  for (const auto& [n, expected] : cases) {
    const std::string msg = sha_test_bytes(n);
    INFO("length " << n);
    CHECK(sha256_hex(msg) == expected);
    // Every split point: the streaming state must not depend on how the input is cut.
    for (std::size_t cut = 0; cut <= n; ++cut) {
      Sha256 h;
      h.update(msg.data(), cut);
      h.update(msg.data() + cut, n - cut);
      REQUIRE(Sha256::hex(h.finish()) == expected);
    }
  }
}

TEST_CASE("SHA-256 refuses input after the digest was taken", "[sha256]") {
  Sha256 h;
  h.update("abc");
  (void)h.finish();
  PEFT_REQUIRE_THROWS_WITH(h.update("d"), ConfigError, "update after finish");
  PEFT_REQUIRE_THROWS_WITH(h.finish(), ConfigError, "finish called twice");
}

TEST_CASE("SHA-256 fast path and scalar path agree, whole and in random pieces", "[sha256]") {
  if (!detail::sha256_cpu_has_shani()) WARN("no SHA-NI on this CPU: both runs take the scalar path");
  std::vector<std::size_t> lengths;
  for (std::size_t n = 0; n <= 300; ++n) lengths.push_back(n);
  for (std::size_t n : {4095, 4096, 4097, 65535, 65536, 65537, 1000003}) lengths.push_back(n);
  Rng chunks(0xc4u);
  for (const std::size_t n : lengths) {
    const std::string msg = sha_random_bytes(n, 1000 + n);
    INFO("length " << n);
    const std::string portable = sha_digest_via(msg, true, nullptr);
    REQUIRE(sha_digest_via(msg, false, nullptr) == portable);
    REQUIRE(sha_digest_via(msg, false, &chunks) == portable);
    REQUIRE(sha_digest_via(msg, true, &chunks) == portable);
  }
}

TEST_CASE("SHA-256 scalar path matches the FIPS 180-2 test vectors too", "[sha256]") {
  // The test above runs on whichever path this machine takes; this one pins the scalar code.
  const ShaPathGuard guard(true);
  CHECK_FALSE(detail::sha256_uses_shani());
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  CHECK(sha256_hex(std::string(1000000, 'a')) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  CHECK(sha256_hex(sha_test_bytes(119)) == "9ce7368e4daf32341631b492e80359dc9f594b48453cd0dd5bf0b19279cc177e");
}

#if PEFT_SHA256_HAVE_SHANI
TEST_CASE("SHA-256 SHA-NI block function matches the scalar one on any state and alignment", "[sha256]") {
  if (!detail::sha256_cpu_has_shani()) {
    WARN("no SHA-NI on this CPU: block function not tested");
    return;
  }
  Rng rng(0x5a);
  const std::string data = sha_random_bytes(64 * 40 + 16, 77);
  for (std::size_t offset = 0; offset < 16; ++offset) {  // unaligned input
    for (const std::size_t blocks : {std::size_t{0}, std::size_t{1}, std::size_t{2}, std::size_t{7}, std::size_t{40}}) {
      std::uint32_t a[8], b[8];
      for (auto& v : a) v = static_cast<std::uint32_t>(rng.next_u64());  // arbitrary chaining value
      std::copy(a, a + 8, b);
      const auto* p = reinterpret_cast<const std::uint8_t*>(data.data()) + offset;
      detail::sha256_blocks_portable(a, p, blocks);
      detail::sha256_blocks_shani(b, p, blocks);
      INFO("offset " << offset << ", blocks " << blocks);
      REQUIRE(std::equal(a, a + 8, b));
    }
  }
}
#endif
