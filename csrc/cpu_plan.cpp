// _run_plan: the CPU eval plan's body (fastres.models._eval_plan) run as one call, the same oneDNN calls on the same
// prepacked weights that its Python loop makes, in the same order, with the same in-place residual writes.
//
// Why: at batch 1 a ResNet-50's 53 convolutions take about 45 ms, and the Python loop around them (a unit's
// function calls, argument lists, the op's Python dispatch) about 20 us each (1 ms over 53 units, measured at
// 64x64): a few percent, which is where torch.compile's generated wrapper was ahead. The Python plan keeps every
// decision (what is packed, the guard, the fallbacks); this replays its steady state.
//
// The ReLUs, first as oneDNN's relu post-op, then checked. The post-op maps NaN to 0 where torch.relu keeps it
// (issue 12: NaN and Inf propagate exactly as in the reference), so the Python loop runs each ReLU as its own pass
// (fastres::_relu_). Those passes cost 5% of a ResNet-50 forward at batch 8 (2-3% at batch 1). A NaN reaches a ReLU
// only from a NaN or Inf input or weight, or from an Inf - Inf or 0 x Inf inside a convolution, and every one of
// these raises the floating-point invalid flag on the thread that computes it: the post-op's vmaxps raises it for a
// NaN operand (quiet ones included), and so do Inf - Inf and 0 x Inf. So the body runs with the post-op, with
// FE_INVALID cleared before on every thread of ATen's pool (the threads oneDNN's kernels run on) and read after;
// where any thread raised it, the output is dropped and the body runs again with the ReLU passes, exactly as the
// Python loop does. Where nothing raised it, no ReLU saw a NaN, and max(x, 0) in a register equals the pass:
// bitwise, fp32 and bf16 (rounding keeps the sign). Each thread's flag is left as it was, or as the run raised it.
//
// Program (int[]): the stem's unit count and units; the pool (0: none, 1: _max_pool_relu with kernel_size, stride,
// padding, dilation, ceil_mode, relu); whether the first block may write over the pool's output; the block count;
// per block the branch's unit count and units, then its shortcut: 0 none (no residual), 1 the block's input,
// 2 a unit (its index), 3 an average pool then a unit (kernel_size, stride, padding, ceil_mode, count_include_pad,
// divisor_override or 0, the unit), 4 option A (stride, the zero channels appended).
// Units (int[], 8 per unit): stride h w, padding h w, dilation h w, groups, relu; unit i's packed weight (oneDNN's,
// or a Winograd transform) and bias are weights[i] and biases[i].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <atomic>
#include <cfenv>
#include <cstring>
#include <vector>

namespace fastres {
namespace {

constexpr int64_t kUnitFields = 8;

// ATen's oneDNN ops, found on first use (libtorch_cpu registered them before this library loaded) and called boxed:
// their C++ signatures differ between torch versions, their schemas' arguments do not.
const c10::OperatorHandle& conv_pointwise() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  return op;
}
const c10::OperatorHandle& conv_pointwise_binary() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary");
  return op;
}
const c10::OperatorHandle& conv_pointwise_binary_inplace() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise_", "binary");
  return op;
}
// fastres's own (csrc/cpu_pool.cpp), through the dispatcher like the others: profiles and hooks see every op.
at::Tensor max_pool_relu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode, bool relu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastres::_max_pool_relu", "")
                             .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                               at::IntArrayRef, bool, bool)>();
  return op.call(x, kernel_size, stride, padding, dilation, ceil_mode, relu);
}

at::Tensor relu_in_place(const at::Tensor& x) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastres::_relu_", "").typed<void(const at::Tensor&)>();
  op.call(x);
  return x;
}

at::Tensor winograd_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& residual, bool relu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastres::_winograd_conv3x3", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, bool)>();
  return op.call(x, weight, bias, residual.defined() ? std::optional<at::Tensor>(residual) : std::nullopt, relu);
}

struct Unit {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  bool relu;
};

Unit unit_at(at::IntArrayRef units, int64_t i) {
  TORCH_CHECK(i >= 0 && (i + 1) * kUnitFields <= static_cast<int64_t>(units.size()),
              "fastres::_run_plan: unit ", i, " is not in units");
  const int64_t* u = units.data() + i * kUnitFields;
  return {{u[0], u[1]}, {u[2], u[3]}, {u[4], u[5]}, u[6], u[7] != 0};
}

c10::IValue optional_tensor(const std::optional<at::Tensor>& t) {
  return t.has_value() ? c10::IValue(*t) : c10::IValue();
}

// relu?(conv(x) + bias + residual?) from a prepacked weight, as fastres.ops.backend_cuda.prepacked_conv_bias_act;
// fuse_relu: the ReLU as oneDNN's post-op (NaN to 0: see run_plan). A dense 3-D weight is _winograd_weight's
// [16, Cin, Cout] transform (pack_conv_weight chose Winograd for this unit and input size): _winograd_conv3x3, whose
// ReLU keeps NaN either way.
at::Tensor run_unit(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const Unit& u, const at::Tensor& residual, bool residual_owned, bool fuse_relu) {
  if (weight.layout() == at::kStrided && weight.dim() == 3) {
    return winograd_conv3x3(x, weight, bias, residual, u.relu);
  }
  const c10::List<std::optional<c10::Scalar>> no_scalars;
  const bool post_relu = fuse_relu && u.relu;
  const c10::IValue unary = post_relu ? c10::IValue("relu") : c10::IValue();
  torch::jit::Stack stack;
  at::Tensor out;
  if (!residual.defined()) {
    stack = {x, weight, optional_tensor(bias), u.padding, u.stride, u.dilation, u.groups, post_relu ? "relu" : "none",
             no_scalars, ""};
    conv_pointwise().callBoxed(&stack);
    out = stack[0].toTensor();
  } else {
    const at::Tensor laid_out = residual.contiguous(at::MemoryFormat::ChannelsLast);
    // Over the residual only where nothing else holds it and it is the output's exact buffer.
    std::vector<int64_t> out_shape{x.size(0), weight.size(0), 0, 0};
    for (const int d : {0, 1}) {
      const int64_t span = u.dilation[d] * (weight.size(2 + d) - 1) + 1;
      out_shape[2 + d] = (x.size(2 + d) + 2 * u.padding[d] - span) / u.stride[d] + 1;
    }
    const bool into_residual = (residual_owned || !laid_out.is_same(residual)) &&
                               laid_out.scalar_type() == x.scalar_type() && !laid_out.requires_grad() &&
                               (c10::InferenceMode::is_enabled() || !laid_out.is_inference()) &&
                               laid_out.sizes() == at::IntArrayRef(out_shape);
    bool done = false;
    if (into_residual) {
      stack = {laid_out, x, weight, optional_tensor(bias), u.padding, u.stride, u.dilation, u.groups, "add",
               c10::IValue(), unary, no_scalars, ""};
      try {
        conv_pointwise_binary_inplace().callBoxed(&stack);
        out = stack[0].toTensor();
        done = true;
      } catch (const c10::Error&) {
        // refused in place (another torch version): out of place, as the Python path does
      }
    }
    if (!done) {
      stack = {x, laid_out, weight, optional_tensor(bias), u.padding, u.stride, u.dilation, u.groups, "add",
               c10::IValue(), unary, no_scalars, ""};
      conv_pointwise_binary().callBoxed(&stack);
      out = stack[0].toTensor();
    }
  }
  // (without the post-op: the NaN-keeping pass)
  return u.relu && !post_relu ? relu_in_place(out) : out;
}

class Reader {
 public:
  explicit Reader(at::IntArrayRef program) : program_(program) {}
  int64_t next() {
    TORCH_CHECK(pos_ < program_.size(), "fastres::_run_plan: the program ends early");
    return program_[pos_++];
  }
  bool done() const { return pos_ == program_.size(); }

 private:
  at::IntArrayRef program_;
  size_t pos_ = 0;
};

at::Tensor run_body(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                    at::IntArrayRef units, at::IntArrayRef program, bool fuse_relu) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "fastres::_run_plan: x must be a 4-D CPU tensor");
  TORCH_CHECK(weights.size() == biases.size() && static_cast<int64_t>(units.size()) ==
                  kUnitFields * static_cast<int64_t>(weights.size()),
              "fastres::_run_plan: weights, biases and units must describe the same units");
  const auto unit = [&](const at::Tensor& in, int64_t i, const at::Tensor& residual = {}, bool owned = false) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(weights.size()), "fastres::_run_plan: no unit ", i);
    return run_unit(in, weights[i], biases.get(i), unit_at(units, i), residual, owned, fuse_relu);
  };
  Reader r(program);
  at::Tensor cur = x;
  for (int64_t n = r.next(); n > 0; --n) {
    cur = unit(cur, r.next());
  }
  const int64_t pool = r.next();
  if (pool == 1) {
    std::vector<int64_t> g(8);
    for (auto& v : g) v = r.next();
    const bool ceil_mode = r.next() != 0;
    const bool relu = r.next() != 0;
    cur = max_pool_relu(cur, {g[0], g[1]}, {g[2], g[3]}, {g[4], g[5]}, {g[6], g[7]}, ceil_mode, relu);
  } else {
    TORCH_CHECK(pool == 0, "fastres::_run_plan: unknown pool ", pool);
  }
  bool owned = r.next() != 0;
  for (int64_t blocks = r.next(); blocks > 0; --blocks) {
    const int64_t branch = r.next();
    TORCH_CHECK(branch >= 1, "fastres::_run_plan: a block needs a unit");
    at::Tensor block_input = cur;
    for (int64_t k = 0; k + 1 < branch; ++k) {
      cur = unit(cur, r.next());
    }
    const int64_t last = r.next();
    at::Tensor shortcut;
    bool shortcut_owned = false;  // as the Python loop: a module's output (option A) is not the block's to write over
    switch (r.next()) {
      case 0:
        break;
      case 1:
        shortcut = block_input;
        shortcut_owned = owned;
        break;
      case 2:
        shortcut = unit(block_input, r.next());
        shortcut_owned = true;
        break;
      case 3: {
        std::vector<int64_t> g(6);
        for (auto& v : g) v = r.next();
        const bool ceil_mode = r.next() != 0;
        const bool count_include_pad = r.next() != 0;
        const int64_t divisor = r.next();
        const at::Tensor pooled = at::avg_pool2d(block_input, {g[0], g[1]}, {g[2], g[3]}, {g[4], g[5]}, ceil_mode,
                                                 count_include_pad, divisor > 0 ? std::optional<int64_t>(divisor)
                                                                                : std::nullopt);
        shortcut = unit(pooled, r.next());
        shortcut_owned = true;
        break;
      }
      case 4: {  // PadShortcut.forward: x[:, :, ::stride, ::stride], then F.pad with zero channels
        const int64_t stride = r.next();
        const int64_t channels = r.next();
        at::Tensor sub = block_input;
        if (stride != 1) {
          sub = sub.slice(2, 0, std::nullopt, stride).slice(3, 0, std::nullopt, stride);
        }
        shortcut = at::constant_pad_nd(sub, {0, 0, 0, 0, 0, channels}, 0);
        break;
      }
      default:
        TORCH_CHECK(false, "fastres::_run_plan: unknown shortcut");
    }
    block_input.reset();  // (where the shortcut is the block's input, it still holds it)
    cur = unit(cur, last, shortcut, shortcut_owned);
    owned = true;
  }
  TORCH_CHECK(r.done(), "fastres::_run_plan: the program has more than its blocks");
  return cur;
}

// FE_INVALID on every thread of ATen's pool (the threads oneDNN's kernels run on): cleared before, read after. A
// parallel_for over [0, threads) with grain 1 runs index t on team thread t, in every region of that team size. The
// state (each thread's saved flag and whether it was set) is a byte tensor, so that Python can hold it too: the
// plan's oneDNN Graph body (fastres.models._eval_plan) runs the same relu post-ops between _fe_invalid_clear and
// _fe_invalid_raised.
constexpr int64_t kFlagBytes = 1 + static_cast<int64_t>(sizeof(fexcept_t));

at::Tensor fe_invalid_clear() {
  const int64_t threads = at::get_num_threads();
  at::Tensor state = at::empty({threads * kFlagBytes}, at::kByte);
  uint8_t* bytes = state.data_ptr<uint8_t>();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      fexcept_t saved;
      fegetexceptflag(&saved, FE_INVALID);
      bytes[t * kFlagBytes] = fetestexcept(FE_INVALID) != 0;
      std::memcpy(bytes + t * kFlagBytes + 1, &saved, sizeof(saved));
      feclearexcept(FE_INVALID);
    }
  });
  return state;
}

// Whether any thread raised FE_INVALID since fe_invalid_clear gave `state`; each thread's flag is left as it was or
// as raised. A state from another team size answers true (the caller then takes its NaN-keeping path).
bool fe_invalid_raised(const at::Tensor& state) {
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kByte && state.is_contiguous() &&
                  state.numel() % kFlagBytes == 0,
              "fastres::_fe_invalid_raised: state must come from fastres::_fe_invalid_clear");
  const int64_t threads = state.numel() / kFlagBytes;
  if (threads != at::get_num_threads()) {
    return true;
  }
  const uint8_t* bytes = state.data_ptr<uint8_t>();
  std::vector<char> now(threads, 0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      now[t] = fetestexcept(FE_INVALID) != 0;
      if (bytes[t * kFlagBytes] && !now[t]) {
        fexcept_t saved;
        std::memcpy(&saved, bytes + t * kFlagBytes + 1, sizeof(saved));
        fesetexceptflag(&saved, FE_INVALID);
      }
    }
  });
  for (char c : now) if (c) return true;
  return false;
}

struct InvalidFlags {
  at::Tensor state = fe_invalid_clear();
  bool raised() const { return fe_invalid_raised(state); }
};

// Set once this torch's oneDNN ops refused a relu post-op: the ReLU passes from then on.
std::atomic<bool> post_relu_refused{false};

at::Tensor run_plan(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                    at::IntArrayRef units, at::IntArrayRef program) {
  if (!post_relu_refused.load(std::memory_order_relaxed)) {
    InvalidFlags flags;
    at::Tensor out;
    try {
      out = run_body(x, weights, biases, units, program, /*fuse_relu=*/true);
    } catch (const c10::Error&) {
      post_relu_refused.store(true, std::memory_order_relaxed);
    }
    // (read even after a refusal: it restores the flags)
    if (!flags.raised() && out.defined()) {
      return out;
    }
  }
  // A NaN met a ReLU (or the post-op was refused): the body with the ReLU passes. It wrote only over tensors it made.
  return run_body(x, weights, biases, units, program, /*fuse_relu=*/false);
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_FRAGMENT(fastres, m) {
  m.def("_run_plan(Tensor x, Tensor[] weights, Tensor?[] biases, int[] units, int[] program) -> Tensor");
  // No tensor decides their dispatch: one kernel for every key.
  m.def("_fe_invalid_clear() -> Tensor", &fastres::fe_invalid_clear);
  m.def("_fe_invalid_raised(Tensor state) -> bool", &fastres::fe_invalid_raised);
}

// The packed weights are oneDNN (MkldnnCPU) tensors, which decide the dispatch.
TORCH_LIBRARY_IMPL(fastres, CPU, m) { m.impl("_run_plan", &fastres::run_plan); }
TORCH_LIBRARY_IMPL(fastres, MkldnnCPU, m) { m.impl("_run_plan", &fastres::run_plan); }
