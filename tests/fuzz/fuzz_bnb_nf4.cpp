// libFuzzer target: the bitsandbytes 4-bit layout reader (quant/bnb_format.hpp) on arbitrary
// safetensors bytes: every module it lists is read, validated and (when small) dequantized. Any
// input must either yield NF4 tensors whose buffers fit their shape, or throw a peft::Error.
#include <peft/io/safetensors.hpp>
#include <peft/quant/bnb_format.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const fuzz::MemFile file(data, size);
  try {
    const peft::io::SafeTensorsFile f(file.path());
    for (const std::string& prefix : peft::quant::bnb_4bit_prefixes(f)) {
      try {
        const peft::quant::NF4Tensor t = peft::quant::read_bnb_nf4(f, prefix);
        if (t.numel() <= (1 << 16)) (void)peft::quant::dequantize_nf4<float>(t).sum();
      } catch (const peft::Error&) {
      }
    }
  } catch (const peft::Error&) {
  }
  return 0;
}
