// CPU kernel of _max_pool_relu: 2-D max pooling with ATen's max_pool2d semantics (padding never wins, a NaN in
// the window gives NaN, output size as ATen computes it, ceil_mode and dilation included), then optionally a
// ReLU that lets NaN through, in one pass.
//
// Why: a ResNet stem's ReLU and max pool are two passes over its largest activation in ATen, and ATen's pool
// writes int64 argmax indices even in inference, twice the bytes of its output. ReLU and max commute (both are
// monotonic and keep NaN), so the stem's conv can end without its ReLU and this pass applies it on the pooled
// map, a quarter of the size. There is no backward kernel: fastres.ops.max_pool_relu's backward recomputes the
// indices with ATen.
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

namespace fastres {
namespace cpu {
namespace {

struct PoolGeometry {
  int64_t N, C, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// max(m, v) with NaN winning, as ATen's `(val > maxval) || isnan(val)`.
template <typename V>
FASTRES_INLINE V max_keep_nan(V m, V v) {
  return ((v > m) | (v != v)) ? v : m;
}

template <typename V>
FASTRES_INLINE V relu_keep_nan(V v) {
  return v < V{} ? V{} : v;
}

// Values as acc_t and back, exactly: a max is one of its inputs (or 0 after the ReLU), so bf16 converts by moving
// its bits into the top of a float and back, which vectorizes (c10::BFloat16's rounding conversion does not).
template <typename scalar_t>
FASTRES_INLINE acc_type_t<scalar_t> load_value(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint16_t bits;
    std::memcpy(&bits, p, sizeof bits);
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float v;
    std::memcpy(&v, &wide, sizeof v);
    return v;
  } else {
    return static_cast<acc_type_t<scalar_t>>(*p);
  }
}

template <typename scalar_t>
FASTRES_INLINE void store_value(scalar_t* p, acc_type_t<scalar_t> v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t wide;
    std::memcpy(&wide, &v, sizeof wide);
    const uint16_t bits = static_cast<uint16_t>(wide >> 16);
    std::memcpy(p, &bits, sizeof bits);
  } else {
    *p = static_cast<scalar_t>(v);
  }
}

#if defined(__GNUC__)
#define FASTRES_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FASTRES_INLINE_LAMBDA
#endif

// Channels per pass of an NHWC row: the running maxima stay in L1 (acc_t[kChannelTile] on the stack).
constexpr int64_t kChannelTile = 256;

// One output row (n, oh) of an NHWC input: OW pixels, every channel. Window positions outside, channels inside:
// the inner loop runs over contiguous channels, which the compiler vectorizes.
template <typename scalar_t, bool kRelu>
FASTRES_CPU_CLONES void pool_row_nhwc(const PoolGeometry& g, const scalar_t* __restrict x, scalar_t* __restrict out,
                                      int64_t n, int64_t oh) {
  using acc_t = acc_type_t<scalar_t>;
  using L8 = Lanes<acc_t, 8>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  typedef uint16_t Bits16 __attribute__((vector_size(16)));
  typedef uint32_t Bits32 __attribute__((vector_size(32)));
  const auto load8 = [](const scalar_t* p) FASTRES_INLINE_LAMBDA {
    typename L8::V v;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // load_value's bit move, 8 lanes at once
      Bits16 b;
      std::memcpy(&b, p, sizeof b);
      const Bits32 w = __builtin_convertvector(b, Bits32) << 16;
      std::memcpy(&v, &w, sizeof v);
    } else {
      for (int k = 0; k < 8; ++k) v[k] = load_value(p + k);
    }
    return v;
  };
  const auto store8 = [](scalar_t* p, typename L8::V v) FASTRES_INLINE_LAMBDA {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      Bits32 w;
      std::memcpy(&w, &v, sizeof w);
      const Bits16 b = __builtin_convertvector(w >> 16, Bits16);
      std::memcpy(p, &b, sizeof b);
    } else {
      for (int k = 0; k < 8; ++k) store_value(p + k, v[k]);
    }
  };
  const int64_t C = g.C;
  const int64_t ih0 = oh * g.sh - g.ph;
  // The window's rows inside the image (padding is never a candidate).
  int64_t i_begin = 0, i_end = g.kh;
  while (i_begin < i_end && ih0 + i_begin * g.dh < 0) ++i_begin;
  while (i_end > i_begin && ih0 + (i_end - 1) * g.dh >= g.H) --i_end;
  acc_t acc[kChannelTile];
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    const int64_t iw0 = ow * g.sw - g.pw;
    int64_t j_begin = 0, j_end = g.kw;
    while (j_begin < j_end && iw0 + j_begin * g.dw < 0) ++j_begin;
    while (j_end > j_begin && iw0 + (j_end - 1) * g.dw >= g.W) --j_end;
    scalar_t* o = out + ((n * g.OH + oh) * g.OW + ow) * C;
    int64_t c0 = 0;
    // 32 channels at a time in registers: four independent chains of maxima over the window.
    for (; c0 + 32 <= C; c0 += 32) {
      typename L8::V m0 = L8::zero() - kInf, m1 = m0, m2 = m0, m3 = m0;
      for (int64_t i = i_begin; i < i_end; ++i) {
        const scalar_t* row = x + ((n * g.H + ih0 + i * g.dh) * g.W) * C + c0;
        for (int64_t j = j_begin; j < j_end; ++j) {
          const scalar_t* v = row + (iw0 + j * g.dw) * C;
          m0 = max_keep_nan(m0, load8(v));
          m1 = max_keep_nan(m1, load8(v + 8));
          m2 = max_keep_nan(m2, load8(v + 16));
          m3 = max_keep_nan(m3, load8(v + 24));
        }
      }
      store8(o + c0, kRelu ? relu_keep_nan(m0) : m0);
      store8(o + c0 + 8, kRelu ? relu_keep_nan(m1) : m1);
      store8(o + c0 + 16, kRelu ? relu_keep_nan(m2) : m2);
      store8(o + c0 + 24, kRelu ? relu_keep_nan(m3) : m3);
    }
    for (; c0 < C; c0 += kChannelTile) {
      const int64_t nc = std::min(kChannelTile, C - c0);
      for (int64_t c = 0; c < nc; ++c) acc[c] = -kInf;
      for (int64_t i = i_begin; i < i_end; ++i) {
        const scalar_t* row = x + ((n * g.H + ih0 + i * g.dh) * g.W) * C + c0;
        for (int64_t j = j_begin; j < j_end; ++j) {
          const scalar_t* __restrict v = row + (iw0 + j * g.dw) * C;
          for (int64_t c = 0; c < nc; ++c) acc[c] = max_keep_nan(acc[c], load_value(v + c));
        }
      }
      for (int64_t c = 0; c < nc; ++c) store_value(o + c0 + c, kRelu ? relu_keep_nan(acc[c]) : acc[c]);
    }
  }
}

// One output plane (n, c) of an NCHW input.
template <typename scalar_t, bool kRelu>
FASTRES_CPU_CLONES void pool_plane_nchw(const PoolGeometry& g, const scalar_t* __restrict x,
                                        scalar_t* __restrict out, int64_t plane) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* in = x + plane * g.H * g.W;
  scalar_t* o = out + plane * g.OH * g.OW;
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    const int64_t ih0 = oh * g.sh - g.ph;
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const int64_t iw0 = ow * g.sw - g.pw;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = ih0 + i * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t iw = iw0 + j * g.dw;
          if (iw < 0 || iw >= g.W) continue;
          m = max_keep_nan(m, load_value(in + ih * g.W + iw));
        }
      }
      store_value(o + oh * g.OW + ow, kRelu ? relu_keep_nan(m) : m);
    }
  }
}

template <typename scalar_t>
void max_pool_relu_kernel(const PoolGeometry& g, const at::Tensor& x, at::Tensor& out, bool channels_last,
                          bool relu) {
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  with_flags(
      [&](auto k_relu) {
        constexpr bool kRelu = decltype(k_relu)::value;
        if (channels_last) {
          const int64_t row_elements = std::max<int64_t>(1, g.OW * g.C * g.kh * g.kw);
          at::parallel_for(0, g.N * g.OH, std::max<int64_t>(1, 32768 / row_elements), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) pool_row_nhwc<scalar_t, kRelu>(g, in, o, r / g.OH, r % g.OH);
          });
        } else {
          const int64_t plane_elements = std::max<int64_t>(1, g.OH * g.OW * g.kh * g.kw);
          at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, 32768 / plane_elements), [&](int64_t p0, int64_t p1) {
            for (int64_t p = p0; p < p1; ++p) pool_plane_nchw<scalar_t, kRelu>(g, in, o, p);
          });
        }
      },
      relu);
}

// ATen's pooling_output_shape (symmetric padding).
int64_t pooled_size(int64_t size, int64_t kernel, int64_t pad, int64_t stride, int64_t dilation, bool ceil_mode) {
  const int64_t span = size + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= size + pad) --out;  // the last window must start inside the input
  return out;
}

}  // namespace
}  // namespace cpu

at::Tensor max_pool_relu_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode, bool relu) {
  TORCH_CHECK(x.device().is_cpu(), "fastres::_max_pool_relu: the CPU kernel got x on ", x.device());
  TORCH_CHECK(x.dim() == 4, "fastres::_max_pool_relu: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastres::_max_pool_relu: x must be floating point, got ",
              x.scalar_type());
  for (const auto& [name, v] : {std::pair<const char*, at::IntArrayRef>{"kernel_size", kernel_size},
                                {"stride", stride}, {"padding", padding}, {"dilation", dilation}}) {
    TORCH_CHECK(v.size() == 2, "fastres::_max_pool_relu: ", name, " must have 2 values, got ", v.size());
  }
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(kernel_size[d] > 0 && stride[d] > 0 && dilation[d] > 0,
                "fastres::_max_pool_relu: kernel_size, stride and dilation must be positive, got ", kernel_size,
                ", ", stride, ", ", dilation);
    TORCH_CHECK(padding[d] >= 0 && padding[d] <= kernel_size[d] / 2,
                "fastres::_max_pool_relu: padding must be between 0 and half of kernel_size, got padding ",
                padding, " for kernel_size ", kernel_size);
  }
  const bool channels_last = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor in = x.contiguous(fmt);
  cpu::PoolGeometry g{};
  g.N = in.size(0), g.C = in.size(1), g.H = in.size(2), g.W = in.size(3);
  g.kh = kernel_size[0], g.kw = kernel_size[1], g.sh = stride[0], g.sw = stride[1];
  g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.OH = cpu::pooled_size(g.H, g.kh, g.ph, g.sh, g.dh, ceil_mode);
  g.OW = cpu::pooled_size(g.W, g.kw, g.pw, g.sw, g.dw, ceil_mode);
  TORCH_CHECK(g.OH >= 1 && g.OW >= 1, "fastres::_max_pool_relu: the output of an input of ", x.sizes(),
              " would be empty (", g.OH, "x", g.OW, "): kernel_size or dilation too large");
  at::Tensor out = at::empty({g.N, g.C, g.OH, g.OW}, in.options().memory_format(fmt));
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "fastres::_max_pool_relu",
                                    [&] { cpu::max_pool_relu_kernel<scalar_t>(g, in, out, channels_last, relu); });
  }
  return out;
}

}  // namespace fastres

TORCH_LIBRARY_FRAGMENT(fastres, m) {
  m.def("_max_pool_relu(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "bool ceil_mode, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastres, CPU, m) { m.impl("_max_pool_relu", &fastres::max_pool_relu_cpu); }
