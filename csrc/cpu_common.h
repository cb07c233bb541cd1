// Internals shared by the CPU kernel files: the fixed work decomposition that keeps results
// independent of the thread count, and compile-time flag dispatch.
//
// The inner loops are plain loops over __restrict pointers calling the scalar math of
// fastres/math.h, written so that the compiler vectorizes them for whatever SIMD the target
// has (SSE2 on any x86-64, NEON on arm64). That measured faster than at::vec here: without a
// CPU_CAPABILITY build (which an extension cannot select at run time), at::vec::Vectorized is
// its generic array-based fallback, and its blendv/compare lower to per-lane branches.
#pragma once

#include <fastres/kernels.h>
#include <fastres/math.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace fastres {
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
