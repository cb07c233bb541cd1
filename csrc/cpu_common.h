// Internals shared by the CPU kernel files: the fixed work decomposition that keeps results
// independent of the thread count, per-CPU clones of the hot loops, SIMD lanes, the 1-bit ReLU
// mask, and compile-time flag dispatch.
//
// The inner loops are plain loops over __restrict pointers, or over Lanes values (GCC/Clang
// vector types), calling the math of fastres/math.h, so the compiler vectorizes them for the SIMD
// the clone targets (AVX2 in the x86-64-v3 clone, SSE2 in the baseline one, NEON on arm64). That
// measured faster than at::vec here: without a CPU_CAPABILITY build (which an extension cannot
// select at run time), at::vec::Vectorized is its generic array-based fallback, and its
// blendv/compare lower to per-lane branches.
#pragma once

#if defined(__GNUC__)
// The vector values of the Lanes helpers below pass through always-inlined functions only (here and
// in fastres/math.h): no calling convention is involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <fastres/kernels.h>
#include <fastres/math.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fastres {
namespace cpu {

// The hot loops (one unit of work at a time) are compiled twice, for x86-64-v3 (AVX2, FMA, F16C) and for
// the baseline, and the dynamic loader picks the clone once by the CPU's features: the plain loops
// then vectorize 8 floats wide where the CPU can. (ATen selects its kernels by CPU the same way.)
// Each clone is deterministic by itself; results may differ in the last bits between CPUs that run
// different clones (FMA contraction).
// FASTRES_CPU_CLONES_AVX512 adds an x86-64-v4 (AVX-512) clone, for loops written over 16-float Lanes:
// Winograd's transforms (cpu_winograd.cpp) ran 1.3x faster with it at 64 channels and 56x56.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__) && !defined(FASTRES_NO_CPU_CLONES)
#define FASTRES_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FASTRES_CPU_CLONES_AVX512 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTRES_CPU_CLONES
#define FASTRES_CPU_CLONES_AVX512
#endif
// What a clone calls must be inlined into it to be compiled for the clone's features.
#if defined(__GNUC__)
#define FASTRES_INLINE inline __attribute__((always_inline))
#else
#define FASTRES_INLINE inline
#endif

// ---- lanes: N consecutive channels of an NHWC row as one value --------------------------------
// Lanes<acc_t, 8>::V is a GCC/Clang vector of 8 acc_t (one AVX2 register of fp32 in the x86-64-v3
// clone, two SSE registers in the baseline one; Lanes<acc_t, 16>::V one AVX-512 register of fp32 in an
// x86-64-v4 clone); Lanes<acc_t, 1>::V is acc_t itself, for the
// channels left over. Loops over rows then keep their per-channel accumulators and coefficients in
// registers, and the per-element formulas of fastres/math.h run on these values unchanged.
template <typename acc_t, int N>
struct Lanes;

template <typename acc_t>
struct Lanes<acc_t, 1> {
  using V = acc_t;
  using M = bool;
  template <typename T>
  static FASTRES_INLINE V load(const T* p) { return static_cast<acc_t>(*p); }
  template <typename T>
  static FASTRES_INLINE void store(T* p, V v) { *p = static_cast<T>(v); }
  static FASTRES_INLINE V zero() { return acc_t(0); }
  static FASTRES_INLINE M bits(unsigned b) { return (b & 1u) != 0; }  // lane 0 = bit 0
  static FASTRES_INLINE V keep(M m, V v) { return m ? v : acc_t(0); }
  static FASTRES_INLINE acc_t lane(V v, int) { return v; }
};

template <typename acc_t, int N>
struct Lanes {
  static_assert(N == 8 || N == 16, "Lanes: 1, 8 or 16 lanes");
  typedef acc_t V __attribute__((vector_size(N * sizeof(acc_t))));
  using I = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  typedef I M __attribute__((vector_size(N * sizeof(acc_t))));
  template <typename T>
  static FASTRES_INLINE V load(const T* p) {
    V v;
    if constexpr (std::is_same_v<T, acc_t>) {
      std::memcpy(&v, p, sizeof v);
    } else {
      for (int j = 0; j < N; ++j) v[j] = static_cast<acc_t>(p[j]);
    }
    return v;
  }
  template <typename T>
  static FASTRES_INLINE void store(T* p, V v) {
    if constexpr (std::is_same_v<T, acc_t>) {
      std::memcpy(p, &v, sizeof v);
    } else {
      for (int j = 0; j < N; ++j) p[j] = static_cast<T>(v[j]);
    }
  }
  static FASTRES_INLINE V zero() { return V{}; }
  static FASTRES_INLINE M bits(unsigned b) {  // lane j = bit j
    M select;
    for (int j = 0; j < N; ++j) select[j] = static_cast<I>(I{1} << j);
    return ((M{} + static_cast<I>(b)) & select) != 0;
  }
  static FASTRES_INLINE V keep(M m, V v) { return m ? v : V{}; }
  static FASTRES_INLINE acc_t lane(V v, int j) { return v[j]; }
};

// fastres/math.h's comparisons on vectors: lane-wise selects.
template <typename V>
struct VectorSelect {
  static FASTRES_INLINE V relu(V v) { return v < V{} ? V{} : v; }
  static FASTRES_INLINE V zero_where_not_positive(V grad, V out) { return out <= V{} ? V{} : grad; }
};

}  // namespace cpu

template <>
struct Select<cpu::Lanes<float, 8>::V> : cpu::VectorSelect<cpu::Lanes<float, 8>::V> {};
template <>
struct Select<cpu::Lanes<double, 8>::V> : cpu::VectorSelect<cpu::Lanes<double, 8>::V> {};
template <>
struct Select<cpu::Lanes<float, 16>::V> : cpu::VectorSelect<cpu::Lanes<float, 16>::V> {};

namespace cpu {

// Units of work, sized so that a reduction's sequential chains stay short (for accuracy): an
// NHWC unit is at most kMaxUnitRows rows and about kUnitElements elements; an NCHW unit at most
// kPlaneTile elements of one plane.
constexpr int64_t kUnitElements = 16384;
constexpr int64_t kMaxUnitRows = 256;
constexpr int64_t kPlaneTile = 2048;

// A 4-D activation cut into units of work that depend on its shape alone:
//   NHWC: blocks of `rows_per_unit` rows of the [N*H*W, C] matrix (every channel in a row);
//   NCHW: tiles of at most kPlaneTile elements of one (n, c) plane (one channel per unit).
// Units are the parallel tasks and, for reductions, the partial sums, which are then added
// in unit order; so the summation order never depends on the thread count.
struct Units {
  ActivationShape shape;
  int64_t rows = 0;            // NHWC: N*H*W
  int64_t rows_per_unit = 0;   // NHWC
  int64_t tiles_per_plane = 0; // NCHW
  int64_t count = 0;

  explicit Units(const ActivationShape& s) : shape(s) {
    if (s.numel() == 0) return;
    if (s.channels_last) {
      rows = s.N * s.HW;
      rows_per_unit = std::clamp<int64_t>(kUnitElements / s.C, 1, kMaxUnitRows);
      count = (rows + rows_per_unit - 1) / rows_per_unit;
    } else {
      tiles_per_plane = (s.HW + kPlaneTile - 1) / kPlaneTile;
      count = s.N * s.C * tiles_per_plane;
    }
  }
  // Units per parallel task: about 32K elements (ATen's grain), so small tensors run on one thread
  // instead of paying for a parallel region. The split never changes a result (units are independent).
  int64_t grain() const {
    const int64_t per_unit = shape.channels_last ? rows_per_unit * shape.C : std::min(shape.HW, kPlaneTile);
    return std::max<int64_t>(1, 32768 / std::max<int64_t>(per_unit, 1));
  }
  // NHWC unit u: rows [row_begin, row_end).
  int64_t row_begin(int64_t u) const { return u * rows_per_unit; }
  int64_t row_end(int64_t u) const { return std::min(rows, (u + 1) * rows_per_unit); }
  // NCHW unit u: `length` elements of channel `channel` starting at flat offset `offset`.
  struct Run {
    int64_t offset, length, channel;
  };
  Run run(int64_t u) const {
    const int64_t plane = u / tiles_per_plane;
    const int64_t start = (u % tiles_per_plane) * kPlaneTile;
    return {plane * shape.HW + start, std::min(kPlaneTile, shape.HW - start), plane % shape.C};
  }
};

// ---- the 1-bit ReLU mask (layout: fastres/kernels.h, mask_bytes_per_row) ----------------
// Bits of n stored values starting at a byte boundary: bit j of mask[b] = relu_mask_bit(out[8b + j]).
template <typename scalar_t>
FASTRES_INLINE void pack_relu_mask(const scalar_t* __restrict out, uint8_t* __restrict mask, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    // relu_mask_bit(v) = !(v <= 0): the complement of cmple's lanes (NaN compares false: bit 1).
    const __m128 zero = _mm_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const int lo = _mm_movemask_ps(_mm_cmple_ps(_mm_loadu_ps(out + i), zero));
      const int hi = _mm_movemask_ps(_mm_cmple_ps(_mm_loadu_ps(out + i + 4), zero));
      mask[i >> 3] = static_cast<uint8_t>(~(lo | (hi << 4)));
    }
  }
#endif
  for (; i < n; i += 8) {
    uint8_t bits = 0;
    for (int64_t j = 0; j < std::min<int64_t>(8, n - i); ++j) {
      bits |= static_cast<uint8_t>(relu_mask_bit(static_cast<acc_type_t<scalar_t>>(out[i + j]))) << j;
    }
    mask[i >> 3] = bits;
  }
}

// dz[i] = grad[i] where the mask bit is set, else 0, for n values starting at a byte boundary.
template <typename scalar_t>
FASTRES_INLINE void unpack_relu_mask(const scalar_t* __restrict grad, const uint8_t* __restrict mask,
                             acc_type_t<scalar_t>* __restrict dz, int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  int64_t i = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    const __m128i select_lo = _mm_setr_epi32(1, 2, 4, 8);
    const __m128i select_hi = _mm_setr_epi32(16, 32, 64, 128);
    for (; i + 8 <= n; i += 8) {
      const __m128i bits = _mm_set1_epi32(mask[i >> 3]);
      const __m128 keep_lo = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_and_si128(bits, select_lo), select_lo));
      const __m128 keep_hi = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_and_si128(bits, select_hi), select_hi));
      _mm_storeu_ps(dz + i, _mm_and_ps(_mm_loadu_ps(grad + i), keep_lo));
      _mm_storeu_ps(dz + i + 4, _mm_and_ps(_mm_loadu_ps(grad + i + 4), keep_hi));
    }
  }
#endif
  for (; i < n; ++i) {
    dz[i] = (mask[i >> 3] >> (i & 7)) & 1 ? static_cast<acc_t>(grad[i]) : acc_t(0);
  }
}

// Calls f(std::bool_constant<b0>{}, std::bool_constant<b1>{}, ...) for runtime flags, so that
// inner loops are compiled once per flag combination with no branch inside.
template <typename F>
void with_flags(F&& f) {
  f();
}
template <typename F, typename... Rest>
void with_flags(F&& f, bool flag, Rest... rest) {
  if (flag) {
    with_flags([&](auto... bs) { f(std::true_type{}, bs...); }, rest...);
  } else {
    with_flags([&](auto... bs) { f(std::false_type{}, bs...); }, rest...);
  }
}

}  // namespace cpu
}  // namespace fastres
