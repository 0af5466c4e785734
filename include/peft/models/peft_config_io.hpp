#pragma once
// The conversions between the in-memory PeftConfig and adapter_config.json (to_adapter_config /
// to_peft_config) live in models/peft_config.hpp, next to apply_peft, which hands its LoRA part to
// the method table in that form. This header is kept for existing includes.
#include "peft/models/peft_config.hpp"
