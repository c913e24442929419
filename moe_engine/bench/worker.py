"""The child process of ``moe-engine bench``: load one system, generate, report events as JSON lines.

Owns: loading a system (the engine with its policy and predictor, or accelerate offloading with
``max_memory``), the measured generation (cold page cache, per-phase peak RSS, cgroup peak, I/O,
thread scheduling, engine counters over the decode steps alone), reading the engine's stats
(``_scalar_stats``, the one reader), and the calibration child that measures the runtime allowance.
The parent (``moe_engine.bench.runner``) starts it as a subprocess and folds its events into a
``RunResult``.

Events (one JSON object a line, appended to the events file as they happen, so a killed child still
leaves what it measured): ``imported``, ``placement`` (accelerate only), ``loaded``, ``token`` (one per
new token, with its time since ``generate()`` was called), ``done``, or ``error`` (a traceback).

Example (what the parent runs)::

    python -m moe_engine.bench.worker --worker '{"system": "lru", "budget": 0.25, ...}' events.jsonl
    python -m moe_engine.bench.worker --calibrate tiny-checkpoint/ 1
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_engine.bench.probes import (
    TokenClock,
    checkpoint_bytes,
    drop_page_cache,
    proc_io,
    proc_status,
    reset_peak_rss,
    sched_delta,
    thread_sched,
)
from moe_engine.bench.settings import BASELINES, QUANTIZED, SystemRun

Emit = Callable[[dict], None]


def _load(run: SystemRun, model_path: str, offload_dir: Path, emit: Emit) -> Any:
    """Build ``run``'s model: the engine (policy and predictor by system) or accelerate offloading."""
    import torch

    if run.system in BASELINES:
        from transformers import AutoModelForCausalLM

        sizes = checkpoint_bytes(model_path)
        cap = sizes.non_expert_bytes + int(run.budget * sizes.expert_bytes)
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(sizes.expert_dtype,
                                                                                       torch.bfloat16)
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_path, device_map="auto", max_memory={"cpu": cap}, offload_folder=str(offload_dir), dtype=dtype
        )
        placement: dict[str, int] = {}
        for device in model.hf_device_map.values():
            placement[str(device)] = placement.get(str(device), 0) + 1
        emit({"event": "placement", "max_memory_bytes": cap, "device_map_summary": placement})
        if run.system == "accelerate_cold":
            cached = [Path(model_path), offload_dir]
            model.register_forward_pre_hook(lambda module, args: drop_page_cache(cached))
        return model

    import moe_engine
    from moe_engine.runtime.policies import DEFAULT_POLICY

    if run.system in QUANTIZED:
        from moe_engine.bench.checkpoint import QUANTIZED_SYSTEMS, ensure_quantized

        stored = checkpoint_bytes(model_path).expert_bytes
        path = ensure_quantized(model_path, QUANTIZED_SYSTEMS[run.system], progress=False)  # made by the runner
        return moe_engine.from_pretrained(path, budget=int(run.budget * stored), policy=DEFAULT_POLICY,
                                          device="cpu", threads=torch.get_num_threads(), progress=True,
                                          quality="fast" if run.system == "fast" else "lossless")
    policy, predictor = {
        "lru": ("lru", None),
        "prefetch": ("lru", "cross_layer_gate"),
        "default": (DEFAULT_POLICY, "cross_layer_gate"),  # the engine as it ships: from_pretrained's defaults
        "ondemand": ("none", None),
    }[run.system]
    import torch

    # Every system runs with the same torch threads (the bench's --threads, else torch's default).
    return moe_engine.from_pretrained(model_path, budget=run.budget, policy=policy, device="cpu",
                                      threads=torch.get_num_threads(),
                                      predictor=predictor, progress=True)


# The EngineStats fields the bench relies on; every other scalar field is copied through as it comes.
STATS_FIELDS = ("hits", "misses", "bytes_moved", "stall_seconds", "prefetches", "prefetch_hits",
                "predict_seconds", "peak_resident_bytes")


def _scalar_stats(stats: Any) -> dict:
    """The engine's stats as a flat dict of numbers (per-layer lists left out), plus ``accesses``,
    ``hit_rate`` and ``prefetch_accuracy``: the only place the bench reads ``EngineStats``. Read
    defensively, so fields the engine adds or drops never break the bench: every scalar field present is
    copied; the three derived figures are the stats' own properties when present, else derived from
    ``STATS_FIELDS`` (accesses = hits + misses)."""
    if dataclasses.is_dataclass(stats):
        values = {f.name: getattr(stats, f.name, None) for f in dataclasses.fields(stats)}
    else:
        values = dict(vars(stats))
    out: dict[str, Any] = {k: v for k, v in values.items() if isinstance(v, int | float)}
    accesses = getattr(stats, "accesses", None)
    if not isinstance(accesses, int | float):
        accesses = out.get("hits", 0) + out.get("misses", 0)
    hit_rate, accuracy = getattr(stats, "hit_rate", None), getattr(stats, "prefetch_accuracy", None)
    if not isinstance(hit_rate, int | float):
        hit_rate = out.get("hits", 0) / accesses if accesses else None
    if not isinstance(accuracy, int | float):
        accuracy = out.get("prefetch_hits", 0) / out["prefetches"] if out.get("prefetches") else None
    out.update(accesses=accesses, hit_rate=hit_rate, prefetch_accuracy=accuracy)
    return out


# Counters differenced over the decode steps; those missing from either snapshot are left out.
_DECODE_COUNTERS = ("hits", "misses", "accesses", "prefetch_hits", "prefetches", "wasted_prefetches",
                    "mispredictions", "bytes_moved", "prefetch_bytes", "stall_seconds", "predict_seconds")


def _decode_delta(first: dict, last: dict) -> dict:
    """Engine counters over the decode steps alone: totals at the end minus totals at the first token."""
    out = {k: last[k] - first[k] for k in _DECODE_COUNTERS
           if isinstance(last.get(k), int | float) and isinstance(first.get(k), int | float)}
    n = out.get("accesses", out.get("hits", 0) + out.get("misses", 0))
    out["hit_rate"] = out.get("hits", 0) / n if n else None
    out["prefetch_accuracy"] = out.get("prefetch_hits", 0) / out["prefetches"] if out.get("prefetches") else None
    return out


class _CgroupPeak:
    """The child's view of its own cgroup's peak charge: read the peak so far, then reset it so the
    generation's own peak can be read at the end (v1: write 0 to ``memory.max_usage_in_bytes``; v2: a
    write to ``memory.peak`` resets it for reads through the same open file)."""

    def __init__(self, info: dict | None) -> None:
        self.info = info
        self.fd: Any = None

    def read_and_reset(self) -> int | None:
        if not self.info:
            return None
        path = Path(self.info["path"])
        try:
            if self.info["version"] == 1:
                peak = int((path / "memory.max_usage_in_bytes").read_text())
                (path / "memory.max_usage_in_bytes").write_text("0")
                return peak
            self.fd = open(path / "memory.peak", "r+")  # noqa: SIM115 - kept open until read()
            peak = int(self.fd.read())
            self.fd.seek(0)
            self.fd.write("reset\n")
            self.fd.flush()
            return peak
        except (OSError, ValueError):
            self.fd = None
            return None

    def read(self) -> int | None:
        if not self.info:
            return None
        try:
            if self.info["version"] == 1:
                return int((Path(self.info["path"]) / "memory.max_usage_in_bytes").read_text())
            if self.fd is None:
                return None
            self.fd.seek(0)
            return int(self.fd.read())
        except (OSError, ValueError):
            return None


def worker(spec: dict, events_path: str) -> int:
    """Child entry point: one system run, reported as JSON lines appended to ``events_path``."""
    with open(events_path, "a", buffering=1) as events:

        def emit(obj: dict) -> None:
            events.write(json.dumps(obj) + "\n")

        try:
            _measure(spec, emit)
        except Exception:
            import traceback

            emit({"event": "error", "error": traceback.format_exc()})
            return 1
    return 0


def _measure(spec: dict, emit: Emit) -> None:
    run = SystemRun(spec["system"], spec["budget"])
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    emit({"event": "imported", "rss": proc_status()["VmRSS"], "threads": torch.get_num_threads()})
    model_path, offload_dir = spec["model_path"], Path(spec["offload_dir"])
    io0 = proc_io()
    t0 = time.perf_counter()
    model = _load(run, model_path, offload_dir, emit)
    load_s = time.perf_counter() - t0
    io1 = proc_io()
    peak_load = proc_status()["VmHWM"]
    # Generation starts cold for every system: what loading left in the page cache goes.
    drop_page_cache([Path(model_path), offload_dir])
    reset = reset_peak_rss()
    cgroup = _CgroupPeak(spec.get("cgroup"))
    emit({"event": "loaded", "load_s": load_s, "peak_rss_load": peak_load,
          "disk_read_load": io1["read_bytes"] - io0["read_bytes"],
          "disk_write_load": io1["write_bytes"] - io0["write_bytes"],
          "cgroup_peak_load": cgroup.read_and_reset()})
    engine = getattr(model, "engine", None)
    at_first: dict = {}
    sched_first: dict = {}

    def snapshot() -> None:
        sched_first.update(thread_sched())
        if engine is not None:
            at_first.update(_scalar_stats(engine.stats()))
            at_first["predict_seconds"] = getattr(engine, "predict_seconds", None)

    input_ids = torch.tensor([spec["prompt_ids"]], dtype=torch.long)
    n = spec["decode_tokens"]
    io2 = proc_io()
    start = time.perf_counter()
    clock = TokenClock(emit, start, n, on_first=snapshot)
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, streamer=clock, pad_token_id=0)
    io3 = proc_io()
    status = proc_status()
    done = {"event": "done", "disk_read_generate": io3["read_bytes"] - io2["read_bytes"],
            "peak_rss_generate": status["VmHWM"] if reset else None,
            "peak_rss": max(peak_load, status["VmHWM"]), "cgroup_peak_generate": cgroup.read(),
            "decode_threads": sched_delta(sched_first, thread_sched()) if sched_first else None}
    if engine is not None:
        stats = _scalar_stats(engine.stats())
        done["engine_stats"] = stats
        done["engine_bytes_moved"] = stats.get("bytes_moved")
        predict = getattr(engine, "predict_seconds", None)
        if isinstance(predict, float):
            stats["predict_seconds"] = predict
        if at_first:
            done["engine_decode_stats"] = _decode_delta(at_first, stats)
    emit(done)


def _calibrate_child(model_path: str, threads: int) -> None:
    """Child of ``runner.measure_runtime_allowance``: import everything a run imports, run a tiny model."""
    import accelerate  # noqa: F401  (the baselines import it)
    import torch
    import transformers  # noqa: F401

    import moe_engine

    if threads:
        torch.set_num_threads(threads)
    model = moe_engine.from_pretrained(model_path, budget=1.0, policy="lru", device="cpu",
                                       threads=torch.get_num_threads())
    ids = torch.arange(8, 24).unsqueeze(0)
    with torch.inference_mode():
        model(ids)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    print(json.dumps({"peak_rss": proc_status()["VmHWM"]}), flush=True)


def main(argv: list[str]) -> int:
    """``--worker SPEC_JSON EVENTS_PATH`` or ``--calibrate MODEL_PATH THREADS``."""
    if len(argv) == 3 and argv[0] == "--worker":
        return worker(json.loads(argv[1]), argv[2])
    if len(argv) == 3 and argv[0] == "--calibrate":
        _calibrate_child(argv[1], int(argv[2]))
        return 0
    print("usage: moe-engine bench --help  (this module's own entry point is for the benchmark's children)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
