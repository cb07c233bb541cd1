// CPU kernels of the elementwise forward ops: _fold_bn, _add_relu, _bn_apply (and _bn_act_forward,
// its form without the dual residual and the mask).
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

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

// out[i] for n elements; channel coefficients from `coef(i)` (a row's channel c = i in NHWC, a
// constant in an NCHW run).
template <typename scalar_t, bool kResidual, bool kDual, bool kRelu, typename Coef>
FASTRES_INLINE void apply_values(const scalar_t* __restrict y, const scalar_t* __restrict res,
                         scalar_t* __restrict out, int64_t n, Coef coef) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t yv = static_cast<acc_t>(y[i]);
    acc_t v;
    if constexpr (kDual) {
      v = bn_dual_act_value(yv, coef.center(i), coef.scale(i), coef.shift(i), static_cast<acc_t>(res[i]),
                            coef.r_center(i), coef.r_scale(i), coef.r_shift(i), kRelu);
    } else if constexpr (kResidual) {
      v = bn_act_value(yv, coef.center(i), coef.scale(i), coef.shift(i), static_cast<acc_t>(res[i]), kRelu);
    } else {
      v = bn_act_value(yv, coef.center(i), coef.scale(i), coef.shift(i), kRelu);
    }
    out[i] = static_cast<scalar_t>(v);
  }
}

// kCentered false: the centers are the constant 0, and y - 0 compiles to y (the uncentered apply
// reads and computes nothing more).
template <typename acc_t, bool kCentered>
struct RowCoef {  // NHWC: element i of a row is channel i
  const acc_t *__restrict m, *__restrict s, *__restrict t, *__restrict rm, *__restrict rs, *__restrict rt;
  acc_t center(int64_t i) const { return kCentered ? m[i] : acc_t(0); }
  acc_t scale(int64_t i) const { return s[i]; }
  acc_t shift(int64_t i) const { return t[i]; }
  acc_t r_center(int64_t i) const { return kCentered ? rm[i] : acc_t(0); }
  acc_t r_scale(int64_t i) const { return rs[i]; }
  acc_t r_shift(int64_t i) const { return rt[i]; }
};

template <typename acc_t>
struct RunCoef {  // NCHW: one channel for the whole run
  acc_t m, s, t, rm, rs, rt;
  acc_t center(int64_t) const { return m; }
  acc_t scale(int64_t) const { return s; }
  acc_t shift(int64_t) const { return t; }
  acc_t r_center(int64_t) const { return rm; }
  acc_t r_scale(int64_t) const { return rs; }
  acc_t r_shift(int64_t) const { return rt; }
};

// One unit of work (csrc/cpu_common.h); compiled per CPU feature level.
template <typename scalar_t, bool kResidual, bool kDual, bool kRelu, bool kCentered>
FASTRES_CPU_CLONES void bn_apply_unit(const BnApplyArgs& a, const Units& units, int64_t u) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t C = a.shape.C;
  const int64_t mask_stride = mask_bytes_per_row(a.shape);
  const scalar_t* y = a.y.const_data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? a.residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  uint8_t* mask = a.write_mask ? a.mask.mutable_data_ptr<uint8_t>() : nullptr;
  const acc_t* center = a.center.const_data_ptr<acc_t>();
  const acc_t* scale = a.scale.const_data_ptr<acc_t>();
  const acc_t* shift = a.shift.const_data_ptr<acc_t>();
  const acc_t* r_center = kDual ? a.residual_center.const_data_ptr<acc_t>() : nullptr;
  const acc_t* r_scale = kDual ? a.residual_scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* r_shift = kDual ? a.residual_shift.const_data_ptr<acc_t>() : nullptr;
  if (units.shape.channels_last) {
    const RowCoef<acc_t, kCentered> coef{center, scale, shift, r_center, r_scale, r_shift};
    for (int64_t row = units.row_begin(u); row < units.row_end(u); ++row) {
      const int64_t i = row * C;
      apply_values<scalar_t, kResidual, kDual, kRelu>(y + i, kResidual ? res + i : nullptr, out + i, C, coef);
      // The mask from the row just written (still in L1), so its bits match the stored values.
      if (mask != nullptr) pack_relu_mask(out + i, mask + row * mask_stride, C);
    }
  } else {
    const auto run = units.run(u);
    const int64_t i = run.offset, c = run.channel;
    const RunCoef<acc_t> coef{kCentered ? center[c] : acc_t(0), scale[c], shift[c],
                              kCentered && kDual ? r_center[c] : acc_t(0), kDual ? r_scale[c] : acc_t(1),
                              kDual ? r_shift[c] : acc_t(0)};
    apply_values<scalar_t, kResidual, kDual, kRelu>(y + i, kResidual ? res + i : nullptr, out + i, run.length,
                                                    coef);
    if (mask != nullptr) {
      // Tiles start at multiples of kPlaneTile (a multiple of 8) within their plane (mask row).
      const int64_t plane = run.offset / a.shape.HW, start = run.offset % a.shape.HW;
      pack_relu_mask(out + i, mask + plane * mask_stride + start / 8, run.length);
    }
  }
}

template <typename scalar_t, bool kResidual, bool kDual, bool kRelu, bool kCentered>
void bn_apply_kernel(const BnApplyArgs& a) {
  const Units units(a.shape);
  at::parallel_for(0, units.count, units.grain(), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) bn_apply_unit<scalar_t, kResidual, kDual, kRelu, kCentered>(a, units, u);
  });
}

template <typename scalar_t>
void bn_apply_dispatch(const BnApplyArgs& a) {
  with_flags(
      [&](auto residual, auto dual, auto relu, auto centered) {
        constexpr bool kResidual = decltype(residual)::value, kDual = decltype(dual)::value;
        if constexpr (!kDual || kResidual) {  // prepare_bn_apply rules out a dual form without residual
          bn_apply_kernel<scalar_t, kResidual, kDual, decltype(relu)::value, decltype(centered)::value>(a);
        }
      },
      a.residual.defined(), a.residual_affine, a.relu, a.centered);
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

std::tuple<at::Tensor, at::Tensor> bn_apply_cpu(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                                                const std::optional<at::Tensor>& shift,
                                                const std::optional<at::Tensor>& residual,
                                                const std::optional<at::Tensor>& residual_scale,
                                                const std::optional<at::Tensor>& residual_shift, bool relu,
                                                bool mask, const std::optional<at::Tensor>& center,
                                                const std::optional<at::Tensor>& residual_center) {
  auto a = prepare_bn_apply(y, scale, shift, residual, residual_scale, residual_shift, relu, mask, center,
                            residual_center, "_bn_apply");
  cpu::check_cpu(y, "_bn_apply", "y");
  if (a.out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "fastres::_bn_apply",
                                    [&] { cpu::bn_apply_dispatch<scalar_t>(a); });
  }
  return {a.out, a.write_mask ? a.mask : at::empty({0}, y.options().dtype(at::kByte))};
}

at::Tensor bn_act_forward_cpu(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& shift,
                              const std::optional<at::Tensor>& residual, bool relu,
                              const std::optional<at::Tensor>& center) {
  auto a = prepare_bn_apply(y, scale, shift, residual, std::nullopt, std::nullopt, relu, false, center,
                            std::nullopt, "_bn_act_forward");
  cpu::check_cpu(y, "_bn_act_forward", "y");
  if (a.out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "fastres::_bn_act_forward",
                                    [&] { cpu::bn_apply_dispatch<scalar_t>(a); });
  }
  return a.out;
}

}  // namespace fastres
