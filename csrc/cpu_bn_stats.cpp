// CPU kernel of _bn_stats: per-channel mean and biased variance of an NCHW or NHWC activation,
// then the finalize step (invstd, apply coefficients, running statistics).
//
// The activation is read from memory once. A unit of work (an NHWC block of rows, a tile of an
// NCHW plane; cpu_common.h) stays in L2, so its statistics are computed in two sweeps: its mean
// (right to well below an ulp also where the mean is large against the spread, which the apply and
// the backward's (y - mean) would otherwise amplify by invstd), then the squared deviations from
// that mean as the math dtype holds it, in short chains. Units are merged with Chan's formula in
// fp64 in unit order: the result does not depend on the thread count.
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace fastres {
namespace cpu {
namespace {

constexpr int64_t kLanes = 8;       // independent accumulators along an NCHW plane (SIMD lanes)
constexpr int64_t kChunkRows = 16;  // NHWC rows per chain of sums in the math dtype

// d = x[c] - ref[c]: acc[c] += d (kSquares false: the shifted sums) or d * d (the squared
// deviations), in the math dtype, for the N channels from c.
template <bool kSquares, int N, typename scalar_t>
FASTRES_INLINE void deviation_lanes(const scalar_t* __restrict x, const acc_type_t<scalar_t>* __restrict ref,
                                    acc_type_t<scalar_t>* __restrict acc, int64_t c) {
  using L = Lanes<acc_type_t<scalar_t>, N>;
  const auto d = L::load(x + c) - L::load(ref + c);
  L::store(acc + c, L::load(acc + c) + (kSquares ? d * d : d));
}

// The same over one row of C channels, 8 lanes at a time.
template <bool kSquares, typename scalar_t>
FASTRES_INLINE void deviation_row(const scalar_t* __restrict x, const acc_type_t<scalar_t>* __restrict ref,
                                  acc_type_t<scalar_t>* __restrict acc, int64_t C) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) deviation_lanes<kSquares, 8>(x, ref, acc, c);
  for (; c < C; ++c) deviation_lanes<kSquares, 1>(x, ref, acc, c);
}

// The m2 about the mean of `count` values from sq, the sum of their squared deviations from
// `rounded`, the mean as the math dtype holds it: sum (x - m)^2 = sum (x - a)^2 - count (m - a)^2.
FASTRES_INLINE double m2_about_mean(double count, double mean, double rounded, double sq) {
  const double off = mean - rounded;
  return std::max(0.0, sq - count * off * off);
}

// One NHWC unit: rows [row0, row1) of the [rows, C] matrix (at most kUnitElements values, which
// stay in L2) -> mean[C], m2[C] of the unit (fp64). The first sweep reads the rows in memory order
// (one stream for the prefetchers) and sums their differences from the unit's first row (the
// shifted-data algorithm: the sum rounds at the spread's magnitude, not the mean's, so a channel
// whose mean is large against its spread gets its mean right to well below an ulp); the second
// sums the squared deviations from the mean as the math dtype holds it. Both sum in the math dtype
// over chunks of kChunkRows rows (short chains), each chunk added in fp64. scratch: 3 * C values.
template <typename scalar_t>
FASTRES_CPU_CLONES void unit_stats_rows(const scalar_t* __restrict y, int64_t row0, int64_t row1, int64_t C,
                                        double* __restrict mean, double* __restrict m2,
                                        acc_type_t<scalar_t>* __restrict scratch) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t* ref = scratch;
  acc_t* acc = scratch + C;  // the shifted sums, then each chunk's squared deviations
  acc_t* rounded = scratch + 2 * C;
  for (int64_t c = 0; c < C; ++c) ref[c] = static_cast<acc_t>(y[row0 * C + c]);
  std::fill(mean, mean + C, 0.0);
  for (int64_t r0 = row0; r0 < row1; r0 += kChunkRows) {
    const int64_t r1 = std::min(row1, r0 + kChunkRows);
    std::fill(acc, acc + C, acc_t(0));
    for (int64_t r = r0; r < r1; ++r) deviation_row<false>(y + r * C, ref, acc, C);
    for (int64_t c = 0; c < C; ++c) mean[c] += static_cast<double>(acc[c]);
  }
  const double count = static_cast<double>(row1 - row0);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = static_cast<double>(ref[c]) + mean[c] / count;
    rounded[c] = static_cast<acc_t>(mean[c]);
    m2[c] = 0.0;
  }
  for (int64_t r0 = row0; r0 < row1; r0 += kChunkRows) {
    const int64_t r1 = std::min(row1, r0 + kChunkRows);
    std::fill(acc, acc + C, acc_t(0));
    for (int64_t r = r0; r < r1; ++r) deviation_row<true>(y + r * C, rounded, acc, C);
    for (int64_t c = 0; c < C; ++c) m2[c] += static_cast<double>(acc[c]);
  }
  for (int64_t c = 0; c < C; ++c) m2[c] = m2_about_mean(count, mean[c], rounded[c], m2[c]);
}

// One NCHW run of n values of a single channel -> (mean, m2), fp64.
template <typename scalar_t>
FASTRES_CPU_CLONES void unit_stats_run(const scalar_t* __restrict x, int64_t n, double& mean_out,
                                       double& m2_out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t full = n - n % kLanes;
  double lane[kLanes] = {};
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += static_cast<double>(x[i + j]);
  }
  double sum = 0;
  for (int64_t j = 0; j < kLanes; ++j) sum += lane[j];
  for (int64_t i = full; i < n; ++i) sum += static_cast<double>(x[i]);
  const double mean = sum / static_cast<double>(n);
  const acc_t rounded = static_cast<acc_t>(mean);
  acc_t sq[kLanes] = {};
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(x[i + j]) - rounded;
      sq[j] += d * d;
    }
  }
  acc_t m2 = 0;
  for (int64_t j = 0; j < kLanes; ++j) m2 += sq[j];
  for (int64_t i = full; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - rounded;
    m2 += d * d;
  }
  mean_out = mean;
  m2_out = m2_about_mean(static_cast<double>(n), mean, rounded, m2);
}

// NHWC: the units' partials (mean[C], m2[C] each, counts from the unit sizes) merged in unit order;
// every channel of a unit has the same count, so the merge weights are per unit.
FASTRES_CPU_CLONES void merge_unit_rows(const Units& units, const double* partials, double* mean, double* m2) {
  const int64_t C = units.shape.C;
  double done = 0;
  for (int64_t u = 0; u < units.count; ++u) {
    const double* __restrict part_mean = partials + u * 2 * C;
    const double* __restrict part_m2 = part_mean + C;
    const double rows = static_cast<double>(units.row_end(u) - units.row_begin(u));
    const double b_share = rows / (done + rows), cross = done * b_share;
    double* __restrict m = mean;
    double* __restrict q = m2;
    for (int64_t c = 0; c < C; ++c) chan_merge(m[c], q[c], part_mean[c], part_m2[c], b_share, cross);
    done += rows;
  }
}

template <typename scalar_t>
void bn_stats_kernel(const BnStatsArgs& a) {
  using acc_t = acc_type_t<scalar_t>;
  const Units units(a.shape);
  const int64_t C = a.shape.C;
  const bool nhwc = a.shape.channels_last;
  const scalar_t* y = a.y.const_data_ptr<scalar_t>();
  // Per unit: NHWC mean[C] then m2[C]; NCHW (mean, m2).
  const int64_t width = nhwc ? 2 * C : 2;
  std::vector<double> partials(units.count * width);
  at::parallel_for(0, units.count, units.grain(), [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> scratch(nhwc ? 3 * C : 0);
    for (int64_t u = u0; u < u1; ++u) {
      double* part = partials.data() + u * width;
      if (nhwc) {
        unit_stats_rows(y, units.row_begin(u), units.row_end(u), C, part, part + C, scratch.data());
      } else {
        const auto run = units.run(u);
        unit_stats_run(y + run.offset, run.length, part[0], part[1]);
      }
    }
  });

  // Chan's merge in a fixed order (unit order; NCHW: batch entries, then tiles of a plane), fp64.
  std::vector<double> total_mean(C, 0.0), total_m2(C, 0.0), total_count(C, 0.0);
  if (nhwc) {
    merge_unit_rows(units, partials.data(), total_mean.data(), total_m2.data());
    std::fill(total_count.begin(), total_count.end(), static_cast<double>(units.rows));
  } else {
    for (int64_t u = 0; u < units.count; ++u) {
      const auto run = units.run(u);
      const int64_t c = run.channel;
      const auto merged = welford_combine(
          Welford<double>{total_count[c], total_mean[c], total_m2[c]},
          Welford<double>{static_cast<double>(run.length), partials[u * 2], partials[u * 2 + 1]});
      total_count[c] = merged.count;
      total_mean[c] = merged.mean;
      total_m2[c] = merged.m2;
    }
  }

  const acc_t* weight = a.weight.const_data_ptr<acc_t>();
  const acc_t* bias = a.bias.const_data_ptr<acc_t>();
  const acc_t* running_mean = a.running_mean.const_data_ptr<acc_t>();
  const acc_t* running_var = a.running_var.const_data_ptr<acc_t>();
  acc_t* mean = a.mean.mutable_data_ptr<acc_t>();
  acc_t* invstd = a.invstd.mutable_data_ptr<acc_t>();
  acc_t* scale = a.scale.mutable_data_ptr<acc_t>();
  acc_t* shift = a.shift.mutable_data_ptr<acc_t>();
  acc_t* new_running_mean = a.new_running_mean.mutable_data_ptr<acc_t>();
  acc_t* new_running_var = a.new_running_var.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    // Finalized from the fp64 statistics, each result rounded to the math dtype once (as ATen's CPU
    // batch norm does): an invstd computed in fp32 from an fp32 variance is ~1.5 ulps off, which a
    // channel whose spread is small against its mean carries into the weight gradient (2.5x ATen's
    // error in one case found). The mean is stored rounded; shift makes up for what it lost.
    const double stored_mean = static_cast<double>(static_cast<acc_t>(total_mean[c]));
    const auto f = bn_finalize(Welford<double>{total_count[c], total_mean[c], total_m2[c]},
                               static_cast<double>(weight[c]), static_cast<double>(bias[c]),
                               static_cast<double>(running_mean[c]), static_cast<double>(running_var[c]),
                               a.momentum, a.eps, total_mean[c] - stored_mean);
    mean[c] = static_cast<acc_t>(f.mean);
    invstd[c] = static_cast<acc_t>(f.invstd);
    scale[c] = static_cast<acc_t>(f.scale);
    shift[c] = static_cast<acc_t>(f.shift);
    new_running_mean[c] = static_cast<acc_t>(f.running_mean);
    new_running_var[c] = static_cast<acc_t>(f.running_var);
  }
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_cpu(
    const at::Tensor& y, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps) {
  auto a = prepare_bn_stats(y, weight, bias, running_mean, running_var, momentum, eps);
  TORCH_CHECK(y.device().is_cpu(), "fastres::_bn_stats: the CPU kernel got y on ", y.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "fastres::_bn_stats",
                                  [&] { cpu::bn_stats_kernel<scalar_t>(a); });
  return finish_bn_stats(a, running_mean, running_var);
}

}  // namespace fastres
