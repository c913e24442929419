"""Compute threads: how many intra-op threads torch uses for the model.

torch's default is one thread per core. On a machine that other processes also use, that is the worst
choice: torch's worker threads wait for each other at every op, and one busy neighbour on a 2-core
machine slowed `moe-engine generate` 90x (0.88 vs 79 tok/s). The engine's default is half the physical
cores this process may run on (at least 1): on the 2-core machines this project measures on it is 1
thread, which `benchmarks/threads_eval.py` measured both quiet and beside a busy process (figures in the
README). ``threads=`` (Python) and ``--threads`` (CLI) override it.

torch's thread count is a process-wide setting (``torch.set_num_threads``): setting it here sets it for
the whole process, as any torch user would.

Example::

    set_threads(None)   # the default (half the physical cores) unless a count was chosen already
    set_threads(4)
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Physical cores this process may run on (affinity-aware where the OS says; at least 1)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
        total = psutil.cpu_count(logical=True) or logical
        per_core = max(1, total // physical)  # SMT siblings per physical core
    except Exception:
        per_core = 1
    return max(1, logical // per_core)


def default_threads() -> int:
    """Half the usable physical cores, at least 1 (see the module docstring for why)."""
    return max(1, usable_cores() // 2)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads``; returns the number in effect.

    ``None`` applies ``default_threads()`` only where torch still runs its own default (one thread per
    core): a count the user or the environment (``OMP_NUM_THREADS``) chose is left alone.
    """
    import torch

    if threads is None:
        if torch.get_num_threads() < max(1, os.cpu_count() or 1):
            return torch.get_num_threads()
        threads = default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
