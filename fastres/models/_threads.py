"""ATen's intra-op worker threads pinned, each to its own CPU, once per process by the CPU eval plan
(fastres.models._eval_plan).

After the process has been idle for longer than libgomp's spin (~10 ms), its worker threads sleep. The first parallel
region after that wakes them, and Linux may place a woken worker on the CPU of the thread that woke it (wake-affine),
where that thread spins at the region's barrier for libgomp's whole spin count before it yields, so the region takes
the spin's length: 7.4 ms for a 2-thread add of 4 MB after 0.1 s of idle, 0.7 ms with the workers pinned, measured on
an Intel Xeon VM (2 CPUs). Every region after it meets the same until the scheduler moves the worker away: CIFAR
ResNet-56 at batch 1 took 13.0 ms after 0.1 s of idle, against 3.4 ms pinned (2.0 ms without the idle).

Pinned here: where ATen's intra-op threads are exactly as many as the CPUs the process may run on (each worker gets a
CPU of its own and none is left idle), on Linux with ATen's OpenMP backend, each worker thread t >= 1 to the t-th
CPU of that set. The caller's thread (team thread 0: the thread that runs the model) is never pinned. It is global:
every PyTorch op of the process runs on those threads (eager PyTorch's included, which gains as much).

FASTRES_CPU_PIN=0 leaves the threads as they are, and so does an OpenMP affinity setting of the user's
(OMP_PROC_BIND, OMP_PLACES, GOMP_CPU_AFFINITY, KMP_AFFINITY), or a thread count other than the CPU count (the user
shares the CPUs with something else).
"""
import os
import threading

import torch

from fastres.ops import _compiled

AFFINITY_VARIABLES = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")

_lock = threading.Lock()
_state = None  # None: not yet decided; else what was done or why not (a line)


def _cpus_or_why_not():
    """(the CPUs to pin the threads to, None), or (None, why not)."""
    setting = os.environ.get("FASTRES_CPU_PIN", "1").strip()
    if setting not in ("0", "1", ""):
        raise ValueError(f"FASTRES_CPU_PIN must be 0 or 1, got {setting!r}")
    if setting == "0":
        return None, "FASTRES_CPU_PIN=0"
    chosen = [name for name in AFFINITY_VARIABLES if os.environ.get(name)]
    if chosen:
        return None, f"{chosen[0]} is set"
    if not hasattr(os, "sched_getaffinity") or not hasattr(_compiled._C, "_pin_intraop_workers"):
        return None, "no thread affinity here"
    cpus = sorted(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    if threads < 2:
        return None, "one intra-op thread"
    if threads != len(cpus):
        return None, f"{threads} intra-op threads on {len(cpus)} CPUs"
    return tuple(cpus), None


def pin():
    """Pin the intra-op worker threads once per process (see the module's docstring); returns what was done or why
    not, as a line (also `state()` afterwards)."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        cpus, why = _cpus_or_why_not()
        if why is None:
            pinned, workers = _compiled._C._pin_intraop_workers(cpus), len(cpus) - 1
            if pinned == workers:
                why = f"intra-op worker threads pinned by fastres, one to each of CPUs {','.join(map(str, cpus[1:]))}"
            elif pinned:
                why = f"{pinned} of {workers} intra-op worker threads pinned by fastres"
            else:
                why = "intra-op threads as they were (no OpenMP worker thread to pin)"
        else:
            why = f"intra-op threads as they were ({why})"
        _state = why
        return why


def state():
    """What pin() did in this process, or None before its first call."""
    return _state
