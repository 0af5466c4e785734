// Test build only: the one compiled copy of io's heavy function templates (the method table and the
// directory readers and writers every io, tools, models and layers test TU calls) for float and
// double. Their `extern template` declarations are at the end of each header (PEFT_EXTERN_TEMPLATES).
#include "peft/io/adapter_factors.hpp"
#include "peft/io/checkpoint.hpp"
#include "peft/io/combine_adapters.hpp"
#include "peft/io/merge_file.hpp"
#include "peft/io/methods.hpp"
#include "peft/io/peft_format.hpp"
#include "peft/models/peft_config.hpp"

namespace peft::io {
PEFT_IO_METHODS_TEMPLATES(, float)
PEFT_IO_METHODS_TEMPLATES(, double)
PEFT_IO_PEFT_FORMAT_TEMPLATES(, float)
PEFT_IO_PEFT_FORMAT_TEMPLATES(, double)
PEFT_IO_MERGE_FILE_TEMPLATES(, float)
PEFT_IO_MERGE_FILE_TEMPLATES(, double)
PEFT_IO_ADAPTER_FACTORS_TEMPLATES(, float)
PEFT_IO_ADAPTER_FACTORS_TEMPLATES(, double)
PEFT_IO_COMBINE_TEMPLATES(, float)
PEFT_IO_COMBINE_TEMPLATES(, double)
PEFT_IO_CHECKPOINT_TEMPLATES(, float)
PEFT_IO_CHECKPOINT_TEMPLATES(, double)
}  // namespace peft::io

namespace peft {
PEFT_PEFT_CONFIG_TEMPLATES(, float)
PEFT_PEFT_CONFIG_TEMPLATES(, double)
}  // namespace peft
