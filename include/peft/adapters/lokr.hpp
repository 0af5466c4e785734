#pragma once
// LoKr: low-rank Kronecker product adaptation (Edalati et al., 2022, "KronA: Parameter Efficient
// Tuning with Kronecker Adapter"; Yeh et al., ICLR 2024, "Navigating Text-To-Image Customization:
// From LyCORIS Fine-Tuning to Model Evaluation"), as Hugging Face PEFT 0.21.2 implements it for
// nn.Linear.
//
//   (in_m, in_n) = factorization(in, f),  (out_l, out_k) = factorization(out, f)
//   w1 [out_l, in_m] = lokr_w1 or lokr_w1_a [out_l, r] · lokr_w1_b [r, in_m]
//   w2 [out_k, in_n] = lokr_w2 or lokr_w2_a [out_k, r] · lokr_w2_b [r, in_n]
//   ΔW = s · kron(w1, w2)  [out, in],  s = alpha / r       (torch.kron: ΔW[i·out_k + p, j·in_n + q] = w1[i,j] w2[p,q])
//   forward:  y += x ΔWᵀ, never materialising ΔW: with X_n = row n of x reshaped [in_m, in_n]
//             (row-major, X_n[j, q] = x[n, j·in_n + q]), row n of the term reshaped [out_l, out_k] is
//             Y_n = s · w1 X_n w2ᵀ
//   merge:    W += ΔW;  unmerge: W −= ΔW;  rank(ΔW) = rank(w1) · rank(w2)
//   LoRA form (exact): w1 = U1 V1, w2 = U2 V2 (a factored w = w_a · w_b; a full w = w · I or I · w,
//             whichever inner size is smaller) give kron(w1, w2) = kron(U1, U2) · kron(V1, V2), rank
//             inner(w1) · inner(w2), scaling s.
//
// Full or factored (PEFT, Linear): w1 is factored iff decompose_both and r < max(out_l, in_m) / 2;
// w2 is factored iff r < max(out_k, in_n) / 2 (true division). A loader derives the layout from the
// keys present instead (lokr_layout_from_shapes).
//
// Init (PEFT): init_weights=true: w1 (or w1_a) = 0, the others kaiming-uniform(a=√5);
// "lycoris": w2 (or w2_b) = 0, the others kaiming-uniform; false: all kaiming-uniform.
//
// Training only (identity in eval): rank_dropout multiplies the rows of ΔW by a 0/1 mask (divided
// by its mean iff rank_dropout_scale); module_dropout skips the whole term with probability p.
#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "peft/adapters/common.hpp"
#include "peft/adapters/method.hpp"
#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/init.hpp"
#include "peft/core/rng.hpp"
#include "peft/merge/lora_factors.hpp"

namespace peft {

enum class LokrInit {
  Default,  ///< init_weights=true: w1 (or w1_a) = 0, so ΔW = 0
  Lycoris,  ///< init_weights="lycoris": w2 (or w2_b) = 0, so ΔW = 0
  Random,   ///< init_weights=false: every factor kaiming-uniform (NOT identity at init)
};

/// LoKrConfig for one module, with PEFT's option names (r and alpha after rank_pattern /
/// alpha_pattern have been resolved for the module).
struct LokrConfig {
  int r = 8;
  double alpha = 8.0;
  bool decompose_both = false;
  int decompose_factor = -1;
  double rank_dropout = 0.0;          ///< training only: row mask on ΔW
  double module_dropout = 0.0;        ///< training only: skip the term with this probability
  bool rank_dropout_scale = false;    ///< divide the rank-dropout mask by its mean
  bool use_effective_conv2d = false;  ///< Conv layers only: no effect on Linear
  LokrInit init_weights = LokrInit::Default;

  /// s = alpha / r (a Python float in PEFT: no float32 rounding; always applied, even with two full factors).
  double scaling() const { return alpha / static_cast<double>(r); }
};

/// LyCORIS' factorization(dimension, factor) as PEFT copies it: (m, n) with m · n = dimension.
/// A positive factor that divides gives (factor, dimension / factor), unsorted; otherwise the
/// divisor pair closest to √dimension with m ≤ factor (factor -1: no cap), smaller first.
inline std::pair<Index, Index> lokr_factorization(Index dimension, int factor = -1) {
  if (dimension <= 0) throw ConfigError("LoKr factorization: dimension must be >= 1, got " + std::to_string(dimension));
  if (factor > 0 && dimension % factor == 0) return {factor, dimension / factor};
  const Index cap = factor == -1 ? dimension : static_cast<Index>(factor);
  Index m = 1, n = dimension;
  const Index length = m + n;  // never updated, as in PEFT
  while (m < n) {
    Index new_m = m + 1;
    while (dimension % new_m != 0) ++new_m;
    const Index new_n = dimension / new_m;
    if (new_m + new_n > length || new_m > cap) break;
    m = new_m;
    n = new_n;
  }
  if (m > n) std::swap(m, n);
  return {m, n};
}

/// Shapes of the two Kronecker factors and whether each is stored full or as a low-rank pair.
struct LokrLayout {
  Index out_l = 1, out_k = 1;  ///< out = out_l · out_k
  Index in_m = 1, in_n = 1;    ///< in = in_m · in_n
  bool w1_full = true;         ///< lokr_w1 [out_l, in_m], else lokr_w1_a [out_l, r], lokr_w1_b [r, in_m]
  bool w2_full = true;         ///< lokr_w2 [out_k, in_n], else lokr_w2_a [out_k, r], lokr_w2_b [r, in_n]

  bool operator==(const LokrLayout& o) const {
    return out_l == o.out_l && out_k == o.out_k && in_m == o.in_m && in_n == o.in_n && w1_full == o.w1_full &&
           w2_full == o.w2_full;
  }
  bool operator!=(const LokrLayout& o) const { return !(*this == o); }
};

/// The layout PEFT creates for an nn.Linear (in, out) under `config`.
inline LokrLayout lokr_layout(Index in, Index out, const LokrConfig& config) {
  LokrLayout l;
  std::tie(l.in_m, l.in_n) = lokr_factorization(in, config.decompose_factor);
  std::tie(l.out_l, l.out_k) = lokr_factorization(out, config.decompose_factor);
  const double r = static_cast<double>(config.r);
  l.w1_full = !(config.decompose_both && r < static_cast<double>(std::max(l.out_l, l.in_m)) / 2.0);
  l.w2_full = !(r < static_cast<double>(std::max(l.out_k, l.in_n)) / 2.0);
  return l;
}

/// The layout of a file's tensors for one module: `shapes` maps the parameter names present
/// (lokr_w1 or lokr_w1_a + lokr_w1_b, lokr_w2 or lokr_w2_a + lokr_w2_b) to their [rows, cols].
/// Checks that they fit together, that the inner size of a factored pair is r, and that
/// rows(w1)·rows(w2) = out, cols(w1)·cols(w2) = in. `who` names the module in messages.
inline LokrLayout lokr_layout_from_shapes(Index in, Index out, int r,
                                          const std::map<std::string, std::pair<Index, Index>>& shapes,
                                          const std::string& who = "") {
  const std::string w = describe("LoKr", who);
  for (const auto& kv : shapes)
    if (kv.first != "lokr_w1" && kv.first != "lokr_w1_a" && kv.first != "lokr_w1_b" && kv.first != "lokr_w2" &&
        kv.first != "lokr_w2_a" && kv.first != "lokr_w2_b")
      throw ConfigError(w + ": unsupported tensor \"" + kv.first +
                        "\" (lokr_t2 exists only for Conv layers with use_effective_conv2d)");
  auto factor = [&](const std::string& base, Index& rows, Index& cols) -> bool {
    const auto full = shapes.find(base), a = shapes.find(base + "_a"), b = shapes.find(base + "_b");
    if (full != shapes.end()) {
      if (a != shapes.end() || b != shapes.end())
        throw ConfigError(w + ": both " + base + " and " + base + "_a / " + base + "_b are present");
      rows = full->second.first;
      cols = full->second.second;
      return true;
    }
    if (a == shapes.end() || b == shapes.end())
      throw ConfigError(w + ": needs " + base + ", or both " + base + "_a and " + base + "_b");
    if (a->second.second != r || b->second.first != r)
      throw ShapeError(w + ": " + base + "_a has shape " + shape_str(a->second.first, a->second.second) + " and " +
                       base + "_b has shape " + shape_str(b->second.first, b->second.second) +
                       ", expected inner size r = " + std::to_string(r));
    rows = a->second.first;
    cols = b->second.second;
    return false;
  };
  LokrLayout l;
  l.w1_full = factor("lokr_w1", l.out_l, l.in_m);
  l.w2_full = factor("lokr_w2", l.out_k, l.in_n);
  if (l.out_l * l.out_k != out || l.in_m * l.in_n != in)
    throw ShapeError(w + ": Kronecker factors w1 " + shape_str(l.out_l, l.in_m) + " and w2 " +
                     shape_str(l.out_k, l.in_n) + " give ΔW " + shape_str(l.out_l * l.out_k, l.in_m * l.in_n) +
                     ", base weight is " + shape_str(out, in));
  return l;
}

/// One layer's LoKr term on an [out, in] base.
template <class T>
class LokrAdapter {
 public:
  static constexpr const char* kPeftType = "LOKR";  ///< Hugging Face PEFT's peft_type
  static constexpr const char* kKind = "LoKr";

  /// What backward needs from one forward.
  struct Cache {
    Index rows = 0;
    bool skipped = false;  ///< module dropout skipped the term (backward adds nothing)
    Matrix<T> x;           ///< the input [rows, in] = [rows·in_m, in_n] stacked X_n (dw2 = Hᵀ X)
    Matrix<T> xw2;         ///< stacked X_n w2ᵀ [rows·in_m, out_k] (dw1 = Σ G_n (X_n w2ᵀ)ᵀ)
    RowVector<T> mask;     ///< rank-dropout row mask [1, out]; empty when none
  };

  // Exactly one of each pair is used, per layout(): the other stays empty (0 × 0, frozen).
  Parameter<T> w1;    ///< lokr_w1 [out_l, in_m]
  Parameter<T> w1_a;  ///< lokr_w1_a [out_l, r]
  Parameter<T> w1_b;  ///< lokr_w1_b [r, in_m]
  Parameter<T> w2;    ///< lokr_w2 [out_k, in_n]
  Parameter<T> w2_a;  ///< lokr_w2_a [out_k, r]
  Parameter<T> w2_b;  ///< lokr_w2_b [r, in_n]

  /// PEFT's layout for (in, out) under config.
  LokrAdapter(Index in, Index out, const LokrConfig& config, Rng& rng, std::string name = "")
      : LokrAdapter(in, out, config, checked_layout(in, out, config, name), rng, std::move(name)) {}

  /// An explicit layout (e.g. lokr_layout_from_shapes of a file's tensors).
  LokrAdapter(Index in, Index out, const LokrConfig& config, const LokrLayout& layout, Rng& rng, std::string name = "");

  const LokrConfig& config() const { return config_; }
  const LokrLayout& layout() const { return layout_; }
  const std::string& name() const { return name_; }
  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  double scaling() const { return config_.scaling(); }
  int rank() const { return config_.r; }

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool training() const { return training_; }

  /// (PEFT file key, model state name, parameter) for the factors this layout uses.
  /// Over the tensors the layout uses (those tensors() lists).
  bool any_trainable() const {
    return (layout_.w1_full ? w1.trainable() : (w1_a.trainable() || w1_b.trainable())) ||
           (layout_.w2_full ? w2.trainable() : (w2_a.trainable() || w2_b.trainable()));
  }

  std::vector<AdapterTensor<T>> tensors(const std::string& module_path, const std::string& adapter) {
    std::vector<std::pair<const char*, Parameter<T>*>> ps;
    if (layout_.w1_full)
      ps.push_back({"lokr_w1", &w1});
    else
      ps.insert(ps.end(), {{"lokr_w1_a", &w1_a}, {"lokr_w1_b", &w1_b}});
    if (layout_.w2_full)
      ps.push_back({"lokr_w2", &w2});
    else
      ps.insert(ps.end(), {{"lokr_w2_a", &w2_a}, {"lokr_w2_b", &w2_b}});
    std::vector<AdapterTensor<T>> v;
    for (const auto& p : ps)
      v.push_back({peft_file_key(module_path, p.first), peft_model_name(module_path, p.first, adapter), p.second});
    return v;
  }

  /// y += x ΔWᵀ without forming ΔW: row n gets s · vec(w1 X_n w2ᵀ); x [rows, in], y [rows, out].
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
    detail::check_io<T>("LoKr", name_, x, y, in_, out_);
    check_factors();
    const Index n = x.rows();
    const LokrLayout& l = layout_;
    cache.rows = n;
    cache.skipped = training_ && detail::draw_module_skip(config_.module_dropout, rng_);
    if (cache.skipped) return;
    if (training_ && config_.rank_dropout > 0.0)
      detail::draw_row_mask<T>(cache.mask, out_, config_.rank_dropout, config_.rank_dropout_scale, rng_);
    else
      cache.mask.resize(0);
    const Matrix<T>& W1 = effective_w1();
    const Matrix<T>& W2 = effective_w2();
    cache.x = x;
    const ConstMatrixMap<T> X(cache.x.data(), n * l.in_m, l.in_n);  // stacked X_n   [rows·in_m, in_n]
    cache.xw2.resize(n * l.in_m, l.out_k);
    cache.xw2.noalias() = X * W2.transpose();  // stacked X_n w2ᵀ   [rows·in_m, out_k]
    term_.resize(n, out_);
    for (Index i = 0; i < n; ++i) {
      MatrixMap<T> Yi(term_.data() + i * out_, l.out_l, l.out_k);
      Yi.noalias() = W1 * ConstMatrixMap<T>(cache.xw2.data() + i * l.in_m * l.out_k, l.in_m, l.out_k);  // w1 X_n w2ᵀ
    }
    const T s = static_cast<T>(scaling());
    if (cache.mask.size() > 0)
      y.array() += s * (term_.array().rowwise() * cache.mask.array());  // rows of ΔW ⊙ mask
    else
      y += s * term_;  // y += s · vec(w1 X_n w2ᵀ)   [rows, out]
  }

  /// Accumulates the gradients of the trainable factors; adds dX into *dx ([rows, in]) when given.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
    detail::check_grad_io<T>("LoKr", name_, dy, dx, cache.rows, in_, out_);
    if (cache.skipped) return;
    const Index n = cache.rows;
    const LokrLayout& l = layout_;
    check::shape("LoKr", name_, "cache x", cache.x.rows(), cache.x.cols(), n, in_);
    check::shape("LoKr", name_, "cache xw2", cache.xw2.rows(), cache.xw2.cols(), n * l.in_m, l.out_k);
    check_factors();
    const bool g1 = w1.trainable() || w1_a.trainable() || w1_b.trainable();
    const bool g2 = w2.trainable() || w2_a.trainable() || w2_b.trainable();
    if (!g1 && !g2 && dx == nullptr) return;
    const Matrix<T>& W1 = effective_w1();
    const Matrix<T>& W2 = effective_w2();
    const T s = static_cast<T>(scaling());
    g_.resize(n, out_);
    if (cache.mask.size() > 0)
      g_.array() = s * (dy.array().rowwise() * cache.mask.array());  // G = s · dY ⊙ mask   [rows, out]
    else
      g_ = s * dy;  // G = s · dY   [rows, out];  G_n = row n reshaped [out_l, out_k]
    if (g1) {
      gw1_.setZero(l.out_l, l.in_m);
      for (Index i = 0; i < n; ++i)  // dw1 = Σ_n G_n (X_n w2ᵀ)ᵀ   [out_l, in_m]
        gw1_.noalias() += ConstMatrixMap<T>(g_.data() + i * out_, l.out_l, l.out_k) *
                          ConstMatrixMap<T>(cache.xw2.data() + i * l.in_m * l.out_k, l.in_m, l.out_k).transpose();
      if (l.w1_full) {
        if (w1.trainable()) w1.accumulator() += gw1_;  // dlokr_w1 = dw1
      } else {
        if (w1_a.trainable())
          w1_a.accumulator().noalias() += gw1_ * w1_b.value.transpose();  // dw1_a = dw1 w1_bᵀ [out_l, r]
        if (w1_b.trainable())
          w1_b.accumulator().noalias() += w1_a.value.transpose() * gw1_;  // dw1_b = w1_aᵀ dw1 [r, in_m]
      }
    }
    if (!g2 && dx == nullptr) return;
    h_.resize(n * l.in_m, l.out_k);
    for (Index i = 0; i < n; ++i)  // H_n = w1ᵀ G_n   [in_m, out_k]
      MatrixMap<T>(h_.data() + i * l.in_m * l.out_k, l.in_m, l.out_k).noalias() =
          W1.transpose() * ConstMatrixMap<T>(g_.data() + i * out_, l.out_l, l.out_k);
    if (g2) {
      const ConstMatrixMap<T> X(cache.x.data(), n * l.in_m, l.in_n);
      gw2_.resize(l.out_k, l.in_n);
      gw2_.noalias() = h_.transpose() * X;  // dw2 = Σ_n H_nᵀ X_n = Hᵀ X   [out_k, in_n]
      if (l.w2_full) {
        if (w2.trainable()) w2.accumulator() += gw2_;  // dlokr_w2 = dw2
      } else {
        if (w2_a.trainable())
          w2_a.accumulator().noalias() += gw2_ * w2_b.value.transpose();  // dw2_a = dw2 w2_bᵀ [out_k, r]
        if (w2_b.trainable())
          w2_b.accumulator().noalias() += w2_a.value.transpose() * gw2_;  // dw2_b = w2_aᵀ dw2 [r, in_n]
      }
    }
    if (dx == nullptr) return;
    MatrixMap<T> DX(dx->data(), n * l.in_m, l.in_n);
    DX.noalias() += h_ * W2;  // dX_n += H_n w2 = w1ᵀ G_n w2   [in_m, in_n] per row
  }

  /// dW = ΔW = s · kron(w1, w2)  [out, in] (resized if needed).
  void delta(Matrix<T>& dW) const {
    check_factors();
    Matrix<T> W1 = full_w1(), W2 = full_w2();
    const LokrLayout& l = layout_;
    const T s = static_cast<T>(scaling());
    dW.resize(out_, in_);
    for (Index i = 0; i < l.out_l; ++i)
      for (Index j = 0; j < l.in_m; ++j) dW.block(i * l.out_k, j * l.in_n, l.out_k, l.in_n) = (W1(i, j) * W2) * s;
  }

  /// Exact LoRA form: B' = kron(U1, U2) [out, k1·k2], A' = kron(V1, V2) [k1·k2, in], scaling s, with
  /// w = U V per factor (factored: w_a, w_b; full: the smaller of w·I and I·w).
  LoraFactors<T> to_factors() const {
    check_factors();
    Matrix<T> U1, V1, U2, V2;
    split(layout_.w1_full, w1, w1_a, w1_b, U1, V1);
    split(layout_.w2_full, w2, w2_a, w2_b, U2, V2);
    LoraFactors<T> f;
    f.B = kron<T>(U1, U2);
    f.A = kron<T>(V1, V2);
    f.scaling = scaling();
    f.name = name_;
    return f;
  }

 private:
  static LokrLayout checked_layout(Index in, Index out, const LokrConfig& config, const std::string& name) {
    if (in <= 0 || out <= 0)
      throw ShapeError(describe("LoKr", name) + ": base shape " + shape_str(out, in) + " is empty");
    if (config.r <= 0) throw ConfigError(describe("LoKr", name) + ": r must be >= 1, got " + std::to_string(config.r));
    return lokr_layout(in, out, config);
  }

  void validate() const {
    const char* k = "LoKr";
    if (in_ <= 0 || out_ <= 0)
      throw ShapeError(describe(k, name_) + ": base shape " + shape_str(out_, in_) + " is empty");
    if (config_.r <= 0) throw ConfigError(describe(k, name_) + ": r must be >= 1, got " + std::to_string(config_.r));
    if (!std::isfinite(config_.alpha))
      throw ConfigError(describe(k, name_) + ": alpha must be finite, got " + check::num(config_.alpha));
    check::unit_interval_open(k, name_, "rank_dropout", config_.rank_dropout);
    check::unit_interval_open(k, name_, "module_dropout", config_.module_dropout);
    const LokrLayout& l = layout_;
    if (l.out_l <= 0 || l.out_k <= 0 || l.in_m <= 0 || l.in_n <= 0 || l.out_l * l.out_k != out_ ||
        l.in_m * l.in_n != in_)
      throw ShapeError(describe(k, name_) + ": layout w1 " + shape_str(l.out_l, l.in_m) + " ⊗ w2 " +
                       shape_str(l.out_k, l.in_n) + " does not give the base shape " + shape_str(out_, in_));
  }

  /// The factors this layout uses have the expected shapes (a loader may have replaced them).
  void check_factors() const {
    const LokrLayout& l = layout_;
    const Index r = config_.r;
    if (l.w1_full) {
      check::shape("LoKr", name_, "lokr_w1", w1.value.rows(), w1.value.cols(), l.out_l, l.in_m);
    } else {
      check::shape("LoKr", name_, "lokr_w1_a", w1_a.value.rows(), w1_a.value.cols(), l.out_l, r);
      check::shape("LoKr", name_, "lokr_w1_b", w1_b.value.rows(), w1_b.value.cols(), r, l.in_m);
    }
    if (l.w2_full) {
      check::shape("LoKr", name_, "lokr_w2", w2.value.rows(), w2.value.cols(), l.out_k, l.in_n);
    } else {
      check::shape("LoKr", name_, "lokr_w2_a", w2_a.value.rows(), w2_a.value.cols(), l.out_k, r);
      check::shape("LoKr", name_, "lokr_w2_b", w2_b.value.rows(), w2_b.value.cols(), r, l.in_n);
    }
  }

  /// w1 (the parameter itself, or w1_a w1_b in a reused buffer).
  const Matrix<T>& effective_w1() {
    if (layout_.w1_full) return w1.value;
    w1_buf_.resize(layout_.out_l, layout_.in_m);
    w1_buf_.noalias() = w1_a.value * w1_b.value;
    return w1_buf_;
  }
  const Matrix<T>& effective_w2() {
    if (layout_.w2_full) return w2.value;
    w2_buf_.resize(layout_.out_k, layout_.in_n);
    w2_buf_.noalias() = w2_a.value * w2_b.value;
    return w2_buf_;
  }
  Matrix<T> full_w1() const { return layout_.w1_full ? w1.value : Matrix<T>(w1_a.value * w1_b.value); }
  Matrix<T> full_w2() const { return layout_.w2_full ? w2.value : Matrix<T>(w2_a.value * w2_b.value); }

  /// w = U V: (w_a, w_b) when factored; for a full w [m, k], (w, I_k) if k ≤ m else (I_m, w).
  static void split(bool full, const Parameter<T>& w, const Parameter<T>& wa, const Parameter<T>& wb, Matrix<T>& U,
                    Matrix<T>& V) {
    if (!full) {
      U = wa.value;
      V = wb.value;
    } else if (w.value.cols() <= w.value.rows()) {
      U = w.value;
      V = Matrix<T>::Identity(w.value.cols(), w.value.cols());
    } else {
      U = Matrix<T>::Identity(w.value.rows(), w.value.rows());
      V = w.value;
    }
  }

  LokrConfig config_;
  LokrLayout layout_;
  Index in_ = 0, out_ = 0;
  std::string name_;
  bool training_ = true;  // as Module: train mode until eval()
  Rng rng_;
  // Scratch reused across calls (backward rebuilds what it needs from the parameters).
  Matrix<T> w1_buf_, w2_buf_, term_, g_, gw1_, gw2_, h_;
};

template <class T>
LokrAdapter<T>::LokrAdapter(Index in, Index out, const LokrConfig& config, const LokrLayout& layout, Rng& rng,
                            std::string name)
    : config_(config), layout_(layout), in_(in), out_(out), name_(std::move(name)) {
  validate();
  const Index r = config.r;
  const LokrLayout& l = layout_;
  const bool zero1 = config.init_weights == LokrInit::Default;
  const bool zero2 = config.init_weights == LokrInit::Lycoris;
  if (l.w1_full) {
    w1 = Parameter<T>(l.out_l, l.in_m);
    if (!zero1) init::kaiming_uniform<T>(w1.value, rng);
  } else {
    w1_a = Parameter<T>(l.out_l, r);
    w1_b = Parameter<T>(r, l.in_m);
    if (!zero1) init::kaiming_uniform<T>(w1_a.value, rng);
    init::kaiming_uniform<T>(w1_b.value, rng);
  }
  if (l.w2_full) {
    w2 = Parameter<T>(l.out_k, l.in_n);
    if (!zero2) init::kaiming_uniform<T>(w2.value, rng);
  } else {
    w2_a = Parameter<T>(l.out_k, r);
    w2_b = Parameter<T>(r, l.in_n);
    init::kaiming_uniform<T>(w2_a.value, rng);
    if (!zero2) init::kaiming_uniform<T>(w2_b.value, rng);
  }
  for (Parameter<T>* p : {&w1, &w1_a, &w1_b, &w2, &w2_a, &w2_b})
    if (p->size() == 0) p->set_trainable(false);
  rng_.reseed(rng.next_u64());
}

/// The adapter as a kind of adapter for AdaptedLinear::add_adapter (`layer` names the host in messages).
template <class T>
std::unique_ptr<AdapterMethod<T>> make_lokr(const std::string& adapter_name, Index in, Index out,
                                            const LokrConfig& config, Rng& rng, const std::string& layer = "") {
  return std::make_unique<KernelMethod<T, LokrAdapter<T>>>(adapter_name, LokrAdapter<T>(in, out, config, rng, layer));
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class LokrAdapter<float>;
extern template class LokrAdapter<double>;
extern template class KernelMethod<float, LokrAdapter<float>>;
extern template class KernelMethod<double, LokrAdapter<double>>;
}  // namespace peft
#endif
