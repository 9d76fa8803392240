"""The process a job runs in: torch's CPU threads, the device, the seeds."""

from __future__ import annotations

import logging
import os
import random
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


def free_cores() -> int:
    """Cores this process may use (its CPU affinity) minus those other work keeps busy (the 1-minute
    load average, rounded down), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def set_cpu_threads(num_threads: Optional[int], device: torch.device) -> int:
    """torch's intra-op threads: ``num_threads`` when set; on CPU otherwise no more than the cores free
    now (:func:`free_cores`). Why: OpenMP threads that outnumber the free cores wait on each other at
    every parallel region (docs/benchmarks.md). Returns the count in use."""
    if num_threads:
        torch.set_num_threads(num_threads)
    elif device.type == "cpu":
        free = free_cores()
        if free < torch.get_num_threads():
            log.info("using %d torch thread(s): the cores free now (set num_threads=... to override)", free)
            torch.set_num_threads(free)
    return torch.get_num_threads()


def device_from(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available; use device=auto or device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
