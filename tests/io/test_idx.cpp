// IDX reader: round trips through tiny gzip files written here with zlib, and every broken case
// (missing, wrong magic, wrong rank, truncated header/body/gzip stream, bad CRC, trailing bytes,
// image/label count mismatch, labels out of range, absurd dimensions).
//
// Needs zlib at link time: tests/CMakeLists.txt links ZLIB::ZLIB into peft_tests_io and defines
// PEFT_HAVE_ZLIB when zlib is found; without it this file compiles to nothing.
#if defined(PEFT_HAVE_ZLIB)
#include <zlib.h>
#include <peft/io/idx.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "io/io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::io::TempDir;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<std::uint8_t>;

void put_be32(Bytes& b, std::uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<std::uint8_t>((v >> s) & 0xFF));
}

/// Header + body of an u8 IDX tensor.
Bytes idx_bytes(const std::vector<std::uint32_t>& dims, const Bytes& body) {
  Bytes b;
  put_be32(b, 0x0800u | static_cast<std::uint32_t>(dims.size()));
  for (auto d : dims) put_be32(b, d);
  b.insert(b.end(), body.begin(), body.end());
  return b;
}

void write_gz(const std::string& path, const Bytes& bytes) {
  gzFile f = gzopen(path.c_str(), "wb9");
  REQUIRE(f != nullptr);
  if (!bytes.empty())
    REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

void write_plain(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

Bytes read_plain(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

Bytes iota_bytes(std::size_t n, int start = 0) {
  Bytes b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<std::uint8_t>((static_cast<int>(i) * 7 + start) & 0xFF);
  return b;
}

}  // namespace

TEST_CASE("read_idx round-trips gzip and plain files", "[io][idx]") {
  TempDir dir;
  const Bytes body = iota_bytes(3 * 2 * 4);
  write_gz(dir.file("img.gz"), idx_bytes({3, 2, 4}, body));
  write_plain(dir.file("img.raw"), idx_bytes({3, 2, 4}, body));
  for (const char* name : {"img.gz", "img.raw"}) {
    INFO(name);
    const IdxArray a = read_idx(dir.file(name), 3);
    CHECK(a.dims == std::vector<std::int64_t>{3, 2, 4});
    CHECK(a.elements() == 24);
    CHECK(a.data == body);
  }
}

TEST_CASE("read_idx_dataset pairs images with labels and scales pixels", "[io][idx]") {
  TempDir dir;
  Bytes pixels = iota_bytes(5 * 2 * 3, 11);
  pixels[0] = 255;
  pixels[1] = 0;
  write_gz(dir.file("images.gz"), idx_bytes({5, 2, 3}, pixels));
  const Bytes labels{3, 1, 4, 1, 5};
  write_gz(dir.file("labels.gz"), idx_bytes({5}, labels));
  const IdxDataset ds = read_idx_dataset(dir.file("images.gz"), dir.file("labels.gz"), 9);
  CHECK(ds.count == 5);
  CHECK(ds.rows == 2);
  CHECK(ds.cols == 3);
  CHECK(ds.pixels_per_image() == 6);
  CHECK(ds.labels == labels);
  CHECK(ds.pixels == pixels);

  const Matrix<float> x = idx_images_to_matrix<float>(ds, {0, 4});
  REQUIRE(x.rows() == 2);
  REQUIRE(x.cols() == 6);
  CHECK(x(0, 0) == 1.0f);
  CHECK(x(0, 1) == 0.0f);
  for (Index j = 0; j < 6; ++j) CHECK(std::abs(x(1, j) - pixels[static_cast<std::size_t>(4 * 6 + j)] / 255.0f) < 1e-6f);
  PEFT_REQUIRE_THROWS_WITH(idx_images_to_matrix<float>(ds, {5}), ShapeError, "index 5 is outside [0, 5)");
}

TEST_CASE("read_idx names the file and the problem for broken headers", "[io][idx][errors]") {
  TempDir dir;
  const std::string missing = dir.file("missing.gz");
  PEFT_REQUIRE_THROWS_WITH(read_idx(missing), IoError, "\"" + missing + "\": cannot open");

  Bytes bad_magic;
  put_be32(bad_magic, 0x12345678u);
  write_gz(dir.file("magic.gz"), bad_magic);
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("magic.gz")), IoError,
                           "magic.gz\": bad magic number 0x12345678 at byte 0");

  Bytes float_type;
  put_be32(float_type, 0x00000D01u);
  put_be32(float_type, 1);
  write_gz(dir.file("float.gz"), float_type);
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("float.gz")), IoError, "element type 0x0d (float32) is not supported");

  write_gz(dir.file("labels.gz"), idx_bytes({4}, iota_bytes(4)));
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("labels.gz"), 3), IoError,
                           "labels.gz\": has 1 dimensions (magic 0x00000801), expected 3 (magic 0x00000803)");

  write_gz(dir.file("zero.gz"), idx_bytes({2, 0, 3}, {}));
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("zero.gz")), IoError, "dimension 1 at byte 8 is 0");

  write_gz(dir.file("huge.gz"), idx_bytes({60000, 60000, 60000}, {}));
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("huge.gz")), IoError, "header announces more than");

  Bytes short_header;
  put_be32(short_header, 0x00000803u);
  put_be32(short_header, 10);
  write_gz(dir.file("short_header.gz"), short_header);
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("short_header.gz")), IoError,
                           "truncated header (dimension 1) at byte 8: expected 4 bytes, got 0");

  write_gz(dir.file("empty.gz"), {});
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("empty.gz")), IoError,
                           "truncated header (magic number) at byte 0: expected 4 bytes, got 0");
}

TEST_CASE("read_idx rejects bodies that disagree with the header", "[io][idx][errors]") {
  TempDir dir;
  // Header promises 3·2·2 = 12 bytes; 10 follow.
  write_gz(dir.file("short.gz"), idx_bytes({3, 2, 2}, iota_bytes(10)));
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("short.gz")), IoError,
                           "short.gz\": truncated body (12 elements) at byte 16: expected 12 bytes, got 10");
  // 13 bytes follow: one too many.
  write_gz(dir.file("long.gz"), idx_bytes({3, 2, 2}, iota_bytes(13)));
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("long.gz")), IoError,
                           "long.gz\": unexpected data after the last element at byte 28 (1 extra bytes)");
}

TEST_CASE("read_idx detects truncated and corrupt gzip streams", "[io][idx][errors]") {
  TempDir dir;
  write_gz(dir.file("good.gz"), idx_bytes({50, 8, 8}, iota_bytes(50 * 64)));
  const Bytes gz = read_plain(dir.file("good.gz"));
  REQUIRE(gz.size() > 40);

  // The compressed stream cut in half: fewer bytes than the header announces.
  write_plain(dir.file("cut.gz"), Bytes(gz.begin(), gz.begin() + static_cast<std::ptrdiff_t>(gz.size() / 2)));
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("cut.gz")), IoError, "cut.gz\": truncated body");

  // Only the 8-byte gzip trailer (CRC-32 and length) missing: every element arrives, the check fails.
  write_plain(dir.file("notrailer.gz"), Bytes(gz.begin(), gz.end() - 8));
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("notrailer.gz")), IoError, "notrailer.gz\": gzip stream ends early");

  // A flipped CRC-32 byte: the data inflate fine but do not match their checksum.
  Bytes bad_crc = gz;
  bad_crc[bad_crc.size() - 8] ^= 0xFF;
  write_plain(dir.file("crc.gz"), bad_crc);
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("crc.gz")), IoError, "crc.gz\": corrupt or unreadable data");

  // Garbage in the deflate data itself.
  Bytes garbage = gz;
  for (std::size_t i = 12; i < 24; ++i) garbage[i] = 0xFF;
  write_plain(dir.file("garbage.gz"), garbage);
  PEFT_REQUIRE_THROWS_WITH(read_idx(dir.file("garbage.gz")), IoError, "garbage.gz\"");
}

TEST_CASE("read_idx_dataset checks counts and label range", "[io][idx][errors]") {
  TempDir dir;
  write_gz(dir.file("img.gz"), idx_bytes({5, 2, 2}, iota_bytes(20)));
  write_gz(dir.file("lab4.gz"), idx_bytes({4}, {0, 1, 2, 3}));
  PEFT_REQUIRE_THROWS_WITH(read_idx_dataset(dir.file("img.gz"), dir.file("lab4.gz")), IoError,
                           "lab4.gz\": 5 images but 4 labels");
  write_gz(dir.file("lab5.gz"), idx_bytes({5}, {0, 1, 12, 3, 4}));
  PEFT_REQUIRE_THROWS_WITH(read_idx_dataset(dir.file("img.gz"), dir.file("lab5.gz"), 9), IoError,
                           "label 12 of example 2 (byte 10) is outside [0, 9]");
  // Swapped arguments: the label file is not an image file.
  PEFT_REQUIRE_THROWS_WITH(read_idx_dataset(dir.file("lab5.gz"), dir.file("img.gz")), IoError, "has 1 dimensions");
}

TEST_CASE("read_idx reads the installed Fashion-MNIST test split when present", "[io][idx][data]") {
  const std::string dir = "/usr/share/datasets/fashion-mnist/";
  if (!fs::exists(dir + "t10k-images-idx3-ubyte.gz") || !fs::exists(dir + "t10k-labels-idx1-ubyte.gz")) {
    WARN("Fashion-MNIST not installed under " << dir << "; skipped");
    return;
  }
  const IdxDataset ds = read_idx_dataset(dir + "t10k-images-idx3-ubyte.gz", dir + "t10k-labels-idx1-ubyte.gz", 9);
  CHECK(ds.count == 10000);
  CHECK(ds.rows == 28);
  CHECK(ds.cols == 28);
  std::vector<int> per_class(10, 0);
  for (auto l : ds.labels) ++per_class[l];
  for (int c = 0; c < 10; ++c) CHECK(per_class[static_cast<std::size_t>(c)] == 1000);  // balanced test split
}
#endif
