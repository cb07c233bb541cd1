"""Per-layer choice of how a convolution runs, measured on the GPU and remembered on disk.

For each conv problem (kind, shapes, stride, padding, dtype, layout, fused flags) the candidates are the Triton
kernel under a short list of tile configs, and ATen's convolution (cuDNN) followed by the fastres epilogue
kernel. The fastest measured wins, so no layer runs slower than the better of the two. A choice and the timings
it rests on are written to a JSON file, keyed by the problem plus the device name and the torch, cuDNN and triton
versions (a new driver stack re-measures):

    $FASTRES_CACHE_DIR/autotune.json      (default ~/.cache/fastres/autotune.json)

Measuring happens the first time a problem is seen on a GPU (like triton.autotune), unless FASTRES_AUTOTUNE=0;
fastres.tune(model, example_input) measures a whole model up front. Nothing is measured on CPU tensors (the
interpreter), during CUDA-graph capture or while torch.compile traces; the default choice then runs.
"""
import contextlib
import contextvars
import datetime
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from typing import NamedTuple, Optional

import torch
import triton

from fastres import testing as tolerance
from fastres.ops import _backend

from ._common import interpreting
from .conv import TileConfig


class Choice(NamedTuple):
    provider: str                        # "triton": fastres's kernel; "aten": ATen's conv + fastres epilogue
    config: Optional[TileConfig] = None  # the Triton kernel's tile config

    def label(self):
        if self.provider != "triton":
            return self.provider
        c = self.config
        if c is None:
            return "triton (launcher default)"
        return (f"triton {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
                + (" kflat" if c.k_flat else ""))

    def to_json(self):
        return {"provider": self.provider, "config": None if self.config is None else list(self.config)}

    @classmethod
    def from_json(cls, entry):
        config = entry.get("config")
        return cls(entry["provider"], None if config is None else TileConfig(*config))


# ---------------------------------------------------------------------------------------------- config space

def forward_configs(dtype, M, C_out, C_a, taps):
    """Tile configs worth measuring for the forward / input-gradient kernel on a Hopper-class GPU.

    128x128 and 128x256 tiles with 8 warps are the shapes that map onto wgmma (a warpgroup of 4 warps per 64 rows);
    smaller ones win where the grid would otherwise not fill the SMs (late ResNet stages at small batch)."""
    block_k = 32 if dtype == torch.float32 else 64
    shapes = [(128, 128, block_k, 8, 3), (128, 256, block_k, 8, 3), (256, 128, block_k, 8, 3),
              (128, 64, block_k, 4, 4), (64, 128, block_k, 4, 4), (64, 64, block_k, 4, 4),
              (128, 128, block_k // 2, 8, 4)]
    k_flat = C_a < 32 and taps > 1
    configs = []
    for bm, bn, bk, warps, stages in shapes:
        if bn > max(64, triton.next_power_of_2(C_out)) or bm > max(64, triton.next_power_of_2(M)):
            continue
        configs.append(TileConfig(bm, bn, bk, warps, stages, 8, k_flat))
    return configs


def wgrad_configs(dtype, C_out, C_in):
    block_k = 32 if dtype == torch.float32 else 64
    shapes = [(64, 64, block_k, 4, 3), (128, 64, block_k, 4, 3), (64, 128, block_k, 4, 3), (128, 128, block_k, 8, 3)]
    return [TileConfig(bm, bn, bk, w, s) for bm, bn, bk, w, s in shapes
            if bm <= max(64, triton.next_power_of_2(C_out)) and bn <= max(64, triton.next_power_of_2(C_in))]


# ---------------------------------------------------------------------------------------------- on-disk cache

def cache_path():
    root = os.environ.get("FASTRES_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastres")
    return os.path.join(root, "autotune.json")


class Cache:
    """A JSON file of {key: entry}; read once, and rewritten whole (merged with what other processes wrote
    meanwhile) through a temporary file and an atomic rename on every new entry."""

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._entries = self._read()

    def _read(self):
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            warnings.warn(f"fastres: ignoring the unreadable autotune cache {self.path}: {e}", RuntimeWarning)
            return {}

    def get(self, key):
        return self._entries.get(key)

    def put(self, key, entry):
        with self._lock:
            self._entries = {**self._read(), **self._entries, key: entry}
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".autotune.", suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump(self._entries, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError as e:  # a read-only home must not break the model; the choice still holds in memory
                warnings.warn(f"fastres: could not write the autotune cache {self.path}: {e}", RuntimeWarning)

    def entries(self):
        return dict(self._entries)


_cache = None
_cache_lock = threading.Lock()


def cache():
    """The process's cache, re-opened when FASTRES_CACHE_DIR changes."""
    global _cache
    path = cache_path()
    with _cache_lock:
        if _cache is None or _cache.path != path:
            _cache = Cache(path)
        return _cache


# ---------------------------------------------------------------------------------------------- measuring

# Carried into backward passes (fastres.ops._backend.carry): autograd may run them on another thread, and a
# tune() of a training step must record the backward's choices too.
_session = _backend.carry(contextvars.ContextVar("fastres_tuning_session", default=None))


# The wall-clock deadline (time.monotonic()) of the tuning session, if any: past it no new problem is measured.
_deadline = _backend.carry(contextvars.ContextVar("fastres_tuning_deadline", default=None))


@contextlib.contextmanager
def tuning(time_budget=None):
    """Inside the block every new problem is measured (even with FASTRES_AUTOTUNE=0), and every choice made,
    new or cached, is recorded into the dict the block yields: {key: Choice}. With time_budget (seconds), no new
    problem is measured once it is spent: those run their default choice and nothing is cached for them."""
    record = {}
    token = _session.set(record)
    deadline = _deadline.set(None if time_budget is None else time.monotonic() + time_budget)
    try:
        yield record
    finally:
        _deadline.reset(deadline)
        _session.reset(token)


def can_measure(device):
    if interpreting() or device.type != "cuda":
        return False
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return False
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        return False
    return _session.get() is not None or os.environ.get("FASTRES_AUTOTUNE", "1").strip() != "0"


def bench(fn):
    """Median milliseconds of fn() on the GPU."""
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


_device_signatures = {}


def device_signature(device):
    """What a measurement depends on besides the problem: the GPU and the software stack."""
    if device.type != "cuda":
        return f"{device.type}|triton {triton.__version__}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_signatures:
        _device_signatures[index] = (f"{torch.cuda.get_device_name(index)}|torch {torch.__version__}|"
                                     f"cudnn {torch.backends.cudnn.version()}|triton {triton.__version__}")
    return _device_signatures[index]


class CandidateCrashedError(RuntimeError):
    """A candidate hit a CUDA error while being measured: the CUDA context is unusable afterwards, so tuning stops
    at once and names the candidate (nothing is cached)."""


# What a CUDA fault looks like from torch (torch.AcceleratorError) or from a Triton launch ("Triton Error [CUDA]").
_CUDA_FAULT = re.compile(r"CUDA error|\[CUDA\]|illegal (memory access|address|instruction)|misaligned address|"
                         r"unspecified launch failure|device-side assert", re.IGNORECASE)


def is_cuda_fault(error):
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(error, accelerator_error)) or bool(
        _CUDA_FAULT.search(str(error)))


def result_tensors(result):
    """The tensors of a candidate's result (a tensor or nested tuples of them; None and non-tensors skipped)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in result_tensors(r)]
    return []


def _max_errors(tensors, reference):
    if len(tensors) != len(reference):
        raise ValueError(f"a candidate returned {len(tensors)} tensors where the reference has {len(reference)}")
    return [tolerance.max_error(t, ref) for t, ref in zip(tensors, reference)]


def violation(tensors, reference, aten_errors):
    """Why `tensors` break the project's tolerance rule (fastres.testing) against the float64 `reference`, given
    ATen's errors in the same dtype, or None."""
    if len(tensors) != len(reference):
        return f"{len(tensors)} outputs where the reference has {len(reference)}"
    for i, (t, ref, aten_error) in enumerate(zip(tensors, reference, aten_errors)):
        why = tolerance.violation(f"output {i}", t, ref, aten_error)
        if why is not None:
            return why
    return None


def measure(key, candidates, run, reference=None, comparable=result_tensors, timer=None):
    """(best Choice, {label: median ms, or why the candidate was ruled out}) over `candidates`.

    Each candidate runs once and, given `reference` (a callable returning the problem's outputs in float64), its
    outputs (comparable(result)) are checked under the tolerance rule against ATen's error before it is timed:
    a fast but wrong candidate (a config this Triton version miscompiles) is ruled out, never chosen or cached.
    A candidate that raises is ruled out too, except on a CUDA fault, which raises CandidateCrashedError naming
    it. With no candidate left, the ATen candidate wins."""
    timer = timer or bench
    candidates = list(candidates)
    reference_tensors = aten_errors = None
    if reference is not None:
        aten = next((c for c in candidates if c.provider == "aten"), None)
        if aten is None:
            raise ValueError(f"{key}: checking candidates needs an ATen candidate to set the tolerance")
        reference_tensors = [t.detach().double() for t in result_tensors(reference())]
        aten_errors = _max_errors(comparable(run(aten)()), reference_tensors)
    times = {}
    best, best_ms = Choice("aten"), math.inf
    for candidate in candidates:
        label = candidate.label()
        try:
            fn = run(candidate)
            if reference_tensors is not None:
                why = violation(comparable(fn()), reference_tensors, aten_errors)
                if why is not None:
                    times[label] = f"wrong: {why}"
                    continue
            ms = timer(fn)
        except Exception as e:  # noqa: BLE001  (a compile or launch failure rules the candidate out)
            if is_cuda_fault(e):
                raise CandidateCrashedError(
                    f"fastres autotune: candidate {label!r} of problem {key} hit a CUDA error ({type(e).__name__}: "
                    f"{e}); the CUDA context is unusable, nothing was cached: drop or fix that config") from e
            times[label] = f"failed: {type(e).__name__}: {str(e)[:160]}"
            continue
        times[label] = ms
        if ms < best_ms:
            best, best_ms = candidate, ms
    return best, times


def choose(key, device, default, candidates, run, reference=None, comparable=result_tensors):
    """The Choice for problem `key` on `device`.

    default: the Choice when nothing is measured; candidates(): the Choices to measure; run(choice): a callable
    that runs the problem once that way; reference(): the problem's outputs in float64, which every candidate's
    outputs are checked against before it is timed (see measure). Only a candidate that ran and passed is
    chosen and cached."""
    full_key = f"{key}|{device_signature(device)}"
    store = cache()
    entry = store.get(full_key)
    if entry is not None:
        choice = Choice.from_json(entry)
    elif can_measure(device):
        start = time.perf_counter()
        measured = list(candidates())
        choice, times = measure(full_key, measured, run, reference, comparable)
        cost_s = time.perf_counter() - start  # compiling, checking and timing every candidate
        passed = [c for c in measured if c.provider == "triton" and c.config is not None
                  and isinstance(times.get(c.label()), float)]
        best_triton = min(passed, key=lambda c: times[c.label()]) if passed else None
        store.put(full_key, {**choice.to_json(), "ms": times,
                             "best_triton": None if best_triton is None else list(best_triton.config),
                             "checked": reference is not None, "tune_s": round(cost_s, 3),
                             "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    else:
        choice = default
    record = _session.get()
    if record is not None:
        record[full_key] = choice
    return choice
