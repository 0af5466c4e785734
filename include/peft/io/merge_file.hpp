#pragma once
// Merges a PEFT LoRA adapter into a safetensors model file, streaming tensor by tensor:
//
//   W' = W + c · s · B A            (fan_in_fan_out: W' = W + c · s · (B A)ᵀ, W stored [in, out])
//   DoRA: W' = m ⊙ V / ‖V‖_row,  V = W + c · s · B A   (Liu et al., 2024, "DoRA: Weight-Decomposed
//         Low-Rank Adaptation"; the norm is over each output row, as PEFT's get_weight_norm)
//
// with s the adapter's scaling and c the user's extra scale. The base is read once, front to back,
// with pread into a reused buffer (never memory-mapped: a base that another process truncates
// during the merge gives a short read, an IoError, where a mapping would kill the process with
// SIGBUS). Each merged tensor is processed in blocks of rows (about `block_bytes`), so peak
// memory is a block plus the adapter, whatever the model size; untouched tensors are copied by
// the kernel (copy_file_range), and a copy that finds the file shorter than its header said is an
// IoError too. The output header equals the input's (names, dtypes, shapes, metadata), so the
// result is a drop-in replacement.
//
// Everything that can be checked up front is (each adapter module finds a float, rank-2 base
// tensor of the right shape; full tensors match; no module is left unused) before the output file
// is created. A tensor the adapter targets that the base does not have is a ConfigError (the wrong
// base model, or a name mapping is needed), not a shape error. A NaN or Inf produced while
// merging, or any error while streaming, aborts the write: the temporary file is removed and
// nothing is left at `out_path`.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/file.hpp"
#include "peft/io/peft_format.hpp"
#include "peft/io/safetensors.hpp"

namespace peft::io {

struct MergeFileOptions {
  double scale = 1.0;                  ///< c: multiplies every adapter's scaling
  NameMapping mapping;                 ///< PEFT module path → base tensor prefix
  std::size_t block_bytes = 8u << 20;  ///< working block for merged tensors
  /// Called before each base tensor is streamed: (index, count, tensor). For progress displays;
  /// an exception thrown here aborts the merge like any other (nothing is written).
  std::function<void(std::size_t, std::size_t, const TensorInfo&)> on_tensor;
};

struct MergeFileReport {
  std::size_t merged = 0;    ///< tensors that received a LoRA delta
  std::size_t replaced = 0;  ///< tensors replaced by full tensors from the adapter
  std::size_t copied = 0;    ///< tensors copied unchanged
  std::uint64_t bytes = 0;   ///< size of the written file
};

/// Reads and validates the header of the safetensors file open as `f` with pread (the data section
/// is not read): for readers that must not map a file another process may truncate.
inline SafeTensorsHeader read_safetensors_header(const InputFile& f) {
  std::vector<unsigned char> head(static_cast<std::size_t>(std::min<std::uint64_t>(f.size(), 8)));
  f.read_at(0, head.size(), head.data());
  if (head.size() == 8) {
    std::uint64_t n = 0;  // little-endian length; read it only to know how much to fetch
    for (int i = 7; i >= 0; --i) n = (n << 8) | head[static_cast<std::size_t>(i)];
    if (n <= kMaxHeaderBytes && n <= f.size() - 8) {  // else the parser reports the bad length
      head.resize(static_cast<std::size_t>(8 + n));
      f.read_at(8, static_cast<std::size_t>(n), head.data() + 8);
    }
  }
  // The parser reads bytes [0, 8 + n) only; `size` (the whole file's) bounds the data offsets.
  return parse_safetensors_header(head.data(), static_cast<std::size_t>(f.size()), f.path());
}

/// Merges `adapter` into the safetensors file `base_path`, writing `out_path` atomically.
/// T is the compute type (float is enough for F16 / BF16 / F32 bases; use double for F64).
template <class T>
MergeFileReport merge_adapter_file(const std::string& base_path, const PeftAdapter<T>& adapter,
                                   const std::string& out_path, const MergeFileOptions& opt = {}) {
  if (!adapter.config.is_lora())
    throw ConfigError("merge: a " + adapter.config.peft_type +
                      " adapter adds virtual tokens; it has no weights to merge");
  if (!std::isfinite(opt.scale)) throw ConfigError("merge: scale must be finite, got " + std::to_string(opt.scale));
  const InputFile base(base_path);
  const SafeTensorsHeader header = read_safetensors_header(base);
  std::map<std::string, const TensorInfo*> by_name;
  for (const TensorInfo& t : header.tensors) by_name[t.name] = &t;
  const std::string who = "merge: base \"" + base_path + "\"";
  const bool fan = adapter.config.fan_in_fan_out;

  // ---- plan: which base tensor each adapter tensor goes to ----
  std::map<std::string, const LoraModuleWeights<T>*> lora_at;
  std::map<std::string, const FullTensor<T>*> full_at;
  for (const auto& m : adapter.lora) {
    const std::string name = opt.mapping(m.path) + ".weight";
    const auto found = by_name.find(name);
    if (found == by_name.end())
      throw ConfigError(who + " has no tensor \"" + name + "\" for adapter module \"" + m.path +
                        "\" (wrong base model, or a name mapping is needed)");
    const TensorInfo& t = *found->second;
    if (!dtype_is_float(t.dtype))
      throw ShapeError(who + ": tensor \"" + name + "\" is " + dtype_name(t.dtype) + ", not a float type");
    const Index out = m.B.rows(), in = m.A.cols();
    if (m.magnitude.size() > 0) {
      if (fan)  // the magnitude is per output row, which the transposed [in, out] storage does not have
        throw ConfigError(who + ": adapter module \"" + m.path +
                          "\" is DoRA (lora_magnitude_vector) with fan_in_fan_out = true, which is not supported");
      if (m.magnitude.size() != out)
        throw ShapeError(who + ": adapter module \"" + m.path + "\" has a magnitude of " +
                         std::to_string(m.magnitude.size()) + " values, expected " + std::to_string(out) +
                         " (one per output row)");
    }
    const Index er = fan ? in : out, ec = fan ? out : in;
    if (t.shape.size() != 2 || t.rows() != er || t.cols() != ec)
      throw ShapeError(who + ": tensor \"" + name + "\" has shape " + t.shape_string() + ", but adapter module \"" +
                       m.path + "\" needs " + shape_str(er, ec) +
                       (fan ? " (fan_in_fan_out: [in, out])" : " ([out, in])"));
    if (!lora_at.emplace(name, &m).second) throw ConfigError(who + ": two adapter modules map to \"" + name + "\"");
  }
  for (const auto& f : adapter.full) {
    const std::string name = opt.mapping(f.name);
    const auto found = by_name.find(name);
    if (found == by_name.end())
      throw ConfigError(who + " has no tensor \"" + name + "\" for the adapter's full tensor \"" + f.name +
                        "\" (wrong base model, or a name mapping is needed)");
    const TensorInfo& t = *found->second;
    if (t.shape != f.shape || !dtype_is_float(t.dtype))
      throw ShapeError(who + ": tensor \"" + name + "\" is " + dtype_name(t.dtype) + " " + t.shape_string() +
                       ", the adapter's replacement is " + TensorInfo{"", DType::F32, f.shape, 0, 0, 0}.shape_string());
    if (lora_at.count(name) || !full_at.emplace(name, &f).second)
      throw ConfigError(who + ": tensor \"" + name + "\" is targeted twice by the adapter");
  }

  // ---- stream ----
  std::vector<TensorSpec> specs;
  specs.reserve(header.tensors.size());
  for (const TensorInfo& t : header.tensors) specs.push_back({t.name, t.dtype, t.shape});
  SafeTensorsWriter w(out_path, std::move(specs), header.metadata);
  MergeFileReport rep;
  Matrix<T> blk;                   // [rows in block, cols] working block, reused
  ColVector<T> norms;              // DoRA row norms
  std::vector<unsigned char> raw;  // stored bytes of a block, read with pread, reused
  const std::size_t count = header.tensors.size();
  for (std::size_t ti = 0; ti < count; ++ti) {
    const TensorInfo& t = header.tensors[ti];
    if (opt.on_tensor) opt.on_tensor(ti, count, t);
    const std::uint64_t file_off = header.data_offset + t.begin;
    const auto lit = lora_at.find(t.name);
    const auto fit = full_at.find(t.name);
    if (lit != lora_at.end()) {
      const LoraModuleWeights<T>& m = *lit->second;
      const T s = static_cast<T>(m.scaling * opt.scale);
      const Index rows = t.rows(), cols = t.cols();
      const std::size_t item = dtype_size(t.dtype);
      const Index per_block = std::max<Index>(
          1, static_cast<Index>(opt.block_bytes / (sizeof(T) * static_cast<std::size_t>(std::max<Index>(cols, 1)))));
      for (Index i0 = 0; i0 < rows; i0 += per_block) {
        const Index n = std::min(per_block, rows - i0);
        const std::size_t elems = static_cast<std::size_t>(n * cols);
        raw.resize(elems * item);
        base.read_at(file_off + static_cast<std::uint64_t>(i0 * cols) * item, raw.size(), raw.data());
        blk.resize(n, cols);
        decode_elements<T>(t.dtype, raw.data(), elems, blk.data());
        if (fan)
          blk.noalias() += s * m.A.middleCols(i0, n).transpose() * m.B.transpose();  // rows i0.. of (B A)ᵀ   [n, out]
        else
          blk.noalias() += s * m.B.middleRows(i0, n) * m.A;  // rows i0.. of s·B A   [n, in]
        if (m.magnitude.size() > 0) {
          norms = blk.rowwise().norm();  // ‖V_i‖ per output row
          for (Index i = 0; i < n; ++i) blk.row(i) *= m.magnitude(0, i0 + i) / norms(i);
        }
        if (!all_finite(blk)) {
          Index bad_r = 0, bad_c = 0;
          for (Index i = 0; i < n; ++i)
            for (Index j = 0; j < cols; ++j)
              if (!std::isfinite(blk(i, j))) {
                bad_r = i;
                bad_c = j;
                i = n;
                break;
              }
          throw NumericError("merge: tensor \"" + t.name + "\" (adapter module \"" + m.path +
                             "\") gets NaN or Inf at [" + std::to_string(i0 + bad_r) + ", " + std::to_string(bad_c) +
                             "]; nothing was written");
        }
        w.write<T>(blk.data(), elems);
      }
      ++rep.merged;
    } else if (fit != full_at.end()) {
      const Matrix<T>& v = fit->second->value;
      if (!all_finite(v))
        throw NumericError("merge: the adapter's replacement for \"" + t.name +
                           "\" has NaN or Inf; nothing was written");
      w.write<T>(v.data(), static_cast<std::size_t>(v.size()));
      ++rep.replaced;
    } else {
      // Copied by the kernel from the file, bytes unchanged (copy_file_range; pread + write where the
      // kernel cannot): a tensor the adapter does not touch is the base's own value, never decoded.
      w.copy_raw(base.fd(), file_off, static_cast<std::size_t>(t.nbytes()), nullptr);
      ++rep.copied;
    }
  }
  w.commit();
  rep.bytes = w.bytes_written();  // the header is rebuilt, so it may differ in length from the base's
  return rep;
}

}  // namespace peft::io

// The test build compiles these once (tests/support/instantiations_io.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_IO_MERGE_FILE_TEMPLATES(KW, T) \
  KW template MergeFileReport merge_adapter_file<T>(const std::string&, const PeftAdapter<T>&, const std::string&, \
                                                    const MergeFileOptions&);
namespace peft::io {
PEFT_IO_MERGE_FILE_TEMPLATES(extern, float)
PEFT_IO_MERGE_FILE_TEMPLATES(extern, double)
}  // namespace peft::io
#endif
