"""CPU threads on a shared machine: OpenMP's wait policy and the automatic thread count.

With a busy neighbour, OpenMP worker threads that spin-wait at every barrier
(libgomp's default ``OMP_WAIT_POLICY=ACTIVE`` for a while, ``GOMP_SPINCOUNT``) fight it for a
core, and a small model's many short kernels spend most of their time waiting: the shipped
digit model took 18-201 s to sample with the default threads against 3.4 s with one thread
(docs/benchmarks.md, threads on a shared machine). :func:`set_wait_policy` runs before torch
is imported (run.py, train.py); :func:`choose_threads` picks ``cpu_threads: null``'s count
from the model's size.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..diffusion._checks import check_int

log = logging.getLogger(__name__)

#: OpenMP settings made before torch starts its thread pool (a value already in the environment wins)
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
#: a UNet with fewer parameters than this runs on one thread: its kernels are too short to share
SMALL_MODEL_PARAMETERS = 20_000_000


def set_wait_policy() -> dict[str, str]:
    """Set :data:`WAIT_POLICY` in ``os.environ`` unless the user set it; call before ``import torch``.
    Returns the settings in force."""
    for key, value in WAIT_POLICY.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in WAIT_POLICY}


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (sysfs topology; the CPU count without it)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/core_id") as a, open(f"{base}/physical_package_id") as b:
                cores.add((a.read().strip(), b.read().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def auto_threads(parameters: int) -> int:
    """``cpu_threads: null``: one thread for a UNet under :data:`SMALL_MODEL_PARAMETERS`, else the
    physical cores (hyper-threads share a core's units and only add waiting)."""
    return 1 if parameters < SMALL_MODEL_PARAMETERS else physical_cores()


def check_cpu_threads(value: Any) -> int | None:
    """``cpu_threads``: None for auto (null, or 0 as before), else the count, an integer >= 1."""
    if value is None or (not isinstance(value, bool) and value in (0, "0")):
        return None
    try:
        return check_int("cpu_threads", value)
    except ValueError:
        raise ValueError(f"cpu_threads must be null (the task's own choice: conf/sample.yaml, train.yaml, "
                         f"eval.yaml) or an integer >= 1, got {value!r}") from None


def choose_threads(cpu_threads: Any, network: Any) -> int:
    """Set torch's intra-op threads: ``cpu_threads`` when given, else :func:`auto_threads` of
    ``network``'s parameter count. Returns the count set."""
    import torch

    cpu_threads = check_cpu_threads(cpu_threads)
    if cpu_threads:
        count, why = cpu_threads, "cpu_threads"
    else:
        parameters = sum(p.numel() for p in network.parameters())
        count, why = auto_threads(parameters), f"auto: {parameters / 1e6:.1f}M UNet parameters"
    torch.set_num_threads(count)
    log.debug("CPU threads: %d (%s; %s)", count, why, ", ".join(f"{k}={os.environ.get(k)}" for k in WAIT_POLICY))
    return count
