#pragma once
// NF4 tensors in the safetensors layout transformers writes for a bitsandbytes 4-bit model
// (Linear4bit._save_to_state_dict + QuantState.as_dict(packed=True)). For a module `<p>`:
//   <p>.weight                                   U8  [⌈n/2⌉, 1]   packed codes, element 2i high nibble
//   <p>.weight.absmax                            U8  [blocks]     DQ codes (F32 absmax when not nested)
//   <p>.weight.quant_map                         F32 [16]         the NF4 code
//   <p>.weight.nested_absmax                     F32 [⌈blocks/256⌉]        (nested only)
//   <p>.weight.nested_quant_map                  F32 [256]        dynamic map (nested only)
//   <p>.weight.quant_state.bitsandbytes__nf4     U8  [len]        UTF-8 of json.dumps({...})
// The JSON holds the non-tensor fields in this order: quant_type, blocksize, dtype ("float32",
// "float16", "bfloat16": the dtype torch dequantizes to), shape, and when nested nested_blocksize,
// nested_dtype, nested_offset (a Python float). We write it exactly as Python's json.dumps does
// (", " and ": " separators, repr() floats), so a tensor read from such a file and written back
// gives identical bytes for every entry.
//
// Requires nlohmann-json (through peft/io), like every file format in peft/io.
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/regex.hpp"
#include "peft/core/separate.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/quant/nf4.hpp"

namespace peft::quant {

/// Python's repr() of a float: the shortest digits that round-trip, in fixed notation when the
/// decimal exponent is in [−4, 16), else d.ddde±XX (json.dumps writes floats this way).
inline std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  if (v == 0.0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  const std::string s(buf, res.ptr);  // e.g. "-1.2345e-05"
  const std::size_t epos = s.find('e');
  std::string mant = s.substr(0, epos);
  const int exp10 = std::stoi(s.substr(epos + 1));
  std::string sign;
  if (mant[0] == '-') {
    sign = "-";
    mant.erase(0, 1);
  }
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  if (exp10 >= -4 && exp10 < 16) {
    if (exp10 < 0) return sign + "0." + std::string(static_cast<std::size_t>(-exp10 - 1), '0') + digits;
    const std::size_t int_len = static_cast<std::size_t>(exp10) + 1;
    if (digits.size() <= int_len) return sign + digits + std::string(int_len - digits.size(), '0') + ".0";
    return sign + digits.substr(0, int_len) + "." + digits.substr(int_len);
  }
  std::string out = sign + digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  const int a = std::abs(exp10);
  return out + (exp10 < 0 ? "e-" : "e+") + (a < 10 ? "0" : "") + std::to_string(a);
}

/// json.dumps of the non-tensor quant state, as QuantState.as_dict(packed=True) stores it.
inline std::string quant_state_json(const NF4Tensor& t) {
  std::string shape = "[";
  for (std::size_t i = 0; i < t.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(t.shape[i]);
  shape += "]";
  std::string s = "{\"quant_type\": \"" + t.quant_type + "\", \"blocksize\": " + std::to_string(t.blocksize) +
                  ", \"dtype\": \"" + t.dtype + "\", \"shape\": " + shape;
  if (t.nested)
    s += ", \"nested_blocksize\": " + std::to_string(t.nested_blocksize) + ", \"nested_dtype\": \"" + t.nested_dtype +
         "\", \"nested_offset\": " + python_float_repr(static_cast<double>(t.nested_offset));
  return s + "}";
}

namespace detail {

inline std::string bnb_name(const std::string& prefix, const std::string& suffix) {
  return (prefix.empty() ? std::string("weight") : prefix + ".weight") + suffix;
}

inline const char* kQuantStateSuffix = ".quant_state.bitsandbytes__";

inline bool known_torch_float(const std::string& d) { return d == "float32" || d == "float16" || d == "bfloat16"; }

inline const io::TensorInfo& bnb_tensor(const io::SafeTensorsFile& f, const std::string& name, io::DType dtype,
                                        const std::string& who) {
  if (!f.contains(name)) throw IoError(who + ": \"" + f.path() + "\" has no tensor \"" + name + "\"");
  const io::TensorInfo& t = f.info(name);
  if (t.dtype != dtype)
    throw IoError(who + ": tensor \"" + name + "\" has dtype " + io::dtype_name(t.dtype) + ", expected " +
                  io::dtype_name(dtype));
  return t;
}

template <class Json>
const Json& json_key(const Json& j, const char* key, const std::string& who) {
  if (!j.contains(key)) throw IoError(who + ": quant_state JSON has no key \"" + key + "\"");
  return j.at(key);
}

template <class Json>
std::int64_t json_int(const Json& j, const char* key, const std::string& who) {
  const Json& v = json_key(j, key, who);
  if (!v.is_number_integer())
    throw IoError(who + ": quant_state key \"" + key + "\" must be an integer, got " + v.dump());
  return v.template get<std::int64_t>();
}

/// An integer key that must fit an int (block sizes): range-checked before the cast.
template <class Json>
int json_int_small(const Json& j, const char* key, const std::string& who) {
  const std::int64_t v = json_int(j, key, who);
  if (v < 1 || v > (std::int64_t{1} << 20))
    throw ConfigError(who + ": quant_state \"" + key + "\" is " + std::to_string(v) + ", expected 1 .. 2^20");
  return static_cast<int>(v);
}

template <class Json>
std::string json_str(const Json& j, const char* key, const std::string& who) {
  const Json& v = json_key(j, key, who);
  if (!v.is_string()) throw IoError(who + ": quant_state key \"" + key + "\" must be a string, got " + v.dump());
  return v.template get<std::string>();
}

}  // namespace detail

/// Module prefixes `<p>` with a packed 4-bit quant state (`<p>.weight.quant_state.bitsandbytes__*`),
/// in file order. Any quant type is listed; read_bnb_nf4 rejects all but nf4.
inline std::vector<std::string> bnb_4bit_prefixes(const io::SafeTensorsFile& f) {
  std::vector<std::string> out;
  const std::string marker = std::string(".weight") + detail::kQuantStateSuffix;
  for (const io::TensorInfo& t : f.tensors()) {
    const std::size_t pos = t.name.rfind(marker);
    if (pos != std::string::npos && t.name.find('.', pos + marker.size()) == std::string::npos)
      out.push_back(t.name.substr(0, pos));
  }
  return out;
}

/// Reads the NF4 weight of module `prefix` (e.g. "model.layers.0.self_attn.q_proj").
/// IoError: a tensor is missing, has the wrong dtype, or the JSON is malformed; ConfigError: a
/// quant type other than nf4, an unsupported block size or dtype; ShapeError: buffer sizes that do
/// not match the shape.
PEFT_SEPARATE_INLINE NF4Tensor read_bnb_nf4(const io::SafeTensorsFile& f, const std::string& prefix);

#if PEFT_SEPARATE_BODIES  // compiled once in the project's test build (peft/core/separate.hpp)
PEFT_SEPARATE_INLINE NF4Tensor read_bnb_nf4(const io::SafeTensorsFile& f, const std::string& prefix) {
  const std::string who = "read_bnb_nf4 \"" + f.path() + "\" module \"" + prefix + "\"";
  std::string state_name;
  for (const char* qt : {"nf4", "fp4"}) {
    const std::string n = detail::bnb_name(prefix, std::string(detail::kQuantStateSuffix) + qt);
    if (f.contains(n)) state_name = n;
  }
  if (state_name.empty()) {
    for (const std::string& p : bnb_4bit_prefixes(f))
      if (p == prefix)
        throw ConfigError(who + ": unsupported quant state tensor (only bitsandbytes__nf4 is supported)");
    throw IoError(who + ": no tensor \"" + detail::bnb_name(prefix, std::string(detail::kQuantStateSuffix) + "nf4") +
                  "\"");
  }
  const io::TensorInfo& st = detail::bnb_tensor(f, state_name, io::DType::U8, who);
  // bitsandbytes writes ~200 bytes of JSON here; a larger one is not a quant state.
  constexpr std::uint64_t kMaxQuantStateBytes = 64 * 1024;
  if (st.numel > kMaxQuantStateBytes)
    throw IoError(who + ": quant_state holds " + std::to_string(st.numel) + " bytes, expected at most " +
                  std::to_string(kMaxQuantStateBytes) + " (a few hundred bytes of JSON)");
  const char* text = reinterpret_cast<const char*>(f.bytes(st));
  const io::Json j = io::parse_json_strict(text, text + st.numel, who + " quant_state");
  if (!j.is_object()) throw IoError(who + ": quant_state JSON is not an object");
  static const char* kKnown[] = {"quant_type",       "blocksize",    "dtype",        "shape",
                                 "nested_blocksize", "nested_dtype", "nested_offset"};
  for (auto it = j.begin(); it != j.end(); ++it) {
    bool ok = false;
    for (const char* k : kKnown) ok = ok || it.key() == k;
    if (!ok) throw IoError(who + ": unknown quant_state key \"" + it.key() + "\"");
  }

  NF4Tensor t;
  t.quant_type = detail::json_str(j, "quant_type", who);
  if (state_name.size() < t.quant_type.size() ||
      state_name.compare(state_name.size() - t.quant_type.size(), t.quant_type.size(), t.quant_type) != 0)
    throw IoError(who + ": quant_type \"" + t.quant_type + "\" does not match the tensor name \"" + state_name + "\"");
  if (t.quant_type != "nf4")
    throw ConfigError(who + ": quant_type \"" + t.quant_type + "\" is not supported (only \"nf4\")");
  t.blocksize = detail::json_int_small(j, "blocksize", who);
  check_blocksize(who, "blocksize", t.blocksize);
  t.dtype = detail::json_str(j, "dtype", who);
  if (!detail::known_torch_float(t.dtype))
    throw ConfigError(who + ": dtype \"" + t.dtype + "\" is not one of float32, float16, bfloat16");
  const io::Json& shape = detail::json_key(j, "shape", who);
  if (!shape.is_array() || shape.empty()) throw IoError(who + ": quant_state \"shape\" must be a non-empty list");
  for (const auto& d : shape) {
    if (!d.is_number_integer() || d.get<std::int64_t>() <= 0)
      throw ShapeError(who + ": quant_state \"shape\" " + shape.dump() + " must hold positive integers");
    t.shape.push_back(d.get<std::int64_t>());
  }
  t.nested = j.contains("nested_blocksize") || j.contains("nested_offset") || j.contains("nested_dtype");

  const io::TensorInfo& w = detail::bnb_tensor(f, detail::bnb_name(prefix, ""), io::DType::U8, who);
  t.packed.assign(f.bytes(w), f.bytes(w) + w.numel);
  const io::TensorInfo& qm = detail::bnb_tensor(f, detail::bnb_name(prefix, ".quant_map"), io::DType::F32, who);
  if (qm.numel != 16) throw ShapeError(who + ": quant_map has " + std::to_string(qm.numel) + " values, expected 16");
  f.load_into<float>(qm, t.quant_map.data());
  if (!t.nested) {
    const io::TensorInfo& am = detail::bnb_tensor(f, detail::bnb_name(prefix, ".absmax"), io::DType::F32, who);
    t.absmax.resize(static_cast<std::size_t>(am.numel));
    f.load_into<float>(am, t.absmax.data());
  } else {
    t.nested_blocksize = detail::json_int_small(j, "nested_blocksize", who);
    t.nested_dtype = detail::json_str(j, "nested_dtype", who);
    if (t.nested_dtype != "float32")
      throw ConfigError(who + ": nested_dtype \"" + t.nested_dtype + "\" is not supported (only float32)");
    const io::Json& off = detail::json_key(j, "nested_offset", who);
    if (!off.is_number()) throw IoError(who + ": quant_state \"nested_offset\" must be a number, got " + off.dump());
    t.nested_offset = static_cast<float>(off.get<double>());
    const io::TensorInfo& am = detail::bnb_tensor(f, detail::bnb_name(prefix, ".absmax"), io::DType::U8, who);
    t.qabsmax.assign(f.bytes(am), f.bytes(am) + am.numel);
    const io::TensorInfo& na = detail::bnb_tensor(f, detail::bnb_name(prefix, ".nested_absmax"), io::DType::F32, who);
    t.nested_absmax.resize(static_cast<std::size_t>(na.numel));
    f.load_into<float>(na, t.nested_absmax.data());
    const io::TensorInfo& nq =
        detail::bnb_tensor(f, detail::bnb_name(prefix, ".nested_quant_map"), io::DType::F32, who);
    if (nq.numel != 256)
      throw ShapeError(who + ": nested_quant_map has " + std::to_string(nq.numel) + " values, expected 256");
    f.load_into<float>(nq, t.nested_quant_map.data());
  }
  t.validate(who);
  return t;
}
#endif

/// The safetensors entries of one NF4 weight, in the order transformers' state dict has them.
inline void add_bnb_nf4_specs(const std::string& prefix, const NF4Tensor& t, std::vector<io::TensorSpec>& specs) {
  t.validate("add_bnb_nf4_specs \"" + prefix + "\"");
  specs.push_back({detail::bnb_name(prefix, ""), io::DType::U8, {static_cast<std::int64_t>(t.packed.size()), 1}});
  if (t.nested)
    specs.push_back(
        {detail::bnb_name(prefix, ".absmax"), io::DType::U8, {static_cast<std::int64_t>(t.qabsmax.size())}});
  else
    specs.push_back(
        {detail::bnb_name(prefix, ".absmax"), io::DType::F32, {static_cast<std::int64_t>(t.absmax.size())}});
  specs.push_back({detail::bnb_name(prefix, ".quant_map"), io::DType::F32, {16}});
  if (t.nested) {
    specs.push_back({detail::bnb_name(prefix, ".nested_absmax"),
                     io::DType::F32,
                     {static_cast<std::int64_t>(t.nested_absmax.size())}});
    specs.push_back({detail::bnb_name(prefix, ".nested_quant_map"), io::DType::F32, {256}});
  }
  specs.push_back({detail::bnb_name(prefix, std::string(detail::kQuantStateSuffix) + t.quant_type),
                   io::DType::U8,
                   {static_cast<std::int64_t>(quant_state_json(t).size())}});
}

/// Streams the data of the entries add_bnb_nf4_specs declared, in the same order.
inline void write_bnb_nf4_data(io::SafeTensorsWriter& w, const NF4Tensor& t) {
  w.write_raw(t.packed.data(), t.packed.size());
  if (t.nested)
    w.write_raw(t.qabsmax.data(), t.qabsmax.size());
  else
    w.write<float>(t.absmax.data(), t.absmax.size());
  w.write<float>(t.quant_map.data(), t.quant_map.size());
  if (t.nested) {
    w.write<float>(t.nested_absmax.data(), t.nested_absmax.size());
    w.write<float>(t.nested_quant_map.data(), t.nested_quant_map.size());
  }
  const std::string js = quant_state_json(t);
  w.write_raw(js.data(), js.size());
}

/// Writes NF4 weights (module prefix, tensor) to a new safetensors file, atomically.
inline void save_bnb_nf4(const std::string& path, const std::vector<std::pair<std::string, const NF4Tensor*>>& weights,
                         const std::map<std::string, std::string>& metadata = {}) {
  std::vector<io::TensorSpec> specs;
  for (const auto& pw : weights) add_bnb_nf4_specs(pw.first, *pw.second, specs);
  io::SafeTensorsWriter w(path, std::move(specs), metadata);
  for (const auto& pw : weights) write_bnb_nf4_data(w, *pw.second);
  w.commit();
}

// ---- whole-file quantization (`peft quantize IN --out OUT`) --------------------------------------

struct QuantizeFileOptions {
  NF4Options nf4;  ///< blocksize 64 and double quantization by default (QLoRA's setting)
  /// Tensors whose full name matches are quantized (must also be 2-D floating point).
  std::string include = R"(.*\.weight)";
  /// Tensors whose full name matches are copied unchanged. The default keeps what transformers
  /// keeps in full precision: the output head and embeddings (they are not nn.Linear).
  std::string exclude = R"((.*\.)?(lm_head|[a-z_]*embed[a-z_]*|wte|wpe)(\..*)?)";
};

struct QuantizeFileReport {
  std::vector<std::string> quantized;  ///< module prefixes written in the bitsandbytes layout
  std::vector<std::string> copied;     ///< tensors copied byte for byte
  std::uint64_t input_bytes = 0;       ///< data bytes of the quantized tensors in the input
  std::uint64_t output_bytes = 0;      ///< data bytes of their NF4 replacement (every entry, maps included)
  std::uint64_t parameters = 0;        ///< weights quantized

  /// Storage per quantized weight, from the bytes written: ≈ 4.127 with double quantization at
  /// blocksize 64 (4.5 without) plus the per-tensor maps and quant_state.
  double bits_per_parameter() const {
    return parameters == 0 ? 0.0 : 8.0 * static_cast<double>(output_bytes) / static_cast<double>(parameters);
  }
};

/// Reads `in`, replaces each selected 2-D float weight `<p>.weight` with its NF4 entries, copies
/// every other tensor (and the metadata) unchanged, and writes `out` atomically.
inline QuantizeFileReport quantize_safetensors(const std::string& in, const std::string& out,
                                               const QuantizeFileOptions& opt) {
  const Regex inc = compile_name_regex(opt.include, "quantize_safetensors: include pattern");
  const Regex exc = compile_name_regex(opt.exclude, "quantize_safetensors: exclude pattern");
  const io::SafeTensorsFile f(in);
  QuantizeFileReport rep;
  struct Item {
    const io::TensorInfo* info;
    NF4Tensor q;  // empty shape: copied as is
  };
  std::vector<Item> items;
  std::vector<io::TensorSpec> specs;
  std::vector<float> buf;
  for (const io::TensorInfo& t : f.tensors()) {
    Item item{&t, {}};
    const bool selected = t.shape.size() == 2 && io::dtype_is_float(t.dtype) && t.numel > 0 && inc.full_match(t.name) &&
                          !exc.full_match(t.name) && t.name.size() > 7 &&
                          t.name.compare(t.name.size() - 7, 7, ".weight") == 0;
    if (selected) {
      buf.resize(static_cast<std::size_t>(t.numel));
      f.load_into<float>(t, buf.data());
      NF4Options o = opt.nf4;
      o.dtype = t.dtype == io::DType::F16 ? "float16" : t.dtype == io::DType::BF16 ? "bfloat16" : "float32";
      try {
        item.q = quantize_nf4(buf.data(), t.shape, o);
      } catch (const NumericError& e) {
        throw NumericError("quantize_safetensors \"" + in + "\": tensor \"" + t.name + "\": " + e.what());
      }
      const std::string prefix = t.name.substr(0, t.name.size() - 7);
      const std::size_t before = specs.size();
      add_bnb_nf4_specs(prefix, item.q, specs);
      for (std::size_t k = before; k < specs.size(); ++k) {
        std::uint64_t n = io::dtype_size(specs[k].dtype);
        for (auto d : specs[k].shape) n *= static_cast<std::uint64_t>(d);
        rep.output_bytes += n;
      }
      rep.input_bytes += t.nbytes();
      rep.parameters += static_cast<std::uint64_t>(t.numel);
      rep.quantized.push_back(prefix);
    } else {
      specs.push_back({t.name, t.dtype, t.shape});
      rep.copied.push_back(t.name);
    }
    items.push_back(std::move(item));
  }
  io::SafeTensorsWriter w(out, std::move(specs), f.metadata());
  for (const Item& it : items) {
    if (!it.q.shape.empty())
      write_bnb_nf4_data(w, it.q);
    else if (it.info->nbytes() > 0)  // passed through unchanged (a -inf mask buffer stays as it is)
      w.copy_raw(f.file().fd(), f.data_offset() + it.info->begin, static_cast<std::size_t>(it.info->nbytes()),
                 f.bytes(*it.info));
  }
  w.commit();
  return rep;
}

/// quantize_safetensors with the default options (NF4, blocksize 64, double quantization).
inline QuantizeFileReport quantize_safetensors(const std::string& in, const std::string& out) {
  const QuantizeFileOptions opt;
  return quantize_safetensors(in, out, opt);
}

}  // namespace peft::quant
