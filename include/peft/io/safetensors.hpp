#pragma once
// Strict safetensors reader and streaming, atomic writer.
//
// Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N
// bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
// {str: str}}, then the data section; offsets are relative to its start (byte 8 + N), tensors are
// row-major little-endian.
//
// Validation (every rule throws IoError naming the file and the byte offset or JSON key):
//   N ≤ 100 MB and 8 + N ≤ file size; the header starts with '{' and is valid UTF-8 JSON with no
//   duplicate keys; every entry has exactly dtype / shape / data_offsets of the right JSON types;
//   bytes = prod(shape) · itemsize, computed with overflow checks; begin ≤ end ≤ data size; sorted
//   by offset the tensors tile [0, data size) exactly (from 0, no gap, no overlap, nothing after
//   the last one); `__metadata__` is a string → string map.
//
// Reading maps the file (zero copy): view<T>() is an Eigen::Map straight into the mapping when the
// stored dtype is T's native one, the host is little-endian and the address is aligned; load<T>()
// converts any supported dtype into a Matrix<T>. Tensors of rank ≠ 2 are seen as matrices: a
// scalar as [1, 1], a vector [n] as [1, n] (the library's RowVector convention), rank ≥ 3 as
// [d0, d1·d2·…].
//
// Writing: the header is padded with spaces to a multiple of 8 bytes (as the reference
// implementation does, so the data section is 8-byte aligned), tensors are streamed in declared
// order through an AtomicFile (temporary + fsync + rename): a failure leaves no file behind.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/io/dtype.hpp"
#include "peft/io/file.hpp"
#include "peft/io/json.hpp"

namespace peft::io {

/// Largest header accepted (the reference implementation's limit).
constexpr std::uint64_t kMaxHeaderBytes = 100u * 1000u * 1000u;

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  ///< byte offset in the data section
  std::uint64_t end = 0;
  std::uint64_t numel = 0;

  std::uint64_t nbytes() const { return end - begin; }
  /// Rows / cols of the matrix view (see the file comment).
  Index rows() const {
    if (shape.size() < 2) return 1;
    return static_cast<Index>(shape[0]);
  }
  Index cols() const {
    if (shape.empty()) return 1;
    if (shape.size() == 1) return static_cast<Index>(shape[0]);
    if (shape.size() == 2) return static_cast<Index>(shape[1]);
    return rows() == 0 ? 0 : static_cast<Index>(numel / static_cast<std::uint64_t>(shape[0]));
  }
  std::string shape_string() const {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

struct SafeTensorsHeader {
  std::vector<TensorInfo> tensors;  ///< sorted by data offset (file order)
  std::map<std::string, std::string> metadata;
  std::uint64_t data_offset = 0;  ///< 8 + N
};

namespace detail {

inline bool mul_overflow_u64(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  return __builtin_mul_overflow(a, b, &out);
}

/// Parsed safetensors headers: map-based (see peft/io/json.hpp), key order does not matter.
using HeaderJson = nlohmann::json;

inline std::uint64_t json_u64(const HeaderJson& v, const std::string& label, const std::string& key, const char* what) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) return static_cast<std::uint64_t>(v.get<std::int64_t>());
  throw IoError("\"" + label + "\": tensor \"" + key + "\": " + what + " must be a non-negative integer, got " +
                v.dump());
}

}  // namespace detail

/// Validates a complete safetensors file image (`size` bytes at `data`); `label` names it in errors.
inline SafeTensorsHeader parse_safetensors_header(const unsigned char* data, std::size_t size,
                                                  const std::string& label) {
  const std::string who = "\"" + label + "\"";
  if (size < 8)
    throw IoError(who + ": file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  const std::uint64_t n = detail::load_le<std::uint64_t>(data);
  if (n > kMaxHeaderBytes)
    throw IoError(who + ": header length " + std::to_string(n) + " (bytes 0..8) exceeds the limit of " +
                  std::to_string(kMaxHeaderBytes) + " bytes");
  if (n > size - 8)
    throw IoError(who + ": header length " + std::to_string(n) + " (bytes 0..8) runs past the end of the " +
                  std::to_string(size) + "-byte file");
  if (n < 2 || data[8] != '{') throw IoError(who + ": header at byte 8 does not start with '{'");
  const char* hb = reinterpret_cast<const char*>(data + 8);
  const detail::HeaderJson j = parse_json_strict<detail::HeaderJson>(hb, hb + n, label, 8);
  if (!j.is_object()) throw IoError(who + ": header is not a JSON object");

  SafeTensorsHeader h;
  h.data_offset = 8 + n;
  const std::uint64_t data_size = size - h.data_offset;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const detail::HeaderJson& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object()) throw IoError(who + ": \"__metadata__\" must be an object of strings, got " + v.type_name());
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          throw IoError(who + ": \"__metadata__\" key \"" + m.key() + "\" must map to a string, got " +
                        m.value().type_name());
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string tw = who + ": tensor \"" + key + "\"";
    if (key.empty()) throw IoError(who + ": tensor with an empty name");
    if (!v.is_object()) throw IoError(tw + ": entry must be an object, got " + v.type_name());
    for (auto f = v.begin(); f != v.end(); ++f)
      if (f.key() != "dtype" && f.key() != "shape" && f.key() != "data_offsets")
        throw IoError(tw + ": unexpected field \"" + f.key() + "\"");
    if (!v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      throw IoError(tw + ": entry needs \"dtype\", \"shape\" and \"data_offsets\"");
    TensorInfo t;
    t.name = key;
    const detail::HeaderJson& dt = v["dtype"];
    if (!dt.is_string()) throw IoError(tw + ": \"dtype\" must be a string, got " + dt.dump());
    if (!parse_dtype(dt.get<std::string>(), t.dtype))
      throw IoError(tw + ": unknown or unsupported dtype \"" + dt.get<std::string>() +
                    "\" (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
    const detail::HeaderJson& sh = v["shape"];
    if (!sh.is_array()) throw IoError(tw + ": \"shape\" must be an array, got " + sh.dump());
    std::uint64_t numel = 1;
    for (const detail::HeaderJson& d : sh) {
      const std::uint64_t dim = detail::json_u64(d, label, key, "\"shape\" entry");
      if (dim > static_cast<std::uint64_t>(INT64_MAX) || detail::mul_overflow_u64(numel, dim, numel))
        throw IoError(tw + ": shape " + sh.dump() + " has more elements than fit in 64 bits");
      t.shape.push_back(static_cast<std::int64_t>(dim));
    }
    t.numel = numel;
    std::uint64_t nbytes = 0;
    if (detail::mul_overflow_u64(numel, dtype_size(t.dtype), nbytes))
      throw IoError(tw + ": shape " + sh.dump() + " × " + dtype_name(t.dtype) + " overflows 64 bits");
    const detail::HeaderJson& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2)
      throw IoError(tw + ": \"data_offsets\" must be [begin, end], got " + off.dump());
    t.begin = detail::json_u64(off[0], label, key, "data_offsets[0]");
    t.end = detail::json_u64(off[1], label, key, "data_offsets[1]");
    if (t.end < t.begin) throw IoError(tw + ": data_offsets " + off.dump() + " end before they begin");
    if (t.end > data_size)
      throw IoError(tw + ": data_offsets " + off.dump() + " run past the " + std::to_string(data_size) +
                    "-byte data section (file bytes " + std::to_string(h.data_offset) + ".." + std::to_string(size) +
                    ")");
    if (t.end - t.begin != nbytes)
      throw IoError(tw + ": data_offsets " + off.dump() + " hold " + std::to_string(t.end - t.begin) + " bytes, but " +
                    dtype_name(t.dtype) + " " + t.shape_string() + " needs " + std::to_string(nbytes));
    h.tensors.push_back(std::move(t));
  }
  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t expected = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : h.tensors) {
    if (t.begin < expected)
      throw IoError(who + ": tensor \"" + t.name + "\" (data bytes " + std::to_string(t.begin) + ".." +
                    std::to_string(t.end) + ") overlaps tensor \"" + prev->name + "\" (ending at " +
                    std::to_string(expected) + ")");
    if (t.begin > expected)
      throw IoError(who + ": gap in the data section: bytes " + std::to_string(expected) + ".." +
                    std::to_string(t.begin) + " before tensor \"" + t.name + "\" belong to no tensor");
    expected = t.end;
    prev = &t;
  }
  if (expected != data_size)
    throw IoError(who + ": " + std::to_string(data_size - expected) +
                  " trailing bytes after the last tensor (file byte " + std::to_string(h.data_offset + expected) +
                  " of " + std::to_string(size) + ")");
  return h;
}

/// A memory-mapped, validated safetensors file.
class SafeTensorsFile {
 public:
  explicit SafeTensorsFile(const std::string& path) : file_(path) {
    header_ = parse_safetensors_header(file_.data(), file_.size(), path);
    for (std::size_t i = 0; i < header_.tensors.size(); ++i) index_[header_.tensors[i].name] = i;
  }

  const std::string& path() const { return file_.path(); }
  const MappedFile& file() const { return file_; }
  /// Tensors in file (offset) order.
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  std::uint64_t data_offset() const { return header_.data_offset; }

  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) throw IoError("\"" + path() + "\": no tensor named \"" + name + "\"");
    return header_.tensors[it->second];
  }

  /// The stored little-endian bytes of a tensor (inside the mapping).
  const unsigned char* bytes(const TensorInfo& t) const { return file_.data() + header_.data_offset + t.begin; }

  /// Converts into `dst` (t.numel elements).
  template <class T>
  void load_into(const TensorInfo& t, T* dst) const {
    decode_elements<T>(t.dtype, bytes(t), static_cast<std::size_t>(t.numel), dst);
  }

  template <class T>
  Matrix<T> load(const std::string& name) const {
    const TensorInfo& t = info(name);
    Matrix<T> m(t.rows(), t.cols());
    load_into<T>(t, m.data());
    return m;
  }

  /// True when view<T>(t) can map the file without a copy.
  template <class T>
  bool can_view(const TensorInfo& t) const {
    return t.dtype == native_dtype<T>() && host_is_little_endian() &&
           reinterpret_cast<std::uintptr_t>(bytes(t)) % alignof(T) == 0;
  }

  /// Zero-copy view into the mapping; valid while this object lives. IoError if not possible
  /// (dtype differs from T's native one, big-endian host, misaligned offset): use load<T>().
  template <class T>
  ConstMatrixMap<T> view(const std::string& name) const {
    const TensorInfo& t = info(name);
    if (!can_view<T>(t))
      throw IoError("\"" + path() + "\": tensor \"" + name + "\" (" + dtype_name(t.dtype) +
                    ") cannot be viewed without conversion as " + dtype_name(native_dtype<T>()) + "; use load()");
    return ConstMatrixMap<T>(reinterpret_cast<const T*>(bytes(t)), t.rows(), t.cols());
  }

 private:
  MappedFile file_;
  SafeTensorsHeader header_;
  std::unordered_map<std::string, std::size_t> index_;
};

struct TensorSpec {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
};

/// The header bytes (length prefix + JSON + space padding) for tensors laid out in `specs` order.
inline std::string build_safetensors_header(const std::vector<TensorSpec>& specs,
                                            const std::map<std::string, std::string>& metadata,
                                            const std::string& label, std::vector<std::uint64_t>* sizes = nullptr) {
  Json j = Json::object();
  if (!metadata.empty()) {
    Json m = Json::object();
    for (const auto& kv : metadata) m[kv.first] = kv.second;
    j["__metadata__"] = m;
  }
  std::uint64_t offset = 0;
  if (sizes) sizes->clear();
  for (const TensorSpec& s : specs) {
    if (s.name.empty() || s.name == "__metadata__")
      throw IoError("\"" + label + "\": invalid tensor name \"" + s.name + "\"");
    if (j.contains(s.name)) throw IoError("\"" + label + "\": duplicate tensor name \"" + s.name + "\"");
    std::uint64_t numel = 1;
    for (std::int64_t d : s.shape) {
      if (d < 0 || detail::mul_overflow_u64(numel, static_cast<std::uint64_t>(d), numel))
        throw IoError("\"" + label + "\": tensor \"" + s.name + "\" has an invalid shape");
    }
    std::uint64_t nbytes = 0;
    if (detail::mul_overflow_u64(numel, dtype_size(s.dtype), nbytes) || offset + nbytes < offset)
      throw IoError("\"" + label + "\": tensor \"" + s.name + "\" is too large");
    j[s.name] = Json{{"dtype", dtype_name(s.dtype)}, {"shape", s.shape}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    if (sizes) sizes->push_back(nbytes);
  }
  std::string text = j.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  detail::store_le<std::uint64_t>(reinterpret_cast<unsigned char*>(&out[0]), text.size());
  return out + text;
}

/// Streams tensors into a new safetensors file: the header is written at construction, then each
/// tensor's data in declared order (in any number of chunks), then commit() renames the file into
/// place. Destroyed without commit() (an exception, a NaN found half-way) it leaves nothing.
class SafeTensorsWriter {
 public:
  SafeTensorsWriter(const std::string& path, std::vector<TensorSpec> specs,
                    const std::map<std::string, std::string>& metadata = {})
      : out_(path), specs_(std::move(specs)) {
    const std::string header = build_safetensors_header(specs_, metadata, path, &sizes_);
    out_.write(header.data(), header.size());
    skip_empty();
  }

  const std::string& path() const { return out_.path(); }
  bool done() const { return current_ == specs_.size(); }
  /// Bytes written so far, header included (the file's size once done()).
  std::uint64_t bytes_written() const { return out_.bytes_written(); }

  /// The tensor the next bytes belong to.
  const TensorSpec& next() const {
    if (done()) throw IoError("\"" + path() + "\": all tensors are already written");
    return specs_[current_];
  }

  /// Appends raw little-endian bytes of the current tensor (may be a part of it).
  void write_raw(const void* data, std::size_t n) {
    append(n, [&](std::size_t done, std::size_t k) { out_.write(static_cast<const unsigned char*>(data) + done, k); });
  }

  /// Appends bytes [offset, offset + n) of an open file (whose bytes are also at `same_bytes`),
  /// copied by the kernel where it can (AtomicFile::copy_from): how a merge copies the tensors it
  /// does not change.
  void copy_raw(int in_fd, std::uint64_t offset, std::size_t n, const unsigned char* same_bytes) {
    append(n, [&](std::size_t done, std::size_t k) { out_.copy_from(in_fd, offset + done, k, same_bytes + done); });
  }

  /// Appends `n` values of T converted to the current tensor's dtype (must not straddle tensors).
  template <class T>
  void write(const T* data, std::size_t n) {
    const TensorSpec& s = next();
    const std::size_t item = dtype_size(s.dtype);
    if (filled_ % item != 0 || filled_ + n * item > sizes_[current_])
      throw IoError("\"" + path() + "\": " + std::to_string(n) + " values do not fit the remaining part of tensor \"" +
                    s.name + "\"");
    if (s.dtype == native_dtype<T>() && host_is_little_endian()) {  // the bytes are the file's: no encoding pass
      write_raw(data, n * item);
      return;
    }
    constexpr std::size_t kChunk = 1u << 16;  // bounded scratch, reused
    buffer_.resize(kChunk * 8);
    for (std::size_t i = 0; i < n; i += kChunk) {
      const std::size_t k = std::min(kChunk, n - i);
      std::size_t bad = 0;
      if (!encode_elements<T>(s.dtype, data + i, k, buffer_.data(), &bad)) {
        char v[32];
        std::snprintf(v, sizeof v, "%.17g", static_cast<double>(data[i + bad]));
        const std::string where = "\"" + path() + "\": tensor \"" + s.name + "\": value " + v + " at element " +
                                  std::to_string(filled_ / item + i + bad);
        if (dtype_is_float(s.dtype))  // a finite value beyond the dtype's range
          throw NumericError(where + " overflows " + dtype_name(s.dtype) + " (it would be stored as Inf)");
        throw IoError(where + " does not fit " + dtype_name(s.dtype));
      }
      write_raw(buffer_.data(), k * item);
    }
  }

  void commit() {
    if (!done())
      throw IoError("\"" + path() + "\": tensor \"" + specs_[current_].name + "\" and " +
                    std::to_string(specs_.size() - current_ - 1) + " more were not written");
    out_.commit();
  }

 private:
  /// Feeds n bytes to `emit(done, k)` in pieces that never cross a tensor boundary, advancing the
  /// current tensor.
  template <class Emit>
  void append(std::size_t n, Emit&& emit) {
    std::size_t done = 0;
    while (done < n) {
      if (this->done()) throw IoError("\"" + path() + "\": more data than the declared tensors hold");
      const std::uint64_t left = sizes_[current_] - filled_;
      const std::size_t k = static_cast<std::size_t>(std::min<std::uint64_t>(left, n - done));
      emit(done, k);
      done += k;
      filled_ += k;
      if (filled_ == sizes_[current_]) {
        ++current_;
        filled_ = 0;
        skip_empty();
      }
    }
  }
  void skip_empty() {
    while (current_ < specs_.size() && sizes_[current_] == 0) ++current_;
  }

  AtomicFile out_;
  std::vector<TensorSpec> specs_;
  std::vector<std::uint64_t> sizes_;
  std::size_t current_ = 0;
  std::uint64_t filled_ = 0;
  std::vector<unsigned char> buffer_;
};

/// A tensor to save: a name, its logical shape, row-major data (not owned) and the file dtype.
template <class T>
struct NamedTensor {
  NamedTensor(std::string name_, std::vector<std::int64_t> shape_, const T* data_, DType dtype_ = native_dtype<T>())
      : name(std::move(name_)), shape(std::move(shape_)), data(data_), dtype(dtype_) {}
  std::string name;
  std::vector<std::int64_t> shape;
  const T* data;
  DType dtype;
};

/// [rows, cols] shape, or [cols] when `vector` (a 1-D tensor stored as a row).
inline std::vector<std::int64_t> matrix_shape(Index rows, Index cols, bool vector = false) {
  if (vector) return {static_cast<std::int64_t>(cols)};
  return {static_cast<std::int64_t>(rows), static_cast<std::int64_t>(cols)};
}

/// Writes all tensors to `path` atomically.
template <class T>
void save_safetensors(const std::string& path, const std::vector<NamedTensor<T>>& tensors,
                      const std::map<std::string, std::string>& metadata = {}) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& t : tensors) specs.push_back({t.name, t.dtype, t.shape});
  SafeTensorsWriter w(path, std::move(specs), metadata);
  for (const auto& t : tensors) {
    std::size_t n = 1;
    for (std::int64_t d : t.shape) n *= static_cast<std::size_t>(d);
    if (n > 0) w.write<T>(t.data, n);
  }
  w.commit();
}

}  // namespace peft::io
