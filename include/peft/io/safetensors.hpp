#pragma once
// Strict safetensors reader and streaming, atomic writer.
//
// Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N
// bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
// {str: str}}, then the data section; offsets are relative to its start (byte 8 + N), tensors are
// row-major little-endian.
//
// Validation (every rule throws IoError naming the file and the byte offset or JSON key):
//   N ≤ kMaxHeaderBytes (100 MB) and 8 + N ≤ file size; the header starts with '{' and all N
//   bytes are valid UTF-8 JSON without NUL (an object, then only whitespace: writers pad with
//   0x20) with no duplicate keys; at most kMaxTensors entries and kMaxMetadataKeys metadata keys;
//   every entry has exactly dtype / shape / data_offsets of the right JSON types, a shape at most
//   kMaxTensorRank dimensions; bytes = prod(shape) · itemsize, computed with overflow checks;
//   begin ≤ end ≤ data size; sorted by offset the tensors tile [0, data size) exactly (from 0, no
//   gap, no overlap, nothing after the last one); `__metadata__` is a string → string map.
//   The header is parsed by SAX straight into TensorInfo (no JSON DOM), so memory and time stay
//   linear in the header and an over-limit header costs no more than counting it.
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
// Float tensors must be finite: a NaN or Inf anywhere is a NumericError and no file is produced.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/separate.hpp"
#include "peft/core/types.hpp"
#include "peft/io/dtype.hpp"
#include "peft/io/file.hpp"
#include "peft/io/json.hpp"

namespace peft::io {

// Limits on a header, each checked while the header is parsed, before anything proportional to
// it is kept, and each named in its error (see detail::HeaderParser). Real checkpoints are far
// below them: a shard holds thousands of tensors and a few metadata keys.

/// Largest header accepted (the reference implementation's limit).
constexpr std::uint64_t kMaxHeaderBytes = 100u * 1000u * 1000u;
/// Most tensor entries in one header. kMaxHeaderBytes alone admits 1.6 million zero-size entries;
/// each costs a TensorInfo (~150 bytes) once parsed.
constexpr std::size_t kMaxTensors = 1000u * 1000u;
/// Most keys in `__metadata__` (a std::map node each).
constexpr std::size_t kMaxMetadataKeys = 65536;
/// Most dimensions of one shape (NumPy 2's NPY_MAXDIMS); a shape of a million ones is not a tensor.
constexpr std::size_t kMaxTensorRank = 64;

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

inline std::string u64_list(const std::vector<std::uint64_t>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

}  // namespace detail

/// Validates a complete safetensors file image (`size` bytes at `data`); `label` names it in errors.
/// This is also the in-memory entry point (a buffer need not come from a file). Only the first
/// 8 + N bytes (the length prefix and the header) are read; `size` is used for the bounds of the
/// data section, so a caller that reads the header with pread may pass a buffer holding just those
/// bytes together with the file's real size.
PEFT_SEPARATE_INLINE SafeTensorsHeader parse_safetensors_header(const unsigned char* data, std::size_t size,
                                                                const std::string& label);

#if PEFT_SEPARATE_BODIES  // (peft/core/separate.hpp)
namespace detail {

/// Builds a SafeTensorsHeader straight from nlohmann's SAX events: no JSON DOM. A DOM of a
/// maximal header costs ~0.5 kB per entry (map nodes, arrays), several times the header itself,
/// and a bad_alloc while building it ends in std::terminate (nlohmann's destructor allocates and
/// is noexcept). Here memory is one TensorInfo per entry, and the schema is enforced event by event,
/// which also bounds everything kept: entries are objects of the three known fields, a shape holds
/// at most kMaxTensorRank integers, data_offsets two; nesting cannot go past three levels.
///
/// Past kMaxTensors entries or kMaxMetadataKeys metadata keys the parser drops what it built and
/// only counts to the end of the header, so the error can state the actual count.
class HeaderParser : public nlohmann::json_sax<nlohmann::json> {
 public:
  HeaderParser(const std::string& label, std::uint64_t data_offset, std::uint64_t data_size, SafeTensorsHeader& out)
      : who_("\"" + label + "\""), data_offset_(data_offset), data_size_(data_size), out_(out) {}

  bool null() override { return scalar("null"); }
  bool boolean(bool b) override { return scalar(b ? "true" : "false"); }
  bool number_integer(number_integer_t v) override {
    return v >= 0 ? integer(static_cast<std::uint64_t>(v)) : scalar(std::to_string(v));
  }
  bool number_unsigned(number_unsigned_t v) override { return integer(v); }
  bool number_float(number_float_t, const string_t& text) override { return scalar(text); }
  bool binary(binary_t&) override { return scalar("binary data"); }

  bool string(string_t& s) override {
    if (counting_) return true;
    if (state_ == State::Entry && field_ == Field::DType) {
      if (!parse_dtype(s, cur_.dtype))
        throw IoError(tensor_who() + ": unknown or unsupported dtype \"" + clip(s) +
                      "\" (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
      field_ = Field::None;
      return true;
    }
    if (state_ == State::Metadata) {
      if (!out_.metadata.emplace(key_, s).second) throw IoError(who_ + ": duplicate JSON key \"" + clip(key_) + "\"");
      return true;
    }
    bad_value("\"" + clip(s) + "\"");
  }

  bool start_object(std::size_t) override {
    ++depth_;
    if (counting_) {
      if (depth_ == 2) in_metadata_ = metadata_pending_;
      return true;
    }
    if (state_ == State::Start) {
      state_ = State::Root;
    } else if (state_ == State::Root && metadata_pending_) {
      state_ = State::Metadata;
      in_metadata_ = true;
    } else if (state_ == State::Root) {
      state_ = State::Entry;
      seen_ = 0;
      field_ = Field::None;
    } else {
      bad_value("an object");
    }
    return true;
  }

  bool key(string_t& k) override {
    if (depth_ == 1) {
      metadata_pending_ = k == "__metadata__";
      if (!metadata_pending_ && ++tensor_count_ > kMaxTensors) start_counting();
    } else if (depth_ == 2 && in_metadata_) {
      if (++metadata_count_ > kMaxMetadataKeys) start_counting();
    }
    if (counting_) return true;
    if (state_ == State::Root) {
      if (metadata_pending_) {
        if (metadata_seen_) throw IoError(who_ + ": duplicate JSON key \"__metadata__\"");
        metadata_seen_ = true;
        return true;
      }
      if (k.empty()) throw IoError(who_ + ": tensor with an empty name");
      cur_ = TensorInfo{};
      cur_.name = k;
      return true;
    }
    if (state_ == State::Metadata) {
      key_ = k;
      return true;
    }
    // state_ == State::Entry: one of the three fields, each once.
    const Field f = k == "dtype"          ? Field::DType
                    : k == "shape"        ? Field::Shape
                    : k == "data_offsets" ? Field::Offsets
                                          : Field::None;
    if (f == Field::None) throw IoError(tensor_who() + ": unexpected field \"" + clip(k) + "\"");
    const unsigned bit = 1u << static_cast<unsigned>(f);
    if (seen_ & bit) throw IoError(tensor_who() + ": duplicate JSON key \"" + k + "\"");
    seen_ |= bit;
    field_ = f;
    return true;
  }

  bool end_object() override {
    --depth_;
    if (depth_ == 1) in_metadata_ = false;
    if (counting_) {
      if (depth_ == 0) throw_limit();
      return true;
    }
    if (state_ == State::Entry) {
      finish_entry();
      state_ = State::Root;
    } else if (state_ == State::Metadata) {
      state_ = State::Root;
    } else {
      state_ = State::Done;
    }
    return true;
  }

  bool start_array(std::size_t) override {
    ++depth_;
    if (counting_) return true;
    if (state_ == State::Entry && field_ == Field::Shape) {
      state_ = State::Shape;
      dims_.clear();
    } else if (state_ == State::Entry && field_ == Field::Offsets) {
      state_ = State::Offsets;
      offsets_.clear();
    } else {
      bad_value("an array");
    }
    return true;
  }

  bool end_array() override {
    --depth_;
    if (counting_) return true;
    if (state_ == State::Offsets && offsets_.size() != 2)
      throw IoError(tensor_who() + ": \"data_offsets\" must be [begin, end], got " + u64_list(offsets_));
    state_ = State::Entry;
    field_ = Field::None;
    return true;
  }

  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) override {
    throw IoError(who_ + ": invalid JSON at byte " + std::to_string(8 + position) + ": " + e.what());
  }

 private:
  enum class State { Start, Root, Entry, Shape, Offsets, Metadata, Done };
  enum class Field : unsigned { DType, Shape, Offsets, None };

  bool integer(std::uint64_t v) {
    if (counting_) return true;
    if (state_ == State::Shape) {
      if (dims_.size() == kMaxTensorRank)
        throw IoError(tensor_who() + ": shape has more than " + std::to_string(kMaxTensorRank) +
                      " dimensions (the limit kMaxTensorRank)");
      dims_.push_back(v);
      return true;
    }
    if (state_ == State::Offsets) {
      if (offsets_.size() == 2)
        throw IoError(tensor_who() + ": \"data_offsets\" must be [begin, end], got more than two values");
      offsets_.push_back(v);
      return true;
    }
    bad_value(std::to_string(v));
  }

  bool scalar(const std::string& text) {
    if (counting_) return true;
    bad_value(text);
  }

  /// A value of the wrong kind for where it stands; `got` renders it.
  [[noreturn]] void bad_value(const std::string& got) const {
    switch (state_) {
      case State::Root:
        if (metadata_pending_) throw IoError(who_ + ": \"__metadata__\" must be an object of strings, got " + got);
        throw IoError(tensor_who() + ": entry must be an object, got " + got);
      case State::Entry:
        if (field_ == Field::DType) throw IoError(tensor_who() + ": \"dtype\" must be a string, got " + got);
        if (field_ == Field::Shape) throw IoError(tensor_who() + ": \"shape\" must be an array, got " + got);
        throw IoError(tensor_who() + ": \"data_offsets\" must be [begin, end], got " + got);
      case State::Shape: throw IoError(tensor_who() + ": \"shape\" entry must be a non-negative integer, got " + got);
      case State::Offsets:
        throw IoError(tensor_who() + ": data_offsets[" + std::to_string(offsets_.size()) +
                      "] must be a non-negative integer, got " + got);
      case State::Metadata:
        throw IoError(who_ + ": \"__metadata__\" key \"" + clip(key_) + "\" must map to a string, got " + got);
      case State::Start:
      case State::Done: break;
    }
    throw IoError(who_ + ": header is not a JSON object");
  }

  void finish_entry() {
    TensorInfo& t = cur_;
    if (seen_ != 7u) throw IoError(tensor_who() + ": entry needs \"dtype\", \"shape\" and \"data_offsets\"");
    std::uint64_t numel = 1;
    for (std::uint64_t d : dims_)
      if (d > static_cast<std::uint64_t>(INT64_MAX) || mul_overflow_u64(numel, d, numel))
        throw IoError(tensor_who() + ": shape " + u64_list(dims_) + " has more elements than fit in 64 bits");
    t.shape.assign(dims_.begin(), dims_.end());
    t.numel = numel;
    std::uint64_t nbytes = 0;
    if (mul_overflow_u64(numel, dtype_size(t.dtype), nbytes))
      throw IoError(tensor_who() + ": shape " + t.shape_string() + " × " + dtype_name(t.dtype) + " overflows 64 bits");
    t.begin = offsets_[0];
    t.end = offsets_[1];
    const std::string off = u64_list(offsets_);
    if (t.end < t.begin) throw IoError(tensor_who() + ": data_offsets " + off + " end before they begin");
    if (t.end > data_size_)
      throw IoError(tensor_who() + ": data_offsets " + off + " run past the " + std::to_string(data_size_) +
                    "-byte data section (file bytes " + std::to_string(data_offset_) + ".." +
                    std::to_string(data_offset_ + data_size_) + ")");
    if (t.end - t.begin != nbytes)
      throw IoError(tensor_who() + ": data_offsets " + off + " hold " + std::to_string(t.end - t.begin) +
                    " bytes, but " + dtype_name(t.dtype) + " " + t.shape_string() + " needs " + std::to_string(nbytes));
    out_.tensors.push_back(std::move(t));
  }

  /// Over a limit: free what was built and only count from here on.
  void start_counting() {
    counting_ = true;
    std::vector<TensorInfo>().swap(out_.tensors);
    out_.metadata.clear();
  }

  [[noreturn]] void throw_limit() const {
    if (tensor_count_ > kMaxTensors)
      throw IoError(who_ + ": header declares " + std::to_string(tensor_count_) + " tensors, more than the limit of " +
                    std::to_string(kMaxTensors) + " (kMaxTensors)");
    throw IoError(who_ + ": \"__metadata__\" has " + std::to_string(metadata_count_) +
                  " keys, more than the limit of " + std::to_string(kMaxMetadataKeys) + " (kMaxMetadataKeys)");
  }

  std::string tensor_who() const { return who_ + ": tensor \"" + clip(cur_.name) + "\""; }
  /// Names and values quoted from a hostile header are cut to a readable length.
  static std::string clip(const std::string& s) { return s.size() <= 200 ? s : s.substr(0, 200) + "..."; }

  std::string who_;
  std::uint64_t data_offset_, data_size_;
  SafeTensorsHeader& out_;
  State state_ = State::Start;
  Field field_ = Field::None;
  unsigned seen_ = 0;  ///< bit f: field f of the current entry was given
  TensorInfo cur_;
  std::vector<std::uint64_t> dims_, offsets_;
  std::string key_;  ///< current metadata key
  int depth_ = 0;
  bool metadata_pending_ = false;  ///< the last key at depth 1 was "__metadata__"
  bool in_metadata_ = false;       ///< inside the `__metadata__` object
  bool metadata_seen_ = false;
  bool counting_ = false;
  std::size_t tensor_count_ = 0, metadata_count_ = 0;
};

}  // namespace detail

PEFT_SEPARATE_INLINE SafeTensorsHeader parse_safetensors_header(const unsigned char* data, std::size_t size,
                                                                const std::string& label) {
  const std::string who = "\"" + label + "\"";
  if (size < 8)
    throw IoError(who + ": file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  const std::uint64_t n = detail::load_le<std::uint64_t>(data);
  if (n > kMaxHeaderBytes)
    throw IoError(who + ": header length " + std::to_string(n) + " (bytes 0..8) exceeds the limit of " +
                  std::to_string(kMaxHeaderBytes) + " bytes (kMaxHeaderBytes)");
  if (n > size - 8)
    throw IoError(who + ": header length " + std::to_string(n) + " (bytes 0..8) runs past the end of the " +
                  std::to_string(size) + "-byte file");
  if (n < 2 || data[8] != '{') throw IoError(who + ": header at byte 8 does not start with '{'");
  const char* hb = reinterpret_cast<const char*>(data + 8);
  // Every one of the n bytes: valid UTF-8, no NUL (the JSON lexer would stop there, see json.hpp);
  // after the object only JSON whitespace, which includes the 0x20 padding writers add.
  detail::check_json_text(hb, hb + n, label, 8);

  SafeTensorsHeader h;
  h.data_offset = 8 + n;
  const std::uint64_t data_size = size - h.data_offset;
  detail::HeaderParser parser(label, h.data_offset, data_size, h);
  try {
    detail::sax_parse_json<nlohmann::json>(hb, hb + n, &parser);
  } catch (const nlohmann::json::exception& e) {
    throw IoError(who + ": invalid JSON: " + e.what());
  }

  // Duplicate tensor names (nlohmann would keep the last; Python the last too, but silently).
  {
    std::vector<const TensorInfo*> by_name(h.tensors.size());
    for (std::size_t i = 0; i < h.tensors.size(); ++i) by_name[i] = &h.tensors[i];
    std::sort(by_name.begin(), by_name.end(),
              [](const TensorInfo* a, const TensorInfo* b) { return a->name < b->name; });
    for (std::size_t i = 1; i < by_name.size(); ++i)
      if (by_name[i]->name == by_name[i - 1]->name)
        throw IoError(who + ": duplicate JSON key \"" + by_name[i]->name + "\"");
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
#endif  // PEFT_SEPARATE_BODIES

/// A memory-mapped, validated safetensors file. Truncation: if another process truncates the file
/// while it is open, reading a tensor from the missing pages raises SIGBUS (see MappedFile); the
/// library installs no signal handler. The streaming merge (merge_file.hpp) reads with pread instead.
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

/// Opens a safetensors file given as input for `what` (e.g. "the base model's .safetensors file");
/// a file that is JSON text (an adapter_config.json, an index given by mistake) gets a message
/// saying what was expected instead of the parser's complaint about an absurd header length.
inline SafeTensorsFile open_safetensors(const std::string& path, const std::string& what) {
  try {
    return SafeTensorsFile(path);
  } catch (const IoError&) {
    const InputFile f(path);
    unsigned char first = 0;
    if (f.size() > 0) f.read_at(0, 1, &first);
    if (first == '{' || first == '[')
      throw IoError("\"" + path + "\" is a JSON file, not a safetensors file (which starts with an 8-byte header " +
                    "length); expected " + what);
    throw;
  }
}

struct TensorSpec {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
};

/// The header bytes (length prefix + JSON + space padding) for tensors laid out in `specs` order.
PEFT_SEPARATE_INLINE std::string build_safetensors_header(const std::vector<TensorSpec>& specs,
                                                          const std::map<std::string, std::string>& metadata,
                                                          const std::string& label,
                                                          std::vector<std::uint64_t>* sizes = nullptr);

#if PEFT_SEPARATE_BODIES
PEFT_SEPARATE_INLINE std::string build_safetensors_header(const std::vector<TensorSpec>& specs,
                                                          const std::map<std::string, std::string>& metadata,
                                                          const std::string& label, std::vector<std::uint64_t>* sizes) {
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
#endif  // PEFT_SEPARATE_BODIES

/// Streams tensors into a new safetensors file: the header is written at construction, then each
/// tensor's data in declared order (in any number of chunks), then commit() renames the file into
/// place. Destroyed without commit() (an exception, a NaN found half-way) it leaves nothing.
///
/// Float tensors must be finite: every value is checked as it is written (write<T> with
/// all_finite, write_raw on the stored bits; copy_raw passes an input's bytes through), a NaN or Inf throws
/// NumericError naming the file, the tensor and the element, and commit() refuses a writer that ever saw one, so no
/// file holding NaN or Inf weights is ever produced. Integer dtypes have no such values.
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

  /// Appends raw little-endian bytes of the current tensor (may be a part of it, even a part of
  /// an element); float elements are checked finite on their bits.
  void write_raw(const void* data, std::size_t n) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    append(n, [&](std::size_t done, std::size_t k) {
      check_raw(bytes + done, k);
      out_.write(bytes + done, k);
    });
  }

  /// Appends bytes [offset, offset + n) of an open file (whose bytes are also at `same_bytes`, or
  /// nullptr: then what the kernel cannot copy is read with pread),
  /// copied by the kernel where it can (AtomicFile::copy_from): how a merge copies the tensors it
  /// does not change. These bytes are not checked for NaN / Inf: they are the input's own values,
  /// passed through unchanged (a model may legitimately store -inf, e.g. in a mask buffer), not
  /// something this library computed; every tensor a writer is given to encode is checked.
  void copy_raw(int in_fd, std::uint64_t offset, std::size_t n, const unsigned char* same_bytes) {
    append(n, [&](std::size_t done, std::size_t k) {
      // Whole elements only: a partial one would leave write_raw's element carry out of step.
      const std::size_t item = dtype_size(specs_[current_].dtype);
      if (carry_n_ != 0 || filled_ % item != 0 || k % item != 0)
        throw IoError("\"" + path() + "\": copy_raw into tensor \"" + specs_[current_].name + "\" must copy whole " +
                      std::to_string(item) + "-byte elements");
      out_.copy_from(in_fd, offset + done, k, same_bytes != nullptr ? same_bytes + done : nullptr);
    });
  }

  /// Appends `n` values of T converted to the current tensor's dtype (must not straddle tensors).
  template <class T>
  void write(const T* data, std::size_t n) {
    const TensorSpec& s = next();
    const std::size_t item = dtype_size(s.dtype);
    if (filled_ % item != 0 || filled_ + n * item > sizes_[current_])
      throw IoError("\"" + path() + "\": " + std::to_string(n) + " values do not fit the remaining part of tensor \"" +
                    s.name + "\"");
    if (dtype_is_float(s.dtype) && !all_finite(Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(data, n))) {
      std::size_t bad = 0;
      while (std::isfinite(data[bad])) ++bad;
      refuse_nonfinite(static_cast<double>(data[bad]), filled_ / item + bad);
    }
    if (s.dtype == native_dtype<T>() && host_is_little_endian()) {  // the bytes are the file's: no encoding pass
      append_checked(data, n * item);
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
      append_checked(buffer_.data(), k * item);
    }
  }

  /// Renames the file into place. Refused (NumericError) if any NaN or Inf was ever offered,
  /// even if the caller caught that error and went on.
  void commit() {
    if (!nonfinite_.empty()) throw NumericError(nonfinite_);
    if (!done())
      throw IoError("\"" + path() + "\": tensor \"" + specs_[current_].name + "\" and " +
                    std::to_string(specs_.size() - current_ - 1) + " more were not written");
    out_.commit();
  }

 private:
  /// Bytes already known finite (encoded by write<T>).
  void append_checked(const void* data, std::size_t n) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    append(n, [&](std::size_t done, std::size_t k) { out_.write(bytes + done, k); });
  }

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

  /// Checks the raw bytes [p, p + k) of the current tensor, which start at its byte filled_.
  /// An element split between two calls is completed from `carry_`.
  void check_raw(const unsigned char* p, std::size_t k) {
    const DType d = specs_[current_].dtype;
    if (!dtype_is_float(d) || k == 0) return;
    const std::size_t item = dtype_size(d);
    std::size_t head = 0;  // bytes of p that complete a carried element
    if (carry_n_ > 0) {
      head = std::min(k, item - carry_n_);
      std::memcpy(carry_ + carry_n_, p, head);
      carry_n_ += head;
      if (carry_n_ < item) return;
      carry_n_ = 0;
      const std::size_t bad = first_nonfinite(d, carry_, 1);
      if (bad == 0) refuse_nonfinite(decode_one(d, carry_), filled_ / item);
    }
    const std::size_t whole = (k - head) / item;
    const std::size_t bad = first_nonfinite(d, p + head, whole);
    if (bad < whole) refuse_nonfinite(decode_one(d, p + head + bad * item), (filled_ + head) / item + bad);
    carry_n_ = (k - head) % item;
    std::memcpy(carry_, p + head + whole * item, carry_n_);
  }

  /// Index of the first element of `n` (dtype d, little-endian) whose exponent bits are all ones
  /// (±Inf or NaN in every IEEE format), or n. One branch-free pass that vectorizes, then a search
  /// only when something was found.
  static std::size_t first_nonfinite(DType d, const unsigned char* p, std::size_t n) {
    switch (d) {
      case DType::F64: return first_all_ones<std::uint64_t>(p, n, 0x7ff0000000000000ull);
      case DType::F32: return first_all_ones<std::uint32_t>(p, n, 0x7f800000u);
      case DType::F16: return first_all_ones<std::uint16_t>(p, n, 0x7c00u);
      case DType::BF16: return first_all_ones<std::uint16_t>(p, n, 0x7f80u);
      default: return n;
    }
  }
  template <class U>
  static std::size_t first_all_ones(const unsigned char* p, std::size_t n, U mask) {
    const bool native = host_is_little_endian();
    auto word = [&](std::size_t i) {
      U w;
      if (native) {
        std::memcpy(&w, p + i * sizeof(U), sizeof(U));
      } else {
        w = detail::load_le<U>(p + i * sizeof(U));
      }
      return w;
    };
    unsigned any = 0;
    for (std::size_t i = 0; i < n; ++i) any |= static_cast<unsigned>((word(i) & mask) == mask);
    if (any == 0) return n;
    std::size_t i = 0;
    while ((word(i) & mask) != mask) ++i;
    return i;
  }
  static double decode_one(DType d, const unsigned char* p) {
    double v = 0;
    decode_elements<double>(d, p, 1, &v);
    return v;
  }

  /// Records and throws the NumericError for a NaN or Inf at `element` of the current tensor.
  [[noreturn]] void refuse_nonfinite(double value, std::uint64_t element) {
    char v[32];
    std::snprintf(v, sizeof v, "%g", value);
    nonfinite_ = "\"" + path() + "\": tensor \"" + specs_[current_].name + "\": element " + std::to_string(element) +
                 " is " + v + "; a file may not hold NaN or Inf, nothing was written";
    throw NumericError(nonfinite_);
  }

  AtomicFile out_;
  std::vector<TensorSpec> specs_;
  std::vector<std::uint64_t> sizes_;
  std::size_t current_ = 0;
  std::uint64_t filled_ = 0;
  std::vector<unsigned char> buffer_;
  unsigned char carry_[8] = {};  ///< leading bytes of an element split between write_raw calls
  std::size_t carry_n_ = 0;
  std::string nonfinite_;  ///< the first NaN / Inf refused; commit() refuses too
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

/// The specs (name, dtype, shape) of `tensors`, in order: what a SafeTensorsWriter for them needs.
template <class T>
std::vector<TensorSpec> tensor_specs(const std::vector<NamedTensor<T>>& tensors) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& t : tensors) specs.push_back({t.name, t.dtype, t.shape});
  return specs;
}

/// Writes every tensor of `tensors` into `w` (made from tensor_specs(tensors)) without committing:
/// for a caller that has something to do between writing and the rename.
template <class T>
void write_tensors(SafeTensorsWriter& w, const std::vector<NamedTensor<T>>& tensors) {
  for (const auto& t : tensors) {
    std::size_t n = 1;
    for (std::int64_t d : t.shape) n *= static_cast<std::size_t>(d);
    if (n > 0) w.write<T>(t.data, n);
  }
}

/// Writes all tensors to `path` atomically; a NaN or Inf in a float tensor refuses (NumericError)
/// and nothing is written.
template <class T>
void save_safetensors(const std::string& path, const std::vector<NamedTensor<T>>& tensors,
                      const std::map<std::string, std::string>& metadata = {}) {
  SafeTensorsWriter w(path, tensor_specs(tensors), metadata);
  write_tensors(w, tensors);
  w.commit();
}

}  // namespace peft::io
