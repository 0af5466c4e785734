// OpenMP paths (issue 16): peft::gemm's per-thread slabs and the attention loops split between
// threads (core/parallel.hpp) give what one thread gives. This executable is the only test one
// compiled with OpenMP (tests/CMakeLists.txt): every template it uses is instantiated here, with
// the parallel code in it.
#include <omp.h>

#include <catch2/catch.hpp>
#include <functional>
#include <string>
#include <vector>

#include <peft/core/gemm.hpp>
#include <peft/core/parallel.hpp>
#include <peft/layers/activations.hpp>
#include <peft/layers/adapter.hpp>
#include <peft/layers/attention.hpp>
#include <peft/layers/ia3.hpp>
#include <peft/layers/layer_norm.hpp>
#include <peft/layers/rms_norm.hpp>
#include <peft/loss/causal_lm.hpp>
#include <peft/models/llama.hpp>
#include <peft/optim/adam.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

using namespace peft;

namespace {

/// Runs f with Eigen's (and so the library's) thread count set to n, then restores it.
template <class F>
void with_threads(int n, F&& f) {
  const int before = Eigen::nbThreads();
  Eigen::setNbThreads(n);
  f();
  Eigen::setNbThreads(before);
}

/// Every parameter's gradient, by name.
template <class M>
std::vector<std::pair<std::string, Matrix<double>>> grads_of(M& m) {
  std::vector<std::pair<std::string, Matrix<double>>> out;
  m.visit_parameters([&](const std::string& n, Parameter<double>& p) { out.emplace_back(n, p.grad); });
  return out;
}

void check_same_grads(const std::vector<std::pair<std::string, Matrix<double>>>& a,
                      const std::vector<std::pair<std::string, Matrix<double>>>& b) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    INFO(a[i].first);
    CHECK(relative_error(b[i].second, a[i].second) < 1e-12);
  }
}

/// forward(x) and backward(dy) of `layer` on one thread and on two: the output, dx and every
/// gradient bit for bit.
template <class L>
void check_same_on_two_threads(L& layer, const Matrix<double>& x, const Matrix<double>& dy) {
  Matrix<double> y[2], dx[2];
  std::vector<std::pair<std::string, Matrix<double>>> g[2];
  for (int t : {1, 2})
    with_threads(t, [&] {
      typename L::Cache c;
      layer.zero_grad();
      layer.forward(x, y[t - 1], c);
      layer.backward(c, dy, &dx[t - 1]);
      g[t - 1] = grads_of(layer);
    });
  CHECK(y[0] == y[1]);
  CHECK(dx[0] == dx[1]);
  REQUIRE(g[0].size() == g[1].size());
  REQUIRE_FALSE(g[0].empty());
  for (std::size_t i = 0; i < g[0].size(); ++i) {
    INFO(g[0][i].first);
    CHECK(g[0][i].second.size() > 0);
    CHECK(g[0][i].second == g[1][i].second);
  }
}

}  // namespace

TEST_CASE("two threads are available to the library in this executable", "[parallel]") {
  with_threads(2, [] {
    CHECK(Eigen::nbThreads() == 2);
    CHECK(parallel_threads(8, 1e8) == 2);
    CHECK(parallel_threads(1, 1e8) == 1);  // one item
    CHECK(parallel_threads(8, 1e3) == 1);  // too little work
    int inside = 0;
    parallel_for(8, 2, [&](Index, Index, int) {
      if (omp_in_parallel()) CHECK(parallel_threads(8, 1e8) == 1);  // no nested regions
#pragma omp atomic
      ++inside;
    });
    CHECK(inside == 2);
  });
  with_threads(1, [] { CHECK(parallel_threads(8, 1e8) == 1); });
}

TEST_CASE("gemm split by rows and by columns equals one thread", "[parallel][gemm]") {
  Rng rng(3);
  struct Shape {
    Index m, n, k;
  };
  for (const Shape s : {Shape{301, 70, 90}, Shape{40, 333, 120}, Shape{64, 64, 600}}) {
    INFO(s.m << " x " << s.n << " x " << s.k);
    const Matrix<double> a = test::random_matrix<double>(s.m, s.k, rng), at = a.transpose();
    const Matrix<double> b = test::random_matrix<double>(s.k, s.n, rng), bt = b.transpose();
    const Matrix<double> c0 = test::random_matrix<double>(s.m, s.n, rng);
    const Matrix<double> want = a * b, want_acc = c0 + 0.5 * want;
    for (int threads : {1, 2, 3}) {
      with_threads(threads, [&] {
        Matrix<double> c;
        gemm(c, a, b);
        CHECK(relative_error(c, want) < 1e-13);
        c = c0;
        gemm(c, at.transpose(), bt.transpose(), 0.5, true);
        CHECK(relative_error(c, want_acc) < 1e-13);
        Matrix<double> big = Matrix<double>::Zero(s.m + 3, s.n + 5);
        gemm(big.block(1, 2, s.m, s.n), a, b);  // a block destination: only its block is written
        CHECK(relative_error(Matrix<double>(big.block(1, 2, s.m, s.n)), want) < 1e-13);
        CHECK(big.row(0).isZero(0));
        CHECK(big.leftCols(2).isZero(0));
      });
    }
  }
}

TEST_CASE("peft's own GEMM kernel split between threads equals one thread bit for bit", "[parallel][gemm]") {
  // detail::gemm_impl<true>: the own kernel on this build's packets (peft::gemm's default only with
  // AVX-512; tests/native checks that tile). Slabs are whole register tiles; k blocking depends on k.
#if defined(EIGEN_USE_BLAS)
  WARN("EIGEN_USE_BLAS: products go to the BLAS; peft's own kernel is not used or checked");
  return;
#endif
  Rng rng(4);
  struct Shape {
    Index m, n, k;
  };
  for (const Shape s : {Shape{301, 70, 900}, Shape{40, 333, 120}}) {
    INFO(s.m << " x " << s.n << " x " << s.k);
    const Matrix<float> a = test::random_matrix<float>(s.m, s.k, rng), bt = test::random_matrix<float>(s.n, s.k, rng);
    const Matrix<float> c0 = test::random_matrix<float>(s.m, s.n, rng);
    Matrix<float> one = c0, two = c0;
    with_threads(1, [&] { detail::gemm_impl<true>(one, a, bt.transpose(), 0.5f, true); });
    with_threads(2, [&] {
      CHECK(parallel_threads(8, 1e8) == 2);
      detail::gemm_impl<true>(two, a, bt.transpose(), 0.5f, true);
    });
    CHECK((one.array() == two.array()).all());
    const Matrix<double> want = c0.cast<double>() + 0.5 * a.cast<double>() * bt.cast<double>().transpose();
    CHECK(relative_error(Matrix<double>(one.cast<double>()), want) < 1e-5);
  }
}

TEST_CASE("a row times a matrix (decoding one token) splits its columns and equals one thread bit for bit",
          "[parallel][gemm]") {
  // y = x Wᵀ with W row-major [n, k] (a linear's weight), y = x B with B [k, n], a scaled operand,
  // accumulation and a block destination, on 1 to 4 threads. n = 17, 33, 49 would leave a
  // one-column last slice if slices were rounded up (Eigen sends a 1 × 1 result to dot(), another
  // summation order); 333 leaves a last slice that is not a multiple of 16; k = 4000 a vector tail
  // in every dot product.
  Rng rng(5);
  const Index k = 4000;
  for (const Index n : {Index{17}, Index{33}, Index{49}, Index{333}}) {
    INFO("n " << n);
    const Matrix<double> x = test::random_matrix<double>(1, k, rng), w = test::random_matrix<double>(n, k, rng);
    const Matrix<double> b = w.transpose(), y0 = test::random_matrix<double>(1, n, rng);
    with_threads(4, [&] { CHECK(parallel_threads(n / 16, 24.0 * n * k) == std::min<Index>(4, n / 16)); });
    std::vector<std::vector<Matrix<double>>> out;
    for (int t : {1, 2, 3, 4})
      with_threads(t, [&] {
        std::vector<Matrix<double>> o(5);
        gemm(o[0], x, w.transpose());
        gemm(o[1], x, b, 0.5);
        o[2] = y0;
        gemm(o[2], x, w.transpose(), -2.0, true);
        o[3] = Matrix<double>::Zero(3, n + 4);
        gemm(o[3].block(1, 2, 1, n), x, w.transpose());  // a block destination: only its block is written
        gemm(o[4], 0.7 * x, 0.3 * w.transpose());        // scalar factors are folded before the split
        out.push_back(o);
      });
    const Matrix<double> want = x * w.transpose();
    for (std::size_t t = 1; t < out.size(); ++t)
      for (std::size_t i = 0; i < out[0].size(); ++i) {
        INFO("threads " << t + 1 << ", product " << i);
        CHECK(out[t][i] == out[0][i]);
      }
    const std::vector<Matrix<double>>& o = out[1];
    CHECK(relative_error(o[0], want) < 1e-13);
    CHECK(relative_error(o[1], Matrix<double>(0.5 * want)) < 1e-13);
    CHECK(relative_error(o[2], Matrix<double>(y0 - 2.0 * want)) < 1e-13);
    CHECK(relative_error(Matrix<double>(o[3].block(1, 2, 1, n)), want) < 1e-13);
    CHECK(o[3].row(0).isZero(0));
    CHECK(o[3].leftCols(2).isZero(0));
    CHECK(o[3].rightCols(2).isZero(0));
    CHECK(relative_error(o[4], Matrix<double>(0.21 * want)) < 1e-13);
  }
}

TEST_CASE("attention forward and backward on two threads equal one thread", "[parallel][attention]") {
  // Large enough that forward and backward split their (sequence, head) items (asserted below).
  const Index d = 64, H = 4, B = 6, S = 32, l = 3;
  for (const bool prefix : {false, true}) {
    INFO("prefix " << prefix);
    Rng rng(11);
    MultiHeadAttention<double> attn(d, H, rng, AttentionOptions{true, true}, "layers.0.attn");
    LoraConfig lora;
    lora.r = 4;
    lora.alpha = 8.0;
    attn.q_proj.add_adapter("default", lora, rng);
    attn.visit_parameters([&](const std::string&, Parameter<double>& p) {
      p.value = test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.3);
      p.set_trainable(true);
    });
    const SequenceLayout layout(B, S, {32, 7, 32, 19, 1, 30});
    const Matrix<double> x = test::random_matrix<double>(B * S, d, rng), g = test::random_matrix<double>(B * S, d, rng);
    const Matrix<double> pk = test::random_matrix<double>(l, d, rng), pv = test::random_matrix<double>(l, d, rng);
    const PrefixKV<double> pkv{pk, pv};
    struct Result {
      Matrix<double> y, dx, dpk, dpv;
      std::vector<std::pair<std::string, Matrix<double>>> grads;
    };
    const auto run = [&](int threads) {
      Result r;
      with_threads(threads, [&] {
        typename MultiHeadAttention<double>::Cache cache;
        attn.zero_grad();
        attn.forward(x, layout, r.y, cache, prefix ? &pkv : nullptr);
        r.dpk = Matrix<double>::Zero(l, d);
        r.dpv = Matrix<double>::Zero(l, d);
        PrefixGrad<double> dp{r.dpk, r.dpv};
        attn.backward(cache, g, &r.dx, prefix ? &dp : nullptr);
        r.grads = grads_of(attn);
      });
      return r;
    };
    with_threads(2, [&] {
      CHECK(parallel_threads(B * H, 4.0 * B * H * S * S * (d / H)) == 2);
      CHECK(parallel_threads(H, 8.0 * B * H * S * S * (d / H)) == 2);
    });
    const Result one = run(1), two = run(2);
    CHECK(relative_error(two.y, one.y) < 1e-12);
    CHECK(relative_error(two.dx, one.dx) < 1e-12);
    if (prefix) {
      CHECK(relative_error(two.dpk, one.dpk) < 1e-12);
      CHECK(relative_error(two.dpv, one.dpv) < 1e-12);
    }
    check_same_grads(one.grads, two.grads);
  }
}

TEST_CASE("llama forward and backward on two threads equal one thread (GQA, padding, prefix, LoRA)",
          "[parallel][llama]") {
  LlamaConfig c;
  c.vocab_size = 50;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.rope.theta = 100.0;
  const Index B = 6, S = 32;
  for (int kind : {0, 1, 2}) {  // LoRA; + prefix tuning; + a sliding window of 9
    INFO("kind " << kind);
    Rng rng(5);
    LlamaConfig ck = c;
    if (kind == 2) ck.sliding_window = 9;
    LlamaForCausalLM<double> model(ck, rng);
    if (kind == 1) model.add_prefix_tuning(3, rng);
    LoraConfig lora;
    lora.r = 4;
    lora.alpha = 8.0;
    for (auto& layer : model.model.layers) {
      layer.self_attn.v_proj.add_adapter("default", lora, rng);
      layer.mlp.down_proj.add_adapter("default", lora, rng);
    }
    model.visit_parameters([&](const std::string&, Parameter<double>& p) {
      p.value = test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.3);
      p.set_trainable(true);
    });
    SequenceLayout layout(B, S, {32, 5, 32, 17, 1, 29});
    layout.left_padded = kind != 1;
    std::vector<Index> ids(static_cast<std::size_t>(B * S));
    for (Index& id : ids) id = static_cast<Index>(rng.uniform_int(50));
    std::vector<std::int64_t> labels(ids.begin(), ids.end());
    const SequenceLayout out = model.output_layout(layout);
    const std::vector<std::int64_t> lab = model.prompt_labels(labels, layout);
    struct Result {
      Matrix<double> logits;
      std::vector<std::pair<std::string, Matrix<double>>> grads;
    };
    const auto run = [&](int threads) {
      Result r;
      with_threads(threads, [&] {
        typename LlamaForCausalLM<double>::Cache cache;
        Matrix<double> dlogits;
        model.zero_grad();
        model.forward(ids, layout, r.logits, cache);
        causal_lm_loss<double>(r.logits, lab, out, &dlogits);
        model.backward(cache, dlogits);
        r.grads = grads_of(model);
      });
      return r;
    };
    const Result one = run(1), two = run(2);
    CHECK(relative_error(two.logits, one.logits) < 1e-12);
    check_same_grads(one.grads, two.grads);
  }
}

TEST_CASE("column sums equal a row-by-row loop and do not depend on the thread count", "[parallel][elementwise]") {
  for (Index cols : {Index{1}, Index{37}, Index{64}, Index{130}}) {
    Matrix<double> a = Matrix<double>::Random(4000, cols), b = Matrix<double>::Random(4000, cols);
    Matrix<double> ref_s = Matrix<double>::Constant(1, cols, 0.5),
                   ref_p = ref_s;  // sums added once, as the library does
    RowVector<double> sum_s = RowVector<double>::Zero(cols), sum_p = RowVector<double>::Zero(cols);
    for (Index i = 0; i < a.rows(); ++i) {
      sum_s += a.row(i);
      sum_p += a.row(i).cwiseProduct(b.row(i));
    }
    ref_s.row(0) += sum_s;
    ref_p.row(0) += sum_p;
    for (int t : {1, 2}) {
      INFO("cols " << cols << ", threads " << t);
      Matrix<double> s = Matrix<double>::Constant(1, cols, 0.5), p = s, q = s;
      const RowVector<double> scale = RowVector<double>::LinSpaced(cols, -1.5, 2.0);
      with_threads(t, [&] {
        add_column_sums<double>(a, s.data());
        add_column_product_sums<double>(a, b, p.data());
        add_column_sums<double>(a, q.data(), scale.data());  // q[j] += scale[j] Σ_i a(i, j)
      });
      CHECK(relative_error(s, ref_s) < 1e-14);
      CHECK(relative_error(p, ref_p) < 1e-14);
      const Matrix<double> ref_q = (0.5 + scale.array() * sum_s.array()).matrix();
      CHECK(relative_error(q, ref_q) < 1e-14);
    }
  }
}

TEST_CASE("LayerNorm and activations on two threads equal one thread bit for bit", "[parallel][elementwise]") {
  LayerNorm<double> ln(96, 1e-5, true, "ln");
  ln.weight.value.setRandom();
  ln.bias.value.setRandom();
  const Matrix<double> x = Matrix<double>::Random(3000, 96), dy = Matrix<double>::Random(3000, 96);
  Matrix<double> y[2], dx[2], g[2], act[2], dact[2], fp;
  for (int t : {1, 2}) {
    with_threads(t, [&] {
      typename LayerNorm<double>::Cache c;
      ln.weight.zero_grad();
      ln.bias.zero_grad();
      ln.forward(x, y[t - 1], c);
      ln.backward(c, dy, &dx[t - 1]);
      g[t - 1].resize(2, 96);
      g[t - 1].row(0) = ln.weight.grad.row(0);
      g[t - 1].row(1) = ln.bias.grad.row(0);
      activation_forward<double>(Activation::GELU, x, act[t - 1]);
      activation_backward<double>(Activation::GELU, x, dy, dact[t - 1], fp);
    });
  }
  CHECK(y[0] == y[1]);
  CHECK(dx[0] == dx[1]);
  CHECK(g[0] == g[1]);
  CHECK(act[0] == act[1]);
  CHECK(dact[0] == dact[1]);
}

TEST_CASE("RMSNorm, causal_lm_loss and AdamW on two threads equal one thread bit for bit", "[parallel][elementwise]") {
  SECTION("RMSNorm forward and backward, with the weight gradient") {
    RMSNorm<double> norm(80, 1e-6, "norm");
    norm.weight.value.setRandom();
    const Matrix<double> x = Matrix<double>::Random(4000, 80), dy = Matrix<double>::Random(4000, 80);
    Matrix<double> y[2], dx[2], g[2];
    for (int t : {1, 2})
      with_threads(t, [&] {
        typename RMSNorm<double>::Cache c;
        norm.weight.zero_grad();
        norm.forward(x, y[t - 1], c);
        norm.backward(c, dy, &dx[t - 1]);
        g[t - 1] = norm.weight.grad;
      });
    CHECK(y[0] == y[1]);
    CHECK(dx[0] == dx[1]);
    CHECK(g[0] == g[1]);
    CHECK(g[0].cwiseAbs().maxCoeff() > 0.0);
  }
  SECTION("causal_lm_loss: loss, stats and dlogits; a non-finite row is still reported by row") {
    const Index B = 6, S = 50, V = 700;
    const Matrix<double> logits = Matrix<double>::Random(B * S, V);
    std::vector<std::int64_t> labels(static_cast<std::size_t>(B * S));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int64_t>((i * 37) % V);
    labels[5] = -100;  // an ignored target
    const SequenceLayout layout(B, S, {50, 31, 50, 7, 50, 44});
    double loss[2];
    Matrix<double> d[2];
    CausalLMStats st[2];
    for (int t : {1, 2})
      with_threads(t, [&] { loss[t - 1] = causal_lm_loss<double>(logits, labels, layout, &d[t - 1], &st[t - 1]); });
    CHECK(loss[0] == loss[1]);
    CHECK(st[0].nll_sum == st[1].nll_sum);
    CHECK(st[0].tokens == st[1].tokens);
    CHECK(st[0].tokens == (49 + 30 + 49 + 6 + 49 + 43) - 1);
    CHECK(d[0] == d[1]);
    Matrix<double> bad = logits;
    bad(211, 3) = std::numeric_limits<double>::quiet_NaN();  // row 211: sequence 4, position 11
    with_threads(2, [&] {
      PEFT_REQUIRE_THROWS_WITH(causal_lm_loss<double>(bad, labels, layout, &d[0]), NumericError, "logits row 211");
    });
  }
  SECTION("AdamW: three steps over a tensor large enough to be split") {
    Parameter<double> p[2] = {Parameter<double>(500, 400), Parameter<double>(500, 400)};
    p[0].value.setRandom();
    p[1].value = p[0].value;
    const Matrix<double> g1 = Matrix<double>::Random(500, 400), g2 = Matrix<double>::Random(500, 400);
    for (int t : {1, 2})
      with_threads(t, [&] {
        AdamW<double> opt(std::vector<NamedParameter<double>>{{"w", &p[t - 1]}},
                          AdamWOptions{0.01, 0.9, 0.99, 1e-8, 0.1});
        for (const Matrix<double>* g : {&g1, &g2, &g1}) {
          p[t - 1].grad = *g;
          opt.step();
        }
      });
    CHECK(p[0].value == p[1].value);
  }
}

TEST_CASE("element-wise helpers on two threads equal one thread bit for bit, and their formula",
          "[parallel][elementwise]") {
  // Widths with a vector tail (37, 130) and without (64): a + b·c may become one fused multiply-add
  // in scalar code only, so a split that moved a tail would change the rounding.
  const Index rows = 9000;
  for (Index cols : {Index{37}, Index{64}, Index{130}}) {
    INFO("cols " << cols);
    with_threads(2, [&] { CHECK(parallel_threads(rows, 4.0 * static_cast<double>(rows * cols)) == 2); });
    const Matrix<double> a = Matrix<double>::Random(rows, cols), b = Matrix<double>::Random(rows, cols);
    const RowVector<double> v = RowVector<double>::Random(cols);
    Matrix<double> out[2][6];
    for (int t : {1, 2})
      with_threads(t, [&] {
        Matrix<double>* o = out[t - 1];
        parallel_scale<double>(o[0], 0.75, a);
        parallel_scaled_sum<double>(o[1], a, 0.75, b);
        parallel_scale_columns<double>(o[2], a, v);
        o[3] = a;
        parallel_scale_columns<double>(o[3], o[3], v);  // in place
        o[4] = b;
        parallel_add_scaled_columns<double>(o[4], a, v);
        parallel_add_self_scaled_columns<double>(o[5], a, v);
      });
    const Matrix<double> want[6] = {
        0.75 * a,
        a + 0.75 * b,
        (a.array().rowwise() * v.array()).matrix(),
        (a.array().rowwise() * v.array()).matrix(),
        (b.array() + a.array().rowwise() * v.array()).matrix(),
        (a.array() + a.array().rowwise() * v.array()).matrix(),
    };
    for (int k = 0; k < 6; ++k) {
      INFO("helper " << k);
      CHECK(out[0][k] == out[1][k]);
      CHECK(relative_error(out[1][k], want[k]) < 1e-15);
    }
  }
  // dst may be an input.
  Matrix<double> x = Matrix<double>::Random(9000, 37), y = Matrix<double>::Random(9000, 37);
  const Matrix<double> want = x + 0.5 * y;
  with_threads(2, [&] { parallel_scaled_sum<double>(y, x, 0.5, y); });
  CHECK(relative_error(y, want) < 1e-15);
}

TEST_CASE("(IA)^3 and bottleneck adapters on two threads equal one thread bit for bit", "[parallel][elementwise]") {
  // Rows enough that every element-wise pass splits (the narrowest, [rows, d], and the column sums
  // over d in 64-column blocks): the output gains (k_proj-like, with a bias), the folded input gain
  // (down-projection-like), and a Houlsby adapter with a scaling.
  const Index rows = 4000, d = 96, f = 150;
  with_threads(2, [&] {
    CHECK(parallel_threads(rows, 4.0 * static_cast<double>(rows * d)) == 2);
    CHECK(parallel_threads((d + 63) / 64, 4.0 * static_cast<double>(rows * d)) == 2);
  });
  Rng rng(29);
  const Matrix<double> x = test::random_matrix<double>(rows, d, rng), dy = test::random_matrix<double>(rows, d, rng);
  const Matrix<double> xf = test::random_matrix<double>(rows, f, rng);
  SECTION("output and input scaling") {
    for (const bool feedforward : {false, true}) {
      INFO("feedforward " << feedforward);
      AdaptedLinear<double> lin(feedforward ? f : d, d, rng, true, "blk.lin");
      auto& m = add_ia3_adapter(lin, "ia3", feedforward);
      m.l.value = test::random_matrix<double>(m.l.value.rows(), m.l.value.cols(), rng);
      const Matrix<double>& input = feedforward ? xf : x;
      typename AdaptedLinear<double>::Cache c;
      lin.forward(input, c);
      CHECK(c.folded == feedforward);  // the input gain scales the base product's input
      check_same_on_two_threads(lin, input, dy);
    }
  }
  SECTION("Houlsby adapter with a scaling") {
    AdapterOptions o;
    o.bottleneck = 9;
    o.scaling = 0.7;
    o.init = AdapterInit::Bert;
    Adapter<double> ad(d, o, rng, true, "blk.adapter");
    check_same_on_two_threads(ad, x, dy);
  }
}
