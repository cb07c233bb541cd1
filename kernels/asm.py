"""Compile the conv kernels for a GPU architecture without a GPU, to check what the GEMM loop becomes.

On Hopper (sm_90) the MMA must be wgmma (SASS: HGMMA), the warpgroup instruction that reads its operands from
shared memory; a kernel that falls back to the Ampere-style mma.sync reaches about half the tensor-core rate.
Triton compiles ahead of time through its bundled ptxas, so this runs on a machine with no GPU and no driver.

    python -m fastres.kernels.asm            # prints, per kernel variant, the wgmma / HGMMA counts for sm_90

The kernels must have been imported without TRITON_INTERPRET=1 (the interpreter's kernels are not compilable).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import conv

_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _specialize(fn, values):
    """(signature, constexprs, attrs) the way Triton's JIT would specialize a launch with these argument values:
    ints equal to 1 become constants, pointers and ints divisible by 16 get the divisibility hint (what lets the
    loads vectorize)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        value = values[name]
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.dtype):
            signature[name] = _POINTER_TYPES[value]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot specialize argument {name}={value!r}")
    return signature, constexprs, attrs


def _nhwc_strides(n, c, h, w):
    return h * w * c, 1, w * c, c  # (n, c, h, w) strides of a channels_last tensor


def forward_args(dtype=torch.bfloat16, batch=256, c_in=64, c_out=64, size=56, kernel=3, stride=1,
                 config=None, **flags):
    """Argument values of one forward-conv launch (NHWC activations, channels_last weight); `flags` override the
    kernel's constexpr flags (e.g. HAS_BIAS=True, RELU=True, STATS=True, PROLOGUE=True)."""
    pad = kernel // 2
    out_size = (size + 2 * pad - kernel) // stride + 1
    config = config or conv.TileConfig(128, 128, 64 if dtype != torch.float32 else 32, 8, 3)
    values = {
        "a_ptr": dtype, "w_ptr": dtype, "out_ptr": dtype, "bias_ptr": dtype, "scale_ptr": torch.float32,
        "res_ptr": dtype, "raw_ptr": dtype, "in_scale_ptr": torch.float32, "in_shift_ptr": torch.float32,
        "mean_ptr": torch.float32, "m2_ptr": torch.float32,
        "M": batch * out_size * out_size, "C_a": c_in, "H_a": size, "W_a": size, "C_out": c_out,
        "H_o": out_size, "W_o": out_size, "stride_h": stride, "stride_w": stride, "pad_h": pad, "pad_w": pad,
        "dil_h": 1, "dil_w": 1,
    }
    for prefix, strides in (("s_a", _nhwc_strides(batch, c_in, size, size)),
                            ("s_o", _nhwc_strides(batch, c_out, out_size, out_size)),
                            ("s_r", _nhwc_strides(batch, c_out, out_size, out_size))):
        values.update(zip((prefix + "n", prefix + "c", prefix + "h", prefix + "w"), strides))
    # channels_last weight [Cout, KH, KW, Cin]: B[(kh, kw, ci), co]
    # s_wg: one group's weights further on (one group here)
    values.update(s_wn=kernel * kernel * c_in, s_wc=1, s_wh=kernel * c_in, s_ww=c_in, s_wg=c_out * kernel * kernel * c_in)
    values.update(KH=kernel, KW=kernel, TRANSPOSED=False, K_FLAT=config.k_flat, PROLOGUE=False,
                  PROLOGUE_RELU=False, HAS_SCALE=False, HAS_BIAS=False, HAS_RESIDUAL=False, RELU=False,
                  STORE_RAW=False, STATS=False, DOT_FP32=False,
                  INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee", ROUND_TF32=dtype == torch.float32,
                  BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m)
    values.update(flags)
    return values, config


def wgrad_args(dtype=torch.bfloat16, batch=256, c_in=64, c_out=64, size=56, kernel=3, config=None, **flags):
    pad = kernel // 2
    config = config or conv.TileConfig(128, 128, 64 if dtype != torch.float32 else 32, 8, 3)
    values = {"g_ptr": dtype, "x_ptr": dtype, "gw_ptr": torch.float32, "gb_ptr": torch.float32,
              "in_scale_ptr": torch.float32, "in_shift_ptr": torch.float32,
              "P": batch * size * size, "C_in": c_in, "H": size, "W": size, "C_out": c_out, "H_o": size, "W_o": size,
              "stride_h": 1, "stride_w": 1, "pad_h": pad, "pad_w": pad, "dil_h": 1, "dil_w": 1,
              "P_PER_SPLIT": 4096}
    for prefix, strides in (("s_g", _nhwc_strides(batch, c_out, size, size)),
                            ("s_x", _nhwc_strides(batch, c_in, size, size))):
        values.update(zip((prefix + "n", prefix + "c", prefix + "h", prefix + "w"), strides))
    values.update(KH=kernel, KW=kernel, PROLOGUE=False, PROLOGUE_RELU=False, BIAS_GRAD=False, DOT_FP32=False,
                  INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee", ROUND_TF32=dtype == torch.float32,
                  BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    values.update(flags)
    return values, config


def compile_kernel(kernel, values, config, arch=90):
    """Triton's compiled kernel (its .asm has 'ttgir', 'ptx', 'cubin', ...) for CUDA sm_<arch>."""
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were built for the Triton interpreter (TRITON_INTERPRET=1); compile them "
                           "in a process without it")
    signature, constexprs, attrs = _specialize(kernel, values)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def sass(cubin):
    """The SASS of a cubin, through cuobjdump (Triton's bundled one, else the CUDA toolkit's); None if neither
    exists."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def mma_report(kernel, values, config, arch=90):
    """{"wgmma": count in PTX, "mma_sync": count in PTX, "hgmma": count in SASS or None, "shared": bytes}."""
    compiled = compile_kernel(kernel, values, config, arch)
    ptx = compiled.asm["ptx"]
    code = sass(compiled.asm["cubin"])
    return {"wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
            "hgmma": None if code is None else code.count("HGMMA"),
            "shared": compiled.metadata.shared}


VARIANTS = {
    # name: (kernel, args builder, keyword overrides)
    "forward 3x3 bf16": ("forward", dict(dtype=torch.bfloat16)),
    "forward 3x3 bf16 bias+residual+relu": ("forward", dict(dtype=torch.bfloat16, HAS_BIAS=True, HAS_RESIDUAL=True,
                                                               RELU=True)),
    "forward 3x3 bf16 prologue+stats": ("forward", dict(dtype=torch.bfloat16, PROLOGUE=True, PROLOGUE_RELU=True,
                                                          STATS=True)),
    "forward 1x1 fp16": ("forward", dict(dtype=torch.float16, kernel=1, c_in=256)),
    "forward 1x1 fp32 (tf32)": ("forward", dict(dtype=torch.float32, kernel=1, c_in=256)),
    "input grad 3x3 bf16": ("forward", dict(dtype=torch.bfloat16, TRANSPOSED=True)),
    "weight grad 3x3 bf16": ("wgrad", dict(dtype=torch.bfloat16)),
}


def report(arch=90, variants=None):
    out = {}
    for name in variants or VARIANTS:
        kind, kwargs = VARIANTS[name]
        if kind == "forward":
            values, config = forward_args(**kwargs)
            out[name] = mma_report(conv._conv_kernel, values, config, arch)
        else:
            values, config = wgrad_args(**kwargs)
            out[name] = mma_report(conv._conv_wgrad_kernel, values, config, arch)
    return out


if __name__ == "__main__":
    names = sys.argv[1:] or None
    print(json.dumps(report(variants=names), indent=1))
