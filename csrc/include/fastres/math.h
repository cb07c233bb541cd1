// Per-element and per-channel math shared by the CPU kernels and their CUDA twins, so the CPU
// tests exercise the same arithmetic the CUDA kernels run. The CPU kernels call these on scalars
// inside loops the compiler vectorizes; the CUDA kernels call them per element of a 16-byte pack.
// Formulas are templates over the value type V; comparisons and selections go through Select<V>,
// which a SIMD value type can specialize.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTRES_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTRES_HOST_DEVICE inline
#endif

namespace fastres {

// Math type of a storage type: fp32 for fp32/fp16/bf16 storage, fp64 for fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type_t = typename AccType<T>::type;

// 1 / sqrt(x) from the correctly rounded sqrt and division (not the approximate rsqrtf), so the
// CPU and GPU fold the same numbers.
FASTRES_HOST_DEVICE float reciprocal_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / ::sqrtf(x);
#else
  return 1.0f / std::sqrt(x);
#endif
}

FASTRES_HOST_DEVICE double reciprocal_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return 1.0 / ::sqrt(x);
#else
  return 1.0 / std::sqrt(x);
#endif
}

// Scalar comparisons; Vectorized gets its own specialization in the CPU kernels.
template <typename V>
struct Select {
  // relu that lets NaN through, like torch.relu.
  static FASTRES_HOST_DEVICE V relu(V v) { return v < V(0) ? V(0) : v; }
  // grad * (out > 0) written the way ATen's threshold_backward is (out <= 0 -> 0), so a NaN
  // output passes its gradient through exactly as the reference does.
  static FASTRES_HOST_DEVICE V zero_where_not_positive(V grad, V out) {
    return out <= V(0) ? V(0) : grad;
  }
};

// ---- eval-mode BN folding -------------------------------------------------------------
// scale[c] = bn_weight[c] / sqrt(running_var[c] + eps)
template <typename acc_t>
FASTRES_HOST_DEVICE acc_t fold_bn_scale(acc_t bn_weight, acc_t running_var, acc_t eps) {
  return bn_weight * reciprocal_sqrt(running_var + eps);
}

// bias[c] = (conv_bias[c] - running_mean[c]) * scale[c] + bn_bias[c]
template <typename acc_t>
FASTRES_HOST_DEVICE acc_t fold_bn_bias(acc_t conv_bias, acc_t running_mean, acc_t scale,
                                       acc_t bn_bias) {
  return (conv_bias - running_mean) * scale + bn_bias;
}

template <typename V>
FASTRES_HOST_DEVICE V fold_bn_weight_value(V conv_weight, V scale) {
  return conv_weight * scale;
}

// ---- forward epilogue -----------------------------------------------------------------
template <typename V>
FASTRES_HOST_DEVICE V add_relu_value(V x, V residual) {
  return Select<V>::relu(x + residual);
}

// act((y - center) * scale + shift), without and with a residual. A missing center and shift
// are 0 and a missing scale 1, which leaves (y - 0) * 1 + 0 == y exactly. A BN passes its mean as
// center and its bias as shift: centered first, a channel whose mean is large against its spread
// keeps its precision, where y * scale + (bias - mean * scale) rounds both terms at the mean's
// magnitude (10x ATen's error at a mean 1e3 x the spread).
template <typename V>
FASTRES_HOST_DEVICE V bn_act_value(V y, V center, V scale, V shift, bool relu) {
  V v = (y - center) * scale + shift;
  return relu ? Select<V>::relu(v) : v;
}

template <typename V>
FASTRES_HOST_DEVICE V bn_act_value(V y, V center, V scale, V shift, V residual, bool relu) {
  V v = (y - center) * scale + shift + residual;
  return relu ? Select<V>::relu(v) : v;
}

// The dual form act((y - center) * scale + shift + (r - r_center) * r_scale + r_shift): a block's
// last BN plus its downsample branch's BN, added and activated in one pass.
template <typename V>
FASTRES_HOST_DEVICE V bn_dual_act_value(V y, V center, V scale, V shift, V r, V r_center, V r_scale, V r_shift,
                                        bool relu) {
  V v = (y - center) * scale + shift + ((r - r_center) * r_scale + r_shift);
  return relu ? Select<V>::relu(v) : v;
}

// The ReLU mask bit of a stored output: 1 where the gradient passes. Taken from the output as
// stored (rounded to its dtype), so it agrees with ATen's threshold_backward(grad, out, 0)
// exactly, NaN included (NaN <= 0 is false: the gradient passes).
template <typename V>
FASTRES_HOST_DEVICE bool relu_mask_bit(V out) {
  return !(out <= V(0));
}

// ---- batch statistics: Welford per element, Chan's merge of partial results --------------
// A partial result over `count` values: their mean and the sum of squared deviations m2.
template <typename acc_t>
struct Welford {
  acc_t count, mean, m2;
};

// One more value (inv_count = 1 / the new count, shared by the lanes that advance together).
template <typename acc_t>
FASTRES_HOST_DEVICE void welford_add(acc_t x, acc_t inv_count, acc_t& mean, acc_t& m2) {
  const acc_t delta = x - mean;
  mean += delta * inv_count;
  m2 += delta * (x - mean);
}

// Chan et al.'s merge of (count_b, mean_b, m2_b) into (count_a, mean, m2), given the two weights that
// depend on the counts alone: b_share = count_b / (count_a + count_b), cross = count_a * b_share.
// (Many channels with the same counts share the weights: the CPU kernels hoist them.)
template <typename acc_t>
FASTRES_HOST_DEVICE void chan_merge(acc_t& mean, acc_t& m2, acc_t mean_b, acc_t m2_b, acc_t b_share,
                                    acc_t cross) {
  const acc_t delta = mean_b - mean;
  mean += delta * b_share;
  m2 += m2_b + delta * delta * cross;
}

// Chan's merge of two partial results; either may be empty.
template <typename acc_t>
FASTRES_HOST_DEVICE Welford<acc_t> welford_combine(Welford<acc_t> a, Welford<acc_t> b) {
  const acc_t count = a.count + b.count;
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t b_share = b.count / count;
  chan_merge(a.mean, a.m2, b.mean, b.m2, b_share, a.count * b_share);
  return {count, a.mean, a.m2};
}

// From a channel's statistics to what the apply and backward kernels need, and the running
// statistics (BatchNorm2d's update: biased variance normalizes, the unbiased one is averaged in).
// shift is that of the centered apply (y - mean) * scale + shift (bn_act_value): the bias, less
// mean_residual * scale, where mean_residual is what the mean lost when it was rounded to acc_t
// (known to a kernel that merged in a wider type; 0 otherwise). On a channel whose spread is small
// against its mean, that rounding, amplified by invstd, would otherwise be the output's largest error.
template <typename acc_t>
struct BnFinal {
  acc_t mean, invstd, scale, shift, running_mean, running_var;
};

template <typename acc_t>
FASTRES_HOST_DEVICE BnFinal<acc_t> bn_finalize(Welford<acc_t> s, acc_t weight, acc_t bias,
                                               acc_t running_mean, acc_t running_var,
                                               acc_t momentum, acc_t eps, acc_t mean_residual = acc_t(0)) {
  BnFinal<acc_t> r;
  const acc_t var = s.count > acc_t(0) ? s.m2 / s.count : acc_t(0);
  r.mean = s.mean;
  r.invstd = reciprocal_sqrt(var + eps);
  r.scale = weight * r.invstd;
  r.shift = bias - mean_residual * r.scale;
  if (s.count > acc_t(0)) {  // an empty batch leaves the running statistics alone, as ATen does
    const acc_t unbiased = s.m2 / (s.count - acc_t(1));
    r.running_mean = momentum * s.mean + (acc_t(1) - momentum) * running_mean;
    r.running_var = momentum * unbiased + (acc_t(1) - momentum) * running_var;
  } else {
    r.running_mean = running_mean;
    r.running_var = running_var;
  }
  return r;
}

// ---- backward of out = act(xhat * weight + bias + residual), xhat = (y - mean) * invstd ----
// Gradient at the pre-activation value z.
template <typename V>
FASTRES_HOST_DEVICE V bn_act_grad_z(V grad_out, V out, bool relu) {
  return relu ? Select<V>::zero_where_not_positive(grad_out, out) : grad_out;
}

// Per-channel coefficients of the elementwise input gradient, from the two reductions
//   sum_dz = sum(dz),  sum_dz_centered = sum(dz * (y - mean))  over N, H, W.
// grad_weight = sum(dz * xhat) = invstd * sum_dz_centered, grad_bias = sum_dz, and
//   training: grad_y = weight*invstd * (dz - sum_dz/M - xhat * grad_weight/M)
//                    = a * (dz - b - (y - mean) * k)
//             with a = weight*invstd, b = sum_dz/M, k = invstd^2 * sum_dz_centered/M
//   eval:     grad_y = a * dz        (b = k = 0)
template <typename acc_t>
struct BnGradCoeffs {
  acc_t a, b, k, grad_weight, grad_bias;
};

// The eval-mode input-gradient scale a = weight * invstd (needed before any reduction).
template <typename acc_t>
FASTRES_HOST_DEVICE acc_t bn_grad_input_scale(acc_t weight, acc_t invstd) {
  return weight * invstd;
}

template <typename acc_t>
FASTRES_HOST_DEVICE BnGradCoeffs<acc_t> bn_grad_coeffs(acc_t sum_dz, acc_t sum_dz_centered,
                                                       acc_t invstd, acc_t weight,
                                                       acc_t inv_count, bool training) {
  BnGradCoeffs<acc_t> r;
  r.grad_bias = sum_dz;
  r.grad_weight = sum_dz_centered * invstd;
  r.a = bn_grad_input_scale(weight, invstd);
  if (training) {
    r.b = sum_dz * inv_count;
    r.k = r.grad_weight * invstd * inv_count;
  } else {
    r.b = acc_t(0);
    r.k = acc_t(0);
  }
  return r;
}

template <typename V>
FASTRES_HOST_DEVICE V bn_train_grad_input(V dz, V y, V mean, V a, V b, V k) {
  return a * (dz - b - (y - mean) * k);
}

template <typename V>
FASTRES_HOST_DEVICE V bn_eval_grad_input(V dz, V a) {
  return a * dz;
}

}  // namespace fastres
