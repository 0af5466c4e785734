// Tokenizer throughput (peft/io/tokenizer.hpp) on the committed fixtures (tests/data/tokenizers):
//
//   OneCharMiB/<kind>   1 MiB of one repeated letter: a single 1 MiB pre-token, so BPE merges over
//                       a million symbols (the heap + linked-list merge keeps it O(n log n))
//   SpacesMiB/<kind>    1 MiB of spaces then a letter: the look-ahead \s+(?!\S) scanned once
//   TextMiB/<kind>      ~1 MiB of English prose (this repository's README, repeated), the usual case
//   DecodeMiB/<kind>    decode of TextMiB's ids
// bytes_per_second is of the input text. Goal: the 1 MiB single-character inputs well under a second.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>
#include <vector>

#include <peft/io/tokenizer.hpp>

namespace {

std::string source_dir() {
  std::string here = __FILE__;
  return here.substr(0, here.find_last_of('/')) + "/..";
}

const peft::io::Tokenizer& tokenizer(int kind) {
  static const peft::io::Tokenizer gpt2 =
      peft::io::load_tokenizer(source_dir() + "/tests/data/tokenizers/gpt2/tokenizer.json");
  static const peft::io::Tokenizer llama3 =
      peft::io::load_tokenizer(source_dir() + "/tests/data/tokenizers/llama3/tokenizer.json");
  static const peft::io::Tokenizer llama2 =
      peft::io::load_tokenizer(source_dir() + "/tests/data/tokenizers/llama2/tokenizer.json");
  return kind == 0 ? gpt2 : (kind == 1 ? llama3 : llama2);
}

const char* kind_name(int kind) { return kind == 0 ? "gpt2" : (kind == 1 ? "llama3" : "llama2"); }

std::string prose() {
  const std::string readme = peft::io::read_text_file(source_dir() + "/README.md");
  std::string text;
  while (text.size() < (1u << 20)) text += readme;
  return text;
}

void run_encode(benchmark::State& state, const std::string& text) {
  const peft::io::Tokenizer& tok = tokenizer(static_cast<int>(state.range(0)));
  std::size_t n = 0;
  for (auto _ : state) {
    const std::vector<std::int32_t> ids = tok.encode(text, false);
    n = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetLabel(kind_name(static_cast<int>(state.range(0))));
  state.counters["ids"] = static_cast<double>(n);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(text.size()));
}

void OneCharMiB(benchmark::State& state) { run_encode(state, std::string(1u << 20, 'a')); }
void SpacesMiB(benchmark::State& state) { run_encode(state, std::string(1u << 20, ' ') + "a"); }
void TextMiB(benchmark::State& state) { run_encode(state, prose()); }

void DecodeMiB(benchmark::State& state) {
  const peft::io::Tokenizer& tok = tokenizer(static_cast<int>(state.range(0)));
  const std::string text = prose();
  const std::vector<std::int32_t> ids = tok.encode(text, false);
  for (auto _ : state) {
    const std::string out = tok.decode(ids);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetLabel(kind_name(static_cast<int>(state.range(0))));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(text.size()));
}

BENCHMARK(OneCharMiB)->DenseRange(0, 2)->Unit(benchmark::kMillisecond);
BENCHMARK(SpacesMiB)->DenseRange(0, 2)->Unit(benchmark::kMillisecond);
BENCHMARK(TextMiB)->DenseRange(0, 2)->Unit(benchmark::kMillisecond);
BENCHMARK(DecodeMiB)->DenseRange(0, 2)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
