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

template <typename T>
struct BnActForwardParams {
  using acc_t = acc_type_t<T>;
  Matrix m;
  const T* y;
  const T* residual;  // may be null
  T* out;
  const acc_t *scale, *shift;
  bool relu;
};

template <typename T>
struct BnActBackwardParams {
  using acc_t = acc_type_t<T>;
  Matrix m;
  const T* grad_out;
  const T* out;  // read only when relu
  const T* y;
  const acc_t *mean, *invstd, *weight;
  T* grad_y;
  T* grad_residual;  // may be null
  acc_t *grad_weight, *grad_bias;
  acc_t* workspace;  // bn_act_backward_workspace_size(m) elements
  acc_t inv_count;   // 1 / (N*H*W)
  bool relu, training;
};

// NHWC reductions cut the rows into this many fixed splits (each a block row of partial sums);
// it depends on the shape alone, so the summation order is the same on every run.
inline int64_t bn_act_backward_row_splits(const Matrix& m) {
  return std::min<int64_t>(1024, std::max<int64_t>(1, (m.rows + 63) / 64));
}

// Partial sums, then the per-channel coefficients a, b, k of grad_y.
inline int64_t bn_act_backward_workspace_size(const Matrix& m) {
  const int64_t partials = m.channel_per_column ? bn_act_backward_row_splits(m) * 2 * m.cols
                                                : m.rows * 2;
  return partials + 3 * m.channels;
}

template <typename T>
void launch_fold_bn(const FoldBnParams<T>& p, cudaStream_t stream);
template <typename T>
void launch_add_relu(const T* x, const T* residual, T* out, int64_t n, cudaStream_t stream);
template <typename T>
void launch_bn_act_forward(const BnActForwardParams<T>& p, cudaStream_t stream);
template <typename T>
void launch_bn_act_backward(const BnActBackwardParams<T>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastres
