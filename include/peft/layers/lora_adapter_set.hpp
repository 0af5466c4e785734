#pragma once
// LoraAdapterSet: the named low-rank adapters of one layer, and the part of LoRA that does not
// depend on how the base weight is stored (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
// Language Models"; rsLoRA: Kalajdzievski, 2023), for NF4LoRALinear (4-bit base, QLoRA), which adds
// its base path around it. The dense host (AdaptedLinear) holds LoRA as a kind of adapter instead
// (adapters/lora.hpp); both share LoraMethod::create and check_lora_config.
//
//   adapter i:  A_i [r, in], B_i [out, r], s_i = alpha/r (alpha/√r with rsLoRA)
//   forward:    x̃ = dropout(x) = x ⊙ keep,  keep_jk ∈ {0, 1/(1−p)};   xa = x̃ Aᵀ [rows, r];
//               y += s · xa Bᵀ
//   backward:   dB = s · dYᵀ xa,   G = dY B,   dA = s · Gᵀ x̃,   dX += s · (G A) ⊙ keep
//
// Init (as Hugging Face PEFT): A kaiming-uniform(a=√5), B = 0, so the output equals the base
// exactly; "gaussian" draws A ~ N(0, (1/r)²) (PEFT: normal_(std=1/r)); "none" gives both
// nn.Linear's default init. Error messages name the owning layer's kind ("LoRALinear \"q\": ...").
//
// Trainability follows PEFT's set_adapter: making a set of adapters active makes exactly their
// parameters trainable and freezes the others (so an optimizer never decays an adapter that got
// no gradient). Adapters live on the heap: adding one never moves the others, so an optimizer's
// pointers to existing adapters' parameters stay valid.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/core/check.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"

namespace peft {

/// Per-adapter forward state of the low-rank path (a layer may derive to add its own fields).
template <class T>
struct LoraAdapterCache {
  std::size_t adapter = 0;  ///< index into adapters()
  Matrix<T> keep;           ///< dropout multiplier (0 or 1/(1−p)) [rows, in]; empty without dropout
  Matrix<T> xd;             ///< dropout(x) [rows, in]; empty without dropout (x is used)
  Matrix<T> xa;             ///< dropout(x) Aᵀ [rows, r]
};

/// A layer's forward state for backward: the input and one LoraAdapterCache-like entry (AC) per
/// active adapter. Reused across calls; backward refuses a cache filled under another generation.
template <class T, class AC = LoraAdapterCache<T>>
struct LoraForwardCache {
  Matrix<T> x;                   ///< the input, when backward needs it (dA without dropout, dW); else empty
  Index rows = 0;                ///< rows of the input of the last forward
  std::vector<AC> adapters;      ///< grows to the largest active set, then is reused
  std::size_t used = 0;          ///< entries of `adapters` filled by the last forward
  std::uint64_t generation = 0;  ///< layer state the cache was filled under (0: never filled)
};

/// A view of a layer's adapters in insertion order (A = LoraAdapter<T> or const LoraAdapter<T>):
/// size(), [i], front(), back(), range-for. Valid while the layer lives and no adapter is removed.
template <class A>
class LoraAdapterList {
  using Ptr = std::unique_ptr<std::remove_const_t<A>>;
  using Iter = typename std::vector<Ptr>::const_iterator;

 public:
  class iterator {
   public:
    explicit iterator(Iter it) : it_(it) {}
    A& operator*() const { return **it_; }
    A* operator->() const { return it_->get(); }
    iterator& operator++() {
      ++it_;
      return *this;
    }
    bool operator==(const iterator& o) const { return it_ == o.it_; }
    bool operator!=(const iterator& o) const { return it_ != o.it_; }

   private:
    Iter it_;
  };

  explicit LoraAdapterList(const std::vector<Ptr>& v) : v_(&v) {}
  std::size_t size() const { return v_->size(); }
  bool empty() const { return v_->empty(); }
  A& operator[](std::size_t i) const { return *(*v_)[i]; }
  A& front() const { return *v_->front(); }
  A& back() const { return *v_->back(); }
  iterator begin() const { return iterator(v_->begin()); }
  iterator end() const { return iterator(v_->end()); }

 private:
  const std::vector<Ptr>* v_;
};

namespace detail {

/// The leading [rows, cols] block of `buf`, growing it only when rows change or cols exceed
/// its width: no allocation once it has seen the largest shape (adapters of different ranks
/// share one buffer).
template <class T>
Eigen::Block<Matrix<T>> lora_scratch(Matrix<T>& buf, Index rows, Index cols) {
  if (buf.rows() != rows || buf.cols() < cols) buf.resize(rows, std::max(cols, buf.rows() == rows ? buf.cols() : cols));
  return buf.leftCols(cols);
}

/// The leading [n, n] block of `buf`, growing it only when n exceeds its size.
template <class T>
Eigen::Block<Matrix<T>> lora_scratch_square(Matrix<T>& buf, Index n) {
  if (buf.rows() < n || buf.cols() < n) buf.resize(n, n);
  return buf.topLeftCorner(n, n);
}

}  // namespace detail

template <class T>
class LoraAdapterSet {
 public:
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);

  /// `kind` names the owning layer in messages (a string literal: it is kept, not copied).
  LoraAdapterSet(const char* kind, std::uint64_t seed) : kind_(kind), rng_(seed) {}
  /// Copies are deep (a copied layer owns its own adapters); moves keep the adapters' addresses.
  LoraAdapterSet(const LoraAdapterSet& o)
      : kind_(o.kind_),
        active_(o.active_),
        generation_(o.generation_),
        rng_(o.rng_),
        work_g_(o.work_g_),
        work_dx_(o.work_dx_) {
    adapters_.reserve(o.adapters_.size());
    for (const auto& a : o.adapters_) adapters_.push_back(std::make_unique<LoraAdapter<T>>(*a));
  }
  LoraAdapterSet& operator=(const LoraAdapterSet& o) {
    if (this != &o) *this = LoraAdapterSet(o);
    return *this;
  }
  LoraAdapterSet(LoraAdapterSet&&) noexcept = default;
  LoraAdapterSet& operator=(LoraAdapterSet&&) noexcept = default;
  ~LoraAdapterSet() = default;

  // ---- adding adapters ----------------------------------------------------------------------

  /// Checks what every layer requires of a new adapter on an [out, in] base: a non-empty name
  /// without '.' (it becomes part of parameter names) not in use, r ≥ 1 (r > min(in, out) is warned about),
  /// alpha > 0, dropout in [0, 1).
  void check_new(const std::string& layer, const std::string& adapter_name, const LoraConfig& config, Index in,
                 Index out) const {
    const std::string who = describe(kind_, layer);
    check_adapter_name(who, adapter_name);
    if (find(adapter_name) != npos) throw ConfigError(who + ": adapter \"" + adapter_name + "\" already exists");
    check_lora_config(kind_, layer, config, in, out);
  }

  /// A fresh adapter [r, in] / [out, r] initialized per config.init (LoraMethod::create).
  static LoraAdapter<T> create(const std::string& adapter_name, const LoraConfig& config, Index in, Index out,
                               Rng& rng) {
    return LoraMethod<T>::create(adapter_name, config, in, out, rng);
  }

  /// Appends an adapter and makes it the only active one (PEFT's add_adapter + set_adapter: the
  /// others are frozen).
  LoraAdapter<T>& add(LoraAdapter<T> a);

  /// Removes adapter i; drops it from the active list (and from `also`, e.g. a merge list) and
  /// renumbers the indices after it.
  void erase(std::size_t i, std::vector<std::size_t>* also = nullptr);

  /// Activates exactly these adapters (duplicates dropped, order kept); they become trainable and
  /// every other adapter is frozen, as PEFT's set_adapter does.
  void set_active(const std::string& layer, const std::vector<std::string>& names);

  // ---- lookup -------------------------------------------------------------------------------

  std::size_t find(const std::string& n) const {
    for (std::size_t i = 0; i < adapters_.size(); ++i)
      if (adapters_[i]->name == n) return i;
    return npos;
  }

  /// find(), or ConfigError naming the layer and listing the adapters it has.
  std::size_t index_of(const std::string& layer, const std::string& n) const;

  std::vector<std::string> names_of(const std::vector<std::size_t>& idx) const {
    std::vector<std::string> out;
    for (std::size_t i : idx) out.push_back(adapters_[i]->name);
    return out;
  }

  /// "a, b, c" for messages.
  std::string join_names(const std::vector<std::size_t>& idx) const {
    std::string s;
    for (std::size_t i : idx) s += (s.empty() ? "" : ", ") + adapters_[i]->name;
    return s;
  }

  LoraAdapterList<LoraAdapter<T>> list() { return LoraAdapterList<LoraAdapter<T>>(adapters_); }
  LoraAdapterList<const LoraAdapter<T>> list() const { return LoraAdapterList<const LoraAdapter<T>>(adapters_); }
  LoraAdapter<T>& operator[](std::size_t i) { return *adapters_[i]; }
  const LoraAdapter<T>& operator[](std::size_t i) const { return *adapters_[i]; }
  const std::vector<std::size_t>& active() const { return active_; }

  /// Bumped by every change that invalidates a forward cache (add, erase, set_active, and the
  /// layer's own: merge, disable).
  std::uint64_t generation() const { return generation_; }
  void touch() { ++generation_; }

  /// Generator for dropout masks (and for add_adapter without an explicit one).
  Rng& rng() { return rng_; }

  // ---- low-rank forward / backward ----------------------------------------------------------

  /// The cache slot for the next adapter of this forward: reuses `caches[used]`, growing the
  /// vector only past the largest active set seen.
  template <class AC>
  static AC& next_slot(std::vector<AC>& caches, std::size_t& used, std::size_t adapter) {
    if (caches.size() <= used) caches.emplace_back();
    AC& ac = caches[used++];
    ac.adapter = adapter;
    return ac;
  }

  /// xa = x̃ Aᵀ [rows, r] with x̃ = x ⊙ keep when `drop` (a fresh mask from rng()), else x̃ = x and
  /// keep, xd are emptied. Reuses ac's buffers.
  void project(const ConstMatrixRef<T>& x, const LoraAdapter<T>& a, bool drop, LoraAdapterCache<T>& ac);

  /// Backward of one plain-LoRA term s·(x̃ Aᵀ) Bᵀ; `xt` is x̃ (ac.xd with dropout, else the cached
  /// x, only read when A is trainable). Accumulates dB, dA (those trainable), adds into *dx.
  void backward_lora(LoraAdapter<T>& a, const LoraAdapterCache<T>& ac, const Matrix<T>& xt, const ConstMatrixRef<T>& dy,
                     Matrix<T>* dx);

  /// Backward scratch shared by every adapter of the layer (reused across calls).
  Eigen::Block<Matrix<T>> scratch_g(Index rows, Index r) { return detail::lora_scratch<T>(work_g_, rows, r); }
  Matrix<T>& scratch_dx(Index rows, Index in) {
    work_dx_.resize(rows, in);
    return work_dx_;
  }

 private:
  std::vector<std::size_t> all() const {
    std::vector<std::size_t> idx(adapters_.size());
    for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i;
    return idx;
  }

  void fill_dropout_mask(Matrix<T>& keep, Index rows, Index cols, double p) {
    keep.resize(rows, cols);
    const T kept = static_cast<T>(1.0 / (1.0 - p));
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) keep(i, j) = rng_.uniform() < p ? T(0) : kept;
  }

  /// PEFT's set_adapter: exactly the active adapters' A, B (and DoRA magnitude) are trainable.
  void sync_trainable();

  const char* kind_;
  std::vector<std::unique_ptr<LoraAdapter<T>>> adapters_;  ///< on the heap: stable addresses
  std::vector<std::size_t> active_;                        ///< indices into adapters_, in activation order
  std::uint64_t generation_ = 1;
  Rng rng_;
  Matrix<T> work_g_;   ///< backward G = dY B [rows, ≥ r]
  Matrix<T> work_dx_;  ///< backward s G A [rows, in] (dropout only)
};

// ---- LoraAdapterSet members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
LoraAdapter<T>& LoraAdapterSet<T>::add(LoraAdapter<T> a) {
  adapters_.push_back(std::make_unique<LoraAdapter<T>>(std::move(a)));
  active_ = {adapters_.size() - 1};
  sync_trainable();
  ++generation_;
  return *adapters_.back();
}

template <class T>
void LoraAdapterSet<T>::erase(std::size_t i, std::vector<std::size_t>* also) {
  adapters_.erase(adapters_.begin() + static_cast<std::ptrdiff_t>(i));
  auto fix = [i](std::vector<std::size_t>& v) {
    v.erase(std::remove(v.begin(), v.end(), i), v.end());
    for (auto& k : v)
      if (k > i) --k;
  };
  fix(active_);
  if (also != nullptr) fix(*also);
  ++generation_;
}

template <class T>
void LoraAdapterSet<T>::set_active(const std::string& layer, const std::vector<std::string>& names) {
  std::vector<std::size_t> next;
  for (const auto& n : names) {
    const std::size_t i = index_of(layer, n);
    if (std::find(next.begin(), next.end(), i) == next.end()) next.push_back(i);
  }
  active_ = std::move(next);
  sync_trainable();
  ++generation_;
}

template <class T>
std::size_t LoraAdapterSet<T>::index_of(const std::string& layer, const std::string& n) const {
  const std::size_t i = find(n);
  if (i == npos)
    throw ConfigError(describe(kind_, layer) + ": unknown adapter \"" + n + "\"; available: [" + join_names(all()) +
                      "]");
  return i;
}

template <class T>
void LoraAdapterSet<T>::project(const ConstMatrixRef<T>& x, const LoraAdapter<T>& a, bool drop,
                                LoraAdapterCache<T>& ac) {
  ac.xa.resize(x.rows(), a.rank());
  if (drop) {
    fill_dropout_mask(ac.keep, x.rows(), x.cols(), a.config.dropout);
    ac.xd.resize(x.rows(), x.cols());
    ac.xd.array() = x.array() * ac.keep.array();
    ac.xa.noalias() = ac.xd * a.A.value.transpose();  // x̃ Aᵀ   [rows, r]
  } else {
    ac.keep.resize(0, 0);
    ac.xd.resize(0, 0);
    ac.xa.noalias() = x * a.A.value.transpose();  // x Aᵀ   [rows, r]
  }
}

template <class T>
void LoraAdapterSet<T>::backward_lora(LoraAdapter<T>& a, const LoraAdapterCache<T>& ac, const Matrix<T>& xt,
                                      const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
  const T s = static_cast<T>(a.scaling());
  if (a.B.trainable()) a.B.accumulator().noalias() += s * dy.transpose() * ac.xa;  // dB = s dYᵀ (x̃ Aᵀ)   [out, r]
  if (!a.A.trainable() && dx == nullptr) return;
  Eigen::Block<Matrix<T>> G = scratch_g(dy.rows(), a.rank());
  G.noalias() = dy * a.B.value;                                                // G = dY B   [rows, r]
  if (a.A.trainable()) a.A.accumulator().noalias() += s * G.transpose() * xt;  // dA = s Gᵀ x̃   [r, in]
  if (dx == nullptr) return;
  if (ac.keep.size() > 0) {
    Matrix<T>& t = scratch_dx(dy.rows(), a.A.value.cols());
    t.noalias() = s * G * a.A.value;             // s G A   [rows, in]
    dx->array() += t.array() * ac.keep.array();  // dropout backward: ⊙ keep
  } else {
    dx->noalias() += s * G * a.A.value;  // dX += s G A   [rows, in]
  }
}

template <class T>
void LoraAdapterSet<T>::sync_trainable() {
  for (std::size_t i = 0; i < adapters_.size(); ++i) {
    const bool on = std::find(active_.begin(), active_.end(), i) != active_.end();
    LoraAdapter<T>& a = *adapters_[i];
    a.A.set_trainable(on);
    a.B.set_trainable(on);
    if (a.magnitude.size() > 0) a.magnitude.set_trainable(on);
  }
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.cpp); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class LoraAdapterSet<float>;
extern template class LoraAdapterSet<double>;
}  // namespace peft
#endif
