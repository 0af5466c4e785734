#pragma once
// IDX reader (the MNIST / Fashion-MNIST file format; LeCun et al., 1998, "Gradient-based learning
// applied to document recognition", file format described at http://yann.lecun.com/exdb/mnist/).
//
// An IDX file is big-endian:
//   bytes 0-1   zero
//   byte  2     element type: 0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64
//   byte  3     number of dimensions n (1 for labels, 3 for images)
//   4·n bytes   the n dimension sizes, u32 each
//   then        the elements in row-major (C) order, Π dims of them.
// So images start with the magic number 0x00000803 = 2051 and labels with 0x00000801 = 2049.
//
// Files are read through zlib's gzread, which inflates gzip (.gz, as Debian's dataset-fashion-mnist
// ships them) and passes plain files through unchanged. Everything that can be wrong with a file is
// reported as peft::IoError naming the file, the byte offset (in the uncompressed stream) and what
// was expected: a missing file, a bad magic number, a zero or absurd dimension, a truncated body,
// trailing bytes after the announced elements, a corrupt gzip stream (bad deflate data or CRC), and
// image/label count mismatches. Only u8 elements are stored (every MNIST-family file uses them);
// other element types are recognised and refused by name.
//
// Needs zlib: link ZLIB::ZLIB.
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"

namespace peft {

/// A decoded IDX tensor of unsigned bytes: dims (outermost first) and the elements in row-major order.
struct IdxArray {
  std::vector<std::int64_t> dims;
  std::vector<std::uint8_t> data;

  /// Product of the dimensions (0 for no dimensions).
  std::int64_t elements() const {
    if (dims.empty()) return 0;
    std::int64_t n = 1;
    for (auto d : dims) n *= d;
    return n;
  }
};

/// Images [count, rows·cols] with their labels, read from an IDX image file and an IDX label file.
struct IdxDataset {
  Index count = 0;
  Index rows = 0;                    ///< image height
  Index cols = 0;                    ///< image width
  std::vector<std::uint8_t> pixels;  ///< count · rows · cols, image after image, row-major
  std::vector<std::uint8_t> labels;  ///< count

  Index pixels_per_image() const { return rows * cols; }
};

namespace detail {

/// Name of an IDX element type code, for messages.
inline const char* idx_type_name(int code) {
  switch (code) {
    case 0x08: return "unsigned byte";
    case 0x09: return "signed byte";
    case 0x0B: return "int16";
    case 0x0C: return "int32";
    case 0x0D: return "float32";
    case 0x0E: return "float64";
    default: return nullptr;
  }
}

inline std::string hex(std::uint32_t v, int digits) {
  static const char* kDigits = "0123456789abcdef";
  std::string s(static_cast<std::size_t>(digits), '0');
  for (int i = digits - 1; i >= 0; --i, v >>= 4) s[static_cast<std::size_t>(i)] = kDigits[v & 0xF];
  return "0x" + s;
}

/// RAII wrapper over a gzFile that reads exactly, turning every failure into an IoError.
class GzReader {
 public:
  explicit GzReader(const std::string& path) : path_(path) {
    file_ = gzopen(path.c_str(), "rb");
    if (file_ == nullptr) throw IoError("IDX file \"" + path + "\": cannot open it for reading");
    gzbuffer(file_, 1 << 17);  // 128 KiB: far fewer read calls on a 45 MB image file
  }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;
  ~GzReader() {
    if (file_ != nullptr) gzclose_r(file_);
  }

  /// Reads up to n bytes; returns how many were read (short only at the end of the stream).
  /// A corrupt stream (bad deflate data, bad CRC or length trailer) throws.
  std::size_t read_some(std::uint8_t* dst, std::size_t n) {
    std::size_t done = 0;
    while (done < n) {
      const std::size_t chunk = std::min<std::size_t>(n - done, 1u << 30);
      const int got = gzread(file_, dst + done, static_cast<unsigned>(chunk));
      if (got < 0) fail_stream();
      if (got == 0) break;
      done += static_cast<std::size_t>(got);
    }
    // gzread reports a truncated gzip member as a short read plus a Z_BUF_ERROR.
    if (done < n) {
      int errnum = Z_OK;
      gzerror(file_, &errnum);
      if (errnum != Z_OK && errnum != Z_BUF_ERROR) fail_stream();
    }
    offset_ += done;
    return done;
  }

  /// Reads exactly n bytes of `what`, or throws naming the offset and how many were missing.
  void read_exact(std::uint8_t* dst, std::size_t n, const std::string& what) {
    const std::uint64_t start = offset_;
    const std::size_t got = read_some(dst, n);
    if (got != n)
      throw IoError("IDX file \"" + path_ + "\": truncated " + what + " at byte " + std::to_string(start) +
                    ": expected " + std::to_string(n) + " bytes, got " + std::to_string(got) + corrupt_hint());
  }

  /// The file must end here: one more byte means the header and the body disagree.
  void expect_end() {
    std::uint8_t extra[64];
    const std::size_t got = read_some(extra, sizeof extra);
    if (got == 0 && !corrupt_hint().empty())
      throw IoError("IDX file \"" + path_ + "\": gzip stream ends early at byte " + std::to_string(offset_) +
                    " of the uncompressed data" + corrupt_hint() + "; the file is truncated");
    if (got != 0)
      throw IoError("IDX file \"" + path_ + "\": unexpected data after the last element at byte " +
                    std::to_string(offset_ - got) + " (" + (got == sizeof extra ? "at least " : "") +
                    std::to_string(got) + " extra bytes); the dimensions in the header do not match the body");
  }

  std::uint64_t offset() const { return offset_; }

 private:
  [[noreturn]] void fail_stream() {
    int errnum = Z_OK;
    const char* msg = gzerror(file_, &errnum);
    throw IoError("IDX file \"" + path_ + "\": corrupt or unreadable data in a read starting at byte " +
                  std::to_string(offset_) +
                  " of the uncompressed stream: " + (msg != nullptr && *msg ? msg : "read error"));
  }

  std::string corrupt_hint() const {
    int errnum = Z_OK;
    const char* msg = gzerror(file_, &errnum);
    if (errnum == Z_BUF_ERROR && msg != nullptr && *msg) return std::string(" (") + msg + ")";
    return "";
  }

  std::string path_;
  gzFile file_ = nullptr;
  std::uint64_t offset_ = 0;
};

inline std::uint32_t read_be32(GzReader& in, const std::string& what) {
  std::uint8_t b[4];
  in.read_exact(b, 4, what);
  return (std::uint32_t{b[0]} << 24) | (std::uint32_t{b[1]} << 16) | (std::uint32_t{b[2]} << 8) | std::uint32_t{b[3]};
}

}  // namespace detail

/// Upper bound on the elements of one IDX file (1 GiB of u8): a corrupt header must not make us
/// allocate terabytes.
constexpr std::int64_t kIdxMaxElements = std::int64_t{1} << 30;

/// Reads a (gzip-compressed or plain) IDX file of unsigned bytes. `expected_ndims` > 0 also checks
/// the number of dimensions (1 for labels, 3 for images).
inline IdxArray read_idx(const std::string& path, int expected_ndims = 0) {
  detail::GzReader in(path);
  const std::uint32_t magic = detail::read_be32(in, "header (magic number)");
  const std::string who = "IDX file \"" + path + "\"";
  const int type = static_cast<int>((magic >> 8) & 0xFF);
  const int ndims = static_cast<int>(magic & 0xFF);
  if ((magic >> 16) != 0 || detail::idx_type_name(type) == nullptr)
    throw IoError(who + ": bad magic number " + detail::hex(magic, 8) +
                  " at byte 0; an IDX file starts with 0x0000TTNN (TT = element type 08..0E, NN = number of "
                  "dimensions)" +
                  ((magic >> 16) == 0x1f8b ? " — it looks gzip-compressed twice" : ""));
  if (type != 0x08)
    throw IoError(who + ": element type " + detail::hex(static_cast<std::uint32_t>(type), 2) + " (" +
                  detail::idx_type_name(type) + ") is not supported; expected 0x08 (unsigned byte)");
  if (ndims == 0) throw IoError(who + ": header declares 0 dimensions");
  if (expected_ndims > 0 && ndims != expected_ndims)
    throw IoError(who + ": has " + std::to_string(ndims) + " dimensions (magic " + detail::hex(magic, 8) +
                  "), expected " + std::to_string(expected_ndims) + " (magic " +
                  detail::hex(0x0800u | static_cast<std::uint32_t>(expected_ndims), 8) + ")");

  IdxArray out;
  out.dims.reserve(static_cast<std::size_t>(ndims));
  std::int64_t elements = 1;
  for (int d = 0; d < ndims; ++d) {
    const std::uint64_t at = in.offset();
    const std::uint32_t size = detail::read_be32(in, "header (dimension " + std::to_string(d) + ")");
    if (size == 0) throw IoError(who + ": dimension " + std::to_string(d) + " at byte " + std::to_string(at) + " is 0");
    elements *= static_cast<std::int64_t>(size);
    if (elements > kIdxMaxElements)
      throw IoError(who + ": header announces more than " + std::to_string(kIdxMaxElements) + " elements (dimension " +
                    std::to_string(d) + " = " + std::to_string(size) + "); the file is corrupt or not an IDX file");
    out.dims.push_back(static_cast<std::int64_t>(size));
  }
  out.data.resize(static_cast<std::size_t>(elements));
  in.read_exact(out.data.data(), out.data.size(), "body (" + std::to_string(elements) + " elements)");
  in.expect_end();
  return out;
}

/// Reads an image file (3 dimensions: count, rows, cols) and a label file (1 dimension: count) and
/// checks that they describe the same number of examples. `max_label` > 0 also checks every label
/// is in [0, max_label].
inline IdxDataset read_idx_dataset(const std::string& images_path, const std::string& labels_path, int max_label = 0) {
  IdxArray images = read_idx(images_path, 3);
  IdxArray labels = read_idx(labels_path, 1);
  if (images.dims[0] != labels.dims[0])
    throw IoError("IDX files \"" + images_path + "\" and \"" + labels_path + "\": " + std::to_string(images.dims[0]) +
                  " images but " + std::to_string(labels.dims[0]) + " labels");
  if (max_label > 0) {
    for (std::size_t i = 0; i < labels.data.size(); ++i)
      if (labels.data[i] > max_label)
        throw IoError("IDX file \"" + labels_path + "\": label " + std::to_string(labels.data[i]) + " of example " +
                      std::to_string(i) + " (byte " + std::to_string(8 + i) + ") is outside [0, " +
                      std::to_string(max_label) + "]");
  }
  IdxDataset ds;
  ds.count = static_cast<Index>(images.dims[0]);
  ds.rows = static_cast<Index>(images.dims[1]);
  ds.cols = static_cast<Index>(images.dims[2]);
  ds.pixels = std::move(images.data);
  ds.labels = std::move(labels.data);
  return ds;
}

/// Selected images as a [n, rows·cols] matrix with pixel values scaled to [0, 1] (x / 255).
template <class T>
Matrix<T> idx_images_to_matrix(const IdxDataset& ds, const std::vector<Index>& indices) {
  const Index d = ds.pixels_per_image();
  Matrix<T> x(static_cast<Index>(indices.size()), d);
  for (std::size_t r = 0; r < indices.size(); ++r) {
    const Index i = indices[r];
    if (i < 0 || i >= ds.count)
      throw ShapeError("idx_images_to_matrix: index " + std::to_string(i) + " is outside [0, " +
                       std::to_string(ds.count) + ")");
    const std::uint8_t* src = ds.pixels.data() + static_cast<std::size_t>(i * d);
    for (Index j = 0; j < d; ++j) x(static_cast<Index>(r), j) = static_cast<T>(src[j]) * static_cast<T>(1.0 / 255.0);
  }
  return x;
}

}  // namespace peft
