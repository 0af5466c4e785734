// Test build only: the one compiled copy of the separately compiled functions (PEFT_SEPARATE_INLINE,
// peft/core/separate.hpp); every other test TU sees their declarations only. CMake defines
// PEFT_SEPARATE_SOURCE on this file (and PEFT_SEPARATE_IO where it found nlohmann-json). It also
// instantiates io's strict JSON parser (declared extern in peft/io/json.hpp). A header that moves a
// body into `#if PEFT_SEPARATE_BODIES` is included here, or the executables that call it fail to
// link.
#include "peft/core/regex.hpp"
#include "peft/core/sequence.hpp"
#include "peft/merge/low_rank_svd.hpp"
#include "peft/models/llama.hpp"
#include "peft/quant/nf4.hpp"

#if PEFT_SEPARATE_IO
#include "peft/io/extract_adapter.hpp"
#include "peft/io/llama_checkpoint.hpp"
#include "peft/io/peft_format.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/io/tokenizer.hpp"
#include "peft/quant/bnb_format.hpp"

namespace peft::io {  // declared extern in peft/io/json.hpp
template Json parse_json_strict<Json>(const char*, const char*, const std::string&, std::size_t, int, std::size_t);
template nlohmann::json parse_json_strict<nlohmann::json>(const char*, const char*, const std::string&, std::size_t,
                                                          int, std::size_t);
}  // namespace peft::io
#endif
