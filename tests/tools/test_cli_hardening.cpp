// The `peft` tool against hostile environments: FIFOs and devices as inputs or outputs, modes and
// the umask, signals during a write (SIGINT / SIGTERM / SIGHUP remove the temporary, SIGKILL's is
// removed by the next run, SIGBUS is an I/O error), out of memory (exit 7), --version, natural
// order in inspect, a JSON file given where a safetensors file is expected.
#include "peft_cli.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <future>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <peft/io/peft_format.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/version.hpp>

#include "../io/io_test_utils.hpp"
#include "cli_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::data_dir;
using peft::test::io::raw_file;
using peft::test::io::returns_without_blocking;
using peft::test::io::TempDir;
using peft::test::io::write_bytes;

namespace {

using peft::test::cli::CliResult;
using peft::test::cli::contains;
using peft::test::cli::run_cli;

bool any_temporary(const TempDir& dir) {
  for (const std::string& e : dir.entries())
    if (e.find(".tmp-") != std::string::npos) return true;
  return false;
}

mode_t mode_of(const std::string& path) {
  struct stat st;
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

struct UmaskScope {
  mode_t old;
  explicit UmaskScope(mode_t m) : old(::umask(m)) {}
  ~UmaskScope() { ::umask(old); }
};

/// A LoRA adapter with one module per (path, out, in), rank r, scaling 1 (alpha = r).
PeftAdapter<double> lora_adapter(const std::vector<std::string>& paths, Index out, Index in, Index r, Rng& rng) {
  PeftAdapter<double> ad;
  ad.config.peft_type = "LORA";
  ad.config.r = static_cast<int>(r);
  ad.config.lora_alpha = static_cast<double>(r);
  ad.config.target_modules = ModuleSelector::list(paths);
  ad.config.raw = Json::object();
  for (const std::string& p : paths) {
    LoraModuleWeights<double> m;
    m.path = p;
    m.A = test::random_matrix<double>(r, in, rng, 0.01);
    m.B = test::random_matrix<double>(out, r, rng, 0.01);
    m.alpha = static_cast<double>(r);
    m.scaling = 1.0;
    ad.lora.push_back(std::move(m));
  }
  return ad;
}

/// A base of `layers` F32 tensors "l.<i>.w.weight" [rows, cols], and an adapter targeting them all.
void write_model(const std::string& base, const std::string& adapter, int layers, Index rows, Index cols) {
  Rng rng(21);
  const Matrix<float> w = test::random_matrix<float>(rows, cols, rng);
  std::vector<NamedTensor<float>> ts;
  std::vector<std::string> paths;
  for (int i = 0; i < layers; ++i) {
    paths.push_back("l." + std::to_string(i) + ".w");
    ts.emplace_back(paths.back() + ".weight", std::vector<std::int64_t>{rows, cols}, w.data());
  }
  save_safetensors<float>(base, ts);
  save_peft_adapter(adapter, lora_adapter(paths, rows, cols, 2, rng));
}

/// Forks; the child restores default signal actions, installs the tool's handlers and runs `body`,
/// exiting with its value.
pid_t fork_cli_child(const std::function<int()>& body) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGBUS}) ::signal(sig, SIG_DFL);
  peft::cli::install_signal_handlers();
  int code = 100;
  try {
    code = body();
  } catch (...) {
    code = 101;
  }
  ::_exit(code);
}

int wait_status(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

}  // namespace

TEST_CASE("peft: --version, and help that lists exit code 7 and what signals leave", "[tools]") {
  CliResult r = run_cli({"--version"});
  CHECK(r.code == cli::kOk);
  CHECK(r.out == "peft " + std::to_string(kVersionMajor) + "." + std::to_string(kVersionMinor) + "." +
                     std::to_string(kVersionPatch) + "\n");
  CHECK(run_cli({"-V"}).out == r.out);
  r = run_cli({"--help"});
  CHECK(contains(r.out, "peft --version"));
  CHECK(contains(r.out, "  7  out of memory"));
  CHECK(contains(r.out, "SIGINT, SIGTERM or SIGHUP"));
  CHECK(contains(r.out, "SIGKILL"));
  CHECK(contains(r.out, "keeps its mode and owner"));
  CHECK(cli::kOutOfMemory == 7);
}

TEST_CASE("peft inspect: natural order of layers; a JSON file says what was expected", "[tools]") {
  TempDir dir;
  Rng rng(5);
  const Matrix<float> w = test::random_matrix<float>(2, 2, rng);
  std::vector<NamedTensor<float>> ts;
  for (int i : {10, 2, 0, 11, 1, 9})
    ts.emplace_back("model.layers." + std::to_string(i) + ".w", std::vector<std::int64_t>{2, 2}, w.data());
  save_safetensors<float>(dir.file("m.safetensors"), ts);
  CliResult r = run_cli({"inspect", dir.file("m.safetensors")});
  REQUIRE(r.code == cli::kOk);
  std::vector<std::size_t> at;
  for (int i : {0, 1, 2, 9, 10, 11}) at.push_back(r.out.find("model.layers." + std::to_string(i) + ".w\n"));
  for (std::size_t k = 0; k < at.size(); ++k) {
    INFO(k);
    REQUIRE(at[k] != std::string::npos);
    if (k > 0) CHECK(at[k - 1] < at[k]);
  }
  // Adapter modules too.
  save_peft_adapter(dir.file("ad"), lora_adapter({"layers.10.q", "layers.2.q", "layers.1.q"}, 4, 4, 1, rng));
  r = run_cli({"inspect", dir.file("ad")});
  REQUIRE(r.code == cli::kOk);
  const std::size_t a1 = r.out.find(" layers.1.q\n"), a2 = r.out.find(" layers.2.q\n"),
                    a10 = r.out.find(" layers.10.q\n");
  REQUIRE(a10 != std::string::npos);
  CHECK(a1 < a2);
  CHECK(a2 < a10);

  r = run_cli({"inspect", dir.file("ad/adapter_config.json")});
  CHECK(r.code == cli::kIo);
  CHECK(contains(r.err, "adapter_config.json\" is a JSON file, not a safetensors file"));
  CHECK(contains(r.err, "or an adapter directory (the folder holding adapter_config.json)"));
  CHECK(!contains(r.err, "bytes 0..8"));  // not the parser's complaint about the "header length"
  r = run_cli({"merge", "--base", dir.file("ad/adapter_config.json"), "--adapter", dir.file("ad"), "--out",
               dir.file("x.safetensors")});
  CHECK(r.code == cli::kIo);
  CHECK(contains(r.err, "is a JSON file, not a safetensors file"));
}

TEST_CASE("peft: a FIFO as input is refused (exit 3) without blocking", "[tools]") {
  TempDir dir;
  const std::string fifo = dir.file("pipe.safetensors");
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CliResult r{};
  CHECK(returns_without_blocking(fifo, [&] { r = run_cli({"inspect", fifo}); }));
  CHECK(r.code == cli::kIo);
  CHECK(contains(r.err, "is not a regular file (it is a FIFO (named pipe))"));
  CHECK(returns_without_blocking(fifo, [&] {
    r = run_cli({"merge", "--base", fifo, "--adapter", data_dir() + "/tiny_lora", "--out", dir.file("m.safetensors")});
  }));
  CHECK(r.code == cli::kIo);
  // An adapter directory whose adapter_config.json is a FIFO.
  REQUIRE(::mkdir(dir.file("ad").c_str(), 0755) == 0);
  write_bytes(dir.file("ad/adapter_model.safetensors"), raw_file(data_dir() + "/tiny_lora/adapter_model.safetensors"));
  const std::string cfg = dir.file("ad/adapter_config.json");
  REQUIRE(::mkfifo(cfg.c_str(), 0600) == 0);
  CHECK(returns_without_blocking(cfg, [&] { r = run_cli({"inspect", dir.file("ad")}); }));
  CHECK(r.code == cli::kIo);
  CHECK(returns_without_blocking(cfg, [&] {
    r = run_cli({"merge", "--base", data_dir() + "/tiny_base.safetensors", "--adapter", dir.file("ad"), "--out",
                 dir.file("m.safetensors")});
  }));
  CHECK(r.code == cli::kIo);
  CHECK(!path_exists(dir.file("m.safetensors")));
}

TEST_CASE("peft: --out naming a device, a FIFO or a directory is refused; nothing is replaced", "[tools]") {
  TempDir dir;
  const std::string base = data_dir() + "/tiny_base.safetensors", ad = data_dir() + "/tiny_lora";
  const bool root = ::geteuid() == 0;
  const std::string dev = dir.file("null");
  if (root)
    REQUIRE(::mknod(dev.c_str(), S_IFCHR | 0666, makedev(1, 3)) == 0);  // a /dev/null of our own
  else
    REQUIRE(::mkfifo(dev.c_str(), 0666) == 0);
  CliResult r = run_cli({"merge", "--base", base, "--adapter", ad, "--out", dev});
  CHECK(r.code == cli::kIo);
  CHECK(contains(r.err, "cannot write \"" + dev + "\": it exists and is " +
                            (root ? "a character device" : "a FIFO (named pipe)")));
  struct stat st;
  REQUIRE(::lstat(dev.c_str(), &st) == 0);
  CHECK((root ? S_ISCHR(st.st_mode) : S_ISFIFO(st.st_mode)));
  r = run_cli({"quantize", base, "--out", dev});
  CHECK(r.code == cli::kIo);
  REQUIRE(::mkdir(dir.file("d").c_str(), 0755) == 0);
  r = run_cli({"merge", "--base", base, "--adapter", ad, "--out", dir.file("d")});
  CHECK(r.code == cli::kIo);
  CHECK(contains(r.err, "it exists and is a directory"));
  // A directory output over a device or a file.
  r = run_cli({"combine", "--method", "cat", ad, "--out", dev});
  CHECK(r.code == cli::kIo);
  CHECK(contains(r.err, "cannot write directory \"" + dev + "\""));
  REQUIRE(::lstat(dev.c_str(), &st) == 0);
  CHECK((root ? S_ISCHR(st.st_mode) : S_ISFIFO(st.st_mode)));
  CHECK(!any_temporary(dir));
}

TEST_CASE("peft: outputs follow the umask; an in-place merge keeps a 0600 model private", "[tools]") {
  TempDir dir;
  const std::string ad = data_dir() + "/tiny_lora";
  {
    const UmaskScope u(077);
    REQUIRE(run_cli({"merge", "--base", data_dir() + "/tiny_base.safetensors", "--adapter", ad, "--out",
                     dir.file("private.safetensors")})
                .code == cli::kOk);
    CHECK(mode_of(dir.file("private.safetensors")) == 0600);
    REQUIRE(run_cli({"combine", "--method", "cat", ad, "--out", dir.file("c77")}).code == cli::kOk);
    CHECK(mode_of(dir.file("c77")) == 0700);
    CHECK(mode_of(dir.file("c77/adapter_model.safetensors")) == 0600);
  }
  const UmaskScope u(022);
  REQUIRE(run_cli({"combine", "--method", "cat", ad, "--out", dir.file("c22")}).code == cli::kOk);
  CHECK(mode_of(dir.file("c22")) == 0755);
  CHECK(mode_of(dir.file("c22/adapter_config.json")) == 0644);
  // In place: --out is the base, a 0600 file: merged, still 0600 (and the owner kept when root).
  const std::string model = dir.file("model.safetensors");
  write_bytes(model, raw_file(data_dir() + "/tiny_base.safetensors"));
  REQUIRE(::chmod(model.c_str(), 0600) == 0);
  const bool root = ::geteuid() == 0;
  if (root) REQUIRE(::chown(model.c_str(), 2345, 2346) == 0);
  CliResult r = run_cli({"merge", "--base", model, "--adapter", ad, "--out", model});
  REQUIRE(r.code == cli::kOk);
  CHECK(mode_of(model) == 0600);
  if (root) {
    struct stat st;
    REQUIRE(::stat(model.c_str(), &st) == 0);
    CHECK(st.st_uid == 2345u);
    CHECK(st.st_gid == 2346u);
  }
  CHECK(raw_file(model) == raw_file(dir.file("private.safetensors")));  // the same merge
  CHECK(!any_temporary(dir));
}

TEST_CASE("peft: SIGINT / SIGTERM / SIGHUP during a merge remove the temporary; the status is the signal's",
          "[tools][signals]") {
  for (const int sig : {SIGINT, SIGTERM, SIGHUP}) {
    INFO("signal " << sig);
    bool caught_mid_write = false;
    // A base large enough that the write lasts a while; doubled if the child was too quick.
    for (int layers = 24; layers <= 96 && !caught_mid_write; layers *= 2) {
      TempDir dir;
      const std::string base = dir.file("base.safetensors"), ad = dir.file("ad"), out = dir.file("out.safetensors");
      write_model(base, ad, layers, 512, 1024);  // 2 MiB per tensor
      const pid_t pid = fork_cli_child([&] {
        std::ostringstream o, e;
        return peft::cli::run({"merge", "--base", base, "--adapter", ad, "--out", out}, o, e);
      });
      REQUIRE(pid > 0);
      int status = 0;
      bool exited = false;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (std::chrono::steady_clock::now() < deadline) {
        if (any_temporary(dir)) {
          ::kill(pid, sig);
          break;
        }
        if (::waitpid(pid, &status, WNOHANG) == pid) {
          exited = true;
          break;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      if (!exited) status = wait_status(pid);
      if (exited) continue;  // finished before the temporary was seen: retry with a bigger base
      caught_mid_write = true;
      REQUIRE(WIFSIGNALED(status));
      CHECK(WTERMSIG(status) == sig);
      CHECK(!any_temporary(dir));
      CHECK(!path_exists(out));
    }
    CHECK(caught_mid_write);
  }
}

TEST_CASE("peft: after SIGKILL the next run removes the stale temporary; SIGBUS is an I/O error", "[tools][signals]") {
  TempDir dir;
  const std::string out = dir.file("m.safetensors");
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  const pid_t pid = fork_cli_child([&]() -> int {
    AtomicFile f(out);  // as a merge's writer would hold it
    f.write("partial", 7);
    (void)!::write(ready[1], "r", 1);
    for (;;) ::pause();
  });
  REQUIRE(pid > 0);
  char c = 0;
  REQUIRE(::read(ready[0], &c, 1) == 1);
  ::close(ready[0]);
  ::close(ready[1]);
  ::kill(pid, SIGKILL);
  const int status = wait_status(pid);
  CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL));
  REQUIRE(any_temporary(dir));  // SIGKILL cannot be caught
  CliResult r = run_cli(
      {"merge", "--base", data_dir() + "/tiny_base.safetensors", "--adapter", data_dir() + "/tiny_lora", "--out", out});
  REQUIRE(r.code == cli::kOk);
  CHECK(dir.entries() == std::vector<std::string>{"m.safetensors"});

  // SIGBUS: a mapped input truncated under the reader; the handler removes the temporaries and
  // exits with the I/O error code.
  const std::string input = dir.file("input.bin");
  write_bytes(input, std::string(3 * 4096, 'x'));
  const pid_t bus = fork_cli_child([&] {
    AtomicFile f(dir.file("o.bin"));
    f.write("partial", 7);
    const MappedFile m(input);
    if (::truncate(input.c_str(), 0) != 0) return 102;
    volatile unsigned char v = m.data()[2 * 4096];  // past the new end: SIGBUS
    return static_cast<int>(v);
  });
  REQUIRE(bus > 0);
  const int bus_status = wait_status(bus);
  REQUIRE(WIFEXITED(bus_status));
  CHECK(WEXITSTATUS(bus_status) == cli::kIo);
  CHECK(!any_temporary(dir));
  CHECK(!path_exists(dir.file("o.bin")));
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PEFT_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define PEFT_TEST_SANITIZED 1
#endif
#endif

TEST_CASE("peft: out of memory exits with 7, not a signal or an internal error", "[tools][oom]") {
#if defined(PEFT_TEST_SANITIZED)
  SUCCEED("sanitizers reserve terabytes of address space: RLIMIT_AS cannot be used");
#else
  TempDir dir;
  Rng rng(8);
  // Rank-1 factors of a [8192, 8192] module: 128 KiB on disk, but the dense methods form the
  // 512 MiB delta, which the child's address-space limit does not allow.
  save_peft_adapter(dir.file("wide"), lora_adapter({"m.q"}, 8192, 8192, 1, rng));
  const pid_t pid = fork_cli_child([&] {
    long pages = 0;
    if (FILE* f = std::fopen("/proc/self/statm", "r")) {
      if (std::fscanf(f, "%ld", &pages) != 1) pages = 0;
      std::fclose(f);
    }
    const rlim_t now = static_cast<rlim_t>(pages) * static_cast<rlim_t>(::sysconf(_SC_PAGESIZE));
    const struct rlimit lim = {now + (256u << 20), now + (256u << 20)};
    if (pages == 0 || ::setrlimit(RLIMIT_AS, &lim) != 0) return 103;
    std::ostringstream o, e;
    const int code =
        peft::cli::run({"combine", "--method", "linear", dir.file("wide"), "--out", dir.file("combined")}, o, e);
    if (code == cli::kOutOfMemory && e.str().find("out of memory") == std::string::npos) return 104;
    return code;
  });
  REQUIRE(pid > 0);
  const int status = wait_status(pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == cli::kOutOfMemory);
  CHECK(!path_exists(dir.file("combined")));
  CHECK(!any_temporary(dir));
#endif
}
