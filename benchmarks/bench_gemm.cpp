// The transformer step's matrix products on each GEMM at hand (issue 16: "measure the GEMM choices
// on our shapes"). The shapes are bench_transformer's full fine-tuning step (4 blocks, d 256, 4
// heads of 64, FFN 1024, 32 sequences × 64 tokens = 2048 rows), in the storage the layers use
// (row-major, weights [out, in], attention on 64-wide column blocks of [2048, 256] activations):
//   forward   Y = X Wᵀ          NT  (2048×256×256 q/k/v/out, 2048×1024×256 fc1, 2048×256×1024 fc2)
//   dX        dX = dY W         NN  (the same three)
//   dW        dW += dYᵀ X       TN  (256×256×2048, 1024×256×2048, 256×1024×2048), accumulated
//   attention per (sequence, head): S = Q Kᵀ, O = A V, dA = dO Vᵀ, dV = Aᵀ dO, dQ = dS K, dK = dSᵀ Q
//             on 64×64×64 blocks with row stride 256
//   LoRA r 8  x Aᵀ (2048×8×256), h Bᵀ (2048×256×8), dB (256×8×2048), dA (8×256×2048)
//
// Backends (each only where found, so the program runs anywhere):
//   peft      peft::gemm's own kernel (core/gemm_kernel.hpp) on the products it fits, Eigen's on
//             the rest (peft::gemm's default with AVX-512)
//   eigen     peft::gemm on Eigen's kernels throughout, with kept packing space (the default
//             without AVX-512)
//   openblas  cblas_sgemm of libopenblas.so.0 (dlopen; PEFT_BENCH_OPENBLAS overrides the path)
//   blis      cblas_sgemm of BLIS' libblis.so.4 (dlopen; PEFT_BENCH_BLIS overrides the path)
// The libraries are opened RTLD_LOCAL, so one process times all three on the same buffers; the
// kernel each one picked is printed (OpenBLAS core name, BLIS sub-configuration).
//
// Benchmarks: gemm/<backend>/<shape>/threads:<t> for each shape, and step/<backend>/threads:<t>:
// every product of one full fine-tuning step in order (40.3 GFLOP, distinct buffers per block as
// in the model). Counters: GF/s and % of the FMA peak (bench_support.hpp's loop, one core × t).
// The step figure is the ceiling of the whole training step's GF/s on that GEMM: the step also
// spends time outside products (norms, activations, softmax, copies, AdamW).
#include <dlfcn.h>

#include <benchmark/benchmark.h>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <peft/core/gemm.hpp>

#include "bench_support.hpp"

namespace {

using peft::Index;
using T = float;

/// One product C (+)= op(A) op(B), row-major, with leading dimensions (as cblas_sgemm takes it).
struct Op {
  Index m, n, k;
  bool ta, tb, accumulate;
  const T* a;
  Index lda;
  const T* b;
  Index ldb;
  T* c;
  Index ldc;
  double flops() const { return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k); }
};

using CMap = Eigen::Map<const peft::Matrix<T>, 0, Eigen::OuterStride<>>;
using MMap = Eigen::Map<peft::Matrix<T>, 0, Eigen::OuterStride<>>;

/// peft::gemm's body with peft's own kernel where it fits (Own) or Eigen's GEBP throughout.
template <bool Own>
void run_peft(const Op& o) {
  const CMap a(o.a, o.ta ? o.k : o.m, o.ta ? o.m : o.k, Eigen::OuterStride<>(o.lda));
  const CMap b(o.b, o.tb ? o.n : o.k, o.tb ? o.k : o.n, Eigen::OuterStride<>(o.ldb));
  MMap c(o.c, o.m, o.n, Eigen::OuterStride<>(o.ldc));
  using peft::detail::gemm_impl;
  if (!o.ta && !o.tb) gemm_impl<Own>(c, a, b, T(1), o.accumulate);
  if (!o.ta && o.tb) gemm_impl<Own>(c, a, b.transpose(), T(1), o.accumulate);
  if (o.ta && !o.tb) gemm_impl<Own>(c, a.transpose(), b, T(1), o.accumulate);
  if (o.ta && o.tb) gemm_impl<Own>(c, a.transpose(), b.transpose(), T(1), o.accumulate);
}

using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                       int);
using SetThreads = void (*)(int);

/// A BLAS opened at run time: its cblas_sgemm and its thread-count setter.
struct Blas {
  std::string name, kernel;
  Sgemm sgemm = nullptr;
  SetThreads set_threads = nullptr;
  void run(const Op& o) const {
    constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
    sgemm(kRowMajor, o.ta ? kTrans : kNoTrans, o.tb ? kTrans : kNoTrans, static_cast<int>(o.m), static_cast<int>(o.n),
          static_cast<int>(o.k), 1.0f, o.a, static_cast<int>(o.lda), o.b, static_cast<int>(o.ldb),
          o.accumulate ? 1.0f : 0.0f, o.c, static_cast<int>(o.ldc));
  }
};

void* open_first(const char* env, std::initializer_list<const char*> paths) {
  if (const char* p = std::getenv(env)) return dlopen(p, RTLD_NOW | RTLD_LOCAL);
  for (const char* p : paths)
    if (void* h = dlopen(p, RTLD_NOW | RTLD_LOCAL)) return h;
  return nullptr;
}

template <class F>
F symbol(void* h, const char* name) {
  return reinterpret_cast<F>(dlsym(h, name));
}

std::vector<Blas> open_blases() {
  std::vector<Blas> out;
  if (void* h = open_first("PEFT_BENCH_OPENBLAS", {"libopenblas.so.0", "libopenblas.so"})) {
    Blas b;
    b.name = "openblas";
    b.sgemm = symbol<Sgemm>(h, "cblas_sgemm");
    b.set_threads = symbol<SetThreads>(h, "openblas_set_num_threads");
    if (auto core = symbol<char* (*)()>(h, "openblas_get_corename")) b.kernel = core();
    if (auto cfg = symbol<char* (*)()>(h, "openblas_get_config")) b.kernel += std::string(" (") + cfg() + ")";
    if (b.sgemm != nullptr) out.push_back(b);
  }
  if (void* h = open_first("PEFT_BENCH_BLIS", {"/usr/lib/x86_64-linux-gnu/blis-openmp/libblis.so.4",
                                               "/usr/lib/x86_64-linux-gnu/blis-serial/libblis.so.4", "libblis.so.4"})) {
    Blas b;
    b.name = "blis";
    b.sgemm = symbol<Sgemm>(h, "cblas_sgemm");
    b.set_threads = symbol<SetThreads>(h, "bli_thread_set_num_threads");
    auto query = symbol<int (*)()>(h, "bli_arch_query_id");
    auto str = symbol<const char* (*)(int)>(h, "bli_arch_string");
    if (query != nullptr && str != nullptr) b.kernel = std::string("sub-configuration ") + str(query());
    if (b.sgemm != nullptr) out.push_back(b);
  }
  return out;
}

/// Buffers of one model's worth of products, filled once.
struct Buffers {
  std::vector<std::unique_ptr<T[]>> owned;
  T* make(Index rows, Index cols) {
    const std::size_t n = static_cast<std::size_t>(rows * cols);
    owned.emplace_back(new T[n]);
    T* p = owned.back().get();
    for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<T>(static_cast<double>((i * 7919) % 2003) / 2003.0 - 0.5);
    return p;
  }
};

constexpr Index kRows = 2048, kDim = 256, kFfn = 1024, kHeads = 4, kHead = 64, kSeqs = 32, kSeq = 64, kRank = 8;

/// The products of one linear layer [in → out] on kRows rows: forward, dX, dW.
void linear_ops(Buffers& buf, Index in, Index out, std::vector<Op>& ops) {
  T* x = buf.make(kRows, in);
  T* w = buf.make(out, in);
  T* y = buf.make(kRows, out);
  T* dy = buf.make(kRows, out);
  T* dx = buf.make(kRows, in);
  T* dw = buf.make(out, in);
  ops.push_back(Op{kRows, out, in, false, true, false, x, in, w, in, y, out});     // Y = X Wᵀ
  ops.push_back(Op{kRows, in, out, false, false, false, dy, out, w, in, dx, in});  // dX = dY W
  ops.push_back(Op{out, in, kRows, true, false, true, dy, out, x, in, dw, in});    // dW += dYᵀ X
}

/// The attention products of one block: per (sequence, head), six 64×64×64 products on column
/// blocks of the [2048, 256] Q, K, V, dO, dQ, dK, dV (row stride 256) and a 64×64 score block.
void attention_ops(Buffers& buf, std::vector<Op>& ops) {
  T *q = buf.make(kRows, kDim), *k = buf.make(kRows, kDim), *v = buf.make(kRows, kDim), *o = buf.make(kRows, kDim);
  T *dout = buf.make(kRows, kDim), *dq = buf.make(kRows, kDim), *dk = buf.make(kRows, kDim);
  T *dv = buf.make(kRows, kDim), *s = buf.make(kSeq, kSeq), *ds = buf.make(kSeq, kSeq);
  for (Index b = 0; b < kSeqs; ++b)
    for (Index h = 0; h < kHeads; ++h) {
      const Index at = b * kSeq * kDim + h * kHead;
      ops.push_back(Op{kSeq, kSeq, kHead, false, true, false, q + at, kDim, k + at, kDim, s, kSeq});      // S = Q Kᵀ
      ops.push_back(Op{kSeq, kHead, kSeq, false, false, false, s, kSeq, v + at, kDim, o + at, kDim});     // O = A V
      ops.push_back(Op{kSeq, kSeq, kHead, false, true, false, dout + at, kDim, v + at, kDim, ds, kSeq});  // dA = dO Vᵀ
      ops.push_back(Op{kSeq, kHead, kSeq, true, false, false, s, kSeq, dout + at, kDim, dv + at, kDim});  // dV = Aᵀ dO
      ops.push_back(Op{kSeq, kHead, kSeq, false, false, false, ds, kSeq, k + at, kDim, dq + at, kDim});   // dQ = dS K
      ops.push_back(Op{kSeq, kHead, kSeq, true, false, false, ds, kSeq, q + at, kDim, dk + at, kDim});    // dK = dSᵀ Q
    }
}

/// Every product of one full fine-tuning step (4 blocks; patch embedding and classifier left out:
/// < 0.1 % of the FLOPs).
std::vector<Op> step_ops(Buffers& buf) {
  std::vector<Op> ops;
  for (int block = 0; block < 4; ++block) {
    for (int i = 0; i < 4; ++i) linear_ops(buf, kDim, kDim, ops);  // q, k, v, out_proj
    attention_ops(buf, ops);
    linear_ops(buf, kDim, kFfn, ops);  // fc1
    linear_ops(buf, kFfn, kDim, ops);  // fc2
  }
  return ops;
}

/// One product shape on its own buffers.
struct Shape {
  std::string name;
  std::vector<Op> ops;  // one op, or the 128 attention items of one kind
};

std::vector<Shape> shapes(Buffers& buf) {
  std::vector<Shape> out;
  auto lin = [&](const char* name, Index in, Index o) {
    std::vector<Op> ops;
    linear_ops(buf, in, o, ops);
    const char* kind[] = {"fwd_NT", "dX_NN", "dW_TN"};
    for (int i = 0; i < 3; ++i) out.push_back(Shape{std::string(name) + "_" + kind[i], {ops[static_cast<std::size_t>(i)]}});
  };
  lin("qkvo_2048x256x256", kDim, kDim);
  lin("fc1_2048x1024x256", kDim, kFfn);
  lin("fc2_2048x256x1024", kFfn, kDim);
  std::vector<Op> att;
  attention_ops(buf, att);
  const char* kinds[] = {"attn_QKt_NT", "attn_AV_NN", "attn_dOVt_NT", "attn_AtdO_TN", "attn_dSK_NN", "attn_dStQ_TN"};
  for (std::size_t j = 0; j < 6; ++j) {
    Shape s{std::string(kinds[j]) + "_128x64x64x64", {}};
    for (std::size_t i = j; i < att.size(); i += 6) s.ops.push_back(att[i]);
    out.push_back(s);
  }
  T *x = buf.make(kRows, kDim), *a = buf.make(kRank, kDim), *bm = buf.make(kDim, kRank), *h = buf.make(kRows, kRank);
  T *y = buf.make(kRows, kDim), *db = buf.make(kDim, kRank), *da = buf.make(kRank, kDim);
  out.push_back(Shape{"lora_xAt_2048x8x256", {Op{kRows, kRank, kDim, false, true, false, x, kDim, a, kDim, h, kRank}}});
  out.push_back(Shape{"lora_hBt_2048x256x8", {Op{kRows, kDim, kRank, false, true, true, h, kRank, bm, kRank, y, kDim}}});
  out.push_back(Shape{"lora_dB_256x8x2048", {Op{kDim, kRank, kRows, true, false, true, y, kDim, h, kRank, db, kRank}}});
  out.push_back(Shape{"lora_dA_8x256x2048", {Op{kRank, kDim, kRows, true, false, true, h, kRank, x, kDim, da, kDim}}});
  return out;
}

void time_ops(benchmark::State& state, const std::vector<Op>& ops, const std::function<void(const Op&)>& run,
              const std::function<void(int)>& set_threads, int threads) {
  set_threads(threads);
  double flops = 0;
  for (const Op& o : ops) flops += o.flops();
  for (const Op& o : ops) run(o);  // warm: packing space, pages
  for (auto _ : state) {
    for (const Op& o : ops) run(o);
    benchmark::ClobberMemory();
  }
  const double per_s = flops * static_cast<double>(state.iterations()) * 1e-9;
  state.counters["GF/s"] = benchmark::Counter(per_s, benchmark::Counter::kIsRate);
  state.counters["GFLOP"] = flops * 1e-9;
  const double peak = peft::bench::fma_peak_gflops() * threads;
  state.counters["peak_GF/s"] = peak;
  state.counters["%peak"] = benchmark::Counter(100.0 * per_s / peak, benchmark::Counter::kIsRate);
  set_threads(1);
}

}  // namespace

int main(int argc, char** argv) {
  static Buffers buf;
  static const std::vector<Op> step = step_ops(buf);
  static const std::vector<Shape> all = shapes(buf);
  static const std::vector<Blas> blases = open_blases();
  std::printf("FMA peak (one core, %s): %.1f GF/s\n", peft::bench::fma_isa(), peft::bench::kFmaPeakAtStart);
  using KS = peft::detail::kernel::Shape<T>;
  std::printf("peft: own kernel, %d x %d register tile (peft::gemm's default here: %s)\n", KS::MR, KS::NR,
              peft::detail::kOwnGemmKernel ? "own kernel" : "Eigen's GEBP");
  std::printf("eigen: Eigen %d.%d.%d kernels%s\n", EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION,
#if defined(EIGEN_USE_BLAS)
              " (EIGEN_USE_BLAS: products go to the linked BLAS)"
#else
              ""
#endif
  );
  for (const Blas& b : blases) std::printf("%s: %s\n", b.name.c_str(), b.kernel.c_str());

  struct Backend {
    std::string name;
    std::function<void(const Op&)> run;
    std::function<void(int)> set_threads;
  };
  // "peft": peft's own kernel on the products it fits (core/gemm_kernel.hpp), whatever this build's
  // default is; "eigen": Eigen's GEBP for every product (peft::gemm's other path).
  std::vector<Backend> backends{{"peft", run_peft<true>, [](int t) { Eigen::setNbThreads(t); }},
                                {"eigen", run_peft<false>, [](int t) { Eigen::setNbThreads(t); }}};
  for (const Blas& b : blases)
    backends.push_back(Backend{b.name, [&b](const Op& o) { b.run(o); },
                               [&b](int t) {
                                 if (b.set_threads != nullptr) b.set_threads(t);
                               }});
  for (const int threads : {1, 2}) {
    for (const Backend& be : backends) {
      benchmark::RegisterBenchmark(("step/" + be.name + "/threads:" + std::to_string(threads)).c_str(),
                                   [be, threads](benchmark::State& s) {
                                     time_ops(s, step, be.run, be.set_threads, threads);
                                   })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
      for (const Shape& sh : all)
        benchmark::RegisterBenchmark(("gemm/" + be.name + "/" + sh.name + "/threads:" + std::to_string(threads)).c_str(),
                                     [be, &sh, threads](benchmark::State& s) {
                                       time_ops(s, sh.ops, be.run, be.set_threads, threads);
                                     })
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
