// CUDA kernels of _bn_apply_backward (and _bn_act_backward):
//   1. per-channel partial sums of dz, dz*(y-mean) [and dz*(r-r_mean)], one block row of partials
//      per fixed split of the data (no atomics);
//   2. a finalize kernel adding the partials in a fixed order (one warp per channel) and turning
//      them into the BN weight and bias gradients and the coefficients of the input gradients;
//   3. in training, an elementwise pass writing grad_y and grad_residual (dz, or the dual residual's
//      gradient); in eval mode the reduction pass writes them (its coefficients need no sums): one read.
// dz comes from grad_out and the 1-bit mask or the output. The splits depend on the shape alone,
// so results are bit-identical from run to run.
#include "common.cuh"

namespace fastres {
namespace cuda {
namespace {

constexpr int kSums = 3;  // sum dz, sum dz*(y-mean), sum dz*(r-r_mean)

// dz for the pack at element i = (row, col) of the matrix.
template <typename T, int VEC>
__device__ __forceinline__ void grad_z(const BnBackwardParams<T>& p, int64_t row, int64_t col, int64_t i,
                                       acc_type_t<T> (&dz)[VEC]) {
  using acc_t = acc_type_t<T>;
  const auto g = load_pack<VEC>(p.grad_out + i);
  if (p.relu && p.mask != nullptr) {
    // VEC divides 8 and col is a multiple of VEC: the pack's bits lie in one byte.
    const unsigned bits = p.mask[row * p.mask_stride + (col >> 3)] >> (col & 7);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dz[j] = (bits >> j) & 1u ? static_cast<acc_t>(g.v[j]) : acc_t(0);
  } else if (p.relu) {
    const auto o = load_pack<VEC>(p.out + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dz[j] = bn_act_grad_z(static_cast<acc_t>(g.v[j]), static_cast<acc_t>(o.v[j]), true);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dz[j] = static_cast<acc_t>(g.v[j]);
  }
}

// Per-channel values a thread of the reduction kernels holds for its VEC channels.
template <typename acc_t, int VEC>
struct ReduceChannels {
  acc_t mean[VEC], r_mean[VEC], a[VEC], r_a[VEC];  // a, r_a: eval mode's input-gradient scales
};

template <typename T, int VEC>
__device__ __forceinline__ void load_reduce_channel(const BnBackwardParams<T>& p, int j, int64_t c,
                                                    ReduceChannels<acc_type_t<T>, VEC>& ch) {
  using acc_t = acc_type_t<T>;
  const bool dual = p.r != nullptr;
  ch.mean[j] = p.mean[c];
  ch.r_mean[j] = dual ? p.r_mean[c] : acc_t(0);
  ch.a[j] = p.training ? acc_t(0) : bn_grad_input_scale(p.weight[c], p.invstd[c]);
  ch.r_a[j] = p.training || !dual ? acc_t(0) : bn_grad_input_scale(p.r_weight[c], p.r_invstd[c]);
}

// Adds the pack's terms to sums[0..2][VEC]. In eval mode the input gradients need no sums: they are
// written here, and the data is read once.
template <typename T, int VEC>
__device__ __forceinline__ void accumulate(const BnBackwardParams<T>& p, int64_t row, int64_t col, int64_t i,
                                           const ReduceChannels<acc_type_t<T>, VEC>& ch,
                                           acc_type_t<T> (&sums)[kSums][VEC]) {
  using acc_t = acc_type_t<T>;
  acc_t dz[VEC];
  grad_z<T, VEC>(p, row, col, i, dz);
  const auto y = load_pack<VEC>(p.y + i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sums[0][j] += dz[j];
    sums[1][j] += dz[j] * (static_cast<acc_t>(y.v[j]) - ch.mean[j]);
  }
  if (p.r != nullptr) {
    const auto r = load_pack<VEC>(p.r + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sums[2][j] += dz[j] * (static_cast<acc_t>(r.v[j]) - ch.r_mean[j]);
  }
  if (!p.training) {
    Pack<T, VEC> gy;
#pragma unroll
    for (int j = 0; j < VEC; ++j) gy.v[j] = static_cast<T>(bn_eval_grad_input(dz[j], ch.a[j]));
    store_pack(p.grad_y + i, gy);
    if (p.grad_residual != nullptr) {
      Pack<T, VEC> gr;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        gr.v[j] = static_cast<T>(p.r != nullptr ? bn_eval_grad_input(dz[j], ch.r_a[j]) : dz[j]);
      }
      store_pack(p.grad_residual + i, gr);
    }
  }
}

// NHWC: block (x: column packs, y: rows); blockIdx.y is the split of rows. Writes
// partial[split][s][c] for the kSums sums s.
template <typename T, int VEC>
__global__ void reduce_columns_kernel(BnBackwardParams<T> p, int64_t rows_per_split) {
  using acc_t = acc_type_t<T>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim.y][blockDim.x][kSums * VEC]
  const Matrix m = p.m;
  const int64_t C = m.cols;
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = col < C;
  acc_t sums[kSums][VEC];
  ReduceChannels<acc_t, VEC> ch;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sums[0][j] = sums[1][j] = sums[2][j] = acc_t(0);
    if (active) load_reduce_channel<T, VEC>(p, j, col + j, ch);
  }
  if (active) {
    const int64_t row_end = std::min(m.rows, (int64_t(blockIdx.y) + 1) * rows_per_split);
    for (int64_t row = int64_t(blockIdx.y) * rows_per_split + threadIdx.y; row < row_end; row += blockDim.y) {
      accumulate<T, VEC>(p, row, col, row * C + col, ch, sums);
    }
  }
  acc_t* mine = smem + (threadIdx.y * blockDim.x + threadIdx.x) * kSums * VEC;
#pragma unroll
  for (int s = 0; s < kSums; ++s) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) mine[s * VEC + j] = sums[s][j];
  }
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    for (unsigned t = 1; t < blockDim.y; ++t) {  // fixed order over the block's row lanes
      const acc_t* other = smem + (t * blockDim.x + threadIdx.x) * kSums * VEC;
#pragma unroll
      for (int s = 0; s < kSums; ++s) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) sums[s][j] += other[s * VEC + j];
      }
    }
    acc_t* partial = p.workspace + int64_t(blockIdx.y) * kSums * C;
#pragma unroll
    for (int s = 0; s < kSums; ++s) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) partial[s * C + col + j] = sums[s][j];
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // complete in lane 0
}

// NCHW: block (x: a multiple of 32 threads along a plane, y: planes). Writes
// partial[plane][s] for the kSums sums s over the plane.
template <typename T, int VEC>
__global__ void reduce_planes_kernel(BnBackwardParams<T> p) {
  using acc_t = acc_type_t<T>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim.y][warps per plane][kSums]
  const Matrix m = p.m;
  const unsigned warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Every thread runs the same number of iterations: the block synchronizes in each.
  for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < m.rows; first += int64_t(gridDim.x) * blockDim.y) {
    const int64_t plane = first + threadIdx.y;
    acc_t sums[kSums][VEC];
    ReduceChannels<acc_t, VEC> ch;
#pragma unroll
    for (int j = 0; j < VEC; ++j) sums[0][j] = sums[1][j] = sums[2][j] = acc_t(0);
    if (plane < m.rows) {
      const int64_t c = plane % m.channels;
#pragma unroll
      for (int j = 0; j < VEC; ++j) load_reduce_channel<T, VEC>(p, j, c, ch);
      for (int64_t col = int64_t(threadIdx.x) * VEC; col < m.cols; col += int64_t(blockDim.x) * VEC) {
        accumulate<T, VEC>(p, plane, col, plane * m.cols + col, ch, sums);
      }
    }
    acc_t total[kSums];
#pragma unroll
    for (int s = 0; s < kSums; ++s) {
      total[s] = sums[s][0];
#pragma unroll
      for (int j = 1; j < VEC; ++j) total[s] += sums[s][j];
      total[s] = warp_sum(total[s]);
      if (lane == 0) smem[(threadIdx.y * warps + warp) * kSums + s] = total[s];
    }
    __syncthreads();
    if (threadIdx.x == 0 && plane < m.rows) {
      for (unsigned w = 1; w < warps; ++w) {
#pragma unroll
        for (int s = 0; s < kSums; ++s) total[s] += smem[(threadIdx.y * warps + w) * kSums + s];
      }
#pragma unroll
      for (int s = 0; s < kSums; ++s) p.workspace[plane * kSums + s] = total[s];
    }
    __syncthreads();
  }
}

// One warp per channel: sums the partials over the splits in a fixed order, then writes the BN
// gradients and coef[0..4][c] = a, b, k, r_a, r_k.
//   NHWC: partial (split s, sum t) of channel c at s * kSums*C + t*C + c;
//   NCHW: at (s * C + c) * kSums + t (the splits are the batch entries).
template <typename T>
__global__ void finalize_kernel(BnBackwardParams<T> p, int64_t splits, acc_type_t<T>* coef) {
  using acc_t = acc_type_t<T>;
  const Matrix m = p.m;
  const int64_t C = m.channels;
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;  // whole warps leave together: the warp's lanes share c
  const int64_t split_stride = kSums * C;
  const int64_t sum_stride = m.channel_per_column ? C : 1;
  const acc_t* base = p.workspace + (m.channel_per_column ? c : c * kSums);
  acc_t sums[kSums] = {0, 0, 0};
  for (int64_t s = threadIdx.x; s < splits; s += 32) {
#pragma unroll
    for (int t = 0; t < kSums; ++t) sums[t] += base[s * split_stride + t * sum_stride];
  }
#pragma unroll
  for (int t = 0; t < kSums; ++t) sums[t] = warp_sum(sums[t]);
  if (threadIdx.x == 0) {
    const auto g = bn_grad_coeffs(sums[0], sums[1], p.invstd[c], p.weight[c], p.inv_count, p.training);
    p.grad_weight[c] = g.grad_weight;
    p.grad_bias[c] = g.grad_bias;
    coef[c] = g.a;
    coef[C + c] = g.b;
    coef[2 * C + c] = g.k;
    if (p.r != nullptr) {
      const auto h = bn_grad_coeffs(sums[0], sums[2], p.r_invstd[c], p.r_weight[c], p.inv_count, p.training);
      p.grad_r_weight[c] = h.grad_weight;
      p.grad_r_bias[c] = h.grad_bias;
      coef[3 * C + c] = h.a;
      coef[4 * C + c] = h.k;
    }
  }
}

// Training: grad_y and grad_residual over the [rows, cols] matrix.
template <typename T, int VEC>
__global__ void grad_input_kernel(BnBackwardParams<T> p, const acc_type_t<T>* coef) {
  using acc_t = acc_type_t<T>;
  const Matrix m = p.m;
  const int64_t C = m.channels;
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= m.cols) return;
  const bool dual = p.r != nullptr;
  acc_t mean[VEC], a[VEC], b[VEC], k[VEC], r_mean[VEC], r_a[VEC], r_k[VEC];
  auto load_channel = [&](int j, int64_t c) {
    mean[j] = p.mean[c];
    a[j] = coef[c];
    b[j] = coef[C + c];
    k[j] = coef[2 * C + c];
    r_mean[j] = dual ? p.r_mean[c] : acc_t(0);
    r_a[j] = dual ? coef[3 * C + c] : acc_t(0);
    r_k[j] = dual ? coef[4 * C + c] : acc_t(0);
  };
  if (m.channel_per_column) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) load_channel(j, col + j);
  }
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < m.rows;
       row += int64_t(gridDim.y) * blockDim.y) {
    if (!m.channel_per_column) {
      const int64_t c = row % C;
#pragma unroll
      for (int j = 0; j < VEC; ++j) load_channel(j, c);
    }
    const int64_t i = row * m.cols + col;
    acc_t dz[VEC];
    grad_z<T, VEC>(p, row, col, i, dz);
    Pack<T, VEC> gy;
    const auto y = load_pack<VEC>(p.y + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      gy.v[j] = static_cast<T>(bn_train_grad_input(dz[j], static_cast<acc_t>(y.v[j]), mean[j], a[j], b[j], k[j]));
    }
    store_pack(p.grad_y + i, gy);
    if (p.grad_residual != nullptr) {
      Pack<T, VEC> gr;
      if (!dual) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) gr.v[j] = static_cast<T>(dz[j]);
      } else {
        const auto r = load_pack<VEC>(p.r + i);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          gr.v[j] = static_cast<T>(
              bn_train_grad_input(dz[j], static_cast<acc_t>(r.v[j]), r_mean[j], r_a[j], b[j], r_k[j]));
        }
      }
      store_pack(p.grad_residual + i, gr);
    }
  }
}

template <typename T, int VEC>
void launch_passes(const BnBackwardParams<T>& p, cudaStream_t stream) {
  using acc_t = acc_type_t<T>;
  const Matrix& m = p.m;
  const int64_t C = m.channels;
  acc_t* coef = p.workspace + partials_size(m, kSums);
  int64_t splits;
  if (m.channel_per_column) {
    splits = row_splits(m);
    const dim3 block = row_block(m.cols / VEC, 1, 64);
    const dim3 grid(static_cast<unsigned>(ceil_div(m.cols / VEC, block.x)), static_cast<unsigned>(splits));
    const size_t smem = size_t(kThreads) * kSums * VEC * sizeof(acc_t);
    reduce_columns_kernel<T, VEC><<<grid, block, smem, stream>>>(p, ceil_div(m.rows, splits));
  } else {
    splits = m.rows / C;
    const dim3 block = row_block(m.cols / VEC, 32, kThreads);
    const auto grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(m.rows, block.y), 65535));
    const size_t smem = size_t(block.y) * (block.x / 32) * kSums * sizeof(acc_t);
    reduce_planes_kernel<T, VEC><<<grid, block, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 finalize_block(32, 8);
  finalize_kernel<T><<<static_cast<unsigned>(ceil_div(C, finalize_block.y)), finalize_block, 0, stream>>>(
      p, splits, coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!p.training) return;  // the reduction pass wrote the input gradients
  const dim3 block = row_block(m.cols / VEC, 1, kThreads);
  grad_input_kernel<T, VEC><<<elementwise_grid(m, VEC, block), block, 0, stream>>>(p, coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void launch_bn_backward(const BnBackwardParams<T>& p, cudaStream_t stream) {
  if (p.m.rows == 0 || p.m.cols == 0) return;
  constexpr int VEC = kPackWidth<T>;
  const bool packed = p.m.cols % VEC == 0 && aligned16(p.grad_out) && aligned16(p.y) && aligned16(p.grad_y) &&
                      (p.out == nullptr || aligned16(p.out)) && (p.r == nullptr || aligned16(p.r)) &&
                      (p.grad_residual == nullptr || aligned16(p.grad_residual));
  if (packed) {
    launch_passes<T, VEC>(p, stream);
  } else {
    launch_passes<T, 1>(p, stream);
  }
}

template void launch_bn_backward<float>(const BnBackwardParams<float>&, cudaStream_t);
template void launch_bn_backward<double>(const BnBackwardParams<double>&, cudaStream_t);
template void launch_bn_backward<c10::Half>(const BnBackwardParams<c10::Half>&, cudaStream_t);
template void launch_bn_backward<c10::BFloat16>(const BnBackwardParams<c10::BFloat16>&, cudaStream_t);

}  // namespace cuda
}  // namespace fastres
