// CPU kernel of _bn_apply_backward (and _bn_act_backward, its form without mask and dual
// residual). Pass 1 reads (grad_out, out or mask, y [, r]) once for the per-channel sums of dz,
// dz*(y-mean) [and dz*(r-r_mean)], writing grad_residual = dz (and in eval mode the input
// gradients); in training mode pass 2 writes the input gradients, reading dz back from
// grad_residual where pass 1 wrote it (one tensor instead of grad_out and out).
//
// NHWC rows go 8 channels at a time as one Lanes value (cpu_common.h), dz computed in registers
// from whichever source; an NCHW tile (one channel) first gets its dz into a small L1 buffer.
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

template <typename scalar_t>
struct Flat {  // the tensors of one call, as flat arrays in the common memory format
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* out;    // relu without mask only
  const uint8_t* mask;    // relu with mask only
  int64_t mask_stride;    // bytes per mask row
  const scalar_t* y;
  const scalar_t* r;      // dual only
  const acc_t *mean, *r_mean;
  const acc_t *a, *b, *k;  // coefficients of grad_y: a known up front, b and k after the sums
  const acc_t *r_a, *r_k;  // of grad_r (dual; b is shared: both BNs' bias grads are sum(dz))
  scalar_t* grad_y;
  scalar_t* grad_residual;  // dz, or grad_r in the dual form; null unless residual_grad
};

// dz of the n elements of an NCHW tile starting at flat index i (its mask bytes at `mask`).
template <typename scalar_t>
FASTRES_INLINE void span_dz(const Flat<scalar_t>& p, int64_t i, const uint8_t* mask, int64_t n,
                            acc_type_t<scalar_t>* dz) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* __restrict g = p.grad_out + i;
  acc_t* __restrict d = dz;
  if (p.mask != nullptr) {
    unpack_relu_mask(g, mask, d, n);
  } else if (p.out != nullptr) {
    const scalar_t* __restrict o = p.out + i;
    for (int64_t j = 0; j < n; ++j) {
      d[j] = bn_act_grad_z(static_cast<acc_t>(g[j]), static_cast<acc_t>(o[j]), true);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) d[j] = static_cast<acc_t>(g[j]);
  }
}

template <typename scalar_t>
FASTRES_INLINE void store_values(const acc_type_t<scalar_t>* __restrict src, scalar_t* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

template <typename acc_t>
struct RunChannel {  // NCHW: one channel for the whole tile
  acc_t m, rm, ca, cb, ck, ra, rk;
  acc_t mean(int64_t) const { return m; }
  acc_t r_mean(int64_t) const { return rm; }
  acc_t a(int64_t) const { return ca; }
  acc_t b(int64_t) const { return cb; }
  acc_t k(int64_t) const { return ck; }
  acc_t r_a(int64_t) const { return ra; }
  acc_t r_k(int64_t) const { return rk; }
};

// What pass 1 computes besides the sums: the dual residual's sum, and in eval mode the input
// gradients (grad_r only when asked for).
enum class Extra { kNone, kEval, kDual, kDualEval, kDualEvalGradR };

// NCHW pass 1 over n elements of a tile with dz given: s_*[j] += ... (j = the SIMD lane).
template <Extra kExtra, typename scalar_t, typename Ch>
FASTRES_INLINE void reduce_values(const acc_type_t<scalar_t>* __restrict dz, const scalar_t* __restrict y,
                          const scalar_t* __restrict r, scalar_t* __restrict grad_y,
                          scalar_t* __restrict grad_r, int64_t n, Ch ch, acc_type_t<scalar_t>* __restrict s_dz,
                          acc_type_t<scalar_t>* __restrict s_dzc, acc_type_t<scalar_t>* __restrict s_dzr) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr bool kDual = kExtra == Extra::kDual || kExtra == Extra::kDualEval || kExtra == Extra::kDualEvalGradR;
  constexpr bool kEval = kExtra == Extra::kEval || kExtra == Extra::kDualEval || kExtra == Extra::kDualEvalGradR;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d = dz[j];
    s_dz[j] += d;
    s_dzc[j] += d * (static_cast<acc_t>(y[j]) - ch.mean(j));
    if constexpr (kDual) s_dzr[j] += d * (static_cast<acc_t>(r[j]) - ch.r_mean(j));
    if constexpr (kEval) grad_y[j] = static_cast<scalar_t>(bn_eval_grad_input(d, ch.a(j)));
    if constexpr (kExtra == Extra::kDualEvalGradR) grad_r[j] = static_cast<scalar_t>(bn_eval_grad_input(d, ch.r_a(j)));
  }
}

// NCHW pass 2 (training) over n elements of a tile with dz given.
template <bool kGradR, typename scalar_t, typename Ch>
FASTRES_INLINE void grad_input_values(const acc_type_t<scalar_t>* __restrict dz, const scalar_t* __restrict y,
                              const scalar_t* __restrict r, scalar_t* __restrict grad_y,
                              scalar_t* __restrict grad_r, int64_t n, Ch ch) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d = dz[j];
    grad_y[j] = static_cast<scalar_t>(
        bn_train_grad_input(d, static_cast<acc_t>(y[j]), ch.mean(j), ch.a(j), ch.b(j), ch.k(j)));
    if constexpr (kGradR) {
      grad_r[j] = static_cast<scalar_t>(
          bn_train_grad_input(d, static_cast<acc_t>(r[j]), ch.r_mean(j), ch.r_a(j), ch.b(j), ch.r_k(j)));
    }
  }
}

template <typename scalar_t>
RunChannel<acc_type_t<scalar_t>> run_channel_of(const Flat<scalar_t>& p, int64_t c) {
  using acc_t = acc_type_t<scalar_t>;
  const bool dual = p.r != nullptr;
  return {p.mean[c], dual ? p.r_mean[c] : acc_t(0), p.a[c], p.b[c], p.k[c], dual ? p.r_a[c] : acc_t(0),
          dual ? p.r_k[c] : acc_t(0)};
}

// Mask bytes of the NCHW tile starting at flat index i (tiles start at multiples of 8 in their plane).
template <typename scalar_t>
FASTRES_INLINE const uint8_t* span_mask(const Units& units, const Flat<scalar_t>& p, int64_t i) {
  if (p.mask == nullptr) return nullptr;
  return p.mask + (i / units.shape.HW) * p.mask_stride + (i % units.shape.HW) / 8;
}

// ---- NHWC: N channels of a row as one Lanes value (N = 8, and 1 for the channels left over), rows
// in memory order. The per-call flags are plain branches, the same in every iteration.

// dz of channels [c0, c0 + N) of one row; i = the flat index of (row, c0).
template <int N, typename scalar_t>
FASTRES_INLINE typename Lanes<acc_type_t<scalar_t>, N>::V block_dz(const Flat<scalar_t>& p, int64_t row, int64_t i,
                                                                   int64_t c0) {
  using L = Lanes<acc_type_t<scalar_t>, N>;
  const auto g = L::load(p.grad_out + i);
  if (p.mask != nullptr) {  // N divides 8 and c0 is a multiple of N: the lanes' bits lie in one byte
    return L::keep(L::bits(p.mask[row * p.mask_stride + (c0 >> 3)] >> (c0 & 7)), g);
  }
  if (p.out != nullptr) return bn_act_grad_z(g, L::load(p.out + i), true);
  return g;
}

// Pass 1 over channels [c0, c0 + N) of one row: adds into the chunk sums s_dz, s_dzc, s_dzr (per
// channel, in L1).
template <int N, typename scalar_t>
FASTRES_INLINE void reduce_lanes(const Flat<scalar_t>& p, bool eval, int64_t row, int64_t c0, int64_t C,
                                 acc_type_t<scalar_t>* s_dz, acc_type_t<scalar_t>* s_dzc,
                                 acc_type_t<scalar_t>* s_dzr) {
  using L = Lanes<acc_type_t<scalar_t>, N>;
  using V = typename L::V;
  const bool dual = p.r != nullptr;
  const int64_t i = row * C + c0;
  const V dz = block_dz<N>(p, row, i, c0);
  L::store(s_dz + c0, L::load(s_dz + c0) + dz);
  L::store(s_dzc + c0, L::load(s_dzc + c0) + dz * (L::load(p.y + i) - L::load(p.mean + c0)));
  if (dual) L::store(s_dzr + c0, L::load(s_dzr + c0) + dz * (L::load(p.r + i) - L::load(p.r_mean + c0)));
  if (p.grad_residual != nullptr && !dual) L::store(p.grad_residual + i, dz);
  if (eval) {
    L::store(p.grad_y + i, bn_eval_grad_input(dz, L::load(p.a + c0)));
    if (p.grad_residual != nullptr && dual) L::store(p.grad_residual + i, bn_eval_grad_input(dz, L::load(p.r_a + c0)));
  }
}

// Pass 2 (training) over channels [c0, c0 + N) of one row.
template <int N, typename scalar_t>
FASTRES_INLINE void grad_input_lanes(const Flat<scalar_t>& p, int64_t row, int64_t c0, int64_t C) {
  using L = Lanes<acc_type_t<scalar_t>, N>;
  using V = typename L::V;
  const int64_t i = row * C + c0;
  const V dz = block_dz<N>(p, row, i, c0);
  const V b = L::load(p.b + c0);
  L::store(p.grad_y + i, bn_train_grad_input(dz, L::load(p.y + i), L::load(p.mean + c0), L::load(p.a + c0), b,
                                             L::load(p.k + c0)));
  if (p.r != nullptr && p.grad_residual != nullptr) {
    L::store(p.grad_residual + i, bn_train_grad_input(dz, L::load(p.r + i), L::load(p.r_mean + c0),
                                                      L::load(p.r_a + c0), b, L::load(p.r_k + c0)));
  }
}

// Pass 1 over the NHWC unit u, row by row (in memory order: few streams for the prefetchers),
// kChunk rows at a time summed in the math type, then added into part[3][C] in fp64.
// chunk: 3 * C values of scratch.
template <typename scalar_t>
FASTRES_CPU_CLONES void reduce_unit_rows(const Units& units, const Flat<scalar_t>& p, bool eval, int64_t u,
                                         double* part, acc_type_t<scalar_t>* chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const Flat<scalar_t> q = p;  // a local copy: its fields are plainly loop-invariant
  const int64_t C = units.shape.C;
  const int64_t row_end = units.row_end(u);
  for (int64_t row0 = units.row_begin(u); row0 < row_end; row0 += kChunk) {
    std::fill(chunk, chunk + 3 * C, acc_t(0));
    for (int64_t row = row0; row < std::min(row_end, row0 + kChunk); ++row) {
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) reduce_lanes<8>(q, eval, row, c, C, chunk, chunk + C, chunk + 2 * C);
      for (; c < C; ++c) reduce_lanes<1>(q, eval, row, c, C, chunk, chunk + C, chunk + 2 * C);
    }
    for (int64_t j = 0; j < 3 * C; ++j) part[j] += static_cast<double>(chunk[j]);
  }
}

// Pass 1 over the NCHW unit u (one tile of a plane); adds the tile's sums into part[3].
// scratch: kPlaneTile values.
template <Extra kExtra, typename scalar_t>
FASTRES_CPU_CLONES void reduce_unit(const Units& units, const Flat<scalar_t>& p, int64_t u, double* part,
                                    acc_type_t<scalar_t>* scratch) {
  using acc_t = acc_type_t<scalar_t>;
  const bool dz_to_residual = p.grad_residual != nullptr && p.r == nullptr;
  scalar_t* no_grad_r = nullptr;
  {  // NCHW
    const auto run = units.run(u);
    const int64_t i0 = run.offset, n = run.length;
    const auto ch = run_channel_of(p, run.channel);
    acc_t* dz = scratch;
    span_dz(p, i0, span_mask(units, p, i0), n, dz);
    if (dz_to_residual) store_values(dz, p.grad_residual + i0, n);
    // Blocks of kLanes*kChunk elements, each summed in kLanes lanes (element j of a group of
    // kLanes goes to lane j), the lanes then added in a fixed order.
    for (int64_t b0 = 0; b0 < n; b0 += kLanes * kChunk) {
      const int64_t b1 = std::min(n, b0 + kLanes * kChunk);
      acc_t lanes[3][kLanes] = {};
      for (int64_t k = b0; k < b1; k += kLanes) {
        const int64_t i = i0 + k;
        const scalar_t* r = p.r ? p.r + i : nullptr;
        scalar_t* gr = p.grad_residual ? p.grad_residual + i : no_grad_r;
        if (k + kLanes <= b1) {  // a whole group: a compile-time length, unrolled into SIMD lanes
          reduce_values<kExtra>(dz + k, p.y + i, r, p.grad_y + i, gr, kLanes, ch, lanes[0], lanes[1], lanes[2]);
        } else {
          reduce_values<kExtra>(dz + k, p.y + i, r, p.grad_y + i, gr, b1 - k, ch, lanes[0], lanes[1], lanes[2]);
        }
      }
      for (int s = 0; s < 3; ++s) {
        for (int64_t j = 0; j < kLanes; ++j) part[s] += static_cast<double>(lanes[s][j]);  // fixed lane order
      }
    }
  }
}

// Pass 1: partial sums per unit into partials (NHWC [unit][3][C], NCHW [unit][3]).
template <Extra kExtra, typename scalar_t>
void reduce_pass(const Units& units, const Flat<scalar_t>& p, bool eval, std::vector<double>& partials) {
  using acc_t = acc_type_t<scalar_t>;
  const bool nhwc = units.shape.channels_last;
  const int64_t width = nhwc ? 3 * units.shape.C : 3;
  partials.assign(units.count * width, 0.0);
  at::parallel_for(0, units.count, units.grain(), [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> scratch(nhwc ? 3 * units.shape.C : kPlaneTile);
    for (int64_t u = u0; u < u1; ++u) {
      if (nhwc) {
        reduce_unit_rows(units, p, eval, u, partials.data() + u * width, scratch.data());
      } else {
        reduce_unit<kExtra>(units, p, u, partials.data() + u * width, scratch.data());
      }
    }
  });
}

// Pass 2 (training) over the unit u; dz from p's source, or (p.grad_out == dz already, no relu) as it
// is. scratch: kPlaneTile values (NCHW).
template <bool kGradR, typename scalar_t>
FASTRES_CPU_CLONES void grad_input_unit(const Units& units, const Flat<scalar_t>& p, int64_t u,
                                        acc_type_t<scalar_t>* scratch) {
  const int64_t C = units.shape.C;
  if (units.shape.channels_last) {
    const Flat<scalar_t> q = p;  // a local copy: its fields are plainly loop-invariant
    for (int64_t row = units.row_begin(u); row < units.row_end(u); ++row) {
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) grad_input_lanes<8>(q, row, c, C);
      for (; c < C; ++c) grad_input_lanes<1>(q, row, c, C);
    }
  } else {
    const auto run = units.run(u);
    const int64_t i = run.offset;
    span_dz(p, i, span_mask(units, p, i), run.length, scratch);
    grad_input_values<kGradR>(scratch, p.y + i, kGradR ? p.r + i : nullptr, p.grad_y + i,
                              kGradR ? p.grad_residual + i : nullptr, run.length, run_channel_of(p, run.channel));
  }
}

template <bool kGradR, typename scalar_t>
void grad_input_pass(const Units& units, const Flat<scalar_t>& p) {
  using acc_t = acc_type_t<scalar_t>;
  at::parallel_for(0, units.count, units.grain(), [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> scratch(units.shape.channels_last ? 0 : kPlaneTile);
    for (int64_t u = u0; u < u1; ++u) grad_input_unit<kGradR>(units, p, u, scratch.data());
  });
}

template <typename scalar_t>
void bn_backward_kernel(const BnBackwardArgs& a) {
  using acc_t = acc_type_t<scalar_t>;
  const Units units(a.shape);
  const int64_t C = a.shape.C;
  const bool dual = a.dual;
  const acc_t* invstd = a.invstd.const_data_ptr<acc_t>();
  const acc_t* weight = a.weight.const_data_ptr<acc_t>();
  const acc_t* r_invstd = dual ? a.r_invstd.const_data_ptr<acc_t>() : nullptr;
  const acc_t* r_weight = dual ? a.r_weight.const_data_ptr<acc_t>() : nullptr;
  // Per-channel coefficients of the input gradients (see bn_grad_coeffs): a is known up front (eval
  // mode writes the gradients during the reduction pass); b and k need the sums.
  std::vector<acc_t> coef(5 * C, acc_t(0));
  acc_t *ca = coef.data(), *cb = ca + C, *ck = cb + C, *ra = ck + C, *rk = ra + C;
  for (int64_t c = 0; c < C; ++c) {
    ca[c] = bn_grad_input_scale(weight[c], invstd[c]);
    if (dual) ra[c] = bn_grad_input_scale(r_weight[c], r_invstd[c]);
  }
  const Flat<scalar_t> p{a.grad_out.const_data_ptr<scalar_t>(),
                         a.relu && !a.use_mask ? a.out.const_data_ptr<scalar_t>() : nullptr,
                         a.use_mask ? a.mask.const_data_ptr<uint8_t>() : nullptr,
                         mask_bytes_per_row(a.shape),
                         a.y.const_data_ptr<scalar_t>(),
                         dual ? a.r.const_data_ptr<scalar_t>() : nullptr,
                         a.mean.const_data_ptr<acc_t>(),
                         dual ? a.r_mean.const_data_ptr<acc_t>() : nullptr,
                         ca, cb, ck, ra, rk,
                         a.grad_y.mutable_data_ptr<scalar_t>(),
                         a.residual_grad ? a.grad_residual.mutable_data_ptr<scalar_t>() : nullptr};

  // ---- pass 1: partial sums per unit; NHWC [unit][3][C], NCHW [unit][3] ----
  std::vector<double> partials;
  const Extra extra = !dual ? (a.training ? Extra::kNone : Extra::kEval)
                            : a.training        ? Extra::kDual
                            : a.residual_grad   ? Extra::kDualEvalGradR
                                                : Extra::kDualEval;
  const bool eval = !a.training;
  switch (extra) {
    case Extra::kNone: reduce_pass<Extra::kNone>(units, p, eval, partials); break;
    case Extra::kEval: reduce_pass<Extra::kEval>(units, p, eval, partials); break;
    case Extra::kDual: reduce_pass<Extra::kDual>(units, p, eval, partials); break;
    case Extra::kDualEval: reduce_pass<Extra::kDualEval>(units, p, eval, partials); break;
    case Extra::kDualEvalGradR: reduce_pass<Extra::kDualEvalGradR>(units, p, eval, partials); break;
  }

  // ---- combine the partials in unit order (cheap: a few values per unit) ----
  std::vector<double> sums(3 * C, 0.0);  // sum dz, sum dz*(y-mean), sum dz*(r-r_mean)
  if (units.shape.channels_last) {
    for (int64_t u = 0; u < units.count; ++u) {
      const double* part = partials.data() + u * 3 * C;
      for (int64_t j = 0; j < 3 * C; ++j) sums[j] += part[j];
    }
  } else {
    for (int64_t u = 0; u < units.count; ++u) {
      const int64_t c = units.run(u).channel;
      for (int s = 0; s < 3; ++s) sums[s * C + c] += partials[u * 3 + s];
    }
  }
  acc_t* grad_weight = a.grad_weight.mutable_data_ptr<acc_t>();
  acc_t* grad_bias = a.grad_bias.mutable_data_ptr<acc_t>();
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(units.shape.N * units.shape.HW);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t sum_dz = static_cast<acc_t>(sums[c]);
    const auto g = bn_grad_coeffs(sum_dz, static_cast<acc_t>(sums[C + c]), invstd[c], weight[c], inv_count,
                                  a.training);
    grad_weight[c] = g.grad_weight;
    grad_bias[c] = g.grad_bias;
    cb[c] = g.b;
    ck[c] = g.k;
    if (dual) {
      const auto h = bn_grad_coeffs(sum_dz, static_cast<acc_t>(sums[2 * C + c]), r_invstd[c], r_weight[c],
                                    inv_count, a.training);
      a.grad_r_weight.mutable_data_ptr<acc_t>()[c] = h.grad_weight;
      a.grad_r_bias.mutable_data_ptr<acc_t>()[c] = h.grad_bias;
      rk[c] = h.k;
    }
  }

  // ---- pass 2 (training): the input gradients ----
  if (a.training) {
    if (a.residual_grad && !dual) {
      // grad_residual already holds dz, exactly (dz is grad_out or 0, so it survives the
      // rounding to scalar_t): read it instead of grad_out and out or mask, one tensor less.
      Flat<scalar_t> q = p;
      q.grad_out = p.grad_residual;
      q.out = nullptr;
      q.mask = nullptr;
      grad_input_pass<false>(units, q);
    } else if (a.residual_grad) {
      grad_input_pass<true>(units, p);
    } else {
      grad_input_pass<false>(units, p);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    BnBackwardArgs& a, const char* op) {
  TORCH_CHECK(a.y.device().is_cpu(), "fastres::", op, ": the CPU kernel got y on ", a.y.device());
  if (a.shape.numel() == 0) {
    for (at::Tensor* t : {&a.grad_weight, &a.grad_bias, &a.grad_r_weight, &a.grad_r_bias}) t->zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "fastres::_bn_apply_backward",
                                    [&] { bn_backward_kernel<scalar_t>(a); });
  }
  return {a.grad_y, a.grad_residual, a.grad_weight, a.grad_bias, a.grad_r_weight, a.grad_r_bias};
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_apply_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& mask,
    const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_mean,
    const std::optional<at::Tensor>& residual_invstd, const std::optional<at::Tensor>& residual_weight, bool relu,
    bool training, bool residual_grad) {
  auto a = prepare_bn_backward(grad_out, out, mask, y, mean, invstd, weight, residual, residual_mean,
                               residual_invstd, residual_weight, relu, training, residual_grad,
                               "_bn_apply_backward");
  return cpu::run_backward(a, "fastres::_bn_apply_backward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool relu, bool training,
    bool residual_grad) {
  auto a = prepare_bn_backward(grad_out, out, std::nullopt, y, mean, invstd, weight, std::nullopt, std::nullopt,
                               std::nullopt, std::nullopt, relu, training, residual_grad, "_bn_act_backward");
  auto r = cpu::run_backward(a, "fastres::_bn_act_backward");
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

}  // namespace fastres
