// CUDA entry points of fastres._C: checks and layout (shared with the CPU path, prepare.cpp),
// device guard and current stream, then the launchers of the .cu files.
#include <fastres/kernels.h>

#include "launch.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fastres {
namespace {

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined() && t.is_cuda(), "fastres::", op, ": the CUDA kernel got ", name, " on ",
              t.defined() ? t.device().str() : std::string("no device (undefined tensor)"));
}

cuda::Matrix matrix_of(const ActivationShape& s) {
  cuda::Matrix m;
  m.channels = s.C;
  m.channel_per_column = s.channels_last;
  m.rows = s.channels_last ? s.N * s.HW : s.N * s.C;
  m.cols = s.channels_last ? s.C : s.HW;
  return m;
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fold_bn_cuda(const at::Tensor& conv_weight,
                                                const std::optional<at::Tensor>& conv_bias,
                                                const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                                const at::Tensor& running_mean,
                                                const at::Tensor& running_var, double eps) {
  check_cuda(conv_weight, "_fold_bn", "conv_weight");
  const c10::cuda::CUDAGuard guard(conv_weight.device());
  auto a = prepare_fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.weight.scalar_type(), "fastres::_fold_bn", [&] {
    using acc_t = acc_type_t<scalar_t>;
    cuda::FoldBnParams<scalar_t> p{a.weight.const_data_ptr<scalar_t>(),
                                   a.weight_out.mutable_data_ptr<scalar_t>(),
                                   a.bias_out.mutable_data_ptr<scalar_t>(),
                                   a.bn_weight.const_data_ptr<acc_t>(),
                                   a.bn_bias.const_data_ptr<acc_t>(),
                                   a.running_mean.const_data_ptr<acc_t>(),
                                   a.running_var.const_data_ptr<acc_t>(),
                                   a.conv_bias.const_data_ptr<acc_t>(),
                                   static_cast<acc_t>(a.eps),
                                   a.out_channels,
                                   a.inner};
    cuda::launch_fold_bn<scalar_t>(p, stream);
  });
  return finish_fold_bn(a, conv_weight);
}

at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& residual) {
  check_cuda(x, "_add_relu", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto a = prepare_add_relu(x, residual);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "fastres::_add_relu", [&] {
    cuda::launch_add_relu<scalar_t>(a.x.const_data_ptr<scalar_t>(), a.residual.const_data_ptr<scalar_t>(),
                                    a.out.mutable_data_ptr<scalar_t>(), a.out.numel(), stream);
  });
  return a.out;
}

namespace {

template <typename T>
T* mutable_or_null(at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.mutable_data_ptr<T>() : nullptr;
}

void run_bn_apply(BnApplyArgs& a) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "fastres::_bn_apply", [&] {
    using acc_t = acc_type_t<scalar_t>;
    cuda::BnApplyParams<scalar_t> p{matrix_of(a.shape),
                                    a.y.const_data_ptr<scalar_t>(),
                                    data_or_null<scalar_t>(a.residual),
                                    a.out.mutable_data_ptr<scalar_t>(),
                                    a.center.const_data_ptr<acc_t>(),
                                    a.scale.const_data_ptr<acc_t>(),
                                    a.shift.const_data_ptr<acc_t>(),
                                    data_or_null<acc_t>(a.residual_center),
                                    data_or_null<acc_t>(a.residual_scale),
                                    data_or_null<acc_t>(a.residual_shift),
                                    a.write_mask ? mutable_or_null<uint8_t>(a.mask) : nullptr,
                                    mask_bytes_per_row(a.shape),
                                    a.relu};
    cuda::launch_bn_apply<scalar_t>(p, stream);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_bn_backward(
    BnBackwardArgs& a) {
  if (a.shape.numel() == 0) {
    for (at::Tensor* t : {&a.grad_weight, &a.grad_bias, &a.grad_r_weight, &a.grad_r_bias}) t->zero_();
    return {a.grad_y, a.grad_residual, a.grad_weight, a.grad_bias, a.grad_r_weight, a.grad_r_bias};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Matrix m = matrix_of(a.shape);
  at::Tensor workspace = at::empty({cuda::bn_backward_workspace_size(m)}, a.grad_weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "fastres::_bn_apply_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    cuda::BnBackwardParams<scalar_t> p{m,
                                       a.grad_out.const_data_ptr<scalar_t>(),
                                       a.relu && !a.use_mask ? a.out.const_data_ptr<scalar_t>() : nullptr,
                                       a.use_mask ? a.mask.const_data_ptr<uint8_t>() : nullptr,
                                       mask_bytes_per_row(a.shape),
                                       a.y.const_data_ptr<scalar_t>(),
                                       a.mean.const_data_ptr<acc_t>(),
                                       a.invstd.const_data_ptr<acc_t>(),
                                       a.weight.const_data_ptr<acc_t>(),
                                       a.dual ? a.r.const_data_ptr<scalar_t>() : nullptr,
                                       data_or_null<acc_t>(a.r_mean),
                                       data_or_null<acc_t>(a.r_invstd),
                                       data_or_null<acc_t>(a.r_weight),
                                       a.grad_y.mutable_data_ptr<scalar_t>(),
                                       a.residual_grad ? a.grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
                                       a.grad_weight.mutable_data_ptr<acc_t>(),
                                       a.grad_bias.mutable_data_ptr<acc_t>(),
                                       mutable_or_null<acc_t>(a.grad_r_weight),
                                       mutable_or_null<acc_t>(a.grad_r_bias),
                                       workspace.mutable_data_ptr<acc_t>(),
                                       acc_t(1) / static_cast<acc_t>(a.shape.N * a.shape.HW),
                                       a.relu,
                                       a.training};
    cuda::launch_bn_backward<scalar_t>(p, stream);
  });
  return {a.grad_y, a.grad_residual, a.grad_weight, a.grad_bias, a.grad_r_weight, a.grad_r_bias};
}

}  // namespace

at::Tensor bn_act_forward_cuda(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift,
                               const std::optional<at::Tensor>& residual, bool relu,
                               const std::optional<at::Tensor>& center) {
  check_cuda(y, "_bn_act_forward", "y");
  const c10::cuda::CUDAGuard guard(y.device());
  auto a = prepare_bn_apply(y, scale, shift, residual, std::nullopt, std::nullopt, relu, false, center, std::nullopt,
                            "_bn_act_forward");
  run_bn_apply(a);
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> bn_apply_cuda(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                                                 const std::optional<at::Tensor>& shift,
                                                 const std::optional<at::Tensor>& residual,
                                                 const std::optional<at::Tensor>& residual_scale,
                                                 const std::optional<at::Tensor>& residual_shift, bool relu,
                                                 bool mask, const std::optional<at::Tensor>& center,
                                                 const std::optional<at::Tensor>& residual_center) {
  check_cuda(y, "_bn_apply", "y");
  const c10::cuda::CUDAGuard guard(y.device());
  auto a = prepare_bn_apply(y, scale, shift, residual, residual_scale, residual_shift, relu, mask, center,
                            residual_center, "_bn_apply");
  run_bn_apply(a);
  return {a.out, a.write_mask ? a.mask : at::empty({0}, y.options().dtype(at::kByte))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_cuda(
    const at::Tensor& y, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps) {
  check_cuda(y, "_bn_stats", "y");
  const c10::cuda::CUDAGuard guard(y.device());
  auto a = prepare_bn_stats(y, weight, bias, running_mean, running_var, momentum, eps);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Matrix m = matrix_of(a.shape);
  at::Tensor workspace = at::empty({std::max<int64_t>(1, cuda::bn_stats_workspace_size(m))}, a.mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "fastres::_bn_stats", [&] {
    using acc_t = acc_type_t<scalar_t>;
    cuda::BnStatsParams<scalar_t> p{m,
                                    a.y.const_data_ptr<scalar_t>(),
                                    a.weight.const_data_ptr<acc_t>(),
                                    a.bias.const_data_ptr<acc_t>(),
                                    a.running_mean.const_data_ptr<acc_t>(),
                                    a.running_var.const_data_ptr<acc_t>(),
                                    a.mean.mutable_data_ptr<acc_t>(),
                                    a.invstd.mutable_data_ptr<acc_t>(),
                                    a.scale.mutable_data_ptr<acc_t>(),
                                    a.shift.mutable_data_ptr<acc_t>(),
                                    a.new_running_mean.mutable_data_ptr<acc_t>(),
                                    a.new_running_var.mutable_data_ptr<acc_t>(),
                                    workspace.mutable_data_ptr<acc_t>(),
                                    static_cast<acc_t>(a.momentum),
                                    static_cast<acc_t>(a.eps)};
    cuda::launch_bn_stats<scalar_t>(p, stream);
  });
  return finish_bn_stats(a, running_mean, running_var);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool relu, bool training,
    bool residual_grad) {
  check_cuda(y, "_bn_act_backward", "y");
  const c10::cuda::CUDAGuard guard(y.device());
  auto a = prepare_bn_backward(grad_out, out, std::nullopt, y, mean, invstd, weight, std::nullopt, std::nullopt,
                               std::nullopt, std::nullopt, relu, training, residual_grad, "_bn_act_backward");
  auto r = run_bn_backward(a);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_apply_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& mask,
    const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_mean,
    const std::optional<at::Tensor>& residual_invstd, const std::optional<at::Tensor>& residual_weight, bool relu,
    bool training, bool residual_grad) {
  check_cuda(y, "_bn_apply_backward", "y");
  const c10::cuda::CUDAGuard guard(y.device());
  auto a = prepare_bn_backward(grad_out, out, mask, y, mean, invstd, weight, residual, residual_mean,
                               residual_invstd, residual_weight, relu, training, residual_grad,
                               "_bn_apply_backward");
  return run_bn_backward(a);
}

}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("_fold_bn", &fastres::fold_bn_cuda);
  m.impl("_add_relu", &fastres::add_relu_cuda);
  m.impl("_bn_act_forward", &fastres::bn_act_forward_cuda);
  m.impl("_bn_act_backward", &fastres::bn_act_backward_cuda);
  m.impl("_bn_stats", &fastres::bn_stats_cuda);
  m.impl("_bn_apply", &fastres::bn_apply_cuda);
  m.impl("_bn_apply_backward", &fastres::bn_apply_backward_cuda);
}
