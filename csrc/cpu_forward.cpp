// CPU kernels of the forward-only ops: _fold_bn, _add_relu, _bn_act_forward.
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace fastres {
namespace cpu {
namespace {

template <typename scalar_t>
void scale_row(const scalar_t* __restrict src, scalar_t* __restrict dst, acc_type_t<scalar_t> scale,
               int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<scalar_t>(fold_bn_weight_value(static_cast<acc_t>(src[i]), scale));
  }
}

template <typename scalar_t>
void fold_bn_kernel(const FoldBnArgs& a) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t K = a.inner;
  const scalar_t* w = a.weight.const_data_ptr<scalar_t>();
  scalar_t* w_out = a.weight_out.mutable_data_ptr<scalar_t>();
  scalar_t* b_out = a.bias_out.mutable_data_ptr<scalar_t>();
  const acc_t* gamma = a.bn_weight.const_data_ptr<acc_t>();
  const acc_t* beta = a.bn_bias.const_data_ptr<acc_t>();
  const acc_t* mean = a.running_mean.const_data_ptr<acc_t>();
  const acc_t* var = a.running_var.const_data_ptr<acc_t>();
  const acc_t* conv_bias = a.conv_bias.const_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(a.eps);
  const int64_t grain = std::max<int64_t>(1, kUnitElements / std::max<int64_t>(K, 1));
  at::parallel_for(0, a.out_channels, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t scale = fold_bn_scale(gamma[c], var[c], eps);
      b_out[c] = static_cast<scalar_t>(fold_bn_bias(conv_bias[c], mean[c], scale, beta[c]));
      scale_row(w + c * K, w_out + c * K, scale, K);
    }
  });
}

template <typename scalar_t>
void add_relu_range(const scalar_t* __restrict x, const scalar_t* __restrict r,
                    scalar_t* __restrict out, int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(add_relu_value(static_cast<acc_t>(x[i]), static_cast<acc_t>(r[i])));
  }
}

template <typename scalar_t>
void add_relu_kernel(const AddReluArgs& a) {
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* r = a.residual.const_data_ptr<scalar_t>();
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  const int64_t n = a.x.numel();
  at::parallel_for(0, n, kUnitElements, [&](int64_t begin, int64_t end) {
    add_relu_range(x + begin, r + begin, out + begin, end - begin);
  });
}

// One NHWC row: channel c of the row uses scale[c], shift[c].
template <typename scalar_t, bool kResidual, bool kRelu>
void bn_act_row(const scalar_t* __restrict y, const scalar_t* __restrict res,
                scalar_t* __restrict out, const acc_type_t<scalar_t>* __restrict scale,
                const acc_type_t<scalar_t>* __restrict shift, int64_t C) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t yv = static_cast<acc_t>(y[c]);
    acc_t v;
    if constexpr (kResidual) {
      v = bn_act_value(yv, scale[c], shift[c], static_cast<acc_t>(res[c]), kRelu);
    } else {
      v = bn_act_value(yv, scale[c], shift[c], kRelu);
    }
    out[c] = static_cast<scalar_t>(v);
  }
}

// A run of one NCHW plane: every element has the same channel.
template <typename scalar_t, bool kResidual, bool kRelu>
void bn_act_run(const scalar_t* __restrict y, const scalar_t* __restrict res,
                scalar_t* __restrict out, acc_type_t<scalar_t> scale, acc_type_t<scalar_t> shift,
                int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t yv = static_cast<acc_t>(y[i]);
    acc_t v;
    if constexpr (kResidual) {
      v = bn_act_value(yv, scale, shift, static_cast<acc_t>(res[i]), kRelu);
    } else {
      v = bn_act_value(yv, scale, shift, kRelu);
    }
    out[i] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, bool kResidual, bool kRelu>
void bn_act_forward_kernel(const BnActForwardArgs& a) {
  using acc_t = acc_type_t<scalar_t>;
  const Units units(a.shape);
  const int64_t C = a.shape.C;
  const scalar_t* y = a.y.const_data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? a.residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  const acc_t* scale = a.scale.const_data_ptr<acc_t>();
  const acc_t* shift = a.shift.const_data_ptr<acc_t>();
  at::parallel_for(0, units.count, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      if (units.shape.channels_last) {
        for (int64_t row = units.row_begin(u); row < units.row_end(u); ++row) {
          const int64_t i = row * C;
          bn_act_row<scalar_t, kResidual, kRelu>(y + i, kResidual ? res + i : nullptr, out + i,
                                                 scale, shift, C);
        }
      } else {
        const auto run = units.run(u);
        const int64_t i = run.offset;
        bn_act_run<scalar_t, kResidual, kRelu>(y + i, kResidual ? res + i : nullptr, out + i,
                                               scale[run.channel], shift[run.channel], run.length);
      }
    }
  });
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastres::", op, ": the CPU kernel got ", name, " on ",
              t.device());
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> fold_bn_cpu(const at::Tensor& conv_weight,
                                               const std::optional<at::Tensor>& conv_bias,
                                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                               const at::Tensor& running_mean,
                                               const at::Tensor& running_var, double eps) {
  auto a = prepare_fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps);
  cpu::check_cpu(conv_weight, "_fold_bn", "conv_weight");
  if (a.out_channels > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.weight.scalar_type(), "fastres::_fold_bn",
                                    [&] { cpu::fold_bn_kernel<scalar_t>(a); });
  }
  return finish_fold_bn(a, conv_weight);
}

at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& residual) {
  auto a = prepare_add_relu(x, residual);
  cpu::check_cpu(x, "_add_relu", "x");
  if (a.out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "fastres::_add_relu",
                                    [&] { cpu::add_relu_kernel<scalar_t>(a); });
  }
  return a.out;
}

at::Tensor bn_act_forward_cpu(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& shift,
                              const std::optional<at::Tensor>& residual, bool relu) {
  auto a = prepare_bn_act_forward(y, scale, shift, residual, relu);
  cpu::check_cpu(y, "_bn_act_forward", "y");
  if (a.out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "fastres::_bn_act_forward", [&] {
      cpu::with_flags(
          [&](auto has_residual, auto relu_flag) {
            cpu::bn_act_forward_kernel<scalar_t, decltype(has_residual)::value, decltype(relu_flag)::value>(a);
          },
          a.residual.defined(), a.relu);
    });
  }
  return a.out;
}

}  // namespace fastres
