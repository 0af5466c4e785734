// SHA-256 against the FIPS 180-2 appendix vectors and hashlib, fed whole and in pieces.
#include <peft/core/sha256.hpp>

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
