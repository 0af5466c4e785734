#pragma once
// Umbrella header: everything in peft-cpp except file I/O (peft/io/*.hpp, needs nlohmann-json).
#include "peft/version.hpp"

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/parameters.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/types.hpp"

#include "peft/layers/linear.hpp"
#include "peft/layers/lora_linear.hpp"

#include "peft/train/gradient_check.hpp"
#include "peft/train/batches.hpp"
#include "peft/train/early_stopping.hpp"
#include "peft/train/memory.hpp"
#include "peft/train/progress.hpp"
