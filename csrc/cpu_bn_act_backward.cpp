// CPU kernel of _bn_act_backward: one read of (grad_out, out, y) for the per-channel sums of
// dz and dz*(y-mean) (also writing grad_residual, and grad_y in eval mode), then, in training
// mode, an elementwise pass for grad_y.
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

namespace fastres {
namespace cpu {
namespace {

// Sums run in the math type over chunks of kChunk rows (NHWC) or kLanes*kChunk elements (NCHW);
// chunk sums are added in fp64: close to a pairwise sum's accuracy at a plain sum's cost.
constexpr int64_t kChunk = 16;
constexpr int64_t kLanes = 8;  // independent accumulators along an NCHW plane (SIMD lanes)

// The gradient at the pre-activation value; `out` is only read with relu.
template <bool kRelu, typename scalar_t>
inline acc_type_t<scalar_t> grad_z(const scalar_t* __restrict g, const scalar_t* __restrict o,
                                   int64_t i) {
  using acc_t = acc_type_t<scalar_t>;
  if constexpr (kRelu) {
    return bn_act_grad_z(static_cast<acc_t>(g[i]), static_cast<acc_t>(o[i]), true);
  } else {
    return static_cast<acc_t>(g[i]);
  }
}

template <typename scalar_t>
struct Flat {  // the tensors of one call, as flat arrays in the common memory format
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* out;  // null unless relu
  const scalar_t* y;
  const acc_t* mean;
  const acc_t* coef_a;  // weight * invstd
  const acc_t* coef_b;  // training only (filled after the reduction)
  const acc_t* coef_k;
  scalar_t* grad_y;
  scalar_t* grad_residual;  // null unless residual_grad
};

// Pass 1 over one NHWC row: sum_dz[c] += dz, sum_dzc[c] += dz * (y - mean[c]).
template <typename scalar_t, bool kRelu, bool kResidualGrad, bool kEval>
void reduce_row(const scalar_t* __restrict g, const scalar_t* __restrict o,
                const scalar_t* __restrict y, const acc_type_t<scalar_t>* __restrict mean,
                const acc_type_t<scalar_t>* __restrict coef_a, acc_type_t<scalar_t>* __restrict sum_dz,
                acc_type_t<scalar_t>* __restrict sum_dzc, scalar_t* __restrict grad_residual,
                scalar_t* __restrict grad_y, int64_t C) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t dz = grad_z<kRelu>(g, o, c);
    sum_dz[c] += dz;
    sum_dzc[c] += dz * (static_cast<acc_t>(y[c]) - mean[c]);
    if constexpr (kResidualGrad) grad_residual[c] = static_cast<scalar_t>(dz);
    if constexpr (kEval) grad_y[c] = static_cast<scalar_t>(bn_eval_grad_input(dz, coef_a[c]));
  }
}

// Pass 1 over n elements of one NCHW plane (channel constants mean, a); adds to sums[0..1].
template <typename scalar_t, bool kRelu, bool kResidualGrad, bool kEval>
void reduce_run(const scalar_t* __restrict g, const scalar_t* __restrict o,
                const scalar_t* __restrict y, acc_type_t<scalar_t> mean, acc_type_t<scalar_t> a,
                scalar_t* __restrict grad_residual, scalar_t* __restrict grad_y, int64_t n,
                double* sums) {
  using acc_t = acc_type_t<scalar_t>;
  int64_t i = 0;
  for (; i + kLanes * kChunk <= n; i += kLanes * kChunk) {
    acc_t lane_dz[kLanes] = {}, lane_dzc[kLanes] = {};
    for (int64_t k = i; k < i + kLanes * kChunk; k += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const acc_t dz = grad_z<kRelu>(g, o, k + j);
        lane_dz[j] += dz;
        lane_dzc[j] += dz * (static_cast<acc_t>(y[k + j]) - mean);
        if constexpr (kResidualGrad) grad_residual[k + j] = static_cast<scalar_t>(dz);
        if constexpr (kEval) grad_y[k + j] = static_cast<scalar_t>(bn_eval_grad_input(dz, a));
      }
    }
    for (int64_t j = 0; j < kLanes; ++j) {  // fixed lane order
      sums[0] += lane_dz[j];
      sums[1] += lane_dzc[j];
    }
  }
  acc_t tail_dz = 0, tail_dzc = 0;  // fewer than kLanes*kChunk elements
  for (; i < n; ++i) {
    const acc_t dz = grad_z<kRelu>(g, o, i);
    tail_dz += dz;
    tail_dzc += dz * (static_cast<acc_t>(y[i]) - mean);
    if constexpr (kResidualGrad) grad_residual[i] = static_cast<scalar_t>(dz);
    if constexpr (kEval) grad_y[i] = static_cast<scalar_t>(bn_eval_grad_input(dz, a));
  }
  sums[0] += tail_dz;
  sums[1] += tail_dzc;
}

// Pass 2 (training), one NHWC row: grad_y = a * (dz - b - (y - mean) * k), per-channel a, b, k.
template <typename scalar_t, bool kRelu>
void grad_input_row(const scalar_t* __restrict g, const scalar_t* __restrict o,
                    const scalar_t* __restrict y, const acc_type_t<scalar_t>* __restrict mean,
                    const acc_type_t<scalar_t>* __restrict a, const acc_type_t<scalar_t>* __restrict b,
                    const acc_type_t<scalar_t>* __restrict k, scalar_t* __restrict grad_y, int64_t C) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t c = 0; c < C; ++c) {
    grad_y[c] = static_cast<scalar_t>(
        bn_train_grad_input(grad_z<kRelu>(g, o, c), static_cast<acc_t>(y[c]), mean[c], a[c], b[c], k[c]));
  }
}

// Pass 2 (training), a run of one NCHW plane.
template <typename scalar_t, bool kRelu>
void grad_input_run(const scalar_t* __restrict g, const scalar_t* __restrict o,
                    const scalar_t* __restrict y, acc_type_t<scalar_t> mean, acc_type_t<scalar_t> a,
                    acc_type_t<scalar_t> b, acc_type_t<scalar_t> k, scalar_t* __restrict grad_y, int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    grad_y[i] = static_cast<scalar_t>(
        bn_train_grad_input(grad_z<kRelu>(g, o, i), static_cast<acc_t>(y[i]), mean, a, b, k));
  }
}

template <typename scalar_t, bool kRelu, bool kResidualGrad, bool kEval>
void reduce_pass(const Units& units, const Flat<scalar_t>& p, std::vector<double>& partials) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t C = units.shape.C;
  const bool nhwc = units.shape.channels_last;
  const int64_t width = nhwc ? 2 * C : 2;
  partials.assign(units.count * width, 0.0);
  at::parallel_for(0, units.count, 1, [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> chunk(nhwc ? 2 * C : 0);
    for (int64_t u = u0; u < u1; ++u) {
      double* part = partials.data() + u * width;
      if (nhwc) {
        const int64_t row_end = units.row_end(u);
        for (int64_t row0 = units.row_begin(u); row0 < row_end; row0 += kChunk) {
          std::fill(chunk.begin(), chunk.end(), acc_t(0));
          for (int64_t row = row0; row < std::min(row_end, row0 + kChunk); ++row) {
            const int64_t i = row * C;
            reduce_row<scalar_t, kRelu, kResidualGrad, kEval>(
                p.grad_out + i, kRelu ? p.out + i : nullptr, p.y + i, p.mean, p.coef_a, chunk.data(),
                chunk.data() + C, kResidualGrad ? p.grad_residual + i : nullptr,
                kEval ? p.grad_y + i : nullptr, C);
          }
          for (int64_t j = 0; j < 2 * C; ++j) part[j] += static_cast<double>(chunk[j]);
        }
      } else {
        const auto run = units.run(u);
        const int64_t i = run.offset;
        reduce_run<scalar_t, kRelu, kResidualGrad, kEval>(
            p.grad_out + i, kRelu ? p.out + i : nullptr, p.y + i, p.mean[run.channel],
            p.coef_a[run.channel], kResidualGrad ? p.grad_residual + i : nullptr,
            kEval ? p.grad_y + i : nullptr, run.length, part);
      }
    }
  });
}

template <typename scalar_t, bool kRelu>
void grad_input_pass(const Units& units, const Flat<scalar_t>& p) {
  const int64_t C = units.shape.C;
  at::parallel_for(0, units.count, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      if (units.shape.channels_last) {
        for (int64_t row = units.row_begin(u); row < units.row_end(u); ++row) {
          const int64_t i = row * C;
          grad_input_row<scalar_t, kRelu>(p.grad_out + i, kRelu ? p.out + i : nullptr, p.y + i, p.mean,
                                          p.coef_a, p.coef_b, p.coef_k, p.grad_y + i, C);
        }
      } else {
        const auto run = units.run(u);
        const int64_t i = run.offset, c = run.channel;
        grad_input_run<scalar_t, kRelu>(p.grad_out + i, kRelu ? p.out + i : nullptr, p.y + i, p.mean[c],
                                        p.coef_a[c], p.coef_b[c], p.coef_k[c], p.grad_y + i, run.length);
      }
    }
  });
}

template <typename scalar_t>
void bn_act_backward_kernel(const BnActBackwardArgs& a) {
  using acc_t = acc_type_t<scalar_t>;
  const Units units(a.shape);
  const int64_t C = a.shape.C;
  const acc_t* invstd = a.invstd.const_data_ptr<acc_t>();
  const acc_t* weight = a.weight.const_data_ptr<acc_t>();
  // Per-channel coefficients of grad_y (see bn_grad_coeffs): a is known up front (eval mode
  // writes grad_y during the reduction pass); b and k need the sums.
  std::vector<acc_t> coef_a(C), coef_b(C), coef_k(C);
  for (int64_t c = 0; c < C; ++c) coef_a[c] = bn_grad_input_scale(weight[c], invstd[c]);
  const Flat<scalar_t> p{a.grad_out.const_data_ptr<scalar_t>(),
                         a.relu ? a.out.const_data_ptr<scalar_t>() : nullptr,
                         a.y.const_data_ptr<scalar_t>(),
                         a.mean.const_data_ptr<acc_t>(),
                         coef_a.data(),
                         coef_b.data(),
                         coef_k.data(),
                         a.grad_y.mutable_data_ptr<scalar_t>(),
                         a.residual_grad ? a.grad_residual.mutable_data_ptr<scalar_t>() : nullptr};

  // ---- pass 1: partial sums per unit; NHWC [unit][2][C], NCHW [unit][2] ----
  std::vector<double> partials;
  with_flags(
      [&](auto relu, auto residual_grad, auto eval) {
        reduce_pass<scalar_t, decltype(relu)::value, decltype(residual_grad)::value, decltype(eval)::value>(
            units, p, partials);
      },
      a.relu, a.residual_grad, !a.training);

  // ---- combine the partials in unit order (cheap: a few values per unit) ----
  std::vector<double> sum_dz(C, 0.0), sum_dzc(C, 0.0);
  if (units.shape.channels_last) {
    for (int64_t u = 0; u < units.count; ++u) {
      const double* part = partials.data() + u * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        sum_dz[c] += part[c];
        sum_dzc[c] += part[C + c];
      }
    }
  } else {
    for (int64_t n = 0; n < units.shape.N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t u0 = (n * C + c) * units.tiles_per_plane;
        for (int64_t t = 0; t < units.tiles_per_plane; ++t) {
          sum_dz[c] += partials[(u0 + t) * 2];
          sum_dzc[c] += partials[(u0 + t) * 2 + 1];
        }
      }
    }
  }
  acc_t* grad_weight = a.grad_weight.mutable_data_ptr<acc_t>();
  acc_t* grad_bias = a.grad_bias.mutable_data_ptr<acc_t>();
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(units.shape.N * units.shape.HW);
  for (int64_t c = 0; c < C; ++c) {
    const auto r = bn_grad_coeffs(static_cast<acc_t>(sum_dz[c]), static_cast<acc_t>(sum_dzc[c]),
                                  invstd[c], weight[c], inv_count, a.training);
    grad_weight[c] = r.grad_weight;
    grad_bias[c] = r.grad_bias;
    coef_b[c] = r.b;
    coef_k[c] = r.k;
  }

  // ---- pass 2 (training): grad_y ----
  if (a.training) {
    if (a.residual_grad) {
      // grad_residual already holds dz, exactly (dz is grad_out or 0, so it survives the
      // rounding to scalar_t): read it instead of grad_out and out, one tensor less.
      Flat<scalar_t> q = p;
      q.grad_out = p.grad_residual;
      q.out = nullptr;
      grad_input_pass<scalar_t, false>(units, q);
    } else {
      with_flags([&](auto relu) { grad_input_pass<scalar_t, decltype(relu)::value>(units, p); }, a.relu);
    }
  }
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool relu, bool training,
    bool residual_grad) {
  auto a = prepare_bn_act_backward(grad_out, out, y, mean, invstd, weight, relu, training,
                                   residual_grad);
  TORCH_CHECK(y.device().is_cpu(), "fastres::_bn_act_backward: the CPU kernel got y on ", y.device());
  if (a.shape.numel() == 0) {
    a.grad_weight.zero_();
    a.grad_bias.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(),
                                    "fastres::_bn_act_backward",
                                    [&] { cpu::bn_act_backward_kernel<scalar_t>(a); });
  }
  return {a.grad_y, a.grad_residual, a.grad_weight, a.grad_bias};
}

}  // namespace fastres
