// safetensors load throughput against a plain sequential read of the same file (goal: ≥ 0.8×).
//
//   SequentialRead   read(2) of the whole file in 8 MiB chunks into one reused buffer: the floor
//                    any loader has to pay (page cache warm in both cases).
//   LoadF32          SafeTensorsFile (mmap + header validation) + load_into a reused Matrix<float>
//                    for every tensor: what a model load costs.
//   ViewF32          the zero-copy path: Eigen::Map into the mapping, summing each tensor so that
//                    every page is touched.
//   LoadF16AsF32     conversion throughput for a half-precision file (bytes of the F16 file).
// Compare bytes_per_second against SequentialRead's (benchmarks/run_io.sh prints the ratios).
// The ≥ 1 GB `peft merge` measurement (time vs. cp, peak RSS) is in benchmarks/run_io.sh.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include <peft/core/rng.hpp>
#include <peft/io/safetensors.hpp>

namespace {

constexpr int kTensors = 48;
constexpr peft::Index kRows = 1024, kCols = 1024;  // 4 MiB per F32 tensor → 192 MiB file

struct Files {
  std::string f32 = "/tmp/peft_bench_io_f32.safetensors";
  std::string f16 = "/tmp/peft_bench_io_f16.safetensors";
  Files() {
    peft::Rng rng(1);
    peft::Matrix<float> m(kRows, kCols);
    for (peft::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(rng.normal());
    std::vector<peft::io::NamedTensor<float>> a, b;
    for (int t = 0; t < kTensors; ++t) {
      a.emplace_back("layer." + std::to_string(t) + ".weight", std::vector<std::int64_t>{kRows, kCols}, m.data());
      b.emplace_back("layer." + std::to_string(t) + ".weight", std::vector<std::int64_t>{kRows, kCols}, m.data(),
                     peft::io::DType::F16);
    }
    peft::io::save_safetensors<float>(f32, a);
    peft::io::save_safetensors<float>(f16, b);
  }
  ~Files() {
    std::remove(f32.c_str());
    std::remove(f16.c_str());
  }
};

Files& files() {
  static Files f;
  return f;
}

void BM_SequentialRead(benchmark::State& state) {
  const std::string& path = files().f32;
  std::vector<char> buf(8u << 20);
  std::int64_t bytes = 0;
  for (auto _ : state) {
    const int fd = ::open(path.c_str(), O_RDONLY);
    ssize_t n;
    while ((n = ::read(fd, buf.data(), buf.size())) > 0) bytes += n;
    ::close(fd);
    benchmark::DoNotOptimize(buf.data());
  }
  state.SetBytesProcessed(bytes);
}

template <class Body>
void measure(benchmark::State& state, const std::string& path, Body body) {
  std::int64_t bytes = 0;
  for (auto _ : state) {
    const peft::io::SafeTensorsFile f(path);
    for (const auto& t : f.tensors()) body(f, t);
    bytes += static_cast<std::int64_t>(f.file().size());
  }
  state.SetBytesProcessed(bytes);
}

void BM_LoadF32(benchmark::State& state) {
  peft::Matrix<float> m(kRows, kCols);
  measure(state, files().f32, [&](const peft::io::SafeTensorsFile& f, const peft::io::TensorInfo& t) {
    f.load_into<float>(t, m.data());
    benchmark::DoNotOptimize(m.data());
  });
}

void BM_ViewF32(benchmark::State& state) {
  measure(state, files().f32, [&](const peft::io::SafeTensorsFile& f, const peft::io::TensorInfo& t) {
    const auto v = f.view<float>(t.name);
    float s = v.sum();
    benchmark::DoNotOptimize(s);
  });
}

void BM_LoadF16AsF32(benchmark::State& state) {
  peft::Matrix<float> m(kRows, kCols);
  measure(state, files().f16, [&](const peft::io::SafeTensorsFile& f, const peft::io::TensorInfo& t) {
    f.load_into<float>(t, m.data());
    benchmark::DoNotOptimize(m.data());
  });
}

}  // namespace

BENCHMARK(BM_SequentialRead)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoadF32)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ViewF32)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LoadF16AsF32)->Unit(benchmark::kMillisecond)->UseRealTime();

int main(int argc, char** argv) {
  files();  // write the inputs once, outside the timings
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
