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
import tempfile
import threading
import warnings
from typing import NamedTuple, Optional

import torch
import triton

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


@contextlib.contextmanager
def tuning():
    """Inside the block every new problem is measured (even with FASTRES_AUTOTUNE=0), and every choice made,
    new or cached, is recorded into the dict the block yields: {key: Choice}."""
    record = {}
    token = _session.set(record)
    try:
        yield record
    finally:
        _session.reset(token)


def can_measure(device):
    if interpreting() or device.type != "cuda":
        return False
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
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


def choose(key, device, default, candidates, run):
    """The Choice for problem `key` on `device`.

    default: the Choice when nothing is measured; candidates(): the Choices to measure; run(choice): a callable
    that runs the problem once that way. A candidate that fails to compile or launch (e.g. too much shared
    memory) is skipped."""
    full_key = f"{key}|{device_signature(device)}"
    store = cache()
    entry = store.get(full_key)
    if entry is not None:
        choice = Choice.from_json(entry)
    elif can_measure(device):
        times = {}
        best, best_ms = default, math.inf
        best_triton, best_triton_ms = None, math.inf
        for candidate in candidates():
            try:
                ms = bench(run(candidate))
            except Exception as e:  # noqa: BLE001  (any failure just rules the candidate out)
                times[candidate.label()] = f"failed: {type(e).__name__}"
                continue
            times[candidate.label()] = ms
            if ms < best_ms:
                best, best_ms = candidate, ms
            if candidate.provider == "triton" and ms < best_triton_ms:
                best_triton, best_triton_ms = candidate, ms
        choice = best
        store.put(full_key, {**choice.to_json(), "ms": times,
                             "best_triton": None if best_triton is None else list(best_triton.config),
                             "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    else:
        choice = default
    record = _session.get()
    if record is not None:
        record[full_key] = choice
    return choice
