#pragma once
// The library version, defined once; CMakeLists.txt reads these three lines.
#define PEFT_VERSION_MAJOR 0
#define PEFT_VERSION_MINOR 1
#define PEFT_VERSION_PATCH 0

namespace peft {
inline constexpr int kVersionMajor = PEFT_VERSION_MAJOR;
inline constexpr int kVersionMinor = PEFT_VERSION_MINOR;
inline constexpr int kVersionPatch = PEFT_VERSION_PATCH;
}  // namespace peft
