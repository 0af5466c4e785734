// safetensors header limits: kMaxHeaderBytes, kMaxTensors, kMaxMetadataKeys, kMaxTensorRank, each
// just under (accepted) and just over (a clean IoError stating the limit and the actual count),
// and a maximal hostile header parsed under a memory limit (it used to end in SIGABRT).
#include <peft/io/safetensors.hpp>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>

#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;

namespace {

/// Length prefix + header + `data_bytes` zero bytes.
std::string limits_file(const std::string& header, std::size_t data_bytes = 0) {
  std::string out(8, '\0');
  peft::io::detail::store_le<std::uint64_t>(reinterpret_cast<unsigned char*>(&out[0]), header.size());
  return out + header + std::string(data_bytes, '\0');
}

SafeTensorsHeader parse_image(const std::string& image, const std::string& label = "limits.st") {
  return parse_safetensors_header(reinterpret_cast<const unsigned char*>(image.data()), image.size(), label);
}

/// A header body of `n` zero-size tensors "t0".."t<n-1>" (no closing brace), the shape of the
/// 1.6 M-entry header of the hardening issue.
std::string empty_entries(std::size_t n) {
  std::string h = "{";
  h.reserve(56 * n + 64);
  const std::string tail = "\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}";
  for (std::size_t i = 0; i < n; ++i) {
    h += i ? ",\"t" : "\"t";
    h += std::to_string(i);
    h += tail;
  }
  return h;
}

std::string metadata_header(std::size_t keys) {
  std::string h = "{\"__metadata__\":{";
  for (std::size_t i = 0; i < keys; ++i) h += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":\"v\"";
  return h + "}}";
}

}  // namespace

TEST_CASE("safetensors limits: tensor count, just under and just over kMaxTensors", "[io][safetensors][limits]") {
  static_assert(kMaxTensors == 1000000, "the tests below are written for this limit");
  // Exactly kMaxTensors entries (metadata keys do not count as tensors) are accepted.
  std::string h = empty_entries(kMaxTensors);
  const std::string meta = ",\"__metadata__\":{\"format\":\"pt\"}}";
  {
    const SafeTensorsHeader ok = parse_image(limits_file(h + meta));
    CHECK(ok.tensors.size() == kMaxTensors);
    CHECK(ok.metadata.at("format") == "pt");
  }
  // Two more: refused, and the message states the limit and the actual count (the parser counts
  // to the end instead of stopping at the first entry past the limit).
  h += ",\"x\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}";
  h += ",\"y\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}";
  PEFT_REQUIRE_THROWS_WITH(parse_image(limits_file(h + meta)), IoError,
                           "\"limits.st\": header declares 1000002 tensors, more than the limit of 1000000 "
                           "(kMaxTensors)");
}

TEST_CASE("safetensors limits: metadata keys, just under and just over kMaxMetadataKeys", "[io][safetensors][limits]") {
  static_assert(kMaxMetadataKeys == 65536, "the tests below are written for this limit");
  CHECK(parse_image(limits_file(metadata_header(kMaxMetadataKeys))).metadata.size() == kMaxMetadataKeys);
  PEFT_REQUIRE_THROWS_WITH(parse_image(limits_file(metadata_header(kMaxMetadataKeys + 1))), IoError,
                           "\"limits.st\": \"__metadata__\" has 65537 keys, more than the limit of 65536 "
                           "(kMaxMetadataKeys)");
  PEFT_REQUIRE_THROWS_WITH(parse_image(limits_file(metadata_header(kMaxMetadataKeys + 100))), IoError,
                           "has 65636 keys");
}

TEST_CASE("safetensors limits: header bytes, just under and just over kMaxHeaderBytes", "[io][safetensors][limits]") {
  static_assert(kMaxHeaderBytes == 100000000, "the tests below are written for this limit");
  // A header of exactly the limit: "{}" padded with spaces, as writers pad.
  std::string h = "{}";
  h.resize(kMaxHeaderBytes, ' ');
  CHECK(parse_image(limits_file(h)).tensors.empty());
  // One byte more is refused from the length prefix alone, before the header is read.
  std::string prefix(8, '\0');
  peft::io::detail::store_le<std::uint64_t>(reinterpret_cast<unsigned char*>(&prefix[0]), kMaxHeaderBytes + 1);
  PEFT_REQUIRE_THROWS_WITH(parse_image(prefix + "{}"), IoError,
                           "header length 100000001 (bytes 0..8) exceeds the limit of 100000000 bytes "
                           "(kMaxHeaderBytes)");
}

TEST_CASE("safetensors limits: shape rank, just under and just over kMaxTensorRank", "[io][safetensors][limits]") {
  static_assert(kMaxTensorRank == 64, "the tests below are written for this limit");
  auto with_rank = [](std::size_t rank) {
    std::string shape;
    for (std::size_t i = 0; i < rank; ++i) shape += i ? ",1" : "1";
    return limits_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[" + shape + "],\"data_offsets\":[0,4]}}", 4);
  };
  CHECK(parse_image(with_rank(kMaxTensorRank)).tensors.at(0).shape.size() == kMaxTensorRank);
  PEFT_REQUIRE_THROWS_WITH(parse_image(with_rank(kMaxTensorRank + 1)), IoError,
                           "tensor \"a\": shape has more than 64 dimensions (the limit kMaxTensorRank)");
}

#if defined(__SANITIZE_ADDRESS__)
#define PEFT_TEST_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PEFT_TEST_UNDER_ASAN 1
#endif
#endif

// Address-space limits do not mix with AddressSanitizer's shadow memory: not built under ASan.
#ifndef PEFT_TEST_UNDER_ASAN
TEST_CASE("safetensors limits: a 1.6 M-entry header under a memory limit is a clean error, not an abort",
          "[io][safetensors][limits]") {
  // The header of the hardening issue: ~90 MB, 1.6 M zero-size tensors. Parsed into a JSON DOM it
  // needed ~1 GB, and a bad_alloc thrown while nlohmann destroyed the half-built value (inside a
  // noexcept destructor) killed the process with SIGABRT. The child below gets 512 MB of address
  // space on top of what it already maps: it must come back with the IoError.
  const std::string image = limits_file(empty_entries(1600000) + "}");
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int code = 3;
    try {
      long pages = 0;
      if (FILE* f = std::fopen("/proc/self/statm", "r")) {
        if (std::fscanf(f, "%ld", &pages) != 1) pages = 0;
        std::fclose(f);
      }
      const rlim_t now = static_cast<rlim_t>(pages) * static_cast<rlim_t>(::sysconf(_SC_PAGESIZE));
      const struct rlimit lim = {now + (512u << 20), now + (512u << 20)};
      if (pages == 0 || ::setrlimit(RLIMIT_AS, &lim) != 0) ::_exit(4);
      (void)parse_image(image);
      code = 1;  // accepted
    } catch (const IoError& e) {
      code = std::string(e.what()).find("1600000 tensors, more than the limit") != std::string::npos ? 0 : 2;
    } catch (...) {
      code = 2;  // e.g. bad_alloc: not the clean error either
    }
    ::_exit(code);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  INFO("child status " << status << (WIFSIGNALED(status) ? " (killed by a signal)" : ""));
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
#endif
