// File plumbing: only regular files are read (a FIFO never blocks), outputs refuse special files,
// symbolic links, modes and owners, the registry of live temporaries, stale temporaries, and a
// base truncated during a streaming merge.
#include <peft/io/file.hpp>
#include <peft/io/merge_file.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <future>
#include <string>
#include <vector>

#include "io_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using namespace peft::io;
using peft::test::io::raw_file;
using peft::test::io::TempDir;
using peft::test::io::write_bytes;

namespace {

using peft::test::io::returns_without_blocking;

mode_t file_mode(const std::string& path) {
  struct stat st;
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

bool has_temporary(const TempDir& dir) {
  for (const std::string& e : dir.entries())
    if (e.find(".tmp-") != std::string::npos) return true;
  return false;
}

/// Sets the umask for a scope.
struct ScopedUmask {
  mode_t old;
  explicit ScopedUmask(mode_t m) : old(::umask(m)) {}
  ~ScopedUmask() { ::umask(old); }
};

/// A pid that surely names no process: a child that has exited and been reaped.
pid_t dead_pid() {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return pid;
}

}  // namespace

TEST_CASE("file: a FIFO is refused without blocking by every reader", "[io][file]") {
  TempDir dir;
  const std::string fifo = dir.file("pipe");
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK(returns_without_blocking(fifo, [&] { (void)read_text_file(fifo); }));
  CHECK(returns_without_blocking(fifo, [&] { MappedFile f(fifo); }));
  CHECK(returns_without_blocking(fifo, [&] { InputFile f(fifo); }));
  PEFT_REQUIRE_THROWS_WITH(read_text_file(fifo), IoError, "is not a regular file (it is a FIFO (named pipe))");
  PEFT_REQUIRE_THROWS_WITH(MappedFile{fifo}, IoError, "is not a regular file (it is a FIFO (named pipe))");
  PEFT_REQUIRE_THROWS_WITH(InputFile{fifo}, IoError, "is not a regular file");
  PEFT_REQUIRE_THROWS_WITH(read_text_file(dir.path), IoError, "it is a directory");
  write_bytes(dir.file("a.txt"), "hello");
  CHECK(read_text_file(dir.file("a.txt")) == "hello");
}

TEST_CASE("file: InputFile reads exactly, and a file that shrank is an IoError", "[io][file]") {
  TempDir dir;
  write_bytes(dir.file("f"), "0123456789");
  const InputFile f(dir.file("f"));
  CHECK(f.size() == 10);
  char buf[4] = {};
  f.read_at(3, 4, buf);
  CHECK(std::string(buf, 4) == "3456");
  REQUIRE(::truncate(dir.file("f").c_str(), 5) == 0);
  PEFT_REQUIRE_THROWS_WITH(f.read_at(3, 4, buf), IoError, "ends at byte 5, reading bytes 3..7 (it was 10 bytes");
}

TEST_CASE("file: copy_from refuses a source shorter than the range (no garbage written)", "[io][file]") {
  TempDir dir;
  write_bytes(dir.file("src"), std::string(1000, 'x'));
  const int in = ::open(dir.file("src").c_str(), O_RDONLY);
  REQUIRE(in >= 0);
  {
    AtomicFile out(dir.file("out"));
    out.copy_from(in, 0, 600, nullptr);
    CHECK(out.bytes_written() == 600);
    REQUIRE(::truncate(dir.file("src").c_str(), 700) == 0);  // another process shrinks the input
    PEFT_REQUIRE_THROWS_WITH(out.copy_from(in, 600, 400, nullptr), IoError, "the file shrank while being copied");
  }
  ::close(in);
  CHECK(!path_exists(dir.file("out")));
  CHECK(!has_temporary(dir));
}

TEST_CASE("file: outputs refuse special files; a symbolic link is replaced, never written through", "[io][file]") {
  TempDir dir;
  // A device node (made here, never /dev itself) or, without root, a FIFO.
  const std::string dev = dir.file("null");
  const bool root = ::geteuid() == 0;
  if (root)
    REQUIRE(::mknod(dev.c_str(), S_IFCHR | 0666, makedev(1, 3)) == 0);
  else
    REQUIRE(::mkfifo(dev.c_str(), 0666) == 0);
  PEFT_REQUIRE_THROWS_WITH(AtomicFile{dev}, IoError,
                           std::string("cannot write \"") + dev + "\": it exists and is " +
                               (root ? "a character device" : "a FIFO (named pipe)"));
  PEFT_REQUIRE_THROWS_WITH(write_file_atomic(dev, "x"), IoError, "only a regular file");
  struct stat st;
  REQUIRE(::lstat(dev.c_str(), &st) == 0);
  CHECK((root ? S_ISCHR(st.st_mode) : S_ISFIFO(st.st_mode)));
  PEFT_REQUIRE_THROWS_WITH(AtomicFile{dir.path}, IoError, "it exists and is a directory");
  CHECK(!has_temporary(dir));

  // A link to a 0600 file: the link becomes a regular file with the new bytes and the target's mode.
  write_bytes(dir.file("target"), "old");
  REQUIRE(::chmod(dir.file("target").c_str(), 0600) == 0);
  REQUIRE(::symlink("target", dir.file("link").c_str()) == 0);
  write_file_atomic(dir.file("link"), "new");
  REQUIRE(::lstat(dir.file("link").c_str(), &st) == 0);
  CHECK(S_ISREG(st.st_mode));
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(raw_file(dir.file("link")) == "new");
  CHECK(raw_file(dir.file("target")) == "old");
  // A link to a device is replaced too: the device is untouched.
  REQUIRE(::symlink("null", dir.file("devlink").c_str()) == 0);
  write_file_atomic(dir.file("devlink"), "data");
  CHECK(raw_file(dir.file("devlink")) == "data");
  REQUIRE(::lstat(dev.c_str(), &st) == 0);
  CHECK((root ? S_ISCHR(st.st_mode) : S_ISFIFO(st.st_mode)));

  // Directories: a regular file, a device or a dangling link is refused; a link to a directory is
  // written through.
  PEFT_REQUIRE_THROWS_WITH(AtomicDirectory{dir.file("target")}, IoError,
                           "it exists and is a regular file, not a directory");
  PEFT_REQUIRE_THROWS_WITH(AtomicDirectory{dev}, IoError, "not a directory");
  REQUIRE(::symlink("nowhere", dir.file("dangling").c_str()) == 0);
  PEFT_REQUIRE_THROWS_WITH(AtomicDirectory{dir.file("dangling")}, IoError,
                           "it is a symbolic link to a path that does not exist");
  REQUIRE(::mkdir(dir.file("real").c_str(), 0755) == 0);
  REQUIRE(::symlink("real", dir.file("dirlink").c_str()) == 0);
  {
    AtomicDirectory d(dir.file("dirlink"));
    write_file_atomic(d.staging() + "/a.json", "{}");
    d.commit();
  }
  CHECK(raw_file(dir.file("real/a.json")) == "{}");
  REQUIRE(::lstat(dir.file("dirlink").c_str(), &st) == 0);
  CHECK(S_ISLNK(st.st_mode));
  // A staged file whose namesake in the directory is a FIFO: refused before anything moves.
  REQUIRE(::mkfifo(dir.file("real/b.bin").c_str(), 0600) == 0);
  {
    AtomicDirectory d(dir.file("real"));
    write_file_atomic(d.staging() + "/a.json", "changed");
    write_file_atomic(d.staging() + "/b.bin", "x");
    PEFT_REQUIRE_THROWS_WITH(d.commit(), IoError, "it exists and is a FIFO (named pipe), not a regular file");
  }
  CHECK(raw_file(dir.file("real/a.json")) == "{}");
  CHECK(!has_temporary(dir));
}

TEST_CASE("file: new outputs follow the umask; a replaced file keeps its mode and owner", "[io][file]") {
  TempDir dir;
  {
    const ScopedUmask m(077);
    write_file_atomic(dir.file("private"), "x");
    CHECK(file_mode(dir.file("private")) == 0600);
    AtomicDirectory d(dir.file("pdir"));
    write_file_atomic(d.staging() + "/f", "x");
    d.commit();
    CHECK(file_mode(dir.file("pdir")) == 0700);
    CHECK(file_mode(dir.file("pdir/f")) == 0600);
  }
  {
    const ScopedUmask m(022);
    write_file_atomic(dir.file("public"), "x");
    CHECK(file_mode(dir.file("public")) == 0644);
    AtomicDirectory d(dir.file("odir"));
    write_file_atomic(d.staging() + "/f", "x");
    d.commit();
    CHECK(file_mode(dir.file("odir")) == 0755);
    // Replacing a 0600 file (alone, or inside an existing directory) keeps 0600.
    REQUIRE(::chmod(dir.file("private").c_str(), 0600) == 0);
    write_file_atomic(dir.file("private"), "replaced");
    CHECK(file_mode(dir.file("private")) == 0600);
    CHECK(raw_file(dir.file("private")) == "replaced");
    REQUIRE(::chmod(dir.file("odir/f").c_str(), 0640) == 0);
    AtomicDirectory again(dir.file("odir"));
    write_file_atomic(again.staging() + "/f", "y");
    write_file_atomic(again.staging() + "/g", "y");
    again.commit();
    CHECK(file_mode(dir.file("odir/f")) == 0640);
    CHECK(file_mode(dir.file("odir/g")) == 0644);
  }
  {
    const ScopedUmask m(027);
    write_file_atomic(dir.file("group"), "x");
    CHECK(file_mode(dir.file("group")) == 0640);
  }
  if (::geteuid() == 0) {  // only root may give a file away: the replaced file's owner is kept
    REQUIRE(::chown(dir.file("public").c_str(), 4321, 4322) == 0);
    write_file_atomic(dir.file("public"), "again");
    struct stat st;
    REQUIRE(::stat(dir.file("public").c_str(), &st) == 0);
    CHECK(st.st_uid == 4321u);
    CHECK(st.st_gid == 4322u);
    CHECK((st.st_mode & 0777) == 0644);
  }
}

TEST_CASE("file: remove_live_temporaries clears what a signal handler must; stale ones go next run", "[io][file]") {
  TempDir dir;
  {
    AtomicFile f(dir.file("out.bin"));
    f.write("abc", 3);
    const auto names = dir.entries();
    REQUIRE(names.size() == 1);
    CHECK(names[0].rfind(".out.bin.tmp-" + std::to_string(::getpid()) + "-", 0) == 0);  // the owner's pid
    AtomicDirectory d(dir.file("adapter"));
    write_file_atomic(d.staging() + "/adapter_config.json", "{}");
    REQUIRE(::mkdir((d.staging() + "/sub").c_str(), 0755) == 0);
    write_bytes(d.staging() + "/sub/x", "x");
    CHECK(dir.entries().size() == 2);
    remove_live_temporaries();  // what the CLI's SIGINT handler calls
    CHECK(dir.entries().empty());
    PEFT_REQUIRE_THROWS_WITH(f.commit(), IoError, "cannot rename the temporary file");
  }
  CHECK(dir.entries().empty());
  remove_live_temporaries();  // nothing registered any more: a no-op

  // Temporaries of a dead process for this output are removed; a live owner's, or another
  // output's, are kept.
  const std::string dead = std::to_string(dead_pid()), live = std::to_string(::getppid());
  write_bytes(dir.file(".out.bin.tmp-" + dead + "-a1b2c3"), "stale");
  REQUIRE(::mkdir(dir.file(".out.bin.tmp-" + dead + "-d4e5f6").c_str(), 0700) == 0);
  write_bytes(dir.file(".out.bin.tmp-" + dead + "-d4e5f6/x"), "stale");
  write_bytes(dir.file(".out.bin.tmp-" + live + "-g7h8i9"), "in use");
  write_bytes(dir.file(".other.bin.tmp-" + dead + "-j0k1l2"), "not ours");
  write_bytes(dir.file(".out.bin.tmp-abcdef"), "old naming, no pid");
  write_file_atomic(dir.file("out.bin"), "fresh");
  CHECK(dir.entries() == std::vector<std::string>{".other.bin.tmp-" + dead + "-j0k1l2",
                                                  ".out.bin.tmp-" + live + "-g7h8i9", ".out.bin.tmp-abcdef",
                                                  "out.bin"});
}

TEST_CASE("merge file: a base truncated during the merge is an IoError and leaves nothing", "[io][merge][file]") {
  TempDir dir;
  Rng rng(3);
  const Matrix<float> w = test::random_matrix<float>(32, 16, rng), big = test::random_matrix<float>(256, 16, rng);
  const std::string base = dir.file("base.safetensors"), out = dir.file("out.safetensors");
  PeftAdapter<float> ad;
  ad.config.r = 2;
  ad.config.lora_alpha = 2;
  LoraModuleWeights<float> m;
  m.path = "m.lin";
  m.A = test::random_matrix<float>(2, 16, rng);
  m.B = test::random_matrix<float>(32, 2, rng);
  m.scaling = 1.0;
  ad.lora.push_back(m);
  for (const std::size_t cut_at : {std::size_t{0}, std::size_t{1}, std::size_t{2}}) {
    INFO("truncated before tensor " << cut_at);
    // File order: a copied tensor, the merged one, another copied one.
    save_safetensors<float>(base, {{"a.copied", {256, 16}, big.data()},
                                   {"m.lin.weight", {32, 16}, w.data()},
                                   {"z.copied", {256, 16}, big.data()}});
    const SafeTensorsHeader h = read_safetensors_header(InputFile(base));
    MergeFileOptions opt;
    opt.block_bytes = 512;  // several reads per tensor
    opt.on_tensor = [&](std::size_t i, std::size_t, const TensorInfo& t) {
      if (i == cut_at) REQUIRE(::truncate(base.c_str(), static_cast<off_t>(h.data_offset + t.begin + 100)) == 0);
    };
    PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(base, ad, out, opt), IoError, "the file shrank while being");
    CHECK(!path_exists(out));
    CHECK(dir.entries() == std::vector<std::string>{"base.safetensors"});
  }
  // Untruncated, the same merge works and the hook sees every tensor in file order.
  save_safetensors<float>(
      base,
      {{"a.copied", {256, 16}, big.data()}, {"m.lin.weight", {32, 16}, w.data()}, {"z.copied", {256, 16}, big.data()}});
  std::vector<std::string> seen;
  MergeFileOptions opt;
  opt.on_tensor = [&](std::size_t, std::size_t count, const TensorInfo& t) {
    CHECK(count == 3);
    seen.push_back(t.name);
  };
  const MergeFileReport rep = merge_adapter_file(base, ad, out, opt);
  CHECK(rep.merged == 1);
  CHECK(rep.copied == 2);
  CHECK(seen == std::vector<std::string>{"a.copied", "m.lin.weight", "z.copied"});
  const SafeTensorsFile got(out);
  CHECK(test::rel_diff(got.load<float>("m.lin.weight"), Matrix<float>(w + m.B * m.A)) < 1e-6);
  CHECK(got.load<float>("z.copied") == big);
}

TEST_CASE("merge file: a tensor the base lacks is a ConfigError naming the tensor and the file", "[io][merge][file]") {
  TempDir dir;
  Rng rng(4);
  const Matrix<float> w = test::random_matrix<float>(4, 4, rng);
  save_safetensors<float>(dir.file("base.safetensors"), {{"other.weight", {4, 4}, w.data()}});
  PeftAdapter<float> ad;
  LoraModuleWeights<float> m;
  m.path = "m.lin";
  m.A = test::random_matrix<float>(1, 4, rng);
  m.B = test::random_matrix<float>(4, 1, rng);
  m.scaling = 1.0;
  ad.lora.push_back(m);
  PEFT_REQUIRE_THROWS_WITH(merge_adapter_file(dir.file("base.safetensors"), ad, dir.file("out.safetensors")),
                           ConfigError,
                           "merge: base \"" + dir.file("base.safetensors") +
                               "\" has no tensor \"m.lin.weight\" for adapter module \"m.lin\" (wrong base model, or "
                               "a name mapping is needed)");
  CHECK(dir.entries() == std::vector<std::string>{"base.safetensors"});
}
