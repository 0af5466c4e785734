#pragma once
// Helpers for file tests: a self-removing temporary directory, raw file access, the fixture folder.
#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <future>
#include <iterator>
#include <string>
#include <vector>

#include <peft/io/file.hpp>

namespace peft::test::io {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/peft_io_test_XXXXXX";
    const char* p = ::mkdtemp(tmpl);
    if (p == nullptr) throw std::runtime_error("mkdtemp failed");
    path = p;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() { peft::io::detail::remove_tree(path); }

  /// Path of `name` inside the directory.
  std::string file(const std::string& name) const { return path + "/" + name; }

  /// Names in the directory (hidden temporaries included), sorted.
  std::vector<std::string> entries(const std::string& sub = "") const {
    std::vector<std::string> out;
    const std::string d = sub.empty() ? path : path + "/" + sub;
    if (DIR* dir = ::opendir(d.c_str())) {
      while (dirent* e = ::readdir(dir)) {
        const std::string n = e->d_name;
        if (n != "." && n != "..") out.push_back(n);
      }
      ::closedir(dir);
    }
    std::sort(out.begin(), out.end());
    return out;
  }
};

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string raw_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

/// tests/data (ctest sets PEFT_TEST_DATA; a direct run falls back to the source tree layout).
inline std::string data_dir() {
  if (const char* d = std::getenv("PEFT_TEST_DATA")) return d;
  // This header lives in tests/io/; the fixtures in tests/data/ (CMake passes absolute paths).
  std::string here = __FILE__;
  here = here.substr(0, here.find_last_of('/'));
  return here.substr(0, here.find_last_of('/')) + "/data";
}

/// Runs `fn` on another thread (a peft::Error it throws is swallowed); if it is still blocked
/// after a few seconds (in open() of the FIFO `fifo`), a non-blocking writer is opened to release
/// it and false is returned. A reader that refuses a FIFO returns at once.
inline bool returns_without_blocking(const std::string& fifo, const std::function<void()>& fn) {
  auto done = std::async(std::launch::async, [&] {
    try {
      fn();
    } catch (const peft::Error&) {
    }
  });
  if (done.wait_for(std::chrono::seconds(5)) == std::future_status::ready) return true;
  const int w = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);  // unblocks the reader's open()
  done.wait();
  if (w >= 0) ::close(w);
  return false;
}

}  // namespace peft::test::io
