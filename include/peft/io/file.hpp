#pragma once
// POSIX file plumbing for peft/io: a read-only memory map, an atomic output file and an output
// directory written all-or-nothing (AtomicDirectory).
//
// Atomicity: output goes to a temporary in the destination's own directory (rename(2) is atomic
// only within one file system), is fsync'ed, renamed over the destination, and the directory is
// fsync'ed so the rename itself survives a crash. Until commit() the destination is untouched; a
// destructor without commit() removes the temporary, so a failure (including an exception thrown
// half-way through writing) leaves nothing behind.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <dirent.h>

#include "peft/core/error.hpp"

namespace peft::io {

namespace detail {

inline std::string errno_text(int err) { return std::string(std::strerror(err)); }

inline std::string parent_dir(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

inline std::string base_name(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

inline void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort: some file systems refuse to open directories
  (void)::fsync(fd);
  ::close(fd);
}

/// Removes a file or a directory tree; errors are ignored (used for cleanup only).
inline void remove_tree(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    if (DIR* d = ::opendir(path.c_str())) {
      std::vector<std::string> names;
      while (dirent* e = ::readdir(d)) {
        const std::string n = e->d_name;
        if (n != "." && n != "..") names.push_back(n);
      }
      ::closedir(d);
      for (const auto& n : names) remove_tree(path + "/" + n);
    }
    ::rmdir(path.c_str());
  } else {
    ::unlink(path.c_str());
  }
}

}  // namespace detail

inline bool path_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

inline bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

/// Whole file as a string (config files); IoError names the file.
inline std::string read_text_file(const std::string& path, std::size_t max_bytes = 100u << 20) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError("cannot open \"" + path + "\": " + detail::errno_text(errno));
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      throw IoError("cannot read \"" + path + "\": " + detail::errno_text(err));
    }
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
    if (out.size() > max_bytes) {
      ::close(fd);
      throw IoError("\"" + path + "\" is larger than " + std::to_string(max_bytes) + " bytes");
    }
  }
  ::close(fd);
  return out;
}

/// A read-only private mapping of a whole file. Movable, not copyable.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw IoError("cannot open \"" + path + "\": " + detail::errno_text(errno));
    struct stat st;
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      close();
      throw IoError("cannot stat \"" + path + "\": " + detail::errno_text(err));
    }
    if (!S_ISREG(st.st_mode)) {
      close();
      throw IoError("\"" + path + "\" is not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        close();
        throw IoError("cannot memory-map \"" + path + "\": " + detail::errno_text(err));
      }
      data_ = static_cast<const unsigned char*>(p);
      // Tensors are read front to back once: tell the kernel to read ahead aggressively.
      (void)::madvise(const_cast<unsigned char*>(data_), size_, MADV_SEQUENTIAL);
    }
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& o) noexcept { swap(o); }
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      close();
      swap(o);
    }
    return *this;
  }
  ~MappedFile() { close(); }

  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  int fd() const { return fd_; }

  /// Lets the kernel drop pages of [offset, offset + n) once they are consumed (streaming merge).
  void release(std::size_t offset, std::size_t n) const {
    if (data_ == nullptr || n == 0) return;
    const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const std::size_t begin = (offset + page - 1) / page * page;  // only whole pages inside the range
    const std::size_t end = (offset + n) / page * page;
    if (end > begin) (void)::madvise(const_cast<unsigned char*>(data_) + begin, end - begin, MADV_DONTNEED);
  }

 private:
  void swap(MappedFile& o) noexcept {
    std::swap(path_, o.path_);
    std::swap(fd_, o.fd_);
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
  }
  void close() noexcept {
    if (data_ != nullptr) ::munmap(const_cast<unsigned char*>(data_), size_);
    if (fd_ >= 0) ::close(fd_);
    data_ = nullptr;
    fd_ = -1;
    size_ = 0;
  }

  std::string path_;
  int fd_ = -1;
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Writes a file atomically: bytes go to `<dir>/.<name>.tmp-XXXXXX`; commit() fsyncs and renames
/// it over `path`. Without commit() the temporary is removed and `path` is never touched.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path) : path_(std::move(path)) {
    std::string tmpl = detail::parent_dir(path_) + "/." + detail::base_name(path_) + ".tmp-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    fd_ = ::mkstemp(buf.data());
    if (fd_ < 0)
      throw IoError("cannot create a temporary file next to \"" + path_ + "\": " + detail::errno_text(errno));
    tmp_ = buf.data();
    (void)::fchmod(fd_, 0644);  // mkstemp makes 0600; output files are ordinary files
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() { abort(); }

  const std::string& path() const { return path_; }
  std::uint64_t bytes_written() const { return written_; }

  void write(const void* data, std::size_t n) {
    if (fd_ < 0) throw IoError("\"" + path_ + "\": write after commit or abort");
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t k = ::write(fd_, p, n);
      if (k < 0) {
        if (errno == EINTR) continue;
        throw IoError("cannot write \"" + path_ + "\" at byte " + std::to_string(written_) + ": " +
                      detail::errno_text(errno));
      }
      p += k;
      n -= static_cast<std::size_t>(k);
      written_ += static_cast<std::uint64_t>(k);
    }
  }

  /// Appends bytes [offset, offset + n) of the file open as `in_fd`, copied inside the kernel
  /// (copy_file_range: no round trip through user memory, as cp does); `same_bytes` is that range
  /// already in memory (e.g. mapped), written instead where the kernel cannot copy between the two
  /// files (another file system on old kernels, no copy_file_range).
  void copy_from(int in_fd, std::uint64_t offset, std::size_t n, const unsigned char* same_bytes) {
    if (fd_ < 0) throw IoError("\"" + path_ + "\": write after commit or abort");
#if defined(__linux__)
    while (n > 0 && kernel_copy_) {
      loff_t in_off = static_cast<loff_t>(offset);
      const ssize_t k = ::copy_file_range(in_fd, &in_off, fd_, nullptr, n, 0);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) {  // not supported here (ENOSYS, EXDEV, EINVAL, ...) or a short source: write
        kernel_copy_ = false;
        break;
      }
      offset += static_cast<std::uint64_t>(k);
      same_bytes += k;
      n -= static_cast<std::size_t>(k);
      written_ += static_cast<std::uint64_t>(k);
    }
#else
    (void)in_fd;
    (void)offset;
#endif
    if (n > 0) write(same_bytes, n);
  }

  /// fsync + rename over the destination + fsync of the directory.
  void commit() {
    if (fd_ < 0) throw IoError("\"" + path_ + "\": commit after commit or abort");
    if (::fsync(fd_) != 0) throw IoError("cannot flush \"" + path_ + "\": " + detail::errno_text(errno));
    if (::close(fd_) != 0) {
      fd_ = -1;
      throw IoError("cannot close \"" + path_ + "\": " + detail::errno_text(errno));
    }
    fd_ = -1;
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      ::unlink(tmp_.c_str());
      tmp_.clear();
      throw IoError("cannot rename the temporary file to \"" + path_ + "\": " + detail::errno_text(err));
    }
    tmp_.clear();
    detail::fsync_dir(detail::parent_dir(path_));
  }

  /// Drops the temporary (also done by the destructor).
  void abort() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!tmp_.empty()) ::unlink(tmp_.c_str());
    tmp_.clear();
  }

 private:
  std::string path_;
  std::string tmp_;
  int fd_ = -1;
  std::uint64_t written_ = 0;
  bool kernel_copy_ = true;  ///< cleared after copy_file_range fails once
};

/// Writes a directory of files without ever leaving a half-written state. Files are written into
/// `<parent>/.<name>.tmp-XXXXXX/` (staging()); until commit() nothing at `path` changes, and
/// without commit() the staging directory is removed.
///
/// commit():
/// - `path` does not exist: the staging directory is renamed to `path` (atomic as a whole).
/// - `path` is an existing directory: each staged file is renamed over its namesake in `path`
///   (each replacement atomic); every other file in `path` is left alone, as Hugging Face's
///   save_pretrained does (a model folder keeps its README, tokenizer, other adapters). Conflicts
///   (a staged file where `path` has a directory, or the reverse) are found before anything moves.
class AtomicDirectory {
 public:
  explicit AtomicDirectory(std::string path) : path_(std::move(path)) {
    while (path_.size() > 1 && path_.back() == '/') path_.pop_back();
    if (path_exists(path_) && !is_directory(path_))
      throw IoError("cannot write directory \"" + path_ + "\": a file of that name exists");
    std::string tmpl = detail::parent_dir(path_) + "/." + detail::base_name(path_) + ".tmp-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr)
      throw IoError("cannot create a temporary directory next to \"" + path_ + "\": " + detail::errno_text(errno));
    tmp_ = buf.data();
    (void)::chmod(tmp_.c_str(), 0755);
  }
  AtomicDirectory(const AtomicDirectory&) = delete;
  AtomicDirectory& operator=(const AtomicDirectory&) = delete;
  ~AtomicDirectory() { abort(); }

  /// Where to write the files before commit().
  const std::string& staging() const { return tmp_; }
  const std::string& path() const { return path_; }

  void commit() {
    if (tmp_.empty()) throw IoError("\"" + path_ + "\": commit after commit or abort");
    detail::fsync_dir(tmp_);
    if (!path_exists(path_)) {
      if (::rename(tmp_.c_str(), path_.c_str()) != 0)
        throw IoError("cannot rename the temporary directory to \"" + path_ + "\": " + detail::errno_text(errno));
      tmp_.clear();
    } else {
      check_merge(tmp_, path_);  // every conflict is reported before the first rename
      merge_into(tmp_, path_);
      detail::fsync_dir(path_);
      abort();  // the (now empty) staging tree
    }
    detail::fsync_dir(detail::parent_dir(path_));
  }

  void abort() noexcept {
    if (!tmp_.empty()) detail::remove_tree(tmp_);
    tmp_.clear();
  }

 private:
  static std::vector<std::string> entries(const std::string& dir) {
    std::vector<std::string> names;
    if (DIR* d = ::opendir(dir.c_str())) {
      while (dirent* e = ::readdir(d)) {
        const std::string n = e->d_name;
        if (n != "." && n != "..") names.push_back(n);
      }
      ::closedir(d);
    }
    return names;
  }

  static void check_merge(const std::string& from, const std::string& to) {
    for (const std::string& n : entries(from)) {
      const std::string src = from + "/" + n, dst = to + "/" + n;
      if (!path_exists(dst)) continue;
      const bool src_dir = is_directory(src), dst_dir = is_directory(dst);
      if (src_dir && dst_dir) {
        check_merge(src, dst);
      } else if (src_dir != dst_dir) {
        throw IoError("cannot write \"" + dst + "\": expected a " + (src_dir ? "directory" : "file") +
                      " there, found a " + (dst_dir ? "directory" : "file") + "; nothing was written");
      }
    }
  }

  static void merge_into(const std::string& from, const std::string& to) {
    for (const std::string& n : entries(from)) {
      const std::string src = from + "/" + n, dst = to + "/" + n;
      if (is_directory(src) && is_directory(dst)) {
        merge_into(src, dst);
        detail::fsync_dir(dst);
      } else if (::rename(src.c_str(), dst.c_str()) != 0) {
        throw IoError("cannot move \"" + n + "\" into \"" + to + "\": " + detail::errno_text(errno));
      }
    }
  }

  std::string path_;
  std::string tmp_;
};

/// Writes a small file atomically (configs, metadata).
inline void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile f(path);
  f.write(contents.data(), contents.size());
  f.commit();
}

}  // namespace peft::io
