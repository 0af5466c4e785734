#pragma once
// Resident memory of this process, read from Linux's /proc/self/status:
//   VmRSS  current resident set size,
//   VmHWM  its high-water mark (peak) since start or since the last reset_peak_rss().
// reset_peak_rss() writes "5" to /proc/self/clear_refs (Linux ≥ 4.0, see proc(5)), which sets
// VmHWM back to the current VmRSS, so a study can report the peak of each phase separately.
// Elsewhere (macOS, Windows, a kernel without /proc) the readers return -1 and the reset false:
// callers print "n/a" rather than a made-up number.
//
// The kernel's counters are approximate (per-CPU counters since Linux 6.2, folded in lazily), so
// two separate reads can disagree by a few pages: VmRSS read first may exceed VmHWM read a moment
// later. resident_memory() reads both from one snapshot, where VmHWM ≥ VmRSS always holds.
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

namespace peft {

/// Value in bytes of a "Key:   1234 kB" line of a /proc status text, or -1 when absent/malformed.
inline std::int64_t parse_proc_status_bytes(const std::string& status_text, const std::string& key) {
  std::istringstream in(status_text);
  std::string line;
  const std::string prefix = key + ":";
  while (std::getline(in, line)) {
    if (line.compare(0, prefix.size(), prefix) != 0) continue;
    std::istringstream fields(line.substr(prefix.size()));
    long long value = -1;
    std::string unit;
    if (!(fields >> value) || value < 0) return -1;
    fields >> unit;
    if (unit == "kB" || unit == "KB" || unit == "kb") return static_cast<std::int64_t>(value) * 1024;
    if (unit.empty()) return static_cast<std::int64_t>(value);
    return -1;
  }
  return -1;
}

namespace detail {
inline std::string read_proc_self_status() {
  std::ifstream in("/proc/self/status");
  if (!in) return {};
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}
}  // namespace detail

/// Current and peak resident set size in bytes from one read of /proc/self/status (-1 each when
/// the platform does not expose them).
struct ResidentMemory {
  std::int64_t current = -1;  ///< VmRSS
  std::int64_t peak = -1;     ///< VmHWM
};

inline ResidentMemory resident_memory() {
  const std::string status = detail::read_proc_self_status();
  return {parse_proc_status_bytes(status, "VmRSS"), parse_proc_status_bytes(status, "VmHWM")};
}

/// Peak resident set size in bytes (VmHWM), or -1 when the platform does not expose it.
inline std::int64_t peak_rss_bytes() { return parse_proc_status_bytes(detail::read_proc_self_status(), "VmHWM"); }

/// Current resident set size in bytes (VmRSS), or -1 when the platform does not expose it.
inline std::int64_t current_rss_bytes() { return parse_proc_status_bytes(detail::read_proc_self_status(), "VmRSS"); }

/// Resets the peak (VmHWM) to the current resident size; false when the kernel refuses.
inline bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  if (!out) return false;
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

}  // namespace peft
