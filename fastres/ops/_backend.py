"""Which backend runs an op: chosen by device, or forced by FASTRES_BACKEND / fastres.backend().

Backends:
  torch   the reference: plain ATen ops, runs anywhere.
  cuda    the compiled kernels of fastres._C (csrc/): CUDA kernels on GPU tensors, their C++ twins on CPU tensors.
  triton  the Triton kernels of fastres.kernels (GPU tensors; CPU tensors only under TRITON_INTERPRET=1).
"""
import contextlib
import contextvars
import functools
import importlib
import os
import warnings

BACKENDS = ("torch", "cuda", "triton")
# Automatic preference by device type; the first backend that has a kernel for the op wins.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cuda", "torch")}
_MODULES = {"torch": "fastres.ops.backend_torch", "cuda": "fastres.ops.backend_cuda",
            "triton": "fastres.ops.backend_triton"}

_forced = contextvars.ContextVar("fastres_backend", default=None)
# Context variables whose forward-time values backward must see: autograd runs backward on its own threads (one
# per CUDA device), where a ContextVar set by the caller of forward is unset. Each autograd formula captures them
# in forward (capture()) and runs under them in backward (restored()).
_carried = [_forced]
_loaded = {}
_warned = set()
_not_shipped = set()  # backends whose module is not part of this version of fastres


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run an op on the given device."""


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _env_backend():
    name = os.environ.get("FASTRES_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTRES_BACKEND must be one of {', '.join(BACKENDS)} or auto, got {name!r}")
    return name


def forced_backend():
    """The backend forced by fastres.backend() or else FASTRES_BACKEND, or None for automatic selection."""
    name = _forced.get()
    if name is None:  # no fastres.backend() block: the environment decides
        return _env_backend()
    return None if name == "auto" else name


@contextlib.contextmanager
def backend(name):
    """Force every fastres op inside the block onto one backend: "torch", "cuda" or "triton".

    A forced backend that cannot run an op raises BackendUnavailableError instead of falling back.
    `backend(None)` or `backend("auto")` restores automatic selection inside the block.
    """
    token = _forced.set("auto" if name in (None, "auto") else _check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def carry(var):
    """Registers a ContextVar that backward passes must see as their forward saw it (see capture)."""
    if var not in _carried:
        _carried.append(var)
    return var


def capture():
    """The values of the carried context variables (the forced backend, the autotuning session) now: saved by a
    forward for its backward."""
    return tuple((var, var.get()) for var in _carried)


@contextlib.contextmanager
def restored(snapshot):
    """Runs the block with the carried context variables as `snapshot` (from capture()) had them, whichever thread
    runs it."""
    tokens = [(var, var.set(value)) for var, value in snapshot]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def keeps_forward_selection(backward):
    """Decorates an autograd backward(ctx, ...) whose forward stored capture() as ctx.selection: it runs under the
    forward's backend and tuning session."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with restored(ctx.selection):
            return backward(ctx, *grads)
    return wrapper


def _module(name):
    """The backend's module, or the reason it cannot load (a string)."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError as e:  # e.g. no triton, or fastres._C not built
            if isinstance(e, ModuleNotFoundError) and e.name == _MODULES[name]:
                _not_shipped.add(name)
            _loaded[name] = f"{type(e).__name__}: {e}"
    return _loaded[name]


def _why_not(name, op, device_type):
    """None if backend `name` can run `op` on `device_type`, else the reason."""
    mod = _module(name)
    if isinstance(mod, str):
        return f"backend {name!r} could not be loaded ({mod})"
    why = mod.unsupported(op, device_type)
    return None if why is None else f"backend {name!r} cannot run fastres::{op} on {device_type}: {why}"


def select(op, device):
    """The backend module that runs `op` for tensors on `device`."""
    device_type = device.type if hasattr(device, "type") else str(device)
    name = forced_backend()
    if name is not None:
        why = _why_not(name, op, device_type)
        if why is not None:
            source = "FASTRES_BACKEND" if _forced.get() is None else "fastres.backend()"
            raise BackendUnavailableError(f"{why} (forced by {source})")
        return _module(name)
    order = _AUTO_ORDER.get(device_type, ("torch",))
    for candidate in order:
        why = _why_not(candidate, op, device_type)
        if why is None:
            return _module(candidate)
        # An op simply lacking a kernel in a backend is expected; a backend that failed to load is worth
        # one warning, since the user is silently losing speed.
        failed = isinstance(_module(candidate), str) and candidate not in _not_shipped
        if failed and (candidate, device_type) not in _warned:
            _warned.add((candidate, device_type))
            warnings.warn(f"fastres: {why}; falling back to the next backend for {device_type} tensors",
                          RuntimeWarning, stacklevel=3)
    raise BackendUnavailableError(f"no fastres backend can run fastres::{op} on {device_type}")
