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

// Geometry of a 4-D activation stored densely as NCHW or NHWC (channels_last); a 1x1 map (HW == 1), the same
// memory either way, always counts as NHWC.
struct ActivationShape {
  int64_t N = 0, C = 0, HW = 0;
  bool channels_last = false;
  int64_t numel() const { return N * C * HW; }
};

// The BN apply: out = act(y * scale[c] + shift[c] + residual), or in its dual form
// act((y - center[c]) * scale[c] + shift[c] + (residual - residual_center[c]) * residual_scale[c] +
// residual_shift[c]); optionally also the ReLU mask, one bit per element (see mask_bytes_per_row).
struct BnApplyArgs {
  ActivationShape shape;
  at::Tensor y, center, scale, shift, residual, residual_center, residual_scale, residual_shift, out, mask;
  bool relu = false;
  bool residual_affine = false;  // the dual form (residual_scale, residual_shift defined)
  bool centered = false;         // center or residual_center given (else both are zeros)
  bool write_mask = false;       // mask defined
};
BnApplyArgs prepare_bn_apply(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& shift,
                             const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& residual_scale,
                             const std::optional<at::Tensor>& residual_shift, bool relu, bool mask,
                             const std::optional<at::Tensor>& center,
                             const std::optional<at::Tensor>& residual_center, const char* op);

// The ReLU mask of an activation seen as its [rows, cols] matrix in memory order (NHWC: rows =
// N*H*W, cols = C, and any 1x1 map; NCHW: rows = N*C, cols = H*W) is a uint8 [rows, ceil(cols / 8)] tensor: bit j
// of byte b of a row is the element at column 8*b + j. Rows start on a byte, so a kernel can
// give whole bytes to threads without crossing rows.
inline int64_t mask_bytes_per_row(const ActivationShape& s) {
  const int64_t cols = s.channels_last ? s.C : s.HW;
  return (cols + 7) / 8;
}
inline int64_t mask_rows(const ActivationShape& s) { return s.channels_last ? s.N * s.HW : s.N * s.C; }

// Batch statistics of y per channel and what follows from them: mean, invstd = 1/sqrt(var+eps)
// (biased variance), the apply coefficients scale = weight*invstd and shift = bias - mean*scale,
// and, when running statistics are given, their updated values (new tensors; the inputs are not
// written).
struct BnStatsArgs {
  ActivationShape shape;
  at::Tensor y;
  at::Tensor weight, bias, running_mean, running_var;  // [C], math dtype (ones/zeros/zeros/ones if absent)
  at::Tensor mean, invstd, scale, shift;               // [C], math dtype
  at::Tensor new_running_mean, new_running_var;        // [C], math dtype; returned only with running stats
  double momentum = 0, eps = 0;
  bool update_running = false;
};
BnStatsArgs prepare_bn_stats(const at::Tensor& y, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, double momentum, double eps);
// The op's outputs: the new running statistics cast to the given running statistics' dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_bn_stats(
    const BnStatsArgs& args, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var);

// Backward of out = act(xhat * weight + bias + res), xhat = (y - mean) * invstd, where res is
// the residual r itself or, in the dual form, a second BN of it: (r - r_mean) * r_invstd *
// r_weight + r_bias. The ReLU's gradient mask comes from `mask` when given, else from `out`.
struct BnBackwardArgs {
  ActivationShape shape;
  at::Tensor grad_out, out, mask, y;          // out undefined unless relu without mask
  at::Tensor mean, invstd, weight;            // [C], math dtype
  at::Tensor r, r_mean, r_invstd, r_weight;   // dual form only
  at::Tensor grad_y, grad_residual, grad_weight, grad_bias, grad_r_weight, grad_r_bias;
  bool relu = false, training = false, residual_grad = false, dual = false, use_mask = false;
};
BnBackwardArgs prepare_bn_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                   const std::optional<at::Tensor>& mask, const at::Tensor& y,
                                   const at::Tensor& mean, const at::Tensor& invstd,
                                   const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& residual,
                                   const std::optional<at::Tensor>& residual_mean,
                                   const std::optional<at::Tensor>& residual_invstd,
                                   const std::optional<at::Tensor>& residual_weight, bool relu,
                                   bool training, bool residual_grad, const char* op);

// ---- entry points -------------------------------------------------------------------------
#define FASTRES_DECLARE_KERNELS(suffix)                                                          \
  std::tuple<at::Tensor, at::Tensor> fold_bn_##suffix(                                           \
      const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,                 \
      const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& running_mean,    \
      const at::Tensor& running_var, double eps);                                                \
  at::Tensor add_relu_##suffix(const at::Tensor& x, const at::Tensor& residual);                 \
  at::Tensor bn_act_forward_##suffix(const at::Tensor& y, const std::optional<at::Tensor>& scale, \
                                     const std::optional<at::Tensor>& shift,                     \
                                     const std::optional<at::Tensor>& residual, bool relu,        \
                                     const std::optional<at::Tensor>& center);                   \
  std::tuple<at::Tensor, at::Tensor> bn_apply_##suffix(                                          \
      const at::Tensor& y, const std::optional<at::Tensor>& scale,                               \
      const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual,          \
      const std::optional<at::Tensor>& residual_scale,                                           \
      const std::optional<at::Tensor>& residual_shift, bool relu, bool mask,                     \
      const std::optional<at::Tensor>& center, const std::optional<at::Tensor>& residual_center); \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>            \
      bn_stats_##suffix(const at::Tensor& y, const std::optional<at::Tensor>& weight,            \
                        const std::optional<at::Tensor>& bias,                                   \
                        const std::optional<at::Tensor>& running_mean,                           \
                        const std::optional<at::Tensor>& running_var, double momentum, double eps); \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_##suffix(           \
      const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,                    \
      const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight,  \
      bool relu, bool training, bool residual_grad);                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>            \
      bn_apply_backward_##suffix(                                                                \
          const at::Tensor& grad_out, const std::optional<at::Tensor>& out,                      \
          const std::optional<at::Tensor>& mask, const at::Tensor& y, const at::Tensor& mean,    \
          const at::Tensor& invstd, const std::optional<at::Tensor>& weight,                     \
          const std::optional<at::Tensor>& residual,                                             \
          const std::optional<at::Tensor>& residual_mean,                                        \
          const std::optional<at::Tensor>& residual_invstd,                                      \
          const std::optional<at::Tensor>& residual_weight, bool relu, bool training,            \
          bool residual_grad);

FASTRES_DECLARE_KERNELS(cpu)
#ifdef FASTRES_WITH_CUDA
FASTRES_DECLARE_KERNELS(cuda)
#endif
#undef FASTRES_DECLARE_KERNELS

}  // namespace fastres
