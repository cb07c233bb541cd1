// Argument checks and layout normalization shared by the CPU and CUDA entry points.
#include <fastres/kernels.h>

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
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

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// An optional per-channel vector of activation y: checked as channel_vector, or `fill` when absent.
at::Tensor channel_vector_or(const std::optional<at::Tensor>& t, const at::Tensor& y, at::ScalarType acc,
                             const char* op, const char* name, double fill) {
  const int64_t channels = y.size(1);
  return present(t) ? channel_vector(*t, channels, y, acc, op, name, "y", "y.size(1)")
                    : at::full({channels}, fill, y.options().dtype(acc));
}

ActivationShape activation_shape(const at::Tensor& t, at::MemoryFormat format) {
  ActivationShape s;
  s.N = t.size(0);
  s.C = t.size(1);
  s.HW = t.size(2) * t.size(3);
  // A 1x1 map is stored [n][c] in either format; which one torch suggests depends on the strides of its size-1
  // dims, which a compiler may lay out otherwise than eager (the ReLU mask's shape must not follow them).
  s.channels_last = format == at::MemoryFormat::ChannelsLast || s.HW == 1;
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

BnApplyArgs prepare_bn_apply(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& shift,
                             const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& residual_scale,
                             const std::optional<at::Tensor>& residual_shift, bool relu, bool mask,
                             const std::optional<at::Tensor>& center,
                             const std::optional<at::Tensor>& residual_center, const char* op) {
  check_activation(y, op, "y");
  const auto format = y.suggest_memory_format();
  const auto acc = at::toOpMathType(y.scalar_type());
  BnApplyArgs a;
  a.shape = activation_shape(y, format);
  a.relu = relu;
  a.y = y.contiguous(format);
  a.scale = channel_vector_or(scale, y, acc, op, "scale", 1.0);
  a.shift = channel_vector_or(shift, y, acc, op, "shift", 0.0);
  a.center = channel_vector_or(center, y, acc, op, "center", 0.0);
  a.centered = present(center) || present(residual_center);
  if (present(residual)) {
    check_like(*residual, y, op, "residual", "y");
    a.residual = residual->contiguous(format);
  }
  a.residual_affine = present(residual_scale) || present(residual_shift) || present(residual_center);
  if (a.residual_affine) {
    TORCH_CHECK(a.residual.defined(), "fastres::", op,
                ": residual_scale, residual_shift and residual_center need a residual");
    a.residual_scale = channel_vector_or(residual_scale, y, acc, op, "residual_scale", 1.0);
    a.residual_shift = channel_vector_or(residual_shift, y, acc, op, "residual_shift", 0.0);
    a.residual_center = channel_vector_or(residual_center, y, acc, op, "residual_center", 0.0);
  }
  a.out = at::empty(y.sizes(), y.options().memory_format(format));
  a.write_mask = mask;
  if (mask) {
    TORCH_CHECK(relu, "fastres::", op, ": a ReLU mask needs relu=True");
    a.mask = at::empty({mask_rows(a.shape), mask_bytes_per_row(a.shape)}, y.options().dtype(at::kByte));
  }
  return a;
}

BnStatsArgs prepare_bn_stats(const at::Tensor& y, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  const char* op = "_bn_stats";
  check_activation(y, op, "y");
  TORCH_CHECK(present(running_mean) == present(running_var), "fastres::_bn_stats: running_mean and "
              "running_var must be given together");
  TORCH_CHECK(eps > 0, "fastres::_bn_stats: eps must be > 0, got ", eps);
  const auto format = y.suggest_memory_format();
  const auto acc = at::toOpMathType(y.scalar_type());
  BnStatsArgs a;
  a.shape = activation_shape(y, format);
  a.y = y.contiguous(format);
  a.momentum = momentum;
  a.eps = eps;
  a.update_running = present(running_mean);
  const int64_t C = a.shape.C;
  a.weight = channel_vector_or(weight, y, acc, op, "weight", 1.0);
  a.bias = channel_vector_or(bias, y, acc, op, "bias", 0.0);
  a.running_mean = channel_vector_or(running_mean, y, acc, op, "running_mean", 0.0);
  a.running_var = channel_vector_or(running_var, y, acc, op, "running_var", 1.0);
  if (a.update_running) {
    const int64_t count = a.shape.N * a.shape.HW;
    TORCH_CHECK(count != 1, "fastres::_bn_stats: expected more than 1 value per channel to update the "
                "running statistics, got y of shape ", y.sizes());
  }
  const auto options = y.options().dtype(acc);
  a.mean = at::empty({C}, options);
  a.invstd = at::empty({C}, options);
  a.scale = at::empty({C}, options);
  a.shift = at::empty({C}, options);
  a.new_running_mean = at::empty({C}, options);
  a.new_running_var = at::empty({C}, options);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_bn_stats(
    const BnStatsArgs& a, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var) {
  if (!a.update_running) {
    return {a.mean, a.invstd, a.scale, a.shift, at::empty({0}, a.mean.options()), at::empty({0}, a.mean.options())};
  }
  // Computed in the math dtype; given back in the dtype the caller keeps its running stats in.
  return {a.mean, a.invstd, a.scale, a.shift, a.new_running_mean.to(running_mean->scalar_type()),
          a.new_running_var.to(running_var->scalar_type())};
}

BnBackwardArgs prepare_bn_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                   const std::optional<at::Tensor>& mask, const at::Tensor& y,
                                   const at::Tensor& mean, const at::Tensor& invstd,
                                   const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& residual,
                                   const std::optional<at::Tensor>& residual_mean,
                                   const std::optional<at::Tensor>& residual_invstd,
                                   const std::optional<at::Tensor>& residual_weight, bool relu,
                                   bool training, bool residual_grad, const char* op) {
  check_activation(y, op, "y");
  check_like(grad_out, y, op, "grad_out", "y");
  const auto format = y.suggest_memory_format();
  const auto acc = at::toOpMathType(y.scalar_type());
  BnBackwardArgs a;
  a.shape = activation_shape(y, format);
  a.relu = relu;
  a.training = training;
  a.residual_grad = residual_grad;
  a.y = y.contiguous(format);
  a.grad_out = grad_out.contiguous(format);
  a.use_mask = relu && present(mask);
  if (a.use_mask) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device() == y.device(), "fastres::", op, ": mask must be on y's device ", y.device(),
                ", got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kByte, "fastres::", op, ": mask must be uint8, got ",
                m.scalar_type());
    const int64_t rows = mask_rows(a.shape), bytes = mask_bytes_per_row(a.shape);
    TORCH_CHECK(m.dim() == 2 && m.size(0) == rows && m.size(1) == bytes, "fastres::", op,
                ": mask must have shape [", rows, ", ", bytes, "] (the mask of y's layout), got ", m.sizes());
    a.mask = m.contiguous();
  } else if (relu) {  // only the relu mask reads the forward output
    TORCH_CHECK(present(out), "fastres::", op, ": relu=True needs out or mask");
    check_like(*out, y, op, "out", "y");
    a.out = out->contiguous(format);
  }
  const int64_t C = a.shape.C;
  const char* ref = "y";
  const char* what = "y.size(1)";
  a.mean = channel_vector(mean, C, y, acc, op, "mean", ref, what);
  a.invstd = channel_vector(invstd, C, y, acc, op, "invstd", ref, what);
  a.weight = channel_vector_or(weight, y, acc, op, "weight", 1.0);
  a.dual = present(residual);
  const auto stat_options = y.options().dtype(acc);
  if (a.dual) {
    check_like(*residual, y, op, "residual", "y");
    TORCH_CHECK(present(residual_mean) && present(residual_invstd), "fastres::", op,
                ": a residual needs residual_mean and residual_invstd (the residual's own BN)");
    a.r = residual->contiguous(format);
    a.r_mean = channel_vector(*residual_mean, C, y, acc, op, "residual_mean", ref, what);
    a.r_invstd = channel_vector(*residual_invstd, C, y, acc, op, "residual_invstd", ref, what);
    a.r_weight = channel_vector_or(residual_weight, y, acc, op, "residual_weight", 1.0);
    a.grad_r_weight = at::empty({C}, stat_options);
    a.grad_r_bias = at::empty({C}, stat_options);
  } else {
    a.grad_r_weight = at::empty({0}, stat_options);
    a.grad_r_bias = at::empty({0}, stat_options);
  }
  a.grad_y = at::empty(y.sizes(), y.options().memory_format(format));
  a.grad_residual = residual_grad ? at::empty(y.sizes(), y.options().memory_format(format))
                                  : at::empty({0}, y.options());
  a.grad_weight = at::empty({C}, stat_options);
  a.grad_bias = at::empty({C}, stat_options);
  return a;
}

}  // namespace fastres
