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

// act(y * scale + shift), without and with a residual. A missing scale is 1 and a missing
// shift 0, which leaves y * 1 + 0 == y exactly.
template <typename V>
FASTRES_HOST_DEVICE V bn_act_value(V y, V scale, V shift, bool relu) {
  V v = y * scale + shift;
  return relu ? Select<V>::relu(v) : v;
}

template <typename V>
FASTRES_HOST_DEVICE V bn_act_value(V y, V scale, V shift, V residual, bool relu) {
  V v = y * scale + shift + residual;
  return relu ? Select<V>::relu(v) : v;
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
