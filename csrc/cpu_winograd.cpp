// CPU kernels of _winograd_conv3x3 and _winograd_weight: a 3x3 convolution (stride 1, padding 1, dilation 1, one
// group) of a channels_last fp32 activation as Winograd's F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for
// Convolutional Neural Networks", 2015), with the bias, a residual and a ReLU applied as the output is written.
//
// Why: a ResNet's 3x3 convolutions are about half of its multiply-adds, and on CPU they run at the machine's peak
// in oneDNN's direct kernels. F(2x2, 3x3) computes each 2x2 output tile from a 4x4 input tile with 16 products per
// channel pair where the direct form takes 36: the products are 16 matrix products [tiles, Cin] x [Cin, Cout]
// (ATen's bmm, or oneDNN's brgemm on blocks of tiles: blocked_form_ran), the transforms around them are additions
// only. Its error stays within the project's tolerance rule (about ATen's: the transforms of the input and output
// only add, and the weight's transform, which halves, is computed once in fp64 and rounded); F(4x4, 3x3) does not
// (30-40x ATen's error, measured).
//
// Layout: the input's 4x4 tiles overlap by 2; tile (ty, tx) of image n covers rows 2ty-1 .. 2ty+2 and columns
// 2tx-1 .. 2tx+2 (the padding reads as 0). V[k][t][c] holds the input transform's element k = 4i + j of tile t,
// the products give M[k][t][o], and the output transform writes the 2x2 output pixels of tile t that lie inside
// the output (an odd size's last tile is partial).
#include "cpu_common.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <memory>
#include <vector>

namespace fastres {
namespace cpu {
namespace {

struct WinogradGeometry {
  int64_t N, H, W, C, K;  // batch, size, input channels, output channels
  int64_t TH, TW, T;      // tiles per column and row, tiles in all (N * TH * TW)
};

// B^T d B for channels [c, c + N) of one tile (L: Lanes<float, N>): B^T's rows (1 0 -1 0), (0 1 1 0),
// (0 -1 1 0), (0 1 0 -1) on the patch's rows, then on its columns.
template <typename L>
FASTRES_INLINE void input_tile(const float* (&d)[4][4], float* __restrict out, int64_t plane, int64_t c) {
  using V = typename L::V;
  V r[4][4];
  for (int j = 0; j < 4; ++j) {
    const V d0 = L::load(d[0][j] + c), d1 = L::load(d[1][j] + c), d2 = L::load(d[2][j] + c), d3 = L::load(d[3][j] + c);
    r[0][j] = d0 - d2;
    r[1][j] = d1 + d2;
    r[2][j] = d2 - d1;
    r[3][j] = d1 - d3;
  }
  for (int i = 0; i < 4; ++i) {
    L::store(out + (4 * i + 0) * plane + c, r[i][0] - r[i][2]);
    L::store(out + (4 * i + 1) * plane + c, r[i][1] + r[i][2]);
    L::store(out + (4 * i + 2) * plane + c, r[i][2] - r[i][1]);
    L::store(out + (4 * i + 3) * plane + c, r[i][1] - r[i][3]);
  }
}

// A^T m A + bias (+ residual), ReLU'd with `relu` (math.h's, which keeps NaN, as ATen's does), for channels
// [o, o + N) of one tile (L: Lanes<float, N>), written to the tile's `rows` x `cols` output pixels at `offsets`:
// A^T's rows (1 1 1 0), (0 1 -1 -1) on the rows of the 4x4 product, then on its columns.
template <typename L>
FASTRES_INLINE void output_tile(const float* __restrict in, int64_t plane, int64_t o, const float* __restrict bias,
                                const float* __restrict residual, bool relu, float* __restrict out,
                                const int64_t (&offsets)[2][2], int rows, int cols) {
  using V = typename L::V;
  V s[2][4];
  for (int j = 0; j < 4; ++j) {
    const V m0 = L::load(in + (0 + j) * plane + o), m1 = L::load(in + (4 + j) * plane + o);
    const V m2 = L::load(in + (8 + j) * plane + o), m3 = L::load(in + (12 + j) * plane + o);
    s[0][j] = m0 + m1 + m2;
    s[1][j] = m1 - m2 - m3;
  }
  const V b = bias ? L::load(bias + o) : L::zero();
  for (int i = 0; i < rows; ++i) {
    const V y[2] = {s[i][0] + s[i][1] + s[i][2] + b, s[i][1] - s[i][2] - s[i][3] + b};
    for (int j = 0; j < cols; ++j) {
      V value = y[j];
      if (residual) value += L::load(residual + offsets[i][j] + o);
      if (relu) value = Select<V>::relu(value);
      L::store(out + offsets[i][j] + o, value);
    }
  }
}

// Tiles [t0, t1): v[k * plane + (t - t0) * C + c] = (B^T d B)[k] for each tile's 4x4 input patch d, every
// channel at once (the inner loops run along the channels, contiguous in channels_last, and vectorize).
FASTRES_CPU_CLONES_AVX512 void input_transform(const WinogradGeometry& g, const float* __restrict x,
                                        const float* __restrict zeros, float* __restrict v, int64_t plane,
                                        int64_t t0, int64_t t1) {
  const int64_t C = g.C;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / (g.TH * g.TW), ty = t / g.TW % g.TH, tx = t % g.TW;
    const float* d[4][4];
    for (int i = 0; i < 4; ++i) {
      const int64_t y = 2 * ty - 1 + i;
      for (int j = 0; j < 4; ++j) {
        const int64_t xx = 2 * tx - 1 + j;
        d[i][j] = (y >= 0 && y < g.H && xx >= 0 && xx < g.W) ? x + ((n * g.H + y) * g.W + xx) * C : zeros;
      }
    }
    float* __restrict out = v + (t - t0) * C;
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) input_tile<Lanes<float, 16>>(d, out, plane, c);
    for (; c < C; ++c) input_tile<Lanes<float, 1>>(d, out, plane, c);
  }
}

// Tiles [t0, t1), their products at m[k * plane + (t - t0) * K + o]: each tile's output pixels (A^T m A) + bias
// (+ residual), ReLU'd with `relu` (a NaN kept, as ATen's relu keeps it), written where they lie inside the output.
FASTRES_CPU_CLONES_AVX512 void output_transform(const WinogradGeometry& g, const float* __restrict m, int64_t plane,
                                         const float* __restrict bias, const float* __restrict residual,
                                         bool relu, float* __restrict out, int64_t t0, int64_t t1) {
  const int64_t K = g.K;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / (g.TH * g.TW), ty = t / g.TW % g.TH, tx = t % g.TW;
    const bool full_rows = 2 * ty + 1 < g.H, full_cols = 2 * tx + 1 < g.W;
    const int64_t pixel = (n * g.H + 2 * ty) * g.W + 2 * tx;
    const int64_t offsets[2][2] = {{pixel * K, (pixel + 1) * K}, {(pixel + g.W) * K, (pixel + g.W + 1) * K}};
    const float* __restrict in = m + (t - t0) * K;
    const int rows = full_rows ? 2 : 1, cols = full_cols ? 2 : 1;
    int64_t o = 0;
    // 16 channels at a time: 1.2x faster than 8 at 64 channels and 56x56 (one AVX-512 register in the v4 clone)
    for (; o + 16 <= K; o += 16) {
      output_tile<Lanes<float, 16>>(in, plane, o, bias, residual, relu, out, offsets, rows, cols);
    }
    for (; o < K; ++o) output_tile<Lanes<float, 1>>(in, plane, o, bias, residual, relu, out, offsets, rows, cols);
  }
}

// Tiles per parallel task: a task's transforms touch 16 x (tiles x channels) floats; about 64 KiB of them.
int64_t tile_grain(int64_t channels) { return std::max<int64_t>(1, 1024 / std::max<int64_t>(channels, 1)); }

// The blocked form: each thread takes blocks of tiles through all three steps, the input transform, the 16 products
// (oneDNN's brgemm micro-kernel, as ATen exposes it) and the output transform, in a scratch buffer of its own that
// stays in its cache. The three-pass form (every tile's input transform, then ATen's bmm, then every tile's output)
// writes and reads back 4x the input and 4x the output through memory; the blocked form reads the whole transformed
// weight once per block instead. So it runs where tiles outnumber output channels 8 to 1 (ResNet-50's first two
// stages at batch 8; on an AVX2 AMD EPYC 64 channels at 56x56 took 7.6 against 8.9 ms and 128 at 28x28 6.2 against
// 7.6 ms), and 3 to 1 where the transformed weight is at most 1 MiB (128 channels in and out: at 28x28, batch 2
// and 4, 1.17x and 1.21x the three-pass form's speed; 256 channels, whose 4 MiB weight each block reads again, were
// 4-15% slower at 3 to 1 and below, as were batch 1's 128 channels at 28x28 and 256 at 14x14).
constexpr int64_t kBlockTiles = 32;
// Each of the 16 planes of a block's scratch starts one cache line further along than a whole number of 4 KiB pages
// would put it: 32 tiles x 64 channels is 8 KiB, so every plane of ResNet-50's first stage fell into the same L1
// set, and the transforms, which touch all 16 at once, missed it. Padded and shared evenly (below): 1.03-1.12x the
// call's speed at 64 channels and 56x56, batch 1 and 8 (AVX2 AMD EPYC, ad hoc, in one process).
constexpr int64_t kPlanePad = 16;

#if defined(CPUBLAS_BRGEMM_F32F32F32)
bool blocked_form_pays(const WinogradGeometry& g) {
  return g.T >= 8 * g.K || (g.T >= 3 * g.K && 16 * g.C * g.K * static_cast<int64_t>(sizeof(float)) <= (1 << 20));
}

bool brgemm_usable() {
  // ATen's fp32 brgemm needs oneDNN's micro-kernels built in and a CPU they support: tried once, on a 1x1 product.
  static const bool usable = [] {
    try {
      const float a = 1.0f, b = 2.0f;
      float c = 0.0f;
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &a, &b, &c, false);
      at::native::cpublas::brgemm_release(false);
      return c == 2.0f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return usable;
}
#endif

// Runs the blocked form where it pays and ATen has brgemm for fp32; false (nothing written) elsewhere.
bool blocked_form_ran(const WinogradGeometry& g, const float* x, const float* zeros, const float* u,
                      const float* bias, const float* residual, bool relu, float* out) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  if (!blocked_form_pays(g) || !brgemm_usable()) return false;
  // Each thread an even share of the tiles, in equal blocks of at most kBlockTiles. Blocks of kBlockTiles each, dealt
  // out whole, left one thread a block more than the other (batch 1's 784 tiles at 56x56: 13 blocks against 12).
  const int64_t threads = at::get_num_threads();
  const int64_t share = (g.T + threads - 1) / threads;
  const int64_t blocks_per_share = (share + kBlockTiles - 1) / kBlockTiles;
  const int64_t tiles = (share + blocks_per_share - 1) / blocks_per_share;
  const int64_t v_plane = tiles * g.C + kPlanePad, m_plane = tiles * g.K + kPlanePad;
  at::parallel_for(0, g.T, share, [&](int64_t begin, int64_t end) {
    const std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(16 * (v_plane + m_plane))]);
    float* v = scratch.get();
    float* m = v + 16 * v_plane;
    for (int64_t t0 = begin; t0 < end; t0 += tiles) {
      const int64_t t1 = std::min(end, t0 + tiles);
      input_transform(g, x, zeros, v, v_plane, t0, t1);
      for (int k = 0; k < 16; ++k) {
        at::native::cpublas::brgemm(t1 - t0, g.K, g.C, g.C, g.K, g.K, false, v + k * v_plane, u + k * g.C * g.K,
                                    m + k * m_plane, false);
      }
      output_transform(g, m, m_plane, bias, residual, relu, out, t0, t1);
    }
    at::native::cpublas::brgemm_release(false);
  });
  return true;
#else
  (void)g, (void)x, (void)zeros, (void)u, (void)bias, (void)residual, (void)relu, (void)out;
  return false;
#endif
}

}  // namespace
}  // namespace cpu

at::Tensor winograd_weight_cpu(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu(), "fastres::_winograd_weight: the CPU kernel got weight on ", weight.device());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "fastres::_winograd_weight: weight must be [Cout, Cin, 3, 3], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "fastres::_winograd_weight: weight must be float32, got ",
              weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  const int64_t K = w.size(0), C = w.size(1);
  at::Tensor u = at::empty({16, C, K}, w.options());
  const float* __restrict src = w.data_ptr<float>();
  float* __restrict dst = u.data_ptr<float>();
  // G = (1 0 0), (1/2 1/2 1/2), (1/2 -1/2 1/2), (0 0 1); U = G w G^T in fp64, rounded once.
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t o = k0; o < k1; ++o) {
      for (int64_t c = 0; c < C; ++c) {
        const float* f = src + (o * C + c) * 9;
        double gf[4][3];
        for (int i = 0; i < 4; ++i) {
          for (int j = 0; j < 3; ++j) {
            gf[i][j] = G[i][0] * f[j] + G[i][1] * f[3 + j] + G[i][2] * f[6 + j];
          }
        }
        for (int i = 0; i < 4; ++i) {
          for (int l = 0; l < 4; ++l) {
            const double value = gf[i][0] * G[l][0] + gf[i][1] * G[l][1] + gf[i][2] * G[l][2];
            dst[((4 * i + l) * C + c) * K + o] = static_cast<float>(value);
          }
        }
      }
    }
  });
  return u;
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* op = "fastres::_winograd_conv3x3: ";
  TORCH_CHECK(x.device().is_cpu(), op, "the CPU kernel got x on ", x.device());
  TORCH_CHECK(x.dim() == 4, op, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 3 &&
                  weight.size(0) == 16 && weight.size(1) == x.size(1),
              op, "weight must be _winograd_weight's float32 [16, Cin, Cout] on the CPU with Cin = x's ", x.size(1),
              " channels, got ", weight.scalar_type(), " ", weight.sizes(), " on ", weight.device());
  const int64_t K = weight.size(2);
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == K,
                op, "bias must be float32 [", K, "] on the CPU, got ", bias->scalar_type(), " ", bias->sizes(), " on ",
                bias->device());
  }
  const at::Tensor in = x.contiguous(at::MemoryFormat::ChannelsLast);
  cpu::WinogradGeometry g{};
  g.N = in.size(0), g.C = in.size(1), g.H = in.size(2), g.W = in.size(3), g.K = K;
  g.TH = (g.H + 1) / 2, g.TW = (g.W + 1) / 2, g.T = g.N * g.TH * g.TW;
  at::Tensor res;
  if (residual) {
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == at::kFloat &&
                    residual->sizes() == at::IntArrayRef({g.N, K, g.H, g.W}),
                op, "residual must be float32 [", g.N, ", ", K, ", ", g.H, ", ", g.W, "] on the CPU, got ",
                residual->scalar_type(), " ", residual->sizes(), " on ", residual->device());
    res = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor out = at::empty({g.N, K, g.H, g.W}, in.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const at::Tensor u = weight.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const std::vector<float> zeros(static_cast<size_t>(std::max<int64_t>(g.C, 1)), 0.0f);
  const float* bias_data = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* residual_data = res.defined() ? res.data_ptr<float>() : nullptr;
  if (cpu::blocked_form_ran(g, in.data_ptr<float>(), zeros.data(), u.data_ptr<float>(), bias_data, residual_data,
                            relu, out.data_ptr<float>())) {
    return out;
  }
  at::Tensor v = at::empty({16, g.T, g.C}, in.options());
  at::parallel_for(0, g.T, cpu::tile_grain(g.C), [&](int64_t t0, int64_t t1) {
    cpu::input_transform(g, in.data_ptr<float>(), zeros.data(), v.data_ptr<float>() + t0 * g.C, g.T * g.C, t0, t1);
  });
  const at::Tensor m = at::bmm(v, u);  // [16, T, K]
  at::parallel_for(0, g.T, cpu::tile_grain(K), [&](int64_t t0, int64_t t1) {
    cpu::output_transform(g, m.data_ptr<float>() + t0 * K, g.T * K, bias_data, residual_data, relu,
                          out.data_ptr<float>(), t0, t1);
  });
  return out;
}

}  // namespace fastres

TORCH_LIBRARY_FRAGMENT(fastres, m) {
  m.def("_winograd_weight(Tensor weight) -> Tensor");
  m.def("_winograd_conv3x3(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("_winograd_weight", &fastres::winograd_weight_cpu);
  m.impl("_winograd_conv3x3", &fastres::winograd_conv3x3_cpu);
}
