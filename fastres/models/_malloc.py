"""glibc's malloc thresholds for CPU inference, set once per process by the CPU eval plan (fastres.models._eval_plan).

With its defaults glibc hands each freed block above its (dynamic) mmap threshold back to the OS and trims the free
top of its heap, so that, in some processes and not others, every forward of a batch-8 ResNet-50 faults in fresh,
zeroed pages for its activations: 12.5k minor faults a forward in fastres (~20 ms of system time over 2 threads),
50k in eager PyTorch, measured on an Intel Xeon (benchmarks/cpu_breakdown.py's page-fault column). onnxruntime and
OpenVINO keep their own arenas and pay none. Raising the mmap threshold to glibc's maximum and the trim threshold to
TRIM_THRESHOLD keeps freed activations in the heap for the next forward: no fault in a steady-state forward, at the
price of up to TRIM_THRESHOLD of freed memory the process keeps instead of returning it. It is global: every
allocation of the process (eager PyTorch's included) is served so from then on.

FASTRES_CPU_MALLOC=0 leaves glibc as it is, and so does a GLIBC_TUNABLES that sets any glibc.malloc tunable (the
user's own choice), or a C library other than glibc. Blocks above MMAP_THRESHOLD (a batch-16 ResNet-50 stem's
output, 51 MB) are still mapped and unmapped on every call: glibc takes no larger threshold.
"""
import ctypes
import os
import sys
import threading

MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>

_lock = threading.Lock()
_state = None  # None: not yet decided; else why (a string) it was or was not tuned


def _why_not():
    """None where this process's malloc may be tuned, else why not."""
    setting = os.environ.get("FASTRES_CPU_MALLOC", "1").strip()
    if setting not in ("0", "1", ""):
        raise ValueError(f"FASTRES_CPU_MALLOC must be 0 or 1, got {setting!r}")
    if setting == "0":
        return "FASTRES_CPU_MALLOC=0"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc's malloc"
    if not sys.platform.startswith("linux") or not hasattr(os, "confstr"):
        return "not glibc"
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return "not glibc"
    except (ValueError, OSError):
        return "not glibc"
    return None


def tune():
    """Raise glibc's mmap and trim thresholds once per process (see the module's docstring); returns what was done
    or why not, as a line (also `state()` afterwards)."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        why = _why_not()
        if why is None:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
                why = (f"glibc malloc tuned by fastres: mmap_threshold {MMAP_THRESHOLD >> 20} MiB, "
                       f"trim_threshold {TRIM_THRESHOLD >> 20} MiB")
            else:
                why = "glibc refused mallopt"
        else:
            why = f"glibc malloc as it was ({why})"
        _state = why
        return why


def state():
    """What tune() did in this process, or None before its first call."""
    return _state
