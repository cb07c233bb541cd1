"""Gradients that are themselves differentiable, for backward passes that record a graph (create_graph=True:
gradient penalties, double backward, torch.func.grad).

The fused backward kernels compute gradients but have no derivatives of their own, and some of what they read
(raw conv outputs, batch statistics) is saved without a graph. When a backward formula runs with grad mode on,
it calls these instead: the op's reference forward (plain ATen ops, as in backend_torch) recomputed from its
differentiable inputs, with batch statistics recomputed from their input, and its vector-Jacobian product taken
by autograd with create_graph=True. Slower than the fused kernels (the forward runs again), and only then.
"""
import torch
import torch.nn.functional as F

from .backend_torch import stat_dtype


def recording():
    """Whether the running backward records a graph of its own (create_graph=True): autograd runs backward
    formulas with grad mode on exactly then."""
    return torch.is_grad_enabled()


def vjp(forward, inputs, needs, grad):
    """The gradients of forward(*inputs) with respect to the inputs whose `needs` flag is set, given the gradient
    `grad` of its output, as differentiable tensors (None where not needed, zeros where forward does not depend on
    the input)."""
    if not any(needs):
        return [None] * len(inputs)
    with torch.enable_grad(), torch.autocast(grad.device.type, enabled=False):
        # Partial derivatives: each input enters through an alias of its own, so that a gradient with respect to x
        # does not also run through another input computed from x (the saved tensors keep their history). The
        # aliases are differentiable views: the result stays a function of the original inputs.
        inputs = [t.view_as(t) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in inputs]
        wanted = [t for t, n in zip(inputs, needs) if n]
        out = forward(*inputs)
        grads = torch.autograd.grad(out, wanted, grad.to(out.dtype), create_graph=True, allow_unused=True)
    grads = iter(grads)
    result = []
    for t, n in zip(inputs, needs):
        g = next(grads) if n else None
        if n and g is None:
            g = torch.zeros_like(t)
        result.append(g)
    return result


def batch_norm(y, gamma, beta, training, eps, mean=None, invstd=None):
    """gamma * (y - mean) * invstd + beta per channel (dim 1), in the statistics dtype. In training mean and invstd
    are y's batch statistics (biased variance), computed here from y so that their derivatives are part of the
    graph; in eval the given ones (running statistics: constants). gamma and beta may be None (1 and 0)."""
    acc = stat_dtype(y)
    dims = [0] + list(range(2, y.dim()))
    shape = (1, -1) + (1,) * (y.dim() - 2)
    y = y.to(acc)
    if training:
        var, mean = torch.var_mean(y, dims, correction=0)
        invstd = torch.rsqrt(var + eps)
    scale = invstd if gamma is None else gamma.to(acc) * invstd
    z = (y - mean.view(shape)) * scale.view(shape)
    return z if beta is None else z + beta.to(acc).view(shape)


def bn_relu_conv(y, gamma, beta, eps, weight, stride, padding, dilation=(1, 1), groups=1):
    """conv2d(relu(bn(y)), weight) with y's batch statistics (the lean chain's _BnReluConv)."""
    a = torch.relu(batch_norm(y, gamma, beta, True, eps)).to(y.dtype)
    return F.conv2d(a, weight.to(a.dtype), None, stride, padding, dilation, groups)


def bn_add_relu(y, gamma, beta, yd, gamma_d, beta_d, *, eps, eps_d, relu, training=True, stats=None,
                stats_d=None):
    """relu?(bn(y) + bn_d(yd)) (just relu?(bn(y)) without yd), in the statistics dtype. The ReLU is recomputed
    here rather than read from a saved 1-bit mask, whose layout is the kernels' business. stats / stats_d: the
    (mean, invstd) to normalize with in eval."""
    z = batch_norm(y, gamma, beta, training, eps, *(stats or (None, None)))
    if yd is not None:
        z = z + batch_norm(yd, gamma_d, beta_d, training, eps_d, *(stats_d or (None, None)))
    return torch.relu(z) if relu else z
