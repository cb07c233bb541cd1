// Argument checks and layout normalization shared by the CPU and CUDA entry points.
#include <fastres/kernels.h>

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <string>

namespace fastres {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "fastres::", op, ": ", name, " must be a tensor, got an undefined tensor");
}

void check_data(const at::Tensor& t, const char* op, const char* name) {
  check_defined(t, op, name);
  TORCH_CHECK(is_supported_float(t.scalar_type()), "fastres::", op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                const char* ref_name) {
  check_defined(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), "fastres::", op, ": ", name, " must be on ", ref_name,
              "'s device ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastres::", op, ": ", name,
              " must have ", ref_name, "'s dtype ", ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastres::", op, ": ", name, " must have ", ref_name,
              "'s shape ", ref.sizes(), ", got ", t.sizes());
}

void check_activation(const at::Tensor& t, const char* op, const char* name) {
  check_data(t, op, name);
  TORCH_CHECK(t.dim() == 4, "fastres::", op, ": ", name,
              " must be 4-D (N, C, H, W), got ", t.dim(), "-D with shape ", t.sizes());
}

// A per-channel vector: 1-D with `channels` floating elements on ref's device, returned in the
// math dtype `acc` and contiguous. `size_of` names where `channels` comes from ("y.size(1)").
at::Tensor channel_vector(const at::Tensor& t, int64_t channels, const at::Tensor& ref,
                          at::ScalarType acc, const char* op, const char* name,
                          const char* ref_name, const char* size_of) {
  check_defined(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), "fastres::", op, ": ", name, " must be on ", ref_name,
              "'s device (", ref.device(), "), got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastres::", op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "fastres::", op, ": ", name,
              " must have shape [", channels, "] (", size_of, "), got ", t.sizes());
  return t.to(acc).contiguous();
}

ActivationShape activation_shape(const at::Tensor& t, at::MemoryFormat format) {
  ActivationShape s;
  s.N = t.size(0);
  s.C = t.size(1);
  s.HW = t.size(2) * t.size(3);
  s.channels_last = format == at::MemoryFormat::ChannelsLast;
  return s;
}

}  // namespace

FoldBnArgs prepare_fold_bn(const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                           const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                           const at::Tensor& running_mean, const at::Tensor& running_var,
                           double eps) {
  const char* op = "_fold_bn";
  check_data(conv_weight, op, "conv_weight");
  TORCH_CHECK(conv_weight.dim() == 4, "fastres::_fold_bn: conv_weight must be 4-D (Cout, Cin, kh, kw), got ",
              conv_weight.dim(), "-D with shape ", conv_weight.sizes());
  FoldBnArgs a;
  a.out_channels = conv_weight.size(0);
  a.inner = a.out_channels == 0 ? 0 : conv_weight.numel() / a.out_channels;
  a.eps = eps;
  const auto acc = at::toOpMathType(conv_weight.scalar_type());
  const int64_t C = a.out_channels;
  const char* ref = "conv_weight";
  const char* what = "conv_weight.size(0)";
  a.bn_weight = channel_vector(bn_weight, C, conv_weight, acc, op, "bn_weight", ref, what);
  a.bn_bias = channel_vector(bn_bias, C, conv_weight, acc, op, "bn_bias", ref, what);
  a.running_mean = channel_vector(running_mean, C, conv_weight, acc, op, "running_mean", ref, what);
  a.running_var = channel_vector(running_var, C, conv_weight, acc, op, "running_var", ref, what);
  if (conv_bias.has_value() && conv_bias->defined()) {
    a.conv_bias = channel_vector(*conv_bias, C, conv_weight, acc, op, "conv_bias", ref, what);
  } else {
    a.conv_bias = at::zeros({C}, conv_weight.options().dtype(acc));
  }
  // Each output channel must be one contiguous block of `inner` elements (true of NCHW and
  // channels_last weights alike, since dim 0 is outermost in both); otherwise work on a copy.
  const bool channel_blocks = conv_weight.is_non_overlapping_and_dense() &&
                              (C <= 1 || conv_weight.stride(0) == a.inner);
  a.weight = channel_blocks ? conv_weight : conv_weight.contiguous();
  a.weight_out = at::empty_like(a.weight);  // keeps a dense tensor's strides
  a.bias_out = at::empty({C}, conv_weight.options());
  return a;
}

std::tuple<at::Tensor, at::Tensor> finish_fold_bn(const FoldBnArgs& a, const at::Tensor& conv_weight) {
  if (a.weight.is_same(conv_weight)) {
    return {a.weight_out, a.bias_out};
  }
  at::Tensor w = at::empty_like(conv_weight);
  w.copy_(a.weight_out);
  return {w, a.bias_out};
}

AddReluArgs prepare_add_relu(const at::Tensor& x, const at::Tensor& residual) {
  check_data(x, "_add_relu", "x");
  check_like(residual, x, "_add_relu", "residual", "x");
  const auto format = x.suggest_memory_format();
  AddReluArgs a;
  a.x = x.contiguous(format);
  a.residual = residual.contiguous(format);
  a.out = at::empty(x.sizes(), x.options().memory_format(format));
  return a;
}

BnActForwardArgs prepare_bn_act_forward(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                                        const std::optional<at::Tensor>& shift,
                                        const std::optional<at::Tensor>& residual, bool relu) {
  const char* op = "_bn_act_forward";
  check_activation(y, op, "y");
  const auto format = y.suggest_memory_format();
  const auto acc = at::toOpMathType(y.scalar_type());
  BnActForwardArgs a;
  a.shape = activation_shape(y, format);
  a.relu = relu;
  a.y = y.contiguous(format);
  const int64_t C = a.shape.C;
  const char* ref = "y";
  const char* what = "y.size(1)";
  a.scale = scale.has_value() && scale->defined()
                ? channel_vector(*scale, C, y, acc, op, "scale", ref, what)
                : at::ones({C}, y.options().dtype(acc));
  a.shift = shift.has_value() && shift->defined()
                ? channel_vector(*shift, C, y, acc, op, "shift", ref, what)
                : at::zeros({C}, y.options().dtype(acc));
  if (residual.has_value() && residual->defined()) {
    check_like(*residual, y, op, "residual", "y");
    a.residual = residual->contiguous(format);
  }
  a.out = at::empty(y.sizes(), y.options().memory_format(format));
  return a;
}

BnActBackwardArgs prepare_bn_act_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                          const at::Tensor& y, const at::Tensor& mean,
                                          const at::Tensor& invstd,
                                          const std::optional<at::Tensor>& weight, bool relu,
                                          bool training, bool residual_grad) {
  const char* op = "_bn_act_backward";
  check_activation(y, op, "y");
  check_like(grad_out, y, op, "grad_out", "y");
  const auto format = y.suggest_memory_format();
  const auto acc = at::toOpMathType(y.scalar_type());
  BnActBackwardArgs a;
  a.shape = activation_shape(y, format);
  a.relu = relu;
  a.training = training;
  a.residual_grad = residual_grad;
  a.y = y.contiguous(format);
  a.grad_out = grad_out.contiguous(format);
  if (relu) {  // only the relu mask reads the forward output
    check_like(out, y, op, "out", "y");
    a.out = out.contiguous(format);
  }
  const int64_t C = a.shape.C;
  const char* ref = "y";
  const char* what = "y.size(1)";
  a.mean = channel_vector(mean, C, y, acc, op, "mean", ref, what);
  a.invstd = channel_vector(invstd, C, y, acc, op, "invstd", ref, what);
  a.weight = weight.has_value() && weight->defined()
                 ? channel_vector(*weight, C, y, acc, op, "weight", ref, what)
                 : at::ones({C}, y.options().dtype(acc));
  a.grad_y = at::empty(y.sizes(), y.options().memory_format(format));
  a.grad_residual = residual_grad ? at::empty(y.sizes(), y.options().memory_format(format))
                                  : at::empty({0}, y.options());
  a.grad_weight = at::empty({C}, y.options().dtype(acc));
  a.grad_bias = at::empty({C}, y.options().dtype(acc));
  return a;
}

}  // namespace fastres
