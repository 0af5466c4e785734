#include <peft/train/memory.hpp>

#include <cstdint>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("parse_proc_status_bytes reads kB lines", "[train][memory]") {
  const std::string status =
      "Name:\tfinetune\nVmPeak:\t  200000 kB\nVmHWM:\t   12345 kB\nVmRSS:\t    1000 kB\nThreads:\t2\n";
  CHECK(parse_proc_status_bytes(status, "VmHWM") == 12345 * 1024);
  CHECK(parse_proc_status_bytes(status, "VmRSS") == 1000 * 1024);
  CHECK(parse_proc_status_bytes(status, "Threads") == 2);
  CHECK(parse_proc_status_bytes(status, "VmSwap") == -1);
  CHECK(parse_proc_status_bytes("VmHWM:\tlots kB\n", "VmHWM") == -1);
  CHECK(parse_proc_status_bytes("VmHWM:\t12 MB\n", "VmHWM") == -1);
  CHECK(parse_proc_status_bytes("VmHWMX:\t12 kB\n", "VmHWM") == -1);
}

TEST_CASE("peak_rss_bytes follows a large allocation and can be reset", "[train][memory]") {
  if (peak_rss_bytes() < 0) {
    WARN("/proc/self/status is not available on this platform; skipped");
    return;
  }
  const ResidentMemory start = resident_memory();
  CHECK(start.current > 0);
  CHECK(start.current <= start.peak);  // one snapshot: the high-water mark covers the current size
  CHECK(current_rss_bytes() > 0);

  const std::int64_t size = std::int64_t{96} << 20;
  {
    std::vector<std::uint8_t> big(static_cast<std::size_t>(size), 1);  // touched, so resident
    for (std::size_t i = 0; i < big.size(); i += 4096) big[i] = static_cast<std::uint8_t>(i);
    const ResidentMemory alive = resident_memory();
    CHECK(alive.current >= size);
    CHECK(alive.peak >= size);
    CHECK(peak_rss_bytes() >= size);
  }
  // Freed: the peak remembers it until reset.
  CHECK(peak_rss_bytes() >= size);
  if (!reset_peak_rss()) {
    WARN("kernel refused /proc/self/clear_refs; peak reset untested");
    return;
  }
  // The reset sets the peak to the current size. Whether the freed block left the process depends
  // on the allocator (ASan's quarantine keeps it resident), so compare with what is resident now;
  // the slack covers the kernel's approximate counters and this test's own small allocations.
  const ResidentMemory after = resident_memory();
  const std::int64_t slack = std::int64_t{4} << 20;
  CHECK(after.peak <= after.current + slack);
  if (after.current < size / 2) CHECK(after.peak < size);
}
