// CUDA kernels of _bn_act_backward:
//   1. per-channel partial sums of dz and dz*(y-mean), one block row of partials per fixed
//      split of the data (no atomics);
//   2. a finalize kernel adding the partials in a fixed order (one warp per channel) and
//      turning them into grad_weight, grad_bias and the coefficients of grad_y;
//   3. an elementwise pass writing grad_y (and grad_residual = dz).
// The splits depend on the shape alone, so results are bit-identical from run to run.
#include "common.cuh"

namespace fastres {
namespace cuda {
namespace {

template <typename T, int VEC>
struct BackwardPack {
  using acc_t = acc_type_t<T>;
  // dz for the pack at element i.
  static __device__ __forceinline__ void grad_z(const BnActBackwardParams<T>& p, int64_t i,
                                                acc_t (&dz)[VEC]) {
    const auto g = load_pack<VEC>(p.grad_out + i);
    if (p.relu) {
      const auto o = load_pack<VEC>(p.out + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        dz[j] = bn_act_grad_z(static_cast<acc_t>(g.v[j]), static_cast<acc_t>(o.v[j]), true);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dz[j] = static_cast<acc_t>(g.v[j]);
    }
  }
};

// NHWC: block (x: column packs, y: rows); blockIdx.y is the split of rows. Writes
// partial[split][0][c] = sum dz, partial[split][1][c] = sum dz*(y-mean).
template <typename T, int VEC>
__global__ void reduce_columns_kernel(BnActBackwardParams<T> p, int64_t rows_per_split) {
  using acc_t = acc_type_t<T>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim.y][blockDim.x][2 * VEC]
  const Matrix m = p.m;
  const int64_t C = m.cols;
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = col < C;
  acc_t sum_dz[VEC], sum_dzc[VEC], mean[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sum_dz[j] = sum_dzc[j] = acc_t(0);
    mean[j] = active ? p.mean[col + j] : acc_t(0);
  }
  if (active) {
    const int64_t row_end = std::min(m.rows, (int64_t(blockIdx.y) + 1) * rows_per_split);
    for (int64_t row = int64_t(blockIdx.y) * rows_per_split + threadIdx.y; row < row_end;
         row += blockDim.y) {
      const int64_t i = row * C + col;
      acc_t dz[VEC];
      BackwardPack<T, VEC>::grad_z(p, i, dz);
      const auto y = load_pack<VEC>(p.y + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        sum_dz[j] += dz[j];
        sum_dzc[j] += dz[j] * (static_cast<acc_t>(y.v[j]) - mean[j]);
      }
    }
  }
  acc_t* mine = smem + (threadIdx.y * blockDim.x + threadIdx.x) * 2 * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    mine[j] = sum_dz[j];
    mine[VEC + j] = sum_dzc[j];
  }
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    for (unsigned t = 1; t < blockDim.y; ++t) {  // fixed order over the block's row lanes
      const acc_t* other = smem + (t * blockDim.x + threadIdx.x) * 2 * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        sum_dz[j] += other[j];
        sum_dzc[j] += other[VEC + j];
      }
    }
    acc_t* partial = p.workspace + int64_t(blockIdx.y) * 2 * C;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      partial[col + j] = sum_dz[j];
      partial[C + col + j] = sum_dzc[j];
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
// partial[plane][0] = sum dz, partial[plane][1] = sum dz*(y-mean) over the plane.
template <typename T, int VEC>
__global__ void reduce_planes_kernel(BnActBackwardParams<T> p) {
  using acc_t = acc_type_t<T>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim.y][warps per plane][2]
  const Matrix m = p.m;
  const unsigned warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Every thread runs the same number of iterations: the block synchronizes in each.
  for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < m.rows;
       first += int64_t(gridDim.x) * blockDim.y) {
    const int64_t plane = first + threadIdx.y;
    acc_t sum_dz = 0, sum_dzc = 0;
    if (plane < m.rows) {
      const acc_t mean = p.mean[plane % m.channels];
      for (int64_t col = int64_t(threadIdx.x) * VEC; col < m.cols; col += int64_t(blockDim.x) * VEC) {
        const int64_t i = plane * m.cols + col;
        acc_t dz[VEC];
        BackwardPack<T, VEC>::grad_z(p, i, dz);
        const auto y = load_pack<VEC>(p.y + i);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sum_dz += dz[j];
          sum_dzc += dz[j] * (static_cast<acc_t>(y.v[j]) - mean);
        }
      }
    }
    sum_dz = warp_sum(sum_dz);
    sum_dzc = warp_sum(sum_dzc);
    if (lane == 0) {
      smem[(threadIdx.y * warps + warp) * 2] = sum_dz;
      smem[(threadIdx.y * warps + warp) * 2 + 1] = sum_dzc;
    }
    __syncthreads();
    if (threadIdx.x == 0 && plane < m.rows) {
      for (unsigned w = 1; w < warps; ++w) {
        sum_dz += smem[(threadIdx.y * warps + w) * 2];
        sum_dzc += smem[(threadIdx.y * warps + w) * 2 + 1];
      }
      p.workspace[plane * 2] = sum_dz;
      p.workspace[plane * 2 + 1] = sum_dzc;
    }
    __syncthreads();
  }
}

// One warp per channel: sums partial[s * split_stride + which * which_stride + c * channel_stride]
// over s in a fixed order, then writes grad_weight, grad_bias and coef[0..2][c] = a, b, k.
template <typename acc_t>
__global__ void finalize_kernel(const acc_t* partial, int64_t splits, int64_t split_stride,
                                int64_t which_stride, int64_t channel_stride, int64_t C,
                                const acc_t* invstd, const acc_t* weight, acc_t inv_count,
                                bool training, acc_t* grad_weight, acc_t* grad_bias, acc_t* coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;  // whole warps leave together: the warp's lanes share c
  acc_t sum_dz = 0, sum_dzc = 0;
  for (int64_t s = threadIdx.x; s < splits; s += 32) {
    const acc_t* src = partial + s * split_stride + c * channel_stride;
    sum_dz += src[0];
    sum_dzc += src[which_stride];
  }
  sum_dz = warp_sum(sum_dz);
  sum_dzc = warp_sum(sum_dzc);
  if (threadIdx.x == 0) {
    const auto r = bn_grad_coeffs(sum_dz, sum_dzc, invstd[c], weight[c], inv_count, training);
    grad_weight[c] = r.grad_weight;
    grad_bias[c] = r.grad_bias;
    coef[c] = r.a;
    coef[C + c] = r.b;
    coef[2 * C + c] = r.k;
  }
}

// grad_y (and grad_residual = dz) over the [rows, cols] matrix.
template <typename T, int VEC>
__global__ void grad_input_kernel(BnActBackwardParams<T> p, const acc_type_t<T>* coef) {
  using acc_t = acc_type_t<T>;
  const Matrix m = p.m;
  const int64_t C = m.channels;
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= m.cols) return;
  acc_t mean[VEC], a[VEC], b[VEC], k[VEC];
  auto load_channel = [&](int j, int64_t c) {
    mean[j] = p.mean[c];
    a[j] = coef[c];
    b[j] = coef[C + c];
    k[j] = coef[2 * C + c];
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
    BackwardPack<T, VEC>::grad_z(p, i, dz);
    if (p.grad_residual != nullptr) {
      Pack<T, VEC> r;
#pragma unroll
      for (int j = 0; j < VEC; ++j) r.v[j] = static_cast<T>(dz[j]);
      store_pack(p.grad_residual + i, r);
    }
    Pack<T, VEC> gy;
    if (p.training) {
      const auto y = load_pack<VEC>(p.y + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        gy.v[j] = static_cast<T>(
            bn_train_grad_input(dz[j], static_cast<acc_t>(y.v[j]), mean[j], a[j], b[j], k[j]));
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) gy.v[j] = static_cast<T>(bn_eval_grad_input(dz[j], a[j]));
    }
    store_pack(p.grad_y + i, gy);
  }
}

template <typename T, int VEC>
void launch_passes(const BnActBackwardParams<T>& p, cudaStream_t stream) {
  using acc_t = acc_type_t<T>;
  const Matrix& m = p.m;
  const int64_t C = m.channels;
  acc_t* coef = p.workspace + bn_act_backward_workspace_size(m) - 3 * C;
  const dim3 finalize_block(32, 8);
  const auto finalize_grid = static_cast<unsigned>(ceil_div(C, finalize_block.y));
  if (m.channel_per_column) {
    const int64_t splits = bn_act_backward_row_splits(m);
    const dim3 block = row_block(m.cols / VEC, 1, 64);
    const dim3 grid(static_cast<unsigned>(ceil_div(m.cols / VEC, block.x)), static_cast<unsigned>(splits));
    const size_t smem = size_t(kThreads) * 2 * VEC * sizeof(acc_t);
    reduce_columns_kernel<T, VEC><<<grid, block, smem, stream>>>(p, ceil_div(m.rows, splits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_kernel<acc_t><<<finalize_grid, finalize_block, 0, stream>>>(
        p.workspace, splits, 2 * C, C, 1, C, p.invstd, p.weight, p.inv_count, p.training,
        p.grad_weight, p.grad_bias, coef);
  } else {
    const dim3 block = row_block(m.cols / VEC, 32, kThreads);
    const auto grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(m.rows, block.y), 65535));
    const size_t smem = size_t(block.y) * (block.x / 32) * 2 * sizeof(acc_t);
    reduce_planes_kernel<T, VEC><<<grid, block, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // partial[(n*C + c) * 2 + which]: splits are the batch entries.
    finalize_kernel<acc_t><<<finalize_grid, finalize_block, 0, stream>>>(
        p.workspace, m.rows / C, 2 * C, 1, 2, C, p.invstd, p.weight, p.inv_count, p.training,
        p.grad_weight, p.grad_bias, coef);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 block = row_block(m.cols / VEC, 1, kThreads);
  grad_input_kernel<T, VEC><<<elementwise_grid(m, VEC, block), block, 0, stream>>>(p, coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void launch_bn_act_backward(const BnActBackwardParams<T>& p, cudaStream_t stream) {
  if (p.m.rows == 0 || p.m.cols == 0) return;
  constexpr int VEC = kPackWidth<T>;
  const bool packed = p.m.cols % VEC == 0 && aligned16(p.grad_out) && aligned16(p.y) &&
                      aligned16(p.grad_y) && (!p.relu || aligned16(p.out)) &&
                      (p.grad_residual == nullptr || aligned16(p.grad_residual));
  if (packed) {
    launch_passes<T, VEC>(p, stream);
  } else {
    launch_passes<T, 1>(p, stream);
  }
}

template void launch_bn_act_backward<float>(const BnActBackwardParams<float>&, cudaStream_t);
template void launch_bn_act_backward<double>(const BnActBackwardParams<double>&, cudaStream_t);
template void launch_bn_act_backward<c10::Half>(const BnActBackwardParams<c10::Half>&, cudaStream_t);
template void launch_bn_act_backward<c10::BFloat16>(const BnActBackwardParams<c10::BFloat16>&,
                                                    cudaStream_t);

}  // namespace cuda
}  // namespace fastres
