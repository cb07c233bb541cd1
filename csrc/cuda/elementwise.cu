// CUDA kernels of the elementwise forward ops: _fold_bn, _add_relu, _bn_apply (_bn_act_forward).
// Each has a 16-byte-pack variant (VEC = 16 / sizeof(T)) used when every pointer is 16-byte
// aligned and rows are whole packs, and a one-element variant otherwise.
#include "common.cuh"

namespace fastres {
namespace cuda {
namespace {

// ---- _fold_bn: [out_channels, inner] rows, one BN channel per row -------------------------
template <typename T, int VEC>
__global__ void fold_bn_kernel(FoldBnParams<T> p) {
  using acc_t = acc_type_t<T>;
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= p.inner) return;
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < p.out_channels;
       row += int64_t(gridDim.y) * blockDim.y) {
    const acc_t scale = fold_bn_scale(p.bn_weight[row], p.running_var[row], p.eps);
    if (col == 0) {
      p.bias_out[row] =
          static_cast<T>(fold_bn_bias(p.conv_bias[row], p.running_mean[row], scale, p.bn_bias[row]));
    }
    const int64_t i = row * p.inner + col;
    const auto w = load_pack<VEC>(p.weight + i);
    Pack<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      o.v[j] = static_cast<T>(fold_bn_weight_value(static_cast<acc_t>(w.v[j]), scale));
    }
    store_pack(p.weight_out + i, o);
  }
}

// ---- _add_relu: flat ---------------------------------------------------------------------
template <typename T, int VEC>
__global__ void add_relu_kernel(const T* x, const T* r, T* out, int64_t n) {
  using acc_t = acc_type_t<T>;
  const int64_t packs = n / VEC;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t k = first; k < packs; k += stride) {
    const auto xv = load_pack<VEC>(x + k * VEC);
    const auto rv = load_pack<VEC>(r + k * VEC);
    Pack<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      o.v[j] = static_cast<T>(add_relu_value(static_cast<acc_t>(xv.v[j]), static_cast<acc_t>(rv.v[j])));
    }
    store_pack(out + k * VEC, o);
  }
  // The last n % VEC elements.
  const int64_t i = packs * VEC + first;
  if (i < n) {
    out[i] = static_cast<T>(add_relu_value(static_cast<acc_t>(x[i]), static_cast<acc_t>(r[i])));
  }
}

// ---- _bn_apply: [rows, cols] (see Matrix) -------------------------------------------------
// A thread owns a group of 8 consecutive columns (8 / VEC packs) of every row it visits, so it
// writes whole mask bytes; rows start on a byte in the mask.
constexpr int kGroup = 8;

template <typename T, int VEC>
__global__ void bn_apply_kernel(BnApplyParams<T> p) {
  using acc_t = acc_type_t<T>;
  constexpr int kPacks = kGroup / VEC;
  const Matrix m = p.m;
  const int64_t col0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kGroup;
  if (col0 >= m.cols) return;
  const bool dual = p.r_scale != nullptr;
  acc_t center[kGroup], scale[kGroup], shift[kGroup], r_center[kGroup], r_scale[kGroup], r_shift[kGroup];
  auto load_channel = [&](int j, int64_t c) {
    center[j] = p.center[c];
    scale[j] = p.scale[c];
    shift[j] = p.shift[c];
    r_center[j] = dual ? p.r_center[c] : acc_t(0);
    r_scale[j] = dual ? p.r_scale[c] : acc_t(1);
    r_shift[j] = dual ? p.r_shift[c] : acc_t(0);
  };
  if (m.channel_per_column) {  // NHWC: this thread's channels are fixed; load them once
#pragma unroll
    for (int j = 0; j < kGroup; ++j) load_channel(j, col0 + j < m.cols ? col0 + j : col0);
  }
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < m.rows;
       row += int64_t(gridDim.y) * blockDim.y) {
    if (!m.channel_per_column) {
      const int64_t c = row % m.channels;
#pragma unroll
      for (int j = 0; j < kGroup; ++j) load_channel(j, c);
    }
    unsigned bits = 0;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t col = col0 + k * VEC;
      if (col < m.cols) {  // cols is a multiple of VEC: packs are whole
        const int64_t i = row * m.cols + col;
        const auto yv = load_pack<VEC>(p.y + i);
        Pack<T, VEC> o;
        if (p.residual != nullptr) {
          const auto rv = load_pack<VEC>(p.residual + i);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const int g = k * VEC + j;
            const acc_t v = dual ? bn_dual_act_value(static_cast<acc_t>(yv.v[j]), center[g], scale[g], shift[g],
                                                     static_cast<acc_t>(rv.v[j]), r_center[g], r_scale[g],
                                                     r_shift[g], p.relu)
                                 : bn_act_value(static_cast<acc_t>(yv.v[j]), center[g], scale[g], shift[g],
                                                static_cast<acc_t>(rv.v[j]), p.relu);
            o.v[j] = static_cast<T>(v);
          }
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const int g = k * VEC + j;
            o.v[j] = static_cast<T>(
                bn_act_value(static_cast<acc_t>(yv.v[j]), center[g], scale[g], shift[g], p.relu));
          }
        }
        store_pack(p.out + i, o);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          // From the stored value, as the CPU kernel does (see relu_mask_bit).
          bits |= unsigned(relu_mask_bit(static_cast<acc_t>(o.v[j]))) << (k * VEC + j);
        }
      }
    }
    if (p.mask != nullptr) p.mask[row * p.mask_stride + col0 / kGroup] = static_cast<uint8_t>(bits);
  }
}

}  // namespace

template <typename T>
void launch_fold_bn(const FoldBnParams<T>& p, cudaStream_t stream) {
  if (p.out_channels == 0 || p.inner == 0) return;
  constexpr int VEC = kPackWidth<T>;
  const Matrix m{p.out_channels, p.inner, p.out_channels, false};
  if (p.inner % VEC == 0 && aligned16(p.weight) && aligned16(p.weight_out)) {
    const dim3 block = row_block(p.inner / VEC, 1, kThreads);
    fold_bn_kernel<T, VEC><<<elementwise_grid(m, VEC, block), block, 0, stream>>>(p);
  } else {
    const dim3 block = row_block(p.inner, 1, kThreads);
    fold_bn_kernel<T, 1><<<elementwise_grid(m, 1, block), block, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_add_relu(const T* x, const T* residual, T* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  constexpr int VEC = kPackWidth<T>;
  const int64_t max_blocks = 8192;  // grid-stride beyond this
  if (aligned16(x) && aligned16(residual) && aligned16(out)) {
    // Enough threads for every pack and for the n % VEC tail.
    const int64_t threads = std::max<int64_t>(n / VEC, n % VEC);
    const auto blocks = static_cast<unsigned>(std::min(ceil_div(threads, kThreads), max_blocks));
    add_relu_kernel<T, VEC><<<blocks, kThreads, 0, stream>>>(x, residual, out, n);
  } else {
    const auto blocks = static_cast<unsigned>(std::min(ceil_div(n, kThreads), max_blocks));
    add_relu_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(x, residual, out, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_bn_apply(const BnApplyParams<T>& p, cudaStream_t stream) {
  if (p.m.rows == 0 || p.m.cols == 0) return;
  constexpr int VEC = kPackWidth<T>;
  const bool packed = p.m.cols % VEC == 0 && aligned16(p.y) && aligned16(p.out) &&
                      (p.residual == nullptr || aligned16(p.residual));
  const int64_t groups = ceil_div(p.m.cols, kGroup);
  const dim3 block = row_block(groups, 1, kThreads);
  const dim3 grid(static_cast<unsigned>(ceil_div(groups, block.x)),
                  static_cast<unsigned>(std::min(ceil_div(p.m.rows, block.y), kMaxGridY)));
  if (packed) {
    bn_apply_kernel<T, VEC><<<grid, block, 0, stream>>>(p);
  } else {
    bn_apply_kernel<T, 1><<<grid, block, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define FASTRES_INSTANTIATE(T)                                                              \
  template void launch_fold_bn<T>(const FoldBnParams<T>&, cudaStream_t);                    \
  template void launch_add_relu<T>(const T*, const T*, T*, int64_t, cudaStream_t);          \
  template void launch_bn_apply<T>(const BnApplyParams<T>&, cudaStream_t);
FASTRES_INSTANTIATE(float)
FASTRES_INSTANTIATE(double)
FASTRES_INSTANTIATE(c10::Half)
FASTRES_INSTANTIATE(c10::BFloat16)
#undef FASTRES_INSTANTIATE

}  // namespace cuda
}  // namespace fastres
