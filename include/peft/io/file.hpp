#pragma once
// POSIX file plumbing for peft/io: input files (a read-only memory map, and a pread reader that
// survives a file shrinking under it), an atomic output file and an output directory written
// all-or-nothing (AtomicDirectory).
//
// Inputs: only regular files are read. A path naming a FIFO, a device or a socket is refused with
// IoError before anything blocks on it (the open is non-blocking, the type is checked with fstat).
//
// Atomicity: output goes to a temporary in the destination's own directory (rename(2) is atomic
// only within one file system), named `.<name>.tmp-<pid>-XXXXXX`, is fsync'ed, renamed over the
// destination, and the directory is fsync'ed so the rename itself survives a crash. Until commit()
// the destination is untouched; a destructor without commit() removes the temporary, so a failure
// (including an exception thrown half-way through writing) leaves nothing behind.
//
// Signals: the library installs no signal handler (it lives in someone else's program). It keeps
// the paths of its live temporaries in a fixed, pre-allocated registry that a handler may read:
// remove_live_temporaries() is async-signal-safe, so a program's SIGINT / SIGTERM handler can call
// it and then re-raise the signal (the `peft` tool does). A process killed by SIGKILL (or one that
// does not clean up) leaves its temporary behind; the next AtomicFile / AtomicDirectory for the
// same output name removes the temporaries whose owner process (the pid in the name) no longer
// exists (kill(pid, 0) fails with ESRCH). Only that output name's temporaries are touched, and a
// temporary whose pid is alive (or reused) is kept.
//
// Outputs and what already exists at their path:
// - a new file gets mode 0666 & ~umask, a new directory 0777 & ~umask (as open(2) / mkdir(2));
// - a regular file that is replaced keeps its mode, and its owner and group where the process may
//   set them (fchown; EPERM is ignored);
// - AtomicFile replaces a regular file or a symbolic link: a link is replaced by the new file, its
//   target is never written (the new file takes the target's mode and owner if the target is a
//   regular file). Anything else (a directory, a device, a FIFO, a socket) is refused with IoError
//   naming the path and what is there, so `--out /dev/null` never replaces a device node;
// - AtomicDirectory writes into an existing directory, or a symbolic link to one (the files go to
//   the link's target); anything else at the path is refused.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <dirent.h>

#if defined(__linux__)
#include <sys/syscall.h>
#endif

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

/// "a regular file", "a directory", "a character device", ... for messages.
inline const char* file_type_name(mode_t mode) {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISSOCK(mode)) return "a socket";
  return "a special file";
}

/// Opens `path` for reading only if it is a regular file. O_NONBLOCK makes the open itself return
/// at once for a FIFO (a blocking open waits for a writer, forever); fstat then tells the type,
/// and the flag is cleared again (it means nothing for a regular file). `st` receives fstat's data.
inline int open_regular_file(const std::string& path, struct stat& st) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) throw IoError("cannot open \"" + path + "\": " + errno_text(errno));
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw IoError("cannot stat \"" + path + "\": " + errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError("\"" + path + "\" is not a regular file (it is " + file_type_name(st.st_mode) + ")");
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) (void)::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

inline void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NONBLOCK);
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

/// The process umask. /proc/self/status has it read-only (Linux ≥ 4.7); elsewhere umask(2) must
/// set it to read it, so it is set back at once (a thread creating a file in between would use 0).
inline mode_t current_umask() {
  const int fd = ::open("/proc/self/status", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    char buf[4096];
    std::size_t len = 0;
    for (;;) {
      const ssize_t k = ::read(fd, buf + len, sizeof buf - 1 - len);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) break;
      len += static_cast<std::size_t>(k);
      if (len == sizeof buf - 1) break;
    }
    ::close(fd);
    buf[len] = '\0';
    if (const char* p = std::strstr(buf, "\nUmask:")) {
      char* end = nullptr;
      const unsigned long m = std::strtoul(p + 7, &end, 8);
      if (end != p + 7) return static_cast<mode_t>(m & 0777);
    }
  }
  const mode_t m = ::umask(022);
  ::umask(m);
  return m;
}

// ---- registry of live temporaries (read by signal handlers) ----

constexpr std::size_t kTempSlots = 64;      ///< live temporaries tracked at once (one per writer)
constexpr std::size_t kTempPathMax = 4096;  ///< longer paths are not tracked

/// One slot: state kFree → kBusy (being filled or emptied by its owner) → kLive (a handler may
/// read `path`) → kBusy → kFree. Lock-free atomics only, so a handler can read it at any time.
struct TempSlot {
  static constexpr int kFree = 0, kBusy = 1, kLive = 2;
  std::atomic<int> state{kFree};
  bool is_dir = false;
  char path[kTempPathMax] = {};
};

/// Zero-initialized static storage: no allocation, no initialization guard.
inline TempSlot g_temp_slots[kTempSlots];

/// Records a live temporary; returns its slot, or -1 when the registry is full or the path too long.
inline int register_temporary(const std::string& path, bool is_dir) noexcept {
  if (path.size() >= kTempPathMax) return -1;
  for (std::size_t i = 0; i < kTempSlots; ++i) {
    int expected = TempSlot::kFree;
    if (g_temp_slots[i].state.compare_exchange_strong(expected, TempSlot::kBusy, std::memory_order_acquire)) {
      std::memcpy(g_temp_slots[i].path, path.c_str(), path.size() + 1);
      g_temp_slots[i].is_dir = is_dir;
      g_temp_slots[i].state.store(TempSlot::kLive, std::memory_order_release);
      return static_cast<int>(i);
    }
  }
  return -1;
}

inline void unregister_temporary(int& slot) noexcept {
  if (slot < 0) return;
  TempSlot& s = g_temp_slots[slot];
  s.state.store(TempSlot::kBusy, std::memory_order_relaxed);
  s.path[0] = '\0';
  s.state.store(TempSlot::kFree, std::memory_order_release);
  slot = -1;
}

#if defined(__linux__)
/// Removes the entry `name` of the directory open as `dirfd`, recursively (at most `depth` levels),
/// with system calls only: async-signal-safe (opendir / readdir allocate; getdents64 does not).
inline void remove_at_signal_safe(int dirfd, const char* name, int depth) noexcept {
  if (::unlinkat(dirfd, name, 0) == 0 || (errno != EISDIR && errno != EPERM)) return;
  if (depth <= 0) return;
  const int fd = ::openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return;
  struct Dirent64 {
    std::uint64_t d_ino;
    std::int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[1];
  };
  alignas(8) char buf[2048];
  // Entries are removed while listing; passes repeat from the start until one removes nothing.
  for (int pass = 0; pass < 64; ++pass) {
    bool removed = false;
    (void)::lseek(fd, 0, SEEK_SET);
    for (;;) {
      const long k = ::syscall(SYS_getdents64, fd, buf, sizeof buf);
      if (k <= 0) break;
      for (long off = 0; off < k;) {
        const Dirent64* e = reinterpret_cast<const Dirent64*>(buf + off);
        off += e->d_reclen;
        const char* n = e->d_name;
        if (n[0] == '.' && (n[1] == '\0' || (n[1] == '.' && n[2] == '\0'))) continue;
        remove_at_signal_safe(fd, n, depth - 1);
        removed = true;
      }
    }
    if (!removed) break;
  }
  ::close(fd);
  (void)::unlinkat(dirfd, name, AT_REMOVEDIR);
}
#endif

/// `.<name>.tmp-<pid>-`: the prefix of this process's temporaries for the output `path`.
inline std::string temp_prefix(const std::string& path) {
  return "." + base_name(path) + ".tmp-" + std::to_string(static_cast<long>(::getpid())) + "-";
}

/// Removes `<dir>/.<name>.tmp-<pid>-*` left by a process that no longer exists (killed by
/// SIGKILL, or one that crashed). A live pid (possibly reused) keeps its temporary.
inline void remove_stale_temporaries(const std::string& path) {
  const std::string dir = parent_dir(path), lead = "." + base_name(path) + ".tmp-";
  std::vector<std::string> stale;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n.compare(0, lead.size(), lead) != 0) continue;
    std::size_t i = lead.size();
    long pid = 0;
    while (i < n.size() && n[i] >= '0' && n[i] <= '9' && pid < 100000000) pid = pid * 10 + (n[i++] - '0');
    if (i == lead.size() || i >= n.size() || n[i] != '-' || pid <= 0 || pid == static_cast<long>(::getpid())) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == -1 && errno == ESRCH) stale.push_back(dir + "/" + n);
  }
  ::closedir(d);
  for (const std::string& s : stale) remove_tree(s);
}

/// Blocks the usual termination signals for a scope (between creating a temporary and recording
/// it, so that a handler never misses one).
class BlockTerminationSignals {
 public:
  BlockTerminationSignals() noexcept {
    sigset_t s;
    sigemptyset(&s);
    for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) sigaddset(&s, sig);
    ok_ = ::pthread_sigmask(SIG_BLOCK, &s, &old_) == 0;
  }
  ~BlockTerminationSignals() {
    if (ok_) ::pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  BlockTerminationSignals(const BlockTerminationSignals&) = delete;
  BlockTerminationSignals& operator=(const BlockTerminationSignals&) = delete;

 private:
  sigset_t old_;
  bool ok_ = false;
};

}  // namespace detail

/// Removes every temporary file and staging directory that a live AtomicFile / AtomicDirectory of
/// this process holds. Async-signal-safe (system calls on pre-allocated storage only): meant for a
/// program's SIGINT / SIGTERM handler, which then re-raises the signal. Writers that keep going
/// afterwards fail with IoError. Temporaries beyond the registry's 64 slots (or with paths of 4096
/// bytes or more) are not tracked.
inline void remove_live_temporaries() noexcept {
  const int saved = errno;
  for (detail::TempSlot& s : detail::g_temp_slots) {
    if (s.state.load(std::memory_order_acquire) != detail::TempSlot::kLive) continue;
    if (!s.is_dir) {
      (void)::unlink(s.path);
      continue;
    }
#if defined(__linux__)
    detail::remove_at_signal_safe(AT_FDCWD, s.path, 8);
#else
    (void)::rmdir(s.path);
#endif
  }
  errno = saved;
}

inline bool path_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

inline bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

/// Whole file as a string (config files); IoError names the file. Only a regular file is read.
inline std::string read_text_file(const std::string& path, std::size_t max_bytes = 100u << 20) {
  struct stat st;
  const int fd = detail::open_regular_file(path, st);
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

/// A read-only private mapping of a whole regular file. Movable, not copyable.
///
/// Truncation: the mapping covers the file's size at construction. If another process truncates
/// the file while it is mapped, reading a page past the new end raises SIGBUS, which by default
/// kills the process; the library installs no handler for it. A program that reads files others
/// may shrink either handles SIGBUS itself (the `peft` tool exits with an I/O error) or reads
/// with pread (InputFile, as the streaming merge does).
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path) : path_(path) {
    struct stat st;
    fd_ = detail::open_regular_file(path, st);
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

  /// Lets the kernel drop pages of [offset, offset + n) once they are consumed.
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

/// A regular file read with pread(2): a file that shrinks while being read gives a short read,
/// reported as IoError, where a mapping would fault (SIGBUS). Movable, not copyable.
class InputFile {
 public:
  InputFile() = default;
  explicit InputFile(const std::string& path) : path_(path) {
    struct stat st;
    fd_ = detail::open_regular_file(path, st);
    size_ = static_cast<std::uint64_t>(st.st_size);
#if defined(POSIX_FADV_SEQUENTIAL)
    (void)::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);  // read front to back once
#endif
  }
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
  InputFile(InputFile&& o) noexcept
      : path_(std::move(o.path_)), fd_(std::exchange(o.fd_, -1)), size_(std::exchange(o.size_, 0)) {}
  InputFile& operator=(InputFile&& o) noexcept {
    if (this != &o) {
      if (fd_ >= 0) ::close(fd_);
      path_ = std::move(o.path_);
      fd_ = std::exchange(o.fd_, -1);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~InputFile() {
    if (fd_ >= 0) ::close(fd_);
  }

  const std::string& path() const { return path_; }
  int fd() const { return fd_; }
  /// The size when the file was opened.
  std::uint64_t size() const { return size_; }

  /// Reads exactly bytes [offset, offset + n) into `dst`; IoError if the file ends first.
  void read_at(std::uint64_t offset, std::size_t n, void* dst) const {
    auto* p = static_cast<unsigned char*>(dst);
    std::size_t done = 0;
    while (done < n) {
      const ssize_t k = ::pread(fd_, p + done, n - done, static_cast<off_t>(offset + done));
      if (k < 0) {
        if (errno == EINTR) continue;
        throw IoError("cannot read \"" + path_ + "\" at byte " + std::to_string(offset + done) + ": " +
                      detail::errno_text(errno));
      }
      if (k == 0)
        throw IoError("\"" + path_ + "\" ends at byte " + std::to_string(offset + done) + ", reading bytes " +
                      std::to_string(offset) + ".." + std::to_string(offset + n) + " (it was " + std::to_string(size_) +
                      " bytes when opened: the file shrank while being read)");
      done += static_cast<std::size_t>(k);
    }
  }

 private:
  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

/// Writes a file atomically: bytes go to `<dir>/.<name>.tmp-<pid>-XXXXXX`; commit() fsyncs and
/// renames it over `path`. Without commit() the temporary is removed and `path` is never touched.
/// Modes, owners, links and what may already exist at `path`: see the file comment.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path) : path_(std::move(path)) {
    struct stat st;
    mode_t mode = static_cast<mode_t>(0666 & ~detail::current_umask());
    bool keep_owner = false;
    if (inspect_destination(st)) {  // a regular file (or a link to one) is replaced: keep its metadata
      mode = static_cast<mode_t>(st.st_mode & 07777);
      keep_owner = true;
    }
    detail::remove_stale_temporaries(path_);
    std::string tmpl = detail::parent_dir(path_) + "/" + detail::temp_prefix(path_) + "XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    {
      const detail::BlockTerminationSignals block;  // no signal between mkstemp and the registry
      fd_ = ::mkstemp(buf.data());
      if (fd_ < 0)
        throw IoError("cannot create a temporary file next to \"" + path_ + "\": " + detail::errno_text(errno));
      tmp_ = buf.data();
      slot_ = detail::register_temporary(tmp_, false);
    }
    (void)::fcntl(fd_, F_SETFD, FD_CLOEXEC);
    // The owner first: chown clears set-user-ID bits, which the fchmod then restores.
    if (keep_owner) (void)::fchown(fd_, st.st_uid, st.st_gid);  // EPERM (not root): keep ours
    (void)::fchmod(fd_, mode);                                  // mkstemp makes 0600
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

  /// Appends bytes [offset, offset + n) of the regular file open as `in_fd`, copied inside the
  /// kernel (copy_file_range: no round trip through user memory, as cp does). Where the kernel
  /// cannot copy between the two files (another file system on old kernels, no copy_file_range)
  /// the bytes are written from `same_bytes` (that range already in memory) or, when it is null,
  /// read with pread. A source that ends before offset + n (a file that shrank while being
  /// copied) is an IoError, never a short or padded output. A mapped `same_bytes` faults (SIGBUS)
  /// if the file shrinks: pass null, or bytes read with pread, when that can happen.
  void copy_from(int in_fd, std::uint64_t offset, std::size_t n, const unsigned char* same_bytes) {
    if (fd_ < 0) throw IoError("\"" + path_ + "\": write after commit or abort");
    const std::uint64_t end = offset + n;
#if defined(__linux__)
    while (n > 0 && kernel_copy_) {
      loff_t in_off = static_cast<loff_t>(offset);
      const ssize_t k = ::copy_file_range(in_fd, &in_off, fd_, nullptr, n, 0);
      if (k < 0 && errno == EINTR) continue;
      if (k == 0) short_source(offset, end);  // end of the source file before the range's end
      if (k < 0) {                            // not supported here (ENOSYS, EXDEV, EINVAL, ...): write instead
        kernel_copy_ = false;
        break;
      }
      offset += static_cast<std::uint64_t>(k);
      if (same_bytes != nullptr) same_bytes += k;
      n -= static_cast<std::size_t>(k);
      written_ += static_cast<std::uint64_t>(k);
    }
#endif
    if (n == 0) return;
    if (same_bytes != nullptr) {
      write(same_bytes, n);
      return;
    }
    buffer_.resize(std::min<std::size_t>(n, std::size_t{1} << 20));
    while (n > 0) {
      const std::size_t want = std::min(n, buffer_.size());
      const ssize_t k = ::pread(in_fd, buffer_.data(), want, static_cast<off_t>(offset));
      if (k < 0 && errno == EINTR) continue;
      if (k < 0) throw IoError("cannot read the input copied into \"" + path_ + "\": " + detail::errno_text(errno));
      if (k == 0) short_source(offset, end);
      write(buffer_.data(), static_cast<std::size_t>(k));
      offset += static_cast<std::uint64_t>(k);
      n -= static_cast<std::size_t>(k);
    }
  }

  /// fsync + rename over the destination + fsync of the directory.
  void commit() {
    if (fd_ < 0) throw IoError("\"" + path_ + "\": commit after commit or abort");
    struct stat st;
    (void)inspect_destination(st);  // something else may have appeared at the path since
    if (::fsync(fd_) != 0) throw IoError("cannot flush \"" + path_ + "\": " + detail::errno_text(errno));
    if (::close(fd_) != 0) {
      fd_ = -1;
      throw IoError("cannot close \"" + path_ + "\": " + detail::errno_text(errno));
    }
    fd_ = -1;
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      abort();
      throw IoError("cannot rename the temporary file to \"" + path_ + "\": " + detail::errno_text(err));
    }
    tmp_.clear();
    detail::unregister_temporary(slot_);  // after the rename: a handler in between finds no file
    detail::fsync_dir(detail::parent_dir(path_));
  }

  /// Drops the temporary (also done by the destructor).
  void abort() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!tmp_.empty()) ::unlink(tmp_.c_str());
    tmp_.clear();
    detail::unregister_temporary(slot_);
  }

 private:
  /// What is at path_: true for a regular file (or a link to one; `st` is its stat), false for
  /// nothing or a link to anything else; IoError for any other file type.
  bool inspect_destination(struct stat& st) const {
    if (::lstat(path_.c_str(), &st) != 0) return false;
    if (S_ISLNK(st.st_mode)) return ::stat(path_.c_str(), &st) == 0 && S_ISREG(st.st_mode);
    if (!S_ISREG(st.st_mode))
      throw IoError("cannot write \"" + path_ + "\": it exists and is " + detail::file_type_name(st.st_mode) +
                    "; only a regular file (or a symbolic link, which is replaced) is overwritten");
    return true;
  }

  [[noreturn]] void short_source(std::uint64_t at, std::uint64_t end) const {
    throw IoError("cannot copy into \"" + path_ + "\": the input ends at byte " + std::to_string(at) +
                  ", before byte " + std::to_string(end) + " (the file shrank while being copied)");
  }

  std::string path_;
  std::string tmp_;
  int fd_ = -1;
  int slot_ = -1;  ///< registry slot of tmp_ (-1: not tracked)
  std::uint64_t written_ = 0;
  bool kernel_copy_ = true;            ///< cleared after copy_file_range fails once
  std::vector<unsigned char> buffer_;  ///< pread fallback of copy_from
};

/// Writes a directory of files without ever leaving a half-written state. Files are written into
/// `<parent>/.<name>.tmp-<pid>-XXXXXX/` (staging()); until commit() nothing at `path` changes, and
/// without commit() the staging directory is removed.
///
/// commit():
/// - `path` does not exist: the staging directory is renamed to `path` (atomic as a whole); it has
///   mode 0777 & ~umask.
/// - `path` is an existing directory (or a symbolic link to one): each staged file is renamed over
///   its namesake in `path` (each replacement atomic, keeping the replaced file's mode and owner);
///   every other file in `path` is left alone, as Hugging Face's save_pretrained does (a model
///   folder keeps its README, tokenizer, other adapters). Conflicts (a staged file where `path` has
///   a directory or a special file, or the reverse) are found before anything moves.
class AtomicDirectory {
 public:
  explicit AtomicDirectory(std::string path) : path_(std::move(path)) {
    while (path_.size() > 1 && path_.back() == '/') path_.pop_back();
    check_destination();
    detail::remove_stale_temporaries(path_);
    std::string tmpl = detail::parent_dir(path_) + "/" + detail::temp_prefix(path_) + "XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    {
      const detail::BlockTerminationSignals block;  // no signal between mkdtemp and the registry
      if (::mkdtemp(buf.data()) == nullptr)
        throw IoError("cannot create a temporary directory next to \"" + path_ + "\": " + detail::errno_text(errno));
      tmp_ = buf.data();
      slot_ = detail::register_temporary(tmp_, true);
    }
    (void)::chmod(tmp_.c_str(), static_cast<mode_t>(0777 & ~detail::current_umask()));  // mkdtemp makes 0700
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
    check_destination();
    if (!path_exists(path_)) {
      if (::rename(tmp_.c_str(), path_.c_str()) != 0)
        throw IoError("cannot rename the temporary directory to \"" + path_ + "\": " + detail::errno_text(errno));
      tmp_.clear();
      detail::unregister_temporary(slot_);
    } else {
      check_merge(tmp_, path_);  // every conflict is reported before the first rename
      {
        // A termination signal waits until every staged file has moved, so that a handler that
        // removes the staging tree never leaves `path` with only some of the new files.
        const detail::BlockTerminationSignals block;
        merge_into(tmp_, path_);
      }
      detail::fsync_dir(path_);
      abort();  // the (now empty) staging tree
    }
    detail::fsync_dir(detail::parent_dir(path_));
  }

  void abort() noexcept {
    if (!tmp_.empty()) detail::remove_tree(tmp_);
    tmp_.clear();
    detail::unregister_temporary(slot_);
  }

 private:
  /// Nothing, a directory, or a link to a directory may be at path_; anything else is refused.
  void check_destination() const {
    struct stat st;
    if (::lstat(path_.c_str(), &st) != 0 || S_ISDIR(st.st_mode)) return;
    if (S_ISLNK(st.st_mode)) {
      struct stat target;
      if (::stat(path_.c_str(), &target) == 0 && S_ISDIR(target.st_mode)) return;
      throw IoError("cannot write directory \"" + path_ + "\": it is a symbolic link to " +
                    (::stat(path_.c_str(), &target) == 0 ? detail::file_type_name(target.st_mode)
                                                         : "a path that does not exist") +
                    ", not a directory");
    }
    throw IoError("cannot write directory \"" + path_ + "\": it exists and is " + detail::file_type_name(st.st_mode) +
                  ", not a directory");
  }

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
      struct stat st;
      if (::lstat(dst.c_str(), &st) != 0) continue;
      const bool src_dir = is_directory(src), dst_dir = is_directory(dst);
      if (src_dir && dst_dir) {
        check_merge(src, dst);
      } else if (src_dir != dst_dir) {
        throw IoError("cannot write \"" + dst + "\": expected a " + (src_dir ? "directory" : "file") +
                      " there, found a " + (dst_dir ? "directory" : "file") + "; nothing was written");
      } else if (!S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode)) {
        throw IoError("cannot write \"" + dst + "\": it exists and is " + detail::file_type_name(st.st_mode) +
                      ", not a regular file; nothing was written");
      }
    }
  }

  static void merge_into(const std::string& from, const std::string& to) {
    for (const std::string& n : entries(from)) {
      const std::string src = from + "/" + n, dst = to + "/" + n;
      if (is_directory(src) && is_directory(dst)) {
        merge_into(src, dst);
        detail::fsync_dir(dst);
        continue;
      }
      struct stat st;
      if (::stat(dst.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {  // the replaced file's owner and mode
        (void)::chown(src.c_str(), st.st_uid, st.st_gid);
        (void)::chmod(src.c_str(), st.st_mode & 07777);
      }
      if (::rename(src.c_str(), dst.c_str()) != 0)
        throw IoError("cannot move \"" + n + "\" into \"" + to + "\": " + detail::errno_text(errno));
    }
  }

  std::string path_;
  std::string tmp_;
  int slot_ = -1;  ///< registry slot of tmp_ (-1: not tracked)
};

/// Writes a small file atomically (configs, metadata).
inline void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile f(path);
  f.write(contents.data(), contents.size());
  f.commit();
}

}  // namespace peft::io
