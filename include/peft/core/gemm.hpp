#pragma once
// Matrix products through peft's own packed kernel (core/gemm_kernel.hpp; the default with
// AVX-512, see kOwnGemmKernel) or Eigen's GEMM, with packing space kept alive (issue 16).
//
// `dst.noalias() = a * b` runs Eigen's GEMM, which packs panels of both operands into two blocks
// of kc·mc and kc·nc scalars per product. Up to EIGEN_STACK_ALLOCATION_LIMIT (128 KiB) they live
// on the stack; above that, every product mallocs and frees them: on a transformer step that is
// ~130 allocations per step, and whenever glibc returns the memory, fresh pages to fault in again.
// On Eigen's path peft::gemm runs the same Eigen kernels (same blocking sizes, same results bit for
// bit) but takes the blocks from a per-thread arena that only grows (kernel::Arena, which the own
// kernel uses too). After the first product of the largest shape, no product allocates.
//
//   gemm(dst, a, b)                 dst  = a · b
//   gemm(dst, a, b, alpha, true)    dst += alpha · a · b
// a and b are any Eigen expressions Eigen's own products accept: matrices, blocks, Refs, their
// .transpose(), scalar multiples (the scalar is folded into alpha as Eigen does). dst must already
// have its shape (a Matrix is resized to it by gemm when it can be). Tiny and vector-shaped
// products go to Eigen's own product code (no packing there); with OpenMP a large row result (one
// token through a linear) is split by columns between threads. With EIGEN_USE_BLAS Eigen's GEMM
// entry point is the BLAS, which gets the call unchanged. With OpenMP (outside a parallel region),
// a large product is split into one slab of dst per thread, each computed by Eigen's sequential
// GEMM on that thread's arena: Eigen's own parallel GEMM shares one packed block between the
// threads, which then wait on each other, and mallocs a B block per worker and call. The own
// kernel's slabs are whole register tiles, and its k blocking depends on k alone: results do not
// depend on the thread count on either path.
#include <Eigen/Core>
#include <algorithm>
#include <type_traits>
#include <utility>

#include "peft/core/gemm_kernel.hpp"
#include "peft/core/parallel.hpp"
#include "peft/core/types.hpp"

namespace peft {
namespace detail {

/// Eigen's dynamic-size blocking (same kc, mc, nc as gemm_blocking_space) on the arena's memory.
template <int StorageOrder, class T>
class ArenaBlocking : public Eigen::internal::level3_blocking<T, T> {
 public:
  ArenaBlocking(Index rows, Index cols, Index depth, Index num_threads) {
    constexpr bool transpose = StorageOrder == Eigen::RowMajor;
    this->m_mc = transpose ? cols : rows;
    this->m_nc = transpose ? rows : cols;
    this->m_kc = depth;
    // gemm_blocking_space's constructor (peft::gemm only runs Eigen's sequential GEMM)
    Eigen::internal::computeProductBlockingSizes<T, T, 1>(this->m_kc, this->m_mc, this->m_nc, num_threads);
    // the calling thread's blocks, shared with the own kernel (core/gemm_kernel.hpp)
    kernel::Arena<T>& arena = kernel::Arena<T>::local();
    this->m_blockA = arena.a(this->m_mc * this->m_kc);
    this->m_blockB = arena.b(this->m_kc * this->m_nc);
  }
};

/// Whether peft::gemm runs peft's own kernel (core/gemm_kernel.hpp) on the products it fits, or
/// Eigen's GEBP throughout. Measured (README, "What limits one thread"): with AVX-512 the own
/// kernel runs the transformer step's products at 80 % of the FMA peak where Eigen 3.4's reach
/// 63 %; with AVX2 the own code was no faster (slower on 64³ blocks), with SSE2 even, and Eigen's
/// is kept.
/// Define PEFT_GEMM_OWN_KERNEL to 0 or 1 (the same in every translation unit) to choose. Under
/// EIGEN_USE_BLAS every product goes to the BLAS whatever this says.
#if defined(PEFT_GEMM_OWN_KERNEL)
inline constexpr bool kOwnGemmKernel = PEFT_GEMM_OWN_KERNEL;
#elif defined(EIGEN_VECTORIZE_AVX512)
inline constexpr bool kOwnGemmKernel = true;
#else
inline constexpr bool kOwnGemmKernel = false;
#endif

/// peft::gemm's body; Own: peft's kernel on the products it fits (tests call both versions).
template <bool Own, class Dst, class Lhs, class Rhs>
void gemm_impl(Dst&& dst_in, const Eigen::MatrixBase<Lhs>& a_lhs, const Eigen::MatrixBase<Rhs>& a_rhs,
               typename std::remove_reference_t<Dst>::Scalar alpha, bool accumulate) {
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
  // An operand that is a vector at compile time (a column as lhs: an outer product) goes to Eigen's
  // product code, which picks its outer-product or GEMV path and honours a vector's inner stride
  // (a column of a row-major matrix); both GEMM paths below assume unit inner strides.
  constexpr bool vector_operand = bool(Lhs::IsVectorAtCompileTime) || bool(Rhs::IsVectorAtCompileTime);
  if (!eigen_kernels || small || vector_operand || dst.rows() == 1 || dst.cols() == 1 || a_lhs.cols() == 0) {
    if (dst.rows() == 1 && dst.cols() != 1 && !small) {
      // A row result as its transpose, dstᵀ = alpha · bᵀ aᵀ: Eigen folds alpha into the matrix
      // operand (bᵀ) and reads the row of a in place. Written as alpha · (a b), Eigen would fold
      // alpha into a and then copy a's only row, scaled, into a heap temporary on every call
      // (dW += dYᵀ X of a one-output head did).
      //
      // A row times a matrix (one token through a linear, decoding with a KV cache) reads every
      // coefficient of b once and is bound by memory: ~0.24 ns per coefficient on one core when b
      // comes from L3 or DRAM (17 GB/s measured, bench_llama's generation), the time of ~24
      // multiply-adds in parallel_threads' units. With threads each computes a slice of dst's
      // columns. The slices are whole blocks of 16 columns (the last one takes the rest), so Eigen's
      // GEMV groups bᵀ's rows (8, 4, 2, 1 at a time) and its vectors as it does for the whole row,
      // and never sees a one-column slice (which it would hand to dot(), summing in another order).
      // The operands' scalar factors are folded into one alpha before the split: every slice, and
      // the one-thread call, multiply the same plain operands. So the results do not depend on the
      // thread count.
      using AT = Eigen::internal::blas_traits<Lhs>;
      using BT = Eigen::internal::blas_traits<Rhs>;
      typename Eigen::internal::add_const_on_value_type<typename AT::DirectLinearAccessType>::type a =
          AT::extract(a_lhs.derived());
      typename Eigen::internal::add_const_on_value_type<typename BT::DirectLinearAccessType>::type b =
          BT::extract(a_rhs.derived());
      const Scalar s = Eigen::internal::combine_scalar_factors(alpha, a_lhs.derived(), a_rhs.derived());
      constexpr double kOpsPerCoefficient = 24.0;
      constexpr Index kSlice = 16;
      const Index n = dst.cols(), k = a.cols(), units = n / kSlice;
      const int threads =
          k >= kSlice ? parallel_threads(units, kOpsPerCoefficient * static_cast<double>(n) * static_cast<double>(k))
                      : 1;
      parallel_for(units > 0 ? units : 1, threads, [&](Index first, Index last, int) {
        const Index c0 = first * kSlice, len = (last >= units ? n : last * kSlice) - c0;
        auto d = dst.middleCols(c0, len).transpose();
        if (accumulate)
          d.noalias() += s * (b.middleCols(c0, len).transpose() * a.transpose());
        else
          d.noalias() = s * (b.middleCols(c0, len).transpose() * a.transpose());
      });
      return;
    }
    if (accumulate)
      dst.noalias() += alpha * (a_lhs.derived() * a_rhs.derived());
    else
      dst.noalias() = alpha * (a_lhs.derived() * a_rhs.derived());
    return;
  }
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
  const Index m = dst.rows(), n = dst.cols(), k = lhs.cols();
  if constexpr (Own && kernel::Shape<Scalar>::kVectorized && bool(Dest::Flags & Eigen::DirectAccessBit) &&
                Dest::InnerStrideAtCompileTime == 1) {
    using KS = kernel::Shape<Scalar>;
    // The kernel's row-major view: C (M × N, row stride ldc) = A (M × k) B (k × N); a column-major
    // dst is computed as its transpose, dstᵀ = rhsᵀ lhsᵀ.
    const Index lrs = lhs.rowStride(), lcs = lhs.colStride();
    const Index rrs = rhs.rowStride(), rcs = rhs.colStride();
    const bool row_major = dst_order == Eigen::RowMajor;
    const Index M = row_major ? m : n, N = row_major ? n : m;
    // Tiles narrower than the register tile would mostly compute padding (a LoRA product with
    // rank 8 as the output's width): those stay with Eigen.
    if (M >= KS::MR && N >= KS::NR) {
      const Scalar* A = row_major ? lhs.data() : rhs.data();
      const Scalar* B = row_major ? rhs.data() : lhs.data();
      const Index ars = row_major ? lrs : rcs, acs = row_major ? lcs : rrs;
      const Index brs = row_major ? rrs : lcs, bcs = row_major ? rcs : lrs;
      Scalar* C = dst.data();
      const Index ldc = dst.outerStride();
      // One slab of C per thread, its longer side split in whole register tiles (see below).
      const bool by_rows = M >= N;
      const Index unit = by_rows ? KS::MR : KS::NR, size = by_rows ? M : N, units = (size + unit - 1) / unit;
      const int threads =
          parallel_threads(units, 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(k));
      parallel_for(units, threads, [&](Index first, Index last, int) {
        const Index begin = first * unit, end = std::min(size, last * unit);
        const Index rows = by_rows ? end - begin : M, cols = by_rows ? N : end - begin;
        const Index row0 = by_rows ? begin : 0, col0 = by_rows ? 0 : begin;
        kernel::gemm_rowmajor(rows, cols, k, A + row0 * ars, ars, acs, B + col0 * bcs, brs, bcs, C + row0 * ldc + col0,
                              ldc, actual_alpha, accumulate);
      });
      return;
    }
  }
  // With several threads (core/parallel.hpp: Eigen's count, at most one per 2^18 multiply-adds,
  // serial inside a parallel region), each computes its own slab of dst, serially, with its own
  // arena: dst's longer side is split in units of 16 (whole register blocks). Every thread packs
  // the whole of the operand the slabs share (small next to its share of the multiply-adds); no
  // thread waits on another's packing, and nothing is allocated after each thread's first call.
  const bool by_rows = m >= n;
  const Index size = by_rows ? m : n, units = (size + 15) / 16;
  const int threads = parallel_threads(units, 2.0 * static_cast<double>(m) * static_cast<double>(n) * k);
  if (threads > 1) {
    parallel_for(units, threads, [&](Index first, Index last, int) {
      const Index begin = first * 16, end = std::min(size, last * 16);
      const Index rows = by_rows ? end - begin : m, cols = by_rows ? n : end - begin;
      const Index row0 = by_rows ? begin : 0, col0 = by_rows ? 0 : begin;
      if (!accumulate) dst.block(row0, col0, rows, cols).setZero();
      Blocking blocking(rows, cols, k, 1);
      Functor(lhs, rhs, dst, actual_alpha, blocking)(row0, rows, col0, cols);
    });
    return;
  }
  if (!accumulate) dst.setZero();
  Blocking blocking(m, n, k, 1);
  Functor(lhs, rhs, dst, actual_alpha, blocking)(0, m, 0, n);
}

}  // namespace detail

/// dst = alpha · lhs · rhs (accumulate = false) or dst += alpha · lhs · rhs, on peft's kernel or
/// Eigen's GEMM kernels with the calling thread's kept packing space (see the top of this file).
/// dst must not alias lhs or rhs (as with noalias()).
template <class Dst, class Lhs, class Rhs>
void gemm(Dst&& dst, const Eigen::MatrixBase<Lhs>& lhs, const Eigen::MatrixBase<Rhs>& rhs,
          typename std::remove_reference_t<Dst>::Scalar alpha = 1, bool accumulate = false) {
  detail::gemm_impl<detail::kOwnGemmKernel>(std::forward<Dst>(dst), lhs, rhs, alpha, accumulate);
}

}  // namespace peft
