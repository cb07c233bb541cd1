"""fastres.tune(model, example_input): measure, once, how each convolution of a model runs fastest.

Every conv the model runs through the triton backend is a problem (shapes, stride, padding, dtype, layout, fused
epilogue) with candidates: the Triton kernel under a few tile configs, and ATen's conv (cuDNN) + the fastres
epilogue. tune() runs the model once with measuring switched on, so each problem is timed and its winner written
to the on-disk cache (fastres.kernels.autotune: $FASTRES_CACHE_DIR/autotune.json, default
~/.cache/fastres/autotune.json); later runs of the same shapes, in any process on the same GPU and software
versions, reuse the choices without measuring. Without tune(), a problem is measured the first time it runs
(unless FASTRES_AUTOTUNE=0), which puts the measuring inside the first training or inference step.
"""
import torch


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def tune(model, example_input, *, backward=None, time_budget=None):
    """Run `model(example_input)` once with measuring on; return {cache key: Choice} for every conv it ran.

    example_input: a tensor, or a tuple of positional arguments. backward: also run the backward pass, tuning
    the kernels training uses (default: model.training). The model comes back as it was: parameters, buffers
    (BN running statistics, num_batches_tracked) and .grad are restored, and the mode is unchanged.
    time_budget: seconds; once spent, the problems not yet measured keep their default choice (uncached).
    On CPU tensors (the Triton interpreter) nothing is measured; the result then lists the default choices.
    """
    from fastres.kernels import autotune  # imports triton: only when tuning is asked for

    if backward is None:
        backward = model.training
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    saved_state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    with autotune.tuning(time_budget) as record:
        if backward:
            with torch.enable_grad():
                outputs = [t for t in _tensors(model(*args)) if t.requires_grad]
                if outputs and params:
                    # autograd.grad, not .backward(): nothing accumulates into the parameters' .grad.
                    torch.autograd.grad(outputs, params, [torch.ones_like(t) for t in outputs], allow_unused=True)
        else:
            with torch.no_grad():
                model(*args)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(saved_state[name])
    return dict(record)
