// CPU kernel of _bn_stats: per-channel mean and biased variance of an NCHW or NHWC activation,
// then the finalize step (invstd, apply coefficients, running statistics).
//
// The activation is read from memory once. Small chunks of it (kChunkRows rows, or a tile of a
// plane) stay in L1/L2, so each chunk's statistics are computed exactly in two sweeps (its sum,
// then the squared deviations from its mean); chunks are merged with Chan's formula, in a fixed
// order at every level (chunks into units of work, units into the total, in fp64): the result does
// not depend on the thread count.
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

namespace fastres {
namespace cpu {
namespace {

constexpr int64_t kLanes = 8;       // independent accumulators along an NCHW plane (SIMD lanes)
constexpr int64_t kChunkRows = 16;  // NHWC rows per chunk

// acc[c] += x[c] (kSquares false) or acc[c] += (x[c] - mean[c])^2 for the N channels from c.
template <bool kSquares, int N, typename scalar_t>
FASTRES_INLINE void accumulate_lanes(const scalar_t* __restrict x, const acc_type_t<scalar_t>* __restrict mean,
                                     acc_type_t<scalar_t>* __restrict acc, int64_t c) {
  using L = Lanes<acc_type_t<scalar_t>, N>;
  auto v = L::load(x + c);
  if constexpr (kSquares) {
    v -= L::load(mean + c);
    v *= v;
  }
  L::store(acc + c, L::load(acc + c) + v);
}

// The same over one row of C channels, 8 lanes at a time.
template <bool kSquares, typename scalar_t>
FASTRES_INLINE void accumulate_row(const scalar_t* __restrict x, const acc_type_t<scalar_t>* __restrict mean,
                                   acc_type_t<scalar_t>* __restrict acc, int64_t C) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) accumulate_lanes<kSquares, 8>(x, mean, acc, c);
  for (; c < C; ++c) accumulate_lanes<kSquares, 1>(x, mean, acc, c);
}

// One NHWC unit: rows [row0, row1) of the [rows, C] matrix -> mean[C], m2[C] of the unit. Rows are
// read in memory order (one stream for the prefetchers); each chunk's second sweep finds them in L1/L2.
// scratch: 2 * C values.
template <typename scalar_t>
FASTRES_CPU_CLONES void unit_stats_rows(const scalar_t* __restrict y, int64_t row0, int64_t row1, int64_t C,
                                        acc_type_t<scalar_t>* __restrict mean, acc_type_t<scalar_t>* __restrict m2,
                                        acc_type_t<scalar_t>* __restrict scratch) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t* chunk_mean = scratch;
  acc_t* chunk_m2 = scratch + C;
  for (int64_t r0 = row0; r0 < row1; r0 += kChunkRows) {
    const int64_t r1 = std::min(row1, r0 + kChunkRows), rows = r1 - r0, done = r0 - row0;
    std::fill(chunk_mean, chunk_mean + 2 * C, acc_t(0));
    for (int64_t r = r0; r < r1; ++r) accumulate_row<false>(y + r * C, nullptr, chunk_mean, C);
    const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(rows);
    for (int64_t c = 0; c < C; ++c) chunk_mean[c] *= inv_rows;
    for (int64_t r = r0; r < r1; ++r) accumulate_row<true>(y + r * C, chunk_mean, chunk_m2, C);
    if (done == 0) {
      std::copy(chunk_mean, chunk_mean + C, mean);
      std::copy(chunk_m2, chunk_m2 + C, m2);
    } else {
      const acc_t b_share = static_cast<acc_t>(rows) / static_cast<acc_t>(done + rows);
      const acc_t cross = static_cast<acc_t>(done) * b_share;
      for (int64_t c = 0; c < C; ++c) chan_merge(mean[c], m2[c], chunk_mean[c], chunk_m2[c], b_share, cross);
    }
  }
}

// One NCHW run of n values of a single channel -> (mean, m2).
template <typename scalar_t>
FASTRES_CPU_CLONES void unit_stats_run(const scalar_t* __restrict x, int64_t n, acc_type_t<scalar_t>& mean_out,
                                       acc_type_t<scalar_t>& m2_out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t full = n - n % kLanes;
  acc_t lane[kLanes] = {};
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += static_cast<acc_t>(x[i + j]);
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < kLanes; ++j) sum += lane[j];
  for (int64_t i = full; i < n; ++i) sum += static_cast<acc_t>(x[i]);
  const acc_t mean = sum / static_cast<acc_t>(n);
  acc_t sq[kLanes] = {};
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(x[i + j]) - mean;
      sq[j] += d * d;
    }
  }
  acc_t m2 = 0;
  for (int64_t j = 0; j < kLanes; ++j) m2 += sq[j];
  for (int64_t i = full; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - mean;
    m2 += d * d;
  }
  mean_out = mean;
  m2_out = m2;
}

// NHWC: the units' partials (mean[C], m2[C] each, counts from the unit sizes) merged in unit order,
// in fp64; every channel of a unit has the same count, so the merge weights are per unit.
template <typename acc_t>
FASTRES_CPU_CLONES void merge_unit_rows(const Units& units, const acc_t* partials, double* mean, double* m2) {
  const int64_t C = units.shape.C;
  double done = 0;
  for (int64_t u = 0; u < units.count; ++u) {
    const acc_t* __restrict part_mean = partials + u * 2 * C;
    const acc_t* __restrict part_m2 = part_mean + C;
    const double rows = static_cast<double>(units.row_end(u) - units.row_begin(u));
    const double b_share = rows / (done + rows), cross = done * b_share;
    double* __restrict m = mean;
    double* __restrict q = m2;
    for (int64_t c = 0; c < C; ++c) {
      chan_merge(m[c], q[c], static_cast<double>(part_mean[c]), static_cast<double>(part_m2[c]), b_share, cross);
    }
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
  std::vector<acc_t> partials(units.count * width);
  at::parallel_for(0, units.count, units.grain(), [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> scratch(nhwc ? 2 * C : 0);
    for (int64_t u = u0; u < u1; ++u) {
      acc_t* part = partials.data() + u * width;
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
          Welford<double>{static_cast<double>(run.length), static_cast<double>(partials[u * 2]),
                          static_cast<double>(partials[u * 2 + 1])});
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
    // The merged statistics enter the math dtype here, as the CUDA kernel's do.
    const Welford<acc_t> s{static_cast<acc_t>(total_count[c]), static_cast<acc_t>(total_mean[c]),
                           static_cast<acc_t>(total_m2[c])};
    const auto f = bn_finalize(s, weight[c], bias[c], running_mean[c], running_var[c],
                               static_cast<acc_t>(a.momentum), static_cast<acc_t>(a.eps));
    mean[c] = f.mean;
    invstd[c] = f.invstd;
    scale[c] = f.scale;
    shift[c] = f.shift;
    new_running_mean[c] = f.running_mean;
    new_running_var[c] = f.running_var;
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
