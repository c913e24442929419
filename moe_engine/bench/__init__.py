"""``moe-engine bench``: the engine at several expert budgets against the offloading baselines a user would try.

Modules, by what each owns:

* ``settings``    system names, ``SystemRun`` / ``parse_systems``, ``BenchSettings``, ``RunResult``
* ``probes``      checkpoint byte split, cold read rate, prompt, page cache, ``/proc`` readers, token clock
* ``memory_cap``  kernel memory caps: one memory cgroup per run (v1 or v2)
* ``checkpoint``  the generated 2.2 GB Mixtral-layout checkpoint of ``--large``
* ``worker``      the child process: load one system, measure, emit events (``python -m moe_engine.bench.worker``)
* ``runner``      the parent: run each system in a child, the memory-cap plan, ``run_benchmark``
* ``checks``      median of rounds, ratios against baselines, acceptance checks, prefetch ceiling
* ``report``      table, chart (matplotlib optional), JSON

Nothing here imports torch or transformers at import time (the CLI's ``--help`` stays fast).

Example::

    from moe_engine.bench import BenchSettings, format_table, run_benchmark, write_report
    report = run_benchmark(BenchSettings(model_path="ckpt/", systems=("lru@0.25", "accelerate@0.25")))
    write_report(report, "~/.cache/moe-engine/bench")
    print(format_table(report))
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names -> their module. Resolved lazily, so that ``python -m moe_engine.bench.worker`` (or
# ``.checkpoint``) does not find its own module already imported by this package.
_EXPORTS = {
    "BenchSettings": "settings", "RunResult": "settings", "SystemRun": "settings", "parse_systems": "settings",
    "run_benchmark": "runner", "run_system": "runner",
    "format_table": "report", "plot": "report", "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_engine.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"moe_engine.bench.{_EXPORTS[name]}"), name)
