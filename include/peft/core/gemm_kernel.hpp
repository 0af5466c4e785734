#pragma once
// peft's own packed GEMM kernel (issue 16: "a small blocked kernel of our own ... if it wins").
//
// C (+)= alpha · A · B for row-major C, on Eigen's SIMD packets (SSE, AVX, AVX-512, NEON: whatever
// the translation unit is compiled for). The layout is BLIS's, transposed for row-major results:
//
//   for each block of KC columns of A (rows of B):
//     pack A's rows into micro-panels of MR rows × KC (a column of MR values per k)
//     for each block of NC columns of B:
//       pack B into micro-panels of KC × NR (a row of NR values per k; the block stays in L2)
//       for each micro-panel of A (stays in L1 across the sweep), for each micro-panel of B:
//         the micro-kernel: MR × NR accumulators in registers (NR = NP packets), per k one
//         broadcast of A per row and NP loads of B, MR · NP fused multiply-adds
//
// Edges are zero-padded in the packed panels and written back through a stack tile, so the
// kernel itself only ever runs full tiles. The k blocking depends on k alone: every element of C
// is summed in the same order whatever slab of C a thread computes, so results do not depend on
// the thread count. Operands are addressed by (row stride, column stride), so transposed views
// need no copy of their own: packing reads them in place.
//
// Why (README, "What limits one thread"): with AVX-512, Eigen 3.4's GEBP runs the transformer
// step's products at 63 % of the FMA peak on a Zen 4 core, OpenBLAS 0.3.21 at 79 %, this kernel at
// 80 %. The register tile is 8 × 32 floats with 32 vector registers (6 × 2 packets with 16).
#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <new>
#include <type_traits>

#include "peft/core/types.hpp"

// Eigen's packet types carry alignment attributes that GCC drops as template arguments
// (PacketBlock<__m512, 16>); Eigen silences the same warning inside its own headers.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

// The kernel's sizes (register tile, blocks) follow the packets, and so the instruction set the
// translation unit is compiled for. Its functions live in an inline namespace named after that
// set, so that a program whose TUs are compiled for different sets never links one TU's packing
// with another's buffer sizes. (Mixing sets in one program is still the usual hazard for every
// inline function, Eigen's included: compile all of it for one set.)
#if defined(EIGEN_VECTORIZE_AVX512)
#define PEFT_GEMM_KERNEL_ISA avx512
#elif defined(EIGEN_VECTORIZE_AVX)
#define PEFT_GEMM_KERNEL_ISA avx
#elif defined(EIGEN_VECTORIZE_SSE)
#define PEFT_GEMM_KERNEL_ISA sse
#elif defined(EIGEN_VECTORIZE_NEON) && EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32
#define PEFT_GEMM_KERNEL_ISA neon32
#elif defined(EIGEN_VECTORIZE_NEON)
#define PEFT_GEMM_KERNEL_ISA neon16
#else
#define PEFT_GEMM_KERNEL_ISA other
#endif

namespace peft {
namespace detail {
namespace kernel {
inline namespace PEFT_GEMM_KERNEL_ISA {

namespace ei = Eigen::internal;

/// Alignment of the packed blocks and the stack tile: at least any packet's (aligned loads),
/// whatever EIGEN_MAX_ALIGN_BYTES says.
inline constexpr std::size_t kAlign = 64;

/// Register tile, packet and blocking sizes for scalar T on the packets this TU is compiled for.
template <class T>
struct Shape {
  using Packet = typename ei::packet_traits<T>::type;
  // real float and double only (complex operands would need conjugation), packets of at most kAlign
  static constexpr bool kVectorized = (std::is_same_v<T, float> || std::is_same_v<T, double>) &&
                                      ei::packet_traits<T>::Vectorizable && ei::unpacket_traits<Packet>::size > 1 &&
                                      sizeof(Packet) <= kAlign;
  static constexpr int P = ei::unpacket_traits<Packet>::size;
  static constexpr int NP = 2;  // packets per tile row
  static constexpr int NR = NP * P;
  // MR·NP accumulators + NP values of B + one broadcast must fit the register file.
  // 8 × 32 floats with AVX-512 (measured on Zen 4 against 12 and 14 rows: as fast on the large
  // products, and 64-row attention blocks are whole tiles); 6 × 2 packets with 16 registers.
  static constexpr int MR = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 8 : 6;
  static constexpr Index kKcMax = 384;  // MR·KC of A in L1
  static constexpr Index kNcMax = 480 / NR * NR > 0 ? 480 / NR * NR : NR;  // KC·NC of B in L2
  // Rows of A packed at once (1.5 MB of floats): against 4032 rows, the same speed on the step's
  // products but one (1024 × 256 × 2048) 6 % slower at 768 rows.
  static constexpr Index kMcMax = 1024 / MR * MR;
};

/// KC for a product of depth k: at most kKcMax, the blocks as even as whole multiples of 8 allow.
/// A function of k alone (see the top of this file).
template <class T>
inline Index depth_block(Index k) {
  const Index max = Shape<T>::kKcMax;
  if (k <= max) return k;
  const Index blocks = (k + max - 1) / max;
  const Index kc = (k + blocks - 1) / blocks;
  return std::min<Index>(max, (kc + 7) / 8 * 8);
}

/// One micro-panel of W lines (rows of A, columns of B) over kc steps of k, the general case: line l
/// at step p is src[l·line_stride + p·step_stride]; lines past `lines` are zero. Returns the end.
template <int W, class T>
inline T* pack_panel(const T* src, Index line_stride, Index step_stride, Index lines, Index kc, T* dst) {
  for (Index p = 0; p < kc; ++p) {
    int l = 0;
    for (; l < lines; ++l) dst[l] = src[l * line_stride + p * step_stride];
    for (; l < W; ++l) dst[l] = T(0);
    dst += W;
  }
  return dst;
}

/// Packs rows [0, mc) × columns [0, kc) of A (element (i, p) at a[i·rs + p·cs]) into micro-panels
/// of MR rows: dst[panel][p][r], rows past mc zero.
template <class T>
inline void pack_a(const T* a, Index rs, Index cs, Index mc, Index kc, T* dst) {
  constexpr int MR = Shape<T>::MR;
  const Index full = mc / MR * MR;
  if (rs == 1 && full > 0) {
    // transposed A (dYᵀ of a weight gradient): MR consecutive values per k and panel; walk k
    // outermost so each row of the stored matrix is read once, along its cache lines
    for (Index p = 0; p < kc; ++p) {
      const T* row = a + p * cs;
      T* out = dst + p * MR;
      for (Index i0 = 0; i0 < full; i0 += MR, out += kc * MR) std::memcpy(out, row + i0, sizeof(T) * MR);
    }
    if (full == mc) return;
    a += full;
    mc -= full;
    dst += full * kc;
  }
  for (Index i0 = 0; i0 < mc; i0 += MR) {
    const Index rows = std::min<Index>(MR, mc - i0);
    const T* src = a + i0 * rs;
    if (rows == MR && cs == 1) {
      // row-major A: read MR rows along k, write them interleaved
      for (Index p = 0; p < kc; ++p) {
        for (int r = 0; r < MR; ++r) dst[r] = src[r * rs + p];
        dst += MR;
      }
    } else {
      dst = pack_panel<MR>(src, rs, cs, rows, kc, dst);
    }
  }
}

/// Packs rows [0, kc) × columns [0, nc) of B (element (p, j) at b[p·rs + j·cs]) into micro-panels
/// of NR columns: dst[panel][p][c], columns past nc zero.
template <class T>
inline void pack_b(const T* b, Index rs, Index cs, Index kc, Index nc, T* dst) {
  constexpr int NR = Shape<T>::NR;
  for (Index j0 = 0; j0 < nc; j0 += NR) {
    const Index cols = std::min<Index>(NR, nc - j0);
    const T* src = b + j0 * cs;
    if (cols == NR && cs == 1) {
      for (Index p = 0; p < kc; ++p) {
        std::memcpy(dst, src + p * rs, sizeof(T) * NR);
        dst += NR;
      }
    } else if (cols == NR && rs == 1) {
      // transposed B (a weight read as Wᵀ, Kᵀ in attention): each column of the panel is
      // contiguous along k; P × P squares are transposed in registers
      using Packet = typename Shape<T>::Packet;
      constexpr int P = Shape<T>::P;
      const Index kp = kc / P * P;
      for (int c0 = 0; c0 < NR; c0 += P) {
        for (Index p0 = 0; p0 < kp; p0 += P) {
          ei::PacketBlock<Packet, P> block;
          for (int i = 0; i < P; ++i) block.packet[i] = ei::ploadu<Packet>(src + (c0 + i) * cs + p0);
          ei::ptranspose(block);
          for (int i = 0; i < P; ++i) ei::pstore(dst + (p0 + i) * NR + c0, block.packet[i]);
        }
        for (Index p = kp; p < kc; ++p)
          for (int c = c0; c < c0 + P; ++c) dst[p * NR + c] = src[c * cs + p];
      }
      dst += kc * NR;
    } else {
      dst = pack_panel<NR>(src, cs, rs, cols, kc, dst);
    }
  }
}

/// One MR × NR tile: C[0:rows, 0:cols] (+)= alpha · Σ_p a[p][r] b[p][c] over kc packed steps.
template <class T>
EIGEN_DONT_INLINE void micro_tile(Index kc, const T* EIGEN_RESTRICT a, const T* EIGEN_RESTRICT b, T* c, Index ldc,
                                  T alpha, bool accumulate, Index rows, Index cols) {
  using S = Shape<T>;
  using Packet = typename S::Packet;
  constexpr int MR = S::MR, NP = S::NP, P = S::P, NR = S::NR;
  Packet acc[MR][NP];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r < rows) {  // the tile's rows of C, needed after the k loop
      ei::prefetch(c + r * ldc);
      ei::prefetch(c + r * ldc + NR - 1);
    }
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) acc[r][q] = ei::pset1<Packet>(T(0));
  }
  for (Index p = 0; p < kc; ++p) {
    Packet bv[NP];
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) bv[q] = ei::pload<Packet>(b + q * P);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Packet av = ei::pset1<Packet>(a[r]);
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) acc[r][q] = ei::pmadd(av, bv[q], acc[r][q]);
    }
    a += MR;
    b += NR;
  }
  // A full tile is stored to C in place; a partial one goes through a full tile on the stack (C's
  // part copied in when accumulating, copied back after). Both run the one store loop below, so an
  // element gets the same bits whichever kind of tile holds it.
  const bool full = rows == MR && cols == NR;
  alignas(kAlign) T tile[MR * NR];
  T* out = full ? c : tile;
  const Index ld = full ? ldc : NR;
  if (!full && accumulate) {
    std::fill(tile, tile + MR * NR, T(0));
    for (Index r = 0; r < rows; ++r) std::copy(c + r * ldc, c + r * ldc + cols, tile + r * NR);
  }
  const Packet va = ei::pset1<Packet>(alpha);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    T* row = out + r * ld;
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      Packet v = ei::pmul(va, acc[r][q]);
      if (accumulate) v = ei::padd(v, ei::ploadu<Packet>(row + q * P));
      ei::pstoreu(row + q * P, v);
    }
  }
  if (!full)
    for (Index r = 0; r < rows; ++r) std::copy(tile + r * NR, tile + r * NR + cols, c + r * ldc);
}

/// The calling thread's packed blocks: grow to the largest product seen, never shrink (no
/// allocation once the largest shape has run). peft::gemm's Eigen path takes its blocks from the
/// same arena (one per thread and instruction set).
template <class T>
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    release(a_);
    release(b_);
  }
  T* a(Index n) { return grow(a_, size_a_, n); }
  T* b(Index n) { return grow(b_, size_b_, n); }
  static Arena& local() {
    thread_local Arena arena;
    return arena;
  }

 private:
  static void release(T* p) {
    if (p != nullptr) ::operator delete(p, std::align_val_t{kAlign});
  }
  static T* grow(T*& p, Index& size, Index n) {
    if (n > size) {
      release(p);
      p = nullptr;
      size = 0;
      p = static_cast<T*>(::operator new(sizeof(T) * static_cast<std::size_t>(n), std::align_val_t{kAlign}));
      size = n;
    }
    return p;
  }
  T* a_ = nullptr;
  T* b_ = nullptr;
  Index size_a_ = 0, size_b_ = 0;
};

/// C[m × n] (row stride ldc, columns contiguous) = alpha · A B (+ C when accumulate), with
/// A(i, p) = a[i·ars + p·acs] (m × k) and B(p, j) = b[p·brs + j·bcs] (k × n). Sequential.
/// The packed blocks come from the calling thread's Arena.
template <class T>
void gemm_rowmajor(Index m, Index n, Index k, const T* a, Index ars, Index acs, const T* b, Index brs, Index bcs,
                   T* c, Index ldc, T alpha, bool accumulate) {
  using S = Shape<T>;
  constexpr int MR = S::MR, NR = S::NR;
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate)
      for (Index i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, T(0));
    return;
  }
  const Index kc_block = depth_block<T>(k);
  Arena<T>& arena = Arena<T>::local();
  struct {
    T* a;
    T* b;
  } buf{nullptr, nullptr};
  // row blocks as even as whole tiles allow (1024 rows with 6-row tiles: 2 × 512, not 1020 + 4)
  const Index m_blocks = (m + S::kMcMax - 1) / S::kMcMax;
  const Index mc_block = ((m + m_blocks - 1) / m_blocks + MR - 1) / MR * MR;
  buf.a = arena.a(mc_block * kc_block);
  buf.b = arena.b((std::min(n, S::kNcMax) + NR - 1) / NR * NR * kc_block);
  for (Index i0 = 0; i0 < m; i0 += mc_block) {
    const Index mc = std::min<Index>(mc_block, m - i0);
    for (Index p0 = 0; p0 < k; p0 += kc_block) {
      const Index kc = std::min<Index>(kc_block, k - p0);
      const bool acc = accumulate || p0 > 0;
      pack_a(a + i0 * ars + p0 * acs, ars, acs, mc, kc, buf.a);
      for (Index j0 = 0; j0 < n; j0 += S::kNcMax) {
        const Index nc = std::min<Index>(S::kNcMax, n - j0);
        pack_b(b + p0 * brs + j0 * bcs, brs, bcs, kc, nc, buf.b);
        for (Index ir = 0; ir < mc; ir += MR) {
          const T* ap = buf.a + ir * kc;
          T* crow = c + (i0 + ir) * ldc + j0;
          const Index rows = std::min<Index>(MR, mc - ir);
          for (Index jr = 0; jr < nc; jr += NR)
            micro_tile<T>(kc, ap, buf.b + jr * kc, crow + jr, ldc, alpha, acc, rows, std::min<Index>(NR, nc - jr));
        }
      }
    }
  }
}

}  // namespace PEFT_GEMM_KERNEL_ISA
}  // namespace kernel
}  // namespace detail
}  // namespace peft

#undef PEFT_GEMM_KERNEL_ISA

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
