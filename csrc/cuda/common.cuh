// Device helpers shared by the .cu files: 16-byte packs and launch shapes.
#pragma once

#include "launch.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fastres {
namespace cuda {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// VEC elements moved as one load/store (16 bytes at the widest).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};
template <typename T>
constexpr int kPackWidth = 16 / sizeof(T);

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}
template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads along a row: the power of two covering `packs` (clamped to [min_x, max_x]); the rest
// of the kThreads-thread block walks rows.
inline dim3 row_block(int64_t packs, int min_x, int max_x) {
  int x = 1;
  while (x < packs && x < max_x) x *= 2;
  x = std::max(x, min_x);
  return dim3(x, kThreads / x);
}

// Grid for a [rows, cols] elementwise pass with `block` threads: x covers a row's packs,
// y walks rows (grid-stride beyond kMaxGridY).
inline dim3 elementwise_grid(const Matrix& m, int vec, dim3 block) {
  const int64_t packs = m.cols / vec;
  return dim3(static_cast<unsigned>(ceil_div(packs, block.x)),
              static_cast<unsigned>(std::min(ceil_div(m.rows, block.y), kMaxGridY)));
}

}  // namespace cuda
}  // namespace fastres
