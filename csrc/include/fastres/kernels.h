// Host-side declarations of fastres._C: argument preparation shared by the CPU and CUDA
// entry points, and the entry points themselves (registered in csrc/module.cpp for CPU and
// csrc/cuda/registration.cpp for CUDA).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastres {

// ---- validated, layout-normalized arguments (csrc/prepare.cpp) -------------------------
// Per-channel vectors are converted to the math dtype (fp32, or fp64 for fp64 data) and made
// contiguous; missing ones are materialized (scale=1, shift=0, weight=1, conv_bias=0), so
// kernels never branch on optional arguments.

struct FoldBnArgs {
  at::Tensor weight;       // [Cout, ...] laid out as Cout contiguous blocks of `inner` elements
  at::Tensor weight_out;   // same strides as `weight`
  at::Tensor conv_bias, bn_weight, bn_bias, running_mean, running_var;  // [Cout], math dtype
  at::Tensor bias_out;     // [Cout], conv_weight's dtype
  double eps = 0;
  int64_t out_channels = 0;
  int64_t inner = 0;       // elements per output channel
};
FoldBnArgs prepare_fold_bn(const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                           const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                           const at::Tensor& running_mean, const at::Tensor& running_var,
                           double eps);
// The folded weight in conv_weight's own layout (copies only when conv_weight was not
// laid out as per-channel blocks).
std::tuple<at::Tensor, at::Tensor> finish_fold_bn(const FoldBnArgs& args,
                                                  const at::Tensor& conv_weight);

struct AddReluArgs {
  at::Tensor x, residual, out;  // all contiguous in x's suggested memory format
};
AddReluArgs prepare_add_relu(const at::Tensor& x, const at::Tensor& residual);

// Geometry of a 4-D activation stored densely as NCHW or NHWC (channels_last).
struct ActivationShape {
  int64_t N = 0, C = 0, HW = 0;
  bool channels_last = false;
  int64_t numel() const { return N * C * HW; }
};

struct BnActForwardArgs {
  ActivationShape shape;
  at::Tensor y, scale, shift, residual, out;  // residual undefined when absent
  bool relu = false;
};
BnActForwardArgs prepare_bn_act_forward(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                                        const std::optional<at::Tensor>& shift,
                                        const std::optional<at::Tensor>& residual, bool relu);

struct BnActBackwardArgs {
  ActivationShape shape;
  at::Tensor grad_out, out, y;      // out undefined when relu is false (it is not read then)
  at::Tensor mean, invstd, weight;  // [C], math dtype
  at::Tensor grad_y, grad_residual, grad_weight, grad_bias;
  bool relu = false, training = false, residual_grad = false;
};
BnActBackwardArgs prepare_bn_act_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                          const at::Tensor& y, const at::Tensor& mean,
                                          const at::Tensor& invstd,
                                          const std::optional<at::Tensor>& weight, bool relu,
                                          bool training, bool residual_grad);

// ---- entry points -------------------------------------------------------------------------
#define FASTRES_DECLARE_KERNELS(suffix)                                                          \
  std::tuple<at::Tensor, at::Tensor> fold_bn_##suffix(                                           \
      const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,                 \
      const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& running_mean,    \
      const at::Tensor& running_var, double eps);                                                \
  at::Tensor add_relu_##suffix(const at::Tensor& x, const at::Tensor& residual);                 \
  at::Tensor bn_act_forward_##suffix(const at::Tensor& y, const std::optional<at::Tensor>& scale, \
                                     const std::optional<at::Tensor>& shift,                     \
                                     const std::optional<at::Tensor>& residual, bool relu);       \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_##suffix(           \
      const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,                    \
      const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight,  \
      bool relu, bool training, bool residual_grad);

FASTRES_DECLARE_KERNELS(cpu)
#ifdef FASTRES_WITH_CUDA
FASTRES_DECLARE_KERNELS(cuda)
#endif
#undef FASTRES_DECLARE_KERNELS

}  // namespace fastres
