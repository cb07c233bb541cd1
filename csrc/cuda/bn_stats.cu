// CUDA kernels of _bn_stats:
//   1. per-thread Welford over a fixed set of rows (NHWC) or plane elements (NCHW), merged with
//      Chan's formula inside the block in a fixed order, one partial (mean, m2) per split or plane;
//   2. a finalize kernel (one warp per channel) merging the partials in a fixed order and writing
//      mean, invstd, the apply coefficients and the new running statistics: all on the device,
//      no host synchronization.
// The splits depend on the shape alone and nothing is accumulated atomically, so the results are
// bit-identical from run to run.
#include "common.cuh"

namespace fastres {
namespace cuda {
namespace {

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> shfl_down(Welford<acc_t> w, int offset) {
  return {__shfl_down_sync(0xffffffffu, w.count, offset), __shfl_down_sync(0xffffffffu, w.mean, offset),
          __shfl_down_sync(0xffffffffu, w.m2, offset)};
}

// Merge over the warp's lanes in a fixed tree; complete in lane 0.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_combine(Welford<acc_t> w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) w = welford_combine(w, shfl_down(w, offset));
  return w;
}

// Rows of the NHWC split s.
__host__ __device__ __forceinline__ int64_t split_rows(int64_t rows, int64_t rows_per_split, int64_t s) {
  const int64_t begin = s * rows_per_split;
  const int64_t end = begin + rows_per_split < rows ? begin + rows_per_split : rows;
  return end > begin ? end - begin : 0;
}

// NHWC: block (x: column packs, y: rows); blockIdx.y is the split. Writes
// partial[split][0][c] = mean, partial[split][1][c] = m2 over the split's rows.
template <typename T, int VEC>
__global__ void stats_columns_kernel(BnStatsParams<T> p, int64_t rows_per_split) {
  using acc_t = acc_type_t<T>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim.y][blockDim.x][2 * VEC]
  const Matrix m = p.m;
  const int64_t C = m.cols;
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = col < C;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_split;
  const int64_t row_end = row_begin + split_rows(m.rows, rows_per_split, blockIdx.y);
  acc_t mean[VEC], m2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) mean[j] = m2[j] = acc_t(0);
  acc_t count = 0;
  if (active) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += blockDim.y) {
      const auto y = load_pack<VEC>(p.y + row * C + col);
      count += acc_t(1);
      const acc_t inv_count = acc_t(1) / count;  // shared by the VEC lanes
#pragma unroll
      for (int j = 0; j < VEC; ++j) welford_add(static_cast<acc_t>(y.v[j]), inv_count, mean[j], m2[j]);
    }
  }
  acc_t* mine = smem + (threadIdx.y * blockDim.x + threadIdx.x) * 2 * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    mine[j] = mean[j];
    mine[VEC + j] = m2[j];
  }
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    // Row lane t visited the rows row_begin + t + k * blockDim.y: its count follows from that.
    const int64_t n = row_end - row_begin;
    Welford<acc_t> w[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) w[j] = {count, mean[j], m2[j]};
    for (unsigned t = 1; t < blockDim.y; ++t) {  // fixed order over the block's row lanes
      const acc_t* other = smem + (t * blockDim.x + threadIdx.x) * 2 * VEC;
      const acc_t other_count = n > t ? acc_t((n - t + blockDim.y - 1) / blockDim.y) : acc_t(0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) w[j] = welford_combine(w[j], Welford<acc_t>{other_count, other[j], other[VEC + j]});
    }
    acc_t* partial = p.workspace + int64_t(blockIdx.y) * 2 * C;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      partial[col + j] = w[j].mean;
      partial[C + col + j] = w[j].m2;
    }
  }
}

// NCHW: block (x: a multiple of 32 threads along a plane, y: planes). Writes
// partial[plane][0] = mean, partial[plane][1] = m2 over the plane.
template <typename T, int VEC>
__global__ void stats_planes_kernel(BnStatsParams<T> p) {
  using acc_t = acc_type_t<T>;
  extern __shared__ unsigned char smem_raw[];
  auto* smem = reinterpret_cast<Welford<acc_t>*>(smem_raw);  // [blockDim.y][warps per plane]
  const Matrix m = p.m;
  const unsigned warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Every thread runs the same number of iterations: the block synchronizes in each.
  for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < m.rows; first += int64_t(gridDim.x) * blockDim.y) {
    const int64_t plane = first + threadIdx.y;
    acc_t mean[VEC], m2[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) mean[j] = m2[j] = acc_t(0);
    acc_t count = 0;
    if (plane < m.rows) {
      for (int64_t col = int64_t(threadIdx.x) * VEC; col < m.cols; col += int64_t(blockDim.x) * VEC) {
        const auto y = load_pack<VEC>(p.y + plane * m.cols + col);
        count += acc_t(1);
        const acc_t inv_count = acc_t(1) / count;
#pragma unroll
        for (int j = 0; j < VEC; ++j) welford_add(static_cast<acc_t>(y.v[j]), inv_count, mean[j], m2[j]);
      }
    }
    Welford<acc_t> w{count, mean[0], m2[0]};
#pragma unroll
    for (int j = 1; j < VEC; ++j) w = welford_combine(w, Welford<acc_t>{count, mean[j], m2[j]});
    w = warp_combine(w);
    if (lane == 0) smem[threadIdx.y * warps + warp] = w;
    __syncthreads();
    if (threadIdx.x == 0 && plane < m.rows) {
      for (unsigned k = 1; k < warps; ++k) w = welford_combine(w, smem[threadIdx.y * warps + k]);
      p.workspace[plane * 2] = w.mean;
      p.workspace[plane * 2 + 1] = w.m2;
    }
    __syncthreads();
  }
}

// One warp per channel: merges the partials in a fixed order and finalizes.
//   NHWC: partial s of channel c at s * 2C + c (m2 at + C), count split_rows(s);
//   NCHW: partial n of channel c at (n * C + c) * 2 (m2 at + 1), count cols.
template <typename T>
__global__ void stats_finalize_kernel(BnStatsParams<T> p, int64_t splits, int64_t rows_per_split) {
  using acc_t = acc_type_t<T>;
  const Matrix m = p.m;
  const int64_t C = m.channels;
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;  // whole warps leave together: the warp's lanes share c
  Welford<acc_t> w{0, 0, 0};
  for (int64_t s = threadIdx.x; s < splits; s += 32) {
    Welford<acc_t> part;
    if (m.channel_per_column) {
      const acc_t* src = p.workspace + s * 2 * C + c;
      part = {acc_t(split_rows(m.rows, rows_per_split, s)), src[0], src[C]};
    } else {
      const acc_t* src = p.workspace + (s * C + c) * 2;
      part = {acc_t(m.cols), src[0], src[1]};
    }
    w = welford_combine(w, part);
  }
  w = warp_combine(w);
  if (threadIdx.x == 0) {
    // merged in acc_t: no residual of the mean's rounding to fold into shift (see bn_finalize)
    const auto f = bn_finalize(w, p.weight[c], p.bias[c], p.running_mean[c], p.running_var[c], p.momentum, p.eps);
    p.mean[c] = f.mean;
    p.invstd[c] = f.invstd;
    p.scale[c] = f.scale;
    p.shift[c] = f.shift;
    p.new_running_mean[c] = f.running_mean;
    p.new_running_var[c] = f.running_var;
  }
}

template <typename T, int VEC>
void launch_passes(const BnStatsParams<T>& p, cudaStream_t stream) {
  using acc_t = acc_type_t<T>;
  const Matrix& m = p.m;
  int64_t splits, rows_per_split = 0;
  if (m.channel_per_column) {
    splits = row_splits(m);
    rows_per_split = ceil_div(m.rows, splits);
    const dim3 block = row_block(m.cols / VEC, 1, 64);
    const dim3 grid(static_cast<unsigned>(ceil_div(m.cols / VEC, block.x)), static_cast<unsigned>(splits));
    const size_t smem = size_t(kThreads) * 2 * VEC * sizeof(acc_t);
    stats_columns_kernel<T, VEC><<<grid, block, smem, stream>>>(p, rows_per_split);
  } else {
    splits = m.rows / m.channels;  // the batch entries
    const dim3 block = row_block(m.cols / VEC, 32, kThreads);
    const auto grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(m.rows, block.y), 65535));
    const size_t smem = size_t(block.y) * (block.x / 32) * sizeof(Welford<acc_t>);
    stats_planes_kernel<T, VEC><<<grid, block, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 block(32, 8);
  stats_finalize_kernel<T><<<static_cast<unsigned>(ceil_div(m.channels, block.y)), block, 0, stream>>>(
      p, splits, rows_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void launch_bn_stats(const BnStatsParams<T>& p, cudaStream_t stream) {
  if (p.m.channels == 0) return;
  if (p.m.rows == 0 || p.m.cols == 0) {  // an empty batch: the finalize step alone (count 0)
    const dim3 block(32, 8);
    stats_finalize_kernel<T><<<static_cast<unsigned>(ceil_div(p.m.channels, block.y)), block, 0, stream>>>(p, 0, 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  constexpr int VEC = kPackWidth<T>;
  if (p.m.cols % VEC == 0 && aligned16(p.y)) {
    launch_passes<T, VEC>(p, stream);
  } else {
    launch_passes<T, 1>(p, stream);
  }
}

template void launch_bn_stats<float>(const BnStatsParams<float>&, cudaStream_t);
template void launch_bn_stats<double>(const BnStatsParams<double>&, cudaStream_t);
template void launch_bn_stats<c10::Half>(const BnStatsParams<c10::Half>&, cudaStream_t);
template void launch_bn_stats<c10::BFloat16>(const BnStatsParams<c10::BFloat16>&, cudaStream_t);

}  // namespace cuda
}  // namespace fastres
