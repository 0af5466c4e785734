#pragma once
// Matrix products through Eigen's GEMM with packing space kept alive (issue 16).
//
// `dst.noalias() = a * b` runs Eigen's GEMM, which packs panels of both operands into two blocks
// of kc·mc and kc·nc scalars per product. Up to EIGEN_STACK_ALLOCATION_LIMIT (128 KiB) they live
// on the stack; above that, every product mallocs and frees them: on a transformer step that is
// ~130 allocations per step, and whenever glibc returns the memory, fresh pages to fault in again.
// peft::gemm runs the same Eigen kernels (same blocking sizes, same results bit for bit) but takes
// the blocks from a per-thread arena that only grows: after the first product of the largest
// shape, no product allocates.
//
//   gemm(dst, a, b)                 dst  = a · b
//   gemm(dst, a, b, alpha, true)    dst += alpha · a · b
// a and b are any Eigen expressions Eigen's own products accept: matrices, blocks, Refs, their
// .transpose(), scalar multiples (the scalar is folded into alpha as Eigen does). dst must already
// have its shape (a Matrix is resized to it by gemm when it can be). Tiny and vector-shaped
// products go to Eigen's own product code (no packing there). With EIGEN_USE_BLAS Eigen's GEMM
// entry point is the BLAS, which gets the call unchanged. With OpenMP, Eigen's parallel GEMM shares
// the A block (from the calling thread's arena); each worker still takes its own B block as Eigen
// does (from the heap above 128 KiB).
#include <Eigen/Core>
#include <type_traits>

#include "peft/core/types.hpp"

namespace peft {
namespace detail {

/// Per-thread packing space: grows to the largest blocks seen, never shrinks.
template <class T>
class GemmArena {
 public:
  GemmArena() = default;
  GemmArena(const GemmArena&) = delete;
  GemmArena& operator=(const GemmArena&) = delete;
  ~GemmArena() {
    Eigen::internal::aligned_delete(a_, size_a_);
    Eigen::internal::aligned_delete(b_, size_b_);
  }
  T* a(Index n) { return grow(a_, size_a_, n); }
  T* b(Index n) { return grow(b_, size_b_, n); }
  static GemmArena& local() {
    thread_local GemmArena arena;
    return arena;
  }

 private:
  static T* grow(T*& p, Index& size, Index n) {
    if (n > size) {
      Eigen::internal::aligned_delete(p, size);
      p = nullptr;
      size = 0;
      p = Eigen::internal::aligned_new<T>(n);
      size = n;
    }
    return p;
  }
  T* a_ = nullptr;
  T* b_ = nullptr;
  Index size_a_ = 0, size_b_ = 0;
};

/// Eigen's dynamic-size blocking (same kc, mc, nc as gemm_blocking_space) on the arena's memory.
template <int StorageOrder, class T>
class ArenaBlocking : public Eigen::internal::level3_blocking<T, T> {
 public:
  ArenaBlocking(Index rows, Index cols, Index depth, Index num_threads) { init(rows, cols, depth, num_threads, true); }
  // What Eigen's parallel GEMM calls (parallelize_gemm → gemm_functor::initParallelSession).
  void initParallel(Index rows, Index cols, Index depth, Index num_threads) {
    init(rows, cols, depth, num_threads, false);
  }
  void allocateA() {}
  void allocateB() {}
  void allocateAll() {}

 private:
  void init(Index rows, Index cols, Index depth, Index num_threads, bool l3_blocking) {
    constexpr bool transpose = StorageOrder == Eigen::RowMajor;
    this->m_mc = transpose ? cols : rows;
    this->m_nc = transpose ? rows : cols;
    this->m_kc = depth;
    if (l3_blocking) {  // gemm_blocking_space's constructor
      Eigen::internal::computeProductBlockingSizes<T, T, 1>(this->m_kc, this->m_mc, this->m_nc, num_threads);
    } else {  // its initParallel: the A block holds every row (shared by the threads), mc stays whole
      Index m = this->m_mc;
      Eigen::internal::computeProductBlockingSizes<T, T, 1>(this->m_kc, m, this->m_nc, num_threads);
    }
    GemmArena<T>& arena = GemmArena<T>::local();
    this->m_blockA = arena.a(this->m_mc * this->m_kc);
    this->m_blockB = arena.b(this->m_kc * this->m_nc);
  }
};

}  // namespace detail

/// dst = alpha · lhs · rhs (accumulate = false) or dst += alpha · lhs · rhs, on Eigen's GEMM
/// kernels with the calling thread's kept packing space (see the top of this file). dst must not
/// alias lhs or rhs (as with noalias()).
template <class Dst, class Lhs, class Rhs>
void gemm(Dst&& dst_in, const Eigen::MatrixBase<Lhs>& a_lhs, const Eigen::MatrixBase<Rhs>& a_rhs,
          typename std::remove_reference_t<Dst>::Scalar alpha = 1, bool accumulate = false) {
  using Dest = std::remove_reference_t<Dst>;
  using Scalar = typename Dest::Scalar;
  Dest& dst = dst_in;
  if constexpr (std::is_base_of_v<Eigen::PlainObjectBase<Dest>, Dest>) {
    if (!accumulate) dst.resize(a_lhs.rows(), a_rhs.cols());
  }
  eigen_assert(dst.rows() == a_lhs.rows() && dst.cols() == a_rhs.cols());
  const bool small = a_rhs.rows() + dst.rows() + dst.cols() < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD;
#if defined(EIGEN_USE_BLAS)
  constexpr bool eigen_kernels = false;  // the BLAS takes the products: nothing to keep
#else
  constexpr bool eigen_kernels = true;
#endif
  if (!eigen_kernels || small || dst.rows() == 1 || dst.cols() == 1 || a_lhs.cols() == 0) {
    if (dst.rows() == 1 && dst.cols() != 1 && !small) {
      // A row result as its transpose, dstᵀ = alpha · bᵀ aᵀ: Eigen folds alpha into the matrix
      // operand (bᵀ) and reads the row of a in place. Written as alpha · (a b), Eigen would fold
      // alpha into a and then copy a's only row, scaled, into a heap temporary on every call
      // (dW += dYᵀ X of a one-output head did).
      if (accumulate)
        dst.transpose().noalias() += alpha * (a_rhs.derived().transpose() * a_lhs.derived().transpose());
      else
        dst.transpose().noalias() = alpha * (a_rhs.derived().transpose() * a_lhs.derived().transpose());
      return;
    }
    if (accumulate)
      dst.noalias() += alpha * (a_lhs.derived() * a_rhs.derived());
    else
      dst.noalias() = alpha * (a_lhs.derived() * a_rhs.derived());
    return;
  }
  if (!accumulate) dst.setZero();
  namespace ei = Eigen::internal;
  using LhsTraits = ei::blas_traits<Lhs>;
  using RhsTraits = ei::blas_traits<Rhs>;
  using ActualLhs = typename ei::remove_all<typename LhsTraits::DirectLinearAccessType>::type;
  using ActualRhs = typename ei::remove_all<typename RhsTraits::DirectLinearAccessType>::type;
  typename ei::add_const_on_value_type<typename LhsTraits::DirectLinearAccessType>::type lhs =
      LhsTraits::extract(a_lhs.derived());
  typename ei::add_const_on_value_type<typename RhsTraits::DirectLinearAccessType>::type rhs =
      RhsTraits::extract(a_rhs.derived());
  const Scalar actual_alpha = ei::combine_scalar_factors(alpha, a_lhs.derived(), a_rhs.derived());
  constexpr int dst_order = (Dest::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
  using Blocking = detail::ArenaBlocking<dst_order, Scalar>;
  using Functor =
      ei::gemm_functor<Scalar, Index,
                       ei::general_matrix_matrix_product<
                           Index, Scalar, (ActualLhs::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor,
                           bool(LhsTraits::NeedToConjugate), Scalar,
                           (ActualRhs::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor,
                           bool(RhsTraits::NeedToConjugate), dst_order, Dest::InnerStrideAtCompileTime>,
                       ActualLhs, ActualRhs, Dest, Blocking>;
  Blocking blocking(dst.rows(), dst.cols(), lhs.cols(), 1);
  ei::parallelize_gemm<true>(Functor(lhs, rhs, dst, actual_alpha, blocking), a_lhs.rows(), a_rhs.cols(), a_lhs.cols(),
                             bool(Dest::Flags & Eigen::RowMajorBit));
}

}  // namespace peft
