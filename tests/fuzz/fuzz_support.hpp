#pragma once
// Helpers shared by the libFuzzer targets: a fuzz input as a file without touching the disk.
//
// The library's readers take paths (they memory-map the file). An anonymous memory file
// (memfd_create) is a regular file that lives in RAM, so each run opens "/proc/self/fd/N": no disk
// I/O, no fsync, and the same code path (open, fstat, mmap) as a real file.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace fuzz {

/// An in-memory regular file holding `size` bytes; closed (and freed) by the destructor.
class MemFile {
 public:
  MemFile(const void* data, std::size_t size) {
    fd_ = static_cast<int>(::memfd_create("peft-fuzz", MFD_CLOEXEC));
    if (fd_ < 0) std::abort();  // the harness itself is broken: stop loudly
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
      const ssize_t k = ::write(fd_, p, size);
      if (k <= 0) std::abort();
      p += k;
      size -= static_cast<std::size_t>(k);
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  ~MemFile() { ::close(fd_); }
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

/// Splits an input into two parts: a 2-byte little-endian length, that many bytes, and the rest.
struct Split {
  const std::uint8_t* first = nullptr;
  std::size_t first_size = 0;
  const std::uint8_t* second = nullptr;
  std::size_t second_size = 0;
};
inline bool split(const std::uint8_t* data, std::size_t size, Split& s) {
  if (size < 2) return false;
  const std::size_t n = static_cast<std::size_t>(data[0]) | (static_cast<std::size_t>(data[1]) << 8);
  if (n > size - 2) return false;
  s.first = data + 2;
  s.first_size = n;
  s.second = data + 2 + n;
  s.second_size = size - 2 - n;
  return true;
}

}  // namespace fuzz
