"""BatchNorm in training through fastres.ops: the dual apply (dual_bn_act: relu(bn(y) + bn_r(r)), a bottleneck's
last BN plus its downsample branch's BN) and the running statistics of conv_bn_act / dual_bn_act, on every backend
that runs on CPU here (the compiled backend runs fastres._C's statistics, apply and backward kernels), and on CUDA
in TestCUDA (`pytest -m cuda` on a GPU machine).

Each result is held to a float64 reference by the project's rule (tests/tolerance.py), with ATen in the test dtype
(F.batch_norm, add, relu and autograd) as the comparator.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fastres
from fastres.ops import _backend
from tolerance import assert_within

fops = torch.ops.fastres
CPU_BACKENDS = [b for b in ("torch", "cuda") if _backend._why_not(b, "dual_bn_act_forward", "cpu") is None]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
LOW_PRECISION = (torch.bfloat16, torch.float16)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with fastres.backend(request.param):
        yield request.param


def _params(c, dtype=torch.float64, device="cpu"):
    """BN weight, bias, running_mean, running_var."""
    return (torch.rand(c, dtype=dtype, device=device) + 0.5, torch.randn(c, dtype=dtype, device=device) * 0.3,
            torch.randn(c, dtype=dtype, device=device) * 0.2, torch.rand(c, dtype=dtype, device=device) + 0.5)


def _reference(y, r, p, q, training, momentum, eps, r_momentum, r_eps, relu):
    """ATen: F.batch_norm twice (running statistics updated in place), add, relu."""
    z = F.batch_norm(y, p[2], p[3], p[0], p[1], training, momentum, eps) + \
        F.batch_norm(r, q[2], q[3], q[0], q[1], training, r_momentum, r_eps)
    return torch.relu(z) if relu else z


def _fused(y, r, p, q, training, momentum, eps, r_momentum, r_eps, relu):
    return fops.dual_bn_act(y, p[0], p[1], p[2], p[3], r, q[0], q[1], q[2], q[3], training, momentum, eps, r_momentum,
                            r_eps, relu)


def _run(fn, y64, r64, p64, q64, g64, dtype, fmt, training, relu, device="cpu"):
    """(out, running stats of both BNs, grads of y, r and the four affine parameters) of fn in `dtype`; BN
    parameters and running statistics in fp32 for low-precision activations, as nn.BatchNorm2d keeps them."""
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    y = y64.to(device, dtype).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    r = r64.to(device, dtype).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    p = [t.to(device, pdt) for t in p64]
    q = [t.to(device, pdt) for t in q64]
    leaves = [y, r, p[0], q[0], p[1], q[1]]
    for t in leaves[2:]:
        t.requires_grad_()
    out = fn(y, r, p, q, training, 0.2, 1e-3, 0.05, 1e-5, relu)
    grads = torch.autograd.grad(out, leaves, g64.to(device, dtype).contiguous(memory_format=FORMATS[fmt]))
    return (out, p[2], p[3], q[2], q[3]) + grads


# Odd shapes: C not a multiple of 8, 7x7 planes, a batch of one (eval, and training with 49 values per channel).
SHAPES = [(2, 13, 7, 7), (1, 13, 7, 7), (3, 16, 5, 3)]
NAMES = ["out", "running_mean", "running_var", "r_running_mean", "r_running_var", "grad_y", "grad_r",
         "grad_bn_weight", "grad_r_bn_weight", "grad_bn_bias", "grad_r_bn_bias"]


def check_dual_matches_batch_norm(device, backend, shape, dtype, fmt, training, relu):
    torch.manual_seed(0)
    c = shape[1]
    y64, r64, g64 = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    y64 = y64 * 2 + 1  # a mean away from zero
    p64, q64 = _params(c), _params(c)
    fused = _run(_fused, y64, r64, p64, q64, g64, dtype, fmt, training, relu, device)
    aten = _run(_reference, y64, r64, p64, q64, g64, dtype, fmt, training, relu, device)
    ref = _run(_reference, y64, r64, p64, q64, g64, torch.float64, fmt, training, relu, device)
    assert fused[0].dtype == dtype and fused[0].is_contiguous(memory_format=FORMATS[fmt])
    # A ReLU's gradient in bf16/fp16 is ill-posed against float64 (see test_ops._outputs_to_compare): there, only
    # the forward and the running statistics are compared.
    names = NAMES[:5] if relu and dtype in LOW_PRECISION else NAMES
    for name, got, a, r in zip(names, fused, aten, ref):
        assert_within(f"{backend}/{name}", got, r.to(got.device), a)
    if not training:
        for got, want in zip(fused[1:5], (p64[2], p64[3], q64[2], q64[3])):
            assert torch.equal(got.cpu(), want.to(got.dtype)), "eval must leave the running statistics alone"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_dual_bn_act_matches_batch_norm(backend, shape, dtype, fmt, training, relu):
    check_dual_matches_batch_norm("cpu", backend, shape, dtype, fmt, training, relu)


@pytest.mark.parametrize("training", [True, False])
def test_dual_bn_act_gradcheck(backend, training):
    y, r = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    p, q = _params(3), _params(3)

    def f(y, r, w, b, rw, rb):
        return fops.dual_bn_act(y, w, b, p[2].clone(), p[3].clone(), r, rw, rb, q[2].clone(), q[3].clone(), training,
                                0.1, 1e-5, 0.1, 1e-5, True)

    leaves = [t.clone().requires_grad_() for t in (y, r, p[0], p[1], q[0], q[1])]
    assert torch.autograd.gradcheck(f, leaves)
    leaves[0] = leaves[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_dual_bn_act_gradgradcheck(backend, training, relu):
    y = torch.randn(2, 3, 2, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    p, q = _params(3), _params(3)

    def f(y, r, w, b, rw, rb):
        return fops.dual_bn_act(y, w, b, p[2].clone(), p[3].clone(), r, rw, rb, q[2].clone(), q[3].clone(), training,
                                0.1, 1e-5, 0.1, 1e-3, relu)

    leaves = [t.clone().requires_grad_() for t in (y, r, p[0], p[1], q[0], q[1])]
    assert torch.autograd.gradgradcheck(f, leaves, fast_mode=True)
    leaves[1].requires_grad_(False)  # no gradient for r: its BN's parameters still get theirs
    assert torch.autograd.gradgradcheck(f, leaves, fast_mode=True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_dual_bn_act_opcheck(backend, training, fmt):
    y = torch.randn(2, 5, 3, 3).contiguous(memory_format=FORMATS[fmt])
    r = torch.randn(2, 5, 3, 3)
    p, q = _params(5, torch.float32), _params(5, torch.float32)
    opcheck(fops.dual_bn_act_forward.default, (y, *p, r, *q, training, 0.1, 1e-5, 0.2, 1e-3, True))
    opcheck(fops.dual_bn_act.default, (y, p[0], p[1], p[2].clone(), p[3].clone(), r, q[0], q[1], q[2].clone(),
                                       q[3].clone(), training, 0.1, 1e-5, 0.2, 1e-3, False))
    _, relu_mask, mean, invstd, r_mean, r_invstd = fops.dual_bn_act_forward(y, *p, r, *q, training)[:6]
    for r_grad in (True, False):
        opcheck(fops.dual_bn_act_backward.default, (torch.randn_like(y), relu_mask, y, mean, invstd, p[0], r, r_mean,
                                                    r_invstd, q[0], True, training, r_grad))


def test_dual_bn_act_compiles_fullgraph(backend):
    y = torch.randn(2, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    p = [t.float() for t in _params(5)]
    q = [t.float() for t in _params(5)]
    p[0].requires_grad_()

    def f(y, r, p, q):
        return fops.dual_bn_act(y, p[0], p[1], p[2], p[3], r, q[0], q[1], q[2], q[3], True, 0.1, 1e-5, 0.1, 1e-5, True)

    pe, pc = [t.clone() if i else t for i, t in enumerate(p)], [t.clone() if i else t for i, t in enumerate(p)]
    qe, qc = [t.clone() for t in q], [t.clone() for t in q]
    eager = f(y, r, pe, qe)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(y, r, pc, qc)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(pc[2:] + qc[2:], pe[2:] + qe[2:]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(compiled.sum(), p[0]), torch.autograd.grad(eager.sum(), p[0]))


def test_dual_bn_act_mutates_only_running_stats(backend):
    y, r = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    p, q = [t.float() for t in _params(5)], [t.float() for t in _params(5)]
    before = [t.clone() for t in (y, r, p[0], p[1], q[0], q[1])]
    running = [p[2], p[3], q[2], q[3]]
    versions = [t._version for t in running]
    running0 = [t.clone() for t in running]
    _fused(y, r, p, q, True, 0.1, 1e-5, 0.1, 1e-5, True)
    for t, t0 in zip((y, r, p[0], p[1], q[0], q[1]), before):
        assert torch.equal(t, t0), "an input was mutated"
    for t, t0, v in zip(running, running0, versions):
        assert not torch.equal(t, t0) and t._version > v, "running statistics must be updated in place"


def test_dual_bn_act_bad_input():
    y = torch.randn(2, 5, 3, 3)
    p, q = [t.float() for t in _params(5)], [t.float() for t in _params(5)]
    with pytest.raises(ValueError, match="r has shape"):
        _fused(y, y[:1], p, q, True, 0.1, 1e-5, 0.1, 1e-5, True)
    with pytest.raises(TypeError, match="r has dtype"):
        _fused(y, y.double(), p, q, True, 0.1, 1e-5, 0.1, 1e-5, True)
    with pytest.raises(ValueError, match="r_running_var has 4 elements"):
        _fused(y, y, p, q[:3] + [q[3][:4]], True, 0.1, 1e-5, 0.1, 1e-5, True)
    with pytest.raises(ValueError, match="y must be 4-D"):
        _fused(y[0], y[0], p, q, True, 0.1, 1e-5, 0.1, 1e-5, True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _fused(y[:1, :, :1, :1], y[:1, :, :1, :1], p, q, True, 0.1, 1e-5, 0.1, 1e-5, True)


# ------------------------------------------------------------------------------------------- the ReLU mask
MASK_CASES = [((2, 13, 7, 7), "nchw"), ((2, 13, 7, 7), "nhwc"), ((2, 8, 1, 8), "nhwc"), ((2, 8, 1, 8), "nchw"),
              ((3, 5, 1, 1), "nchw"), ((2, 3, 1, 4), "nhwc")]  # the last three: layouts torch has to guess


@pytest.mark.parametrize("shape, fmt", MASK_CASES, ids=str)
def test_reference_relu_mask_is_the_kernels(shape, fmt):
    """The reference backend's mask (pure torch) has the compiled kernels' layout bit for bit, and applying it is
    threshold_backward of the output."""
    from fastres.ops import backend_torch
    y = torch.randn(shape).contiguous(memory_format=FORMATS[fmt])
    y[0, 0] = 0.0  # zeros: the gradient stops
    out = torch.relu(y)
    mask = backend_torch.pack_relu_mask(out)
    assert mask.dtype == torch.uint8 and tuple(mask.shape) == backend_torch.relu_mask_shape(out)
    if "cuda" in CPU_BACKENDS:
        _, kernel_mask = fops._bn_apply(y, None, None, None, None, None, True, True)
        assert torch.equal(mask, kernel_mask)
    g = torch.randn_like(out)
    assert torch.equal(backend_torch.apply_relu_mask(g, mask), torch.ops.aten.threshold_backward(g, out, 0))


@pytest.mark.skipif("cuda" not in CPU_BACKENDS, reason="needs the compiled backend")
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
def test_dual_bn_act_backends_interchange(layout):
    """Forward on one backend, backward on the other (the backward op picks its backend when it runs): the saved
    mask means the same to both, also for inputs that are not dense."""
    torch.manual_seed(0)
    shape = (2, 8, 4, 2)  # C * 1 == H * W: a mask in the wrong layout would have the right shape
    if layout == "sliced":
        y = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)[..., ::2]
        r = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)[..., ::2]
    else:
        y = torch.randn(shape).contiguous(memory_format=FORMATS[layout])
        r = torch.randn(shape).contiguous(memory_format=FORMATS[layout])
    p, q = [t.float() for t in _params(8)], [t.float() for t in _params(8)]
    g = torch.randn(shape)
    grads = {}
    for forward, backward in (("torch", "torch"), ("cuda", "cuda"), ("cuda", "torch"), ("torch", "cuda")):
        leaves = [y.clone().requires_grad_(), r.clone().requires_grad_(), p[0].clone().requires_grad_()]
        with fastres.backend(forward):
            out = fops.dual_bn_act(leaves[0], leaves[2], p[1], p[2].clone(), p[3].clone(), leaves[1], q[0], q[1],
                                   q[2].clone(), q[3].clone(), True, 0.1, 1e-5, 0.1, 1e-5, True)
        with fastres.backend(backward):
            grads[forward, backward] = torch.autograd.grad(out, leaves, g)
    for key, got in grads.items():
        for a, b in zip(got, grads["torch", "torch"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


# ------------------------------------------------------------------------------------------- running statistics
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_running_stats_follow_batchnorm2d(backend, momentum, fmt):
    """Four training steps through conv_bn_act and dual_bn_act, the caller handling num_batches_tracked as the nn
    layer does (momentum=None: the factor 1 / num_batches_tracked): the running statistics stay with
    nn.BatchNorm2d's within the tolerance rule at every step."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 13, 3, padding=1, bias=False)
    bns = [torch.nn.BatchNorm2d(13, momentum=momentum) for _ in range(3)]
    ours = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    for step in range(1, 5):
        x = (torch.randn(2, 3, 7, 7) * step + step).contiguous(memory_format=FORMATS[fmt])
        with torch.no_grad():
            y = conv(x)
            r = torch.randn_like(y) * 3 - 1
            for bn in bns:
                bn.train()
            bns[0](y), bns[1](y), bns[2](r)
        factor = 1.0 / step if momentum is None else momentum
        previous = [(m.clone(), v.clone()) for m, v in ours]
        w, b = bns[0].weight.detach(), bns[0].bias.detach()
        fastres.ops.conv_bn_act(x, conv.weight.detach(), w, b, *ours[0], True, factor, 1e-5, 1, 1)
        fops.dual_bn_act(y, w, b, *ours[1], r, w, b, *ours[2], True, factor, 1e-5, factor, 1e-5, True)
        for (m, v), (m0, v0), bn, src in zip(ours, previous, bns, (y, y, r)):
            var, mean = torch.var_mean(src.double(), dim=(0, 2, 3), correction=1)
            ref_m = factor * mean + (1 - factor) * m0.double()
            ref_v = factor * var + (1 - factor) * v0.double()
            assert_within(f"running_mean step {step}", m, ref_m, bn.running_mean)
            assert_within(f"running_var step {step}", v, ref_v, bn.running_var)


# ------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCUDA:
    @pytest.fixture(autouse=True)
    def _cuda_backend(self):
        if _backend._why_not("cuda", "dual_bn_act_forward", "cuda") is not None:
            pytest.skip("fastres._C was built without its CUDA kernels")
        with fastres.backend("cuda"):
            yield

    @pytest.mark.parametrize("shape", SHAPES + [(8, 64, 14, 14)], ids=str)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
    @pytest.mark.parametrize("training", [True, False])
    @pytest.mark.parametrize("relu", [True, False])
    def test_dual_bn_act_matches_batch_norm(self, shape, dtype, fmt, training, relu):
        check_dual_matches_batch_norm("cuda", "cuda", shape, dtype, fmt, training, relu)

    @pytest.mark.parametrize("training", [True, False])
    def test_gradcheck(self, training):
        y, r = (torch.randn(2, 3, 4, 5, dtype=torch.float64, device="cuda") for _ in range(2))
        p, q = _params(3, device="cuda"), _params(3, device="cuda")

        def f(y, r, w, b, rw, rb):
            return fops.dual_bn_act(y, w, b, p[2].clone(), p[3].clone(), r, rw, rb, q[2].clone(), q[3].clone(),
                                    training, 0.1, 1e-5, 0.1, 1e-5, True)

        assert torch.autograd.gradcheck(f, [t.clone().requires_grad_() for t in (y, r, p[0], p[1], q[0], q[1])])

    def test_opcheck(self):
        y = torch.randn(2, 5, 3, 3, device="cuda").contiguous(memory_format=torch.channels_last)
        r = torch.randn(2, 5, 3, 3, device="cuda")
        p, q = _params(5, torch.float32, "cuda"), _params(5, torch.float32, "cuda")
        for training in (True, False):
            opcheck(fops.dual_bn_act_forward.default, (y, *p, r, *q, training, 0.1, 1e-5, 0.2, 1e-3, True))

    def test_no_host_synchronization(self):
        """The training forward (statistics, finalize, running statistics, apply) and backward never wait for the
        device."""
        x = torch.randn(4, 8, 9, 9, device="cuda").contiguous(memory_format=torch.channels_last)
        w = torch.randn(16, 8, 3, 3, device="cuda", requires_grad=True)
        p, q = _params(16, torch.float32, "cuda"), _params(16, torch.float32, "cuda")
        y = torch.randn(4, 16, 9, 9, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fastres.ops.conv_bn_act(x, w, p[0], p[1], p[2], p[3], True, 0.1, 1e-5, 1, 1)
            out = fops.dual_bn_act(out, *p, y, *q, True, 0.1, 1e-5, 0.1, 1e-5, True)
            out.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
