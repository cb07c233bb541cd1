// Interface between the CUDA entry points (registration.cpp, compiled by the host compiler with
// the ATen headers) and the kernels (*.cu, which see no ATen header, to keep nvcc fast): plain
// parameter structs over raw pointers, and the launchers, instantiated in the .cu files for
// float, double, c10::Half and c10::BFloat16.
#pragma once

#include <fastres/math.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace fastres {
namespace cuda {

// A dense 4-D activation seen as a row-major [rows, cols] matrix:
//   NHWC: rows = N*H*W, cols = C, channel = column;
//   NCHW: rows = N*C,   cols = H*W, channel = row % C.
struct Matrix {
  int64_t rows = 0, cols = 0, channels = 0;
  bool channel_per_column = false;
};

template <typename T>
struct FoldBnParams {
  using acc_t = acc_type_t<T>;
  const T* weight;  // [out_channels, inner]
  T* weight_out;
  T* bias_out;
  const acc_t *bn_weight, *bn_bias, *running_mean, *running_var, *conv_bias;
  acc_t eps;
  int64_t out_channels, inner;
};

// The BN apply, plain or dual: out = act(y * scale + shift + residual [* r_scale + r_shift]),
// and the ReLU mask when `mask` is set (layout: fastres/kernels.h, mask_bytes_per_row).
template <typename T>
struct BnApplyParams {
  using acc_t = acc_type_t<T>;
  Matrix m;
  const T* y;
  const T* residual;  // may be null
  T* out;
  const acc_t *center, *scale, *shift;
  const acc_t *r_center, *r_scale, *r_shift;  // the dual form; null otherwise
  uint8_t* mask;                   // may be null
  int64_t mask_stride;             // bytes per mask row
  bool relu;
};

// Per-channel statistics and the finalize step (_bn_stats).
template <typename T>
struct BnStatsParams {
  using acc_t = acc_type_t<T>;
  Matrix m;
  const T* y;
  const acc_t *weight, *bias, *running_mean, *running_var;
  acc_t *mean, *invstd, *scale, *shift, *new_running_mean, *new_running_var;
  acc_t* workspace;  // bn_stats_workspace_size(m) elements
  acc_t momentum, eps;
};

// Backward of the apply (_bn_apply_backward, _bn_act_backward): dz from grad_out and the mask
// or out; the dual form's second BN (r, r_mean, ...) when r is set.
template <typename T>
struct BnBackwardParams {
  using acc_t = acc_type_t<T>;
  Matrix m;
  const T* grad_out;
  const T* out;          // read only when relu without mask
  const uint8_t* mask;   // may be null
  int64_t mask_stride;
  const T* y;
  const acc_t *mean, *invstd, *weight;
  const T* r;            // the dual form; null otherwise
  const acc_t *r_mean, *r_invstd, *r_weight;
  T* grad_y;
  T* grad_residual;      // may be null; dz, or in the dual form the residual's input gradient
  acc_t *grad_weight, *grad_bias, *grad_r_weight, *grad_r_bias;
  acc_t* workspace;      // bn_backward_workspace_size(m) elements
  acc_t inv_count;       // 1 / (N*H*W)
  bool relu, training;
};

// NHWC reductions cut the rows into this many fixed splits (each a block row of partial results);
// it depends on the shape alone, so the summation order is the same on every run.
inline int64_t row_splits(const Matrix& m) {
  return std::min<int64_t>(1024, std::max<int64_t>(1, (m.rows + 63) / 64));
}

// Partial results: NHWC [splits][kinds][C], NCHW [N*C][kinds].
inline int64_t partials_size(const Matrix& m, int kinds) {
  return (m.channel_per_column ? row_splits(m) * m.cols : m.rows) * kinds;
}

// (mean, m2) partials.
inline int64_t bn_stats_workspace_size(const Matrix& m) { return partials_size(m, 2); }

// (sum dz, sum dz*(y-mean), sum dz*(r-r_mean)) partials, then the per-channel coefficients
// a, b, k, r_a, r_k of the input gradients.
inline int64_t bn_backward_workspace_size(const Matrix& m) {
  return partials_size(m, 3) + 5 * m.channels;
}

template <typename T>
void launch_fold_bn(const FoldBnParams<T>& p, cudaStream_t stream);
template <typename T>
void launch_add_relu(const T* x, const T* residual, T* out, int64_t n, cudaStream_t stream);
template <typename T>
void launch_bn_apply(const BnApplyParams<T>& p, cudaStream_t stream);
template <typename T>
void launch_bn_stats(const BnStatsParams<T>& p, cudaStream_t stream);
template <typename T>
void launch_bn_backward(const BnBackwardParams<T>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastres
