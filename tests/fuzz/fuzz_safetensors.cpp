// libFuzzer target: the safetensors header parser and validator on arbitrary bytes. Any input must
// either parse into a header whose tensors tile the data section, or throw peft::IoError; every
// accepted tensor is then decoded (to exercise the bounds the validator promised).
#include <peft/io/safetensors.hpp>

#include <cstdint>
#include <cstdlib>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const peft::io::SafeTensorsHeader h = peft::io::parse_safetensors_header(data, size, "fuzz");
    std::uint64_t covered = 0;
    std::vector<float> buf;
    for (const auto& t : h.tensors) {
      if (t.begin != covered || t.end > size - h.data_offset) std::abort();  // the validator's promise
      covered = t.end;
      if (t.numel <= (1u << 20)) {
        buf.resize(static_cast<std::size_t>(t.numel));
        peft::io::decode_elements<float>(t.dtype, data + h.data_offset + t.begin, buf.size(), buf.data());
      }
    }
    if (covered != size - h.data_offset) std::abort();
  } catch (const peft::IoError&) {
  }
  return 0;
}
