"""Offloading benchmark: the engine at several expert budgets against the baselines a user would try.

Systems (each run in its own subprocess, on the same prompt, page cache dropped first):

* ``lru``        ``moe_engine.from_pretrained(path, budget=f, policy="lru", device="cpu", predictor=None)``
* ``prefetch``   the same with ``predictor="cross_layer_gate"`` (asynchronous prefetch of the next layer)
* ``ondemand``   ``policy="none"``: every expert is read from disk when needed, nothing is kept
* ``accelerate`` ``AutoModelForCausalLM.from_pretrained(path, device_map="auto",
  max_memory={"cpu": M}, offload_folder=...)`` with ``M = non-expert bytes + f * expert bytes``.
  Its offloaded weights are read through the OS page cache, which keeps them between forward passes
  when RAM is free: ``max_memory`` bounds its RSS, not the memory it really uses. Under the memory cap
  (below) the page cache is charged too, so this is accelerate held to the engine's memory.
* ``accelerate_plain`` the same, never under the memory cap (only ``max_memory``): what accelerate
  does on a machine with free RAM; a reference, its page cache is not bounded.
* ``accelerate_cold`` the same as ``accelerate``, with the page cache of the model's and offload
  folder's files dropped before every forward pass: accelerate on a machine whose RAM really is ``M``.

Memory cap (``BenchSettings.memory_cap``): with ``"cgroup"`` every run but ``accelerate_plain`` runs in a
fresh memory cgroup (``benchmarks/memory_cap.py``) whose limit is the same for every system at a
budget ``f``: ``non-expert bytes + f * expert bytes + runtime allowance``. The kernel charges a cgroup
with its anonymous memory *and* the page cache it touches, reclaims page cache at the limit and
OOM-kills past it, so the cap holds for every system alike. The runtime allowance is measured once per
benchmark: the peak memory of a child that imports torch, transformers, accelerate and moe_engine and
runs a tiny model's forward pass (peak RSS, or the cgroup's peak charge if larger).
``accelerate_plain`` runs in a cgroup without a limit, for accounting. A run the kernel kills at the
cap is reported with status ``oom_killed``. With ``"none"`` no cgroup is used.

Figures per run: prefill tok/s (prompt tokens / time to the first new token), decode tok/s (new
tokens after the first / their time), peak RSS (``VmHWM`` of the child for the whole run, and for the
generation alone after resetting it through ``/proc/self/clear_refs``), bytes read from the block
device (``read_bytes`` of ``/proc/self/io``) during loading and during generation, the engine's own
``bytes_moved`` and counters, and the page cache held by the checkpoint's and offload folder's files
(peak, sampled every few seconds, and after the run).

Cold start, for every system alike: the parent drops the checkpoint's pages from the page cache before
starting the child, and the child drops the checkpoint's (and accelerate's offload folder's) pages
again after loading, so generation starts with nothing cached but what the system holds itself.

Repeats (``BenchSettings.repeats``): the systems run in interleaved rounds (A B C, A B C, ...) and each
is reported by its median-speed run, so a slow spell of a shared machine does not land on one system
alone; every round's speeds stay in the JSON (``rounds``).

Prefetch ceiling: with ``prefetch`` in the run, the engine's cold read rate of whole experts is probed
(best of three) and the prefetch check reports the most any prefetcher moving LRU's bytes could gain:
LRU's seconds per token over max(compute with every expert resident (``lru@1``), bytes / read rate).

A *budget* ``f`` is a fraction of all expert bytes. A *system label* is ``name@f`` (``lru@0.25``).

Example::

    from moe_engine.benchmarks.bench_offload import BenchSettings, run_benchmark, format_table
    report = run_benchmark(BenchSettings(model_path="ckpt/", systems=("lru@0.25", "accelerate@0.25")))
    print(format_table(report))
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_engine.benchmarks.make_checkpoint import CheckpointSpec, ensure_checkpoint
from moe_engine.benchmarks.memory_cap import CgroupBackend, detect_backend

SYSTEMS = ("lru", "prefetch", "ondemand", "accelerate", "accelerate_plain", "accelerate_cold")
BASELINES = ("accelerate", "accelerate_plain", "accelerate_cold")
UNCAPPED = ("accelerate_plain",)  # never under the memory cap (a reference)
MEMORY_CAPS = ("none", "cgroup")
DEFAULT_BUDGETS = (0.125, 0.25, 0.5, 1.0)
DEFAULT_REF_BUDGET = 0.25
# Acceptance bars (issue 2: engine vs accelerate at 25 %; issue 4: prefetch vs LRU on demand).
BAR_ENGINE_VS_ACCELERATE = 3.0
BAR_PREFETCH_VS_LRU = 1.5

_EXPERT_TENSOR = re.compile(r"\.experts\.(\d+\.|gate_up_proj|down_proj|gate_proj|up_proj)")
_REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Settings and results


@dataclass(frozen=True)
class SystemRun:
    """One system at one budget: what a child process runs."""

    system: str
    budget: float

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown system {self.system!r}; choose from {', '.join(SYSTEMS)}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be a fraction of expert bytes in (0, 1], got {self.budget}")

    @property
    def label(self) -> str:
        return f"{self.system}@{self.budget:g}"


def parse_systems(text: str, budgets: tuple[float, ...], ref_budget: float) -> tuple[SystemRun, ...]:
    """``"lru,prefetch@0.5,accelerate"`` -> runs. ``lru`` alone sweeps ``budgets``; the other names
    alone run at ``ref_budget``; ``name@f`` runs at ``f``."""
    runs: list[SystemRun] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, budget = item.partition("@")
        if budget:
            try:
                runs.append(SystemRun(name, float(budget)))
            except ValueError as exc:
                raise ValueError(f"bad system {item!r}: {exc}") from None
        elif name == "lru":
            runs.extend(SystemRun(name, b) for b in budgets)
        else:
            runs.append(SystemRun(name, ref_budget))
    if not runs:
        raise ValueError("--systems names no system")
    return tuple(dict.fromkeys(runs))  # drop repeats, keep order


@dataclass(frozen=True)
class BenchSettings:
    model_path: str
    model_name: str = "model"
    systems: tuple[str, ...] = ("lru@0.125", "lru@0.25", "lru@0.5", "lru@1", "prefetch@0.25",
                                "ondemand@0.25", "accelerate@0.25", "accelerate_plain@0.25", "accelerate_cold@0.25")
    ref_budget: float = DEFAULT_REF_BUDGET
    prompt_tokens: int = 64
    decode_tokens: int = 32
    seed: int = 0
    timeout_s: float = 900.0
    threads: int | None = None
    offload_root: str | None = None  # where accelerate's offload folders go (default: beside the model)
    memory_cap: str = "none"  # "cgroup": every run but accelerate_plain in a memory cgroup (see module doc)
    runtime_allowance_bytes: int | None = None  # added to each cgroup cap; None: measured once
    repeats: int = 1  # rounds over all systems, interleaved; each system is reported by its median run

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError("repeats must be at least 1")
        if self.memory_cap not in MEMORY_CAPS:
            raise ValueError(f"memory_cap must be one of {', '.join(MEMORY_CAPS)}, got {self.memory_cap!r}")
        if self.prompt_tokens < 1 or self.decode_tokens < 1:
            raise ValueError("prompt and decode token counts must be at least 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout must be positive")
        for label in self.systems:
            name, _, budget = label.partition("@")
            SystemRun(name, float(budget))  # validates


@dataclass
class RunResult:
    """Figures of one system run; ``status`` is ``ok``, ``timed_out``, ``oom_killed`` (by the memory cap)
    or ``failed``."""

    label: str
    system: str
    budget: float
    status: str = "failed"
    error: str | None = None
    wall_s: float | None = None
    load_s: float | None = None
    prefill_s: float | None = None
    prefill_tok_s: float | None = None
    decode_s: float | None = None
    decode_tok_s: float | None = None
    new_tokens: int = 0
    rss_after_import_bytes: int | None = None
    peak_rss_bytes: int | None = None  # VmHWM over the whole child (imports, loading, generation)
    peak_rss_load_bytes: int | None = None
    peak_rss_generate_bytes: int | None = None  # VmHWM of the generation alone
    peak_rss_sampled_bytes: int | None = None  # parent's 10 Hz sampling of VmRSS, a cross-check
    peak_rss_anon_sampled_bytes: int | None = None
    peak_rss_file_sampled_bytes: int | None = None  # file pages mapped into the process (mmap)
    disk_read_load_bytes: int | None = None
    disk_read_generate_bytes: int | None = None
    disk_write_load_bytes: int | None = None
    engine_bytes_moved: int | None = None
    peak_page_cache_bytes: int | None = None  # checkpoint + offload bytes in the page cache, sampled
    page_cache_after_bytes: int | None = None  # the same, after the run
    max_memory_bytes: int | None = None  # accelerate's max_memory["cpu"]
    device_map_summary: dict | None = None
    # Kernel memory cap (cgroup): the limit, whether one was enforced, the cgroup's peak charge
    # (anonymous memory + page cache + kernel memory) for the whole run and for the generation alone,
    # OOM kills and how often the charge hit the limit (each hit reclaims page cache in the cgroup).
    memory_cap_bytes: int | None = None
    memory_cap_enforced: bool = False
    cgroup_peak_bytes: int | None = None
    cgroup_peak_generate_bytes: int | None = None
    cgroup_oom_kills: int | None = None
    cgroup_limit_hits: int | None = None
    cgroup: dict | None = None
    peak_memory_bytes: int | None = None  # the figure compared: cgroup peak when measured, else peak RSS
    engine_stats: dict | None = None
    engine_decode_stats: dict | None = None  # engine counters over the decode steps alone (after token 1)
    decode_threads: dict | None = None  # CPU / run-queue-wait seconds of the threads over the decode steps
    tokens: list[int] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)  # since generate() was called


# --------------------------------------------------------------------------------------------------
# Checkpoint facts


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class CheckpointBytes:
    expert_bytes: int  # all routed experts, as stored
    non_expert_bytes: int  # everything else (embeddings, attention, norms, routers, shared experts)
    expert_dtype: str  # safetensors dtype of the expert tensors, e.g. "BF16"


def checkpoint_bytes(path: str | os.PathLike) -> CheckpointBytes:
    """Split a checkpoint's stored bytes into routed experts and the rest, from the file headers."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    expert = other = 0
    dtypes: set[str] = set()
    for f in files:
        for name, info in _safetensors_header(f).items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if _EXPERT_TENSOR.search(name):
                expert += end - start
                dtypes.add(info["dtype"])
            else:
                other += end - start
    if not expert:
        raise ValueError(f"{path} has no routed-expert tensors (names with '.experts.N.'): not an MoE checkpoint")
    return CheckpointBytes(expert, other, "/".join(sorted(dtypes)))


def measure_read_rate(model_path: str | os.PathLike, max_bytes: int = 512 * 2**20, threads: int = 2,
                      seed: int = 0) -> dict:
    """Cold read rate of the checkpoint's experts through the engine's own read path.

    Reads whole experts (their byte-adjacent tensors as one range), in random order, on ``threads``
    threads as the engine's mover does, with the page cache dropped first and after every read
    (``CheckpointStore``'s default), up to ``max_bytes``. Used to bound what prefetching can gain: it
    can hide reads behind compute, but the reads still take bytes / this rate. (The simulator's
    ``measure_cold_read_bandwidth`` times large sequential reads of a fresh file: a disk profile, not
    this checkpoint's expert-sized random reads.)
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from moe_engine.runtime.store import CheckpointStore, ExpertLocation

    store = CheckpointStore.open(model_path)
    try:
        groups: dict[str, list] = {}
        for name, loc in store.tensors.items():
            m = _EXPERT_TENSOR.search(name)
            if m is not None and m.group(1)[0].isdigit():  # per-expert tensors: group by expert
                groups.setdefault(name[: m.end()], []).append(loc)
        experts = [sorted(locs, key=lambda t: t.offset) for locs in groups.values()]
        random.Random(seed).shuffle(experts)
        chosen, total = [], 0
        for locs in experts:
            if total >= max_bytes:
                break
            chosen.append(locs)
            total += sum(t.nbytes for t in locs)
        if not chosen:
            return {"read_gbytes_per_s": None, "bytes": 0, "note": "no per-expert tensors to read"}
        store.drop_page_cache()
        numel = max(sum(t.nbytes for t in e) // e[0].dtype.itemsize for e in chosen)
        slots = [torch.empty(numel, dtype=chosen[0][0].dtype) for _ in range(threads)]

        def read(i: int) -> None:
            for locs in chosen[i::threads]:  # one scatter preadv per expert when its parts are adjacent
                n = sum(t.nbytes for t in locs) // locs[0].dtype.itemsize
                store.read_expert_into(ExpertLocation(tuple(locs)), slots[i][:n])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(threads)))
        wall = time.perf_counter() - t0
    finally:
        store.close()
    return {"read_gbytes_per_s": total / wall / 1e9, "bytes": total, "experts": len(chosen), "threads": threads,
            "seconds": wall}


def prompt_ids(model_path: str | os.PathLike, n: int, seed: int) -> list[int]:
    """A fixed prompt of ``n`` token ids drawn from ``seed``, avoiding the first ids (often special)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not vocab:
        raise ValueError(f"{model_path}/config.json has no vocab_size")
    rng = random.Random(seed)
    low = min(8, vocab - 1)
    return [rng.randrange(low, vocab) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# Page cache, memory and I/O counters (Linux)


def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files under ``paths`` from the OS page cache (fsync first: dirty pages cannot go)."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in files:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def page_cache_bytes(paths: list[Path]) -> int | None:
    """Bytes of the files under ``paths`` resident in the page cache (util-linux ``fincore``), or None."""
    files = []
    for root in paths:
        if root.exists():
            files += [str(root)] if root.is_file() else [str(p) for p in root.rglob("*") if p.is_file()]
    if not files or shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return sum(int(x) for x in out.split())


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` ... of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so a phase's peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# Child process: load one system, generate, report events as JSON lines


class _TokenClock:
    """A ``generate()`` streamer that timestamps each new token and reports it to the parent."""

    def __init__(self, emit, start: float, total: int, on_first=None) -> None:
        from tqdm.auto import tqdm

        self.emit, self.start, self.prompt_seen, self.on_first = emit, start, False, on_first
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.bar = tqdm(total=total, desc="  decoding", unit="tok", leave=False)

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first streams the prompt itself
            self.prompt_seen = True
            return
        t = time.perf_counter() - self.start
        tok = int(value.reshape(-1)[0])
        self.times.append(t)
        self.tokens.append(tok)
        self.emit({"event": "token", "t": t, "token": tok})
        if len(self.times) == 1 and self.on_first is not None:
            self.on_first()
        self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


def _load(run: SystemRun, model_path: str, offload_dir: Path, emit) -> Any:
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

    policy, predictor = {
        "lru": ("lru", None),
        "prefetch": ("lru", "cross_layer_gate"),
        "ondemand": ("none", None),
    }[run.system]
    return moe_engine.from_pretrained(model_path, budget=run.budget, policy=policy, device="cpu",
                                      predictor=predictor, progress=True)


def _scalar_stats(stats) -> dict:
    """The engine's ``EngineStats`` as a dict: totals, hit rate and prefetch accuracy (per-layer left out)."""
    out = {k: v for k, v in dataclasses.asdict(stats).items() if isinstance(v, int | float)}
    out["hit_rate"] = stats.hit_rate
    out["prefetch_accuracy"] = stats.prefetch_accuracy
    return out


_DECODE_COUNTERS = ("hits", "misses", "prefetch_hits", "prefetches", "wasted_prefetches", "mispredictions",
                    "bytes_moved", "prefetch_bytes", "stall_seconds", "predict_seconds")


def _decode_delta(first: dict, last: dict) -> dict:
    """Engine counters over the decode steps alone: totals at the end minus totals at the first token."""
    out = {k: last[k] - first[k] for k in _DECODE_COUNTERS
           if isinstance(last.get(k), int | float) and isinstance(first.get(k), int | float)}
    n = out.get("hits", 0) + out.get("misses", 0)
    out["hit_rate"] = out["hits"] / n if n else None
    out["prefetch_accuracy"] = out["prefetch_hits"] / out["prefetches"] if out.get("prefetches") else None
    return out


def _thread_sched() -> dict[int, tuple[int, int]]:
    """Per thread of this process: (ns on a CPU, ns waiting on a run queue), from ``schedstat``."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            cpu, wait, _ = (task / "schedstat").read_text().split()
            out[int(task.name)] = (int(cpu), int(wait))
        except (OSError, ValueError):
            pass
    return out


def _sched_delta(first: dict[int, tuple[int, int]], last: dict[int, tuple[int, int]]) -> dict:
    """CPU and run-queue-wait seconds between two snapshots: the main (compute) thread, the others
    (I/O threads of the engine's mover, library threads) summed."""
    main = os.getpid()
    out = {"main_cpu_s": 0.0, "main_runqueue_wait_s": 0.0, "other_threads_cpu_s": 0.0,
           "other_threads_runqueue_wait_s": 0.0}
    for tid, (cpu, wait) in last.items():
        cpu0, wait0 = first.get(tid, (0, 0))
        prefix = "main" if tid == main else "other_threads"
        out[f"{prefix}_cpu_s"] += (cpu - cpu0) / 1e9
        out[f"{prefix}_runqueue_wait_s"] += (wait - wait0) / 1e9
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


def _measure(spec: dict, emit) -> None:
    run = SystemRun(spec["system"], spec["budget"])
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    emit({"event": "imported", "rss": _proc_status()["VmRSS"], "threads": torch.get_num_threads()})
    model_path, offload_dir = spec["model_path"], Path(spec["offload_dir"])
    io0 = _proc_io()
    t0 = time.perf_counter()
    model = _load(run, model_path, offload_dir, emit)
    load_s = time.perf_counter() - t0
    io1 = _proc_io()
    peak_load = _proc_status()["VmHWM"]
    # Generation starts cold for every system: what loading left in the page cache goes.
    drop_page_cache([Path(model_path), offload_dir])
    reset = _reset_peak_rss()
    cgroup = _CgroupPeak(spec.get("cgroup"))
    emit({"event": "loaded", "load_s": load_s, "peak_rss_load": peak_load,
          "disk_read_load": io1["read_bytes"] - io0["read_bytes"],
          "disk_write_load": io1["write_bytes"] - io0["write_bytes"],
          "cgroup_peak_load": cgroup.read_and_reset()})
    engine = getattr(model, "engine", None)
    at_first: dict = {}
    sched_first: dict = {}

    def snapshot() -> None:
        sched_first.update(_thread_sched())
        if engine is not None:
            at_first.update(_scalar_stats(engine.stats()))
            at_first["predict_seconds"] = getattr(engine, "predict_seconds", None)

    input_ids = torch.tensor([spec["prompt_ids"]], dtype=torch.long)
    n = spec["decode_tokens"]
    io2 = _proc_io()
    start = time.perf_counter()
    clock = _TokenClock(emit, start, n, on_first=snapshot)
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, streamer=clock, pad_token_id=0)
    io3 = _proc_io()
    status = _proc_status()
    done = {"event": "done", "disk_read_generate": io3["read_bytes"] - io2["read_bytes"],
            "peak_rss_generate": status["VmHWM"] if reset else None,
            "peak_rss": max(peak_load, status["VmHWM"]), "cgroup_peak_generate": cgroup.read(),
            "decode_threads": _sched_delta(sched_first, _thread_sched()) if sched_first else None}
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


# --------------------------------------------------------------------------------------------------
# Parent: run each system in a subprocess with a timeout


def _events(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed child
                pass
    return out


def _fold(result: RunResult, events: list[dict], prompt_len: int) -> None:
    """Fill ``result`` from a child's events (also from a partial list, e.g. after a timeout)."""
    for ev in events:
        kind = ev["event"]
        if kind == "imported":
            result.rss_after_import_bytes = ev["rss"]
        elif kind == "placement":
            result.max_memory_bytes = ev["max_memory_bytes"]
            result.device_map_summary = ev["device_map_summary"]
        elif kind == "loaded":
            result.load_s = ev["load_s"]
            result.peak_rss_load_bytes = ev["peak_rss_load"]
            result.peak_rss_bytes = ev["peak_rss_load"]
            result.disk_read_load_bytes = ev["disk_read_load"]
            result.disk_write_load_bytes = ev["disk_write_load"]
            result.cgroup_peak_bytes = ev.get("cgroup_peak_load")
        elif kind == "token":
            result.token_times_s.append(ev["t"])
            result.tokens.append(ev["token"])
        elif kind == "done":
            result.disk_read_generate_bytes = ev["disk_read_generate"]
            result.peak_rss_generate_bytes = ev["peak_rss_generate"]
            result.peak_rss_bytes = ev["peak_rss"]
            result.engine_stats = ev.get("engine_stats")
            result.engine_bytes_moved = ev.get("engine_bytes_moved")
            result.engine_decode_stats = ev.get("engine_decode_stats")
            result.decode_threads = ev.get("decode_threads")
            result.cgroup_peak_generate_bytes = ev.get("cgroup_peak_generate")
        elif kind == "error":
            result.error = ev["error"]
    times = result.token_times_s
    result.new_tokens = len(times)
    if times:
        result.prefill_s = times[0]
        result.prefill_tok_s = prompt_len / times[0]
    if len(times) >= 2:
        result.decode_s = times[-1] - times[0]
        result.decode_tok_s = (len(times) - 1) / result.decode_s


@dataclass(frozen=True)
class MemoryCapPlan:
    """How runs are capped: cgroups from ``backend``, limit = non-expert + budget x expert + allowance."""

    backend: CgroupBackend
    allowance_bytes: int
    sizes: CheckpointBytes

    def limit_for(self, run: SystemRun) -> int | None:
        if run.system in UNCAPPED:
            return None
        return self.sizes.non_expert_bytes + int(run.budget * self.sizes.expert_bytes) + self.allowance_bytes


# A tiny Mixtral for measuring the runtime allowance (what importing and running costs, weights aside).
ALLOWANCE_SPEC = CheckpointSpec(num_layers=2, num_experts=4, hidden_size=64, intermediate_size=128, num_heads=4,
                                num_kv_heads=2, vocab_size=256)


def _calibrate_child(model_path: str, threads: int) -> None:
    """Child of :func:`measure_runtime_allowance`: import everything a run imports, run a tiny model."""
    import accelerate  # noqa: F401  (the baselines import it)
    import torch
    import transformers  # noqa: F401

    import moe_engine

    if threads:
        torch.set_num_threads(threads)
    model = moe_engine.from_pretrained(model_path, budget=1.0, policy="lru", device="cpu")
    ids = torch.arange(8, 24).unsqueeze(0)
    with torch.inference_mode():
        model(ids)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    print(json.dumps({"peak_rss": _proc_status()["VmHWM"]}), flush=True)


def measure_runtime_allowance(backend: CgroupBackend | None, threads: int | None, work_dir: Path) -> dict:
    """Peak memory of a child that imports torch, transformers, accelerate and moe_engine and runs a tiny
    model's forward pass and a 2-token ``generate()``: the memory every run needs besides its weights.
    The allowance is the larger of the child's peak RSS and its cgroup's peak charge."""
    with tempfile.TemporaryDirectory(prefix=".bench-allowance-", dir=work_dir) as tmp:
        path = ensure_checkpoint(Path(tmp) / "tiny", ALLOWANCE_SPEC, progress=False)
        cmd = [sys.executable, "-m", "moe_engine.benchmarks.bench_offload", "--calibrate", str(path), str(threads or 0)]
        cg = backend.create("allowance", None) if backend is not None else None
        try:
            proc = subprocess.run(cg.wrap(cmd) if cg else cmd, capture_output=True, text=True, env=_child_env(),
                                  timeout=600)
            figures = cg.figures() if cg else {}
        finally:
            if cg is not None:
                cg.remove()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measuring the runtime allowance failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    peak_rss = json.loads(lines[-1])["peak_rss"]
    cg_peak = figures.get("peak_bytes")
    return {"peak_rss_bytes": peak_rss, "cgroup_peak_bytes": cg_peak, "allowance_bytes": max(peak_rss, cg_peak or 0),
            "how": "peak of a child importing torch, transformers, accelerate, moe_engine and running a tiny "
                   "Mixtral's forward pass and a 2-token generate() (max of peak RSS and cgroup peak charge)"}


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_system(run: SystemRun, settings: BenchSettings, prompt: list[int],
               cap: MemoryCapPlan | None = None) -> RunResult:
    """Run one system in a fresh subprocess (page cache dropped first; in a fresh memory cgroup when
    ``cap`` is given); never raises for its failures."""
    model_path = Path(settings.model_path).resolve()
    offload_root = Path(settings.offload_root) if settings.offload_root else model_path.parent
    offload_root.mkdir(parents=True, exist_ok=True)
    result = RunResult(label=run.label, system=run.system, budget=run.budget)
    with tempfile.TemporaryDirectory(prefix=".bench-run-", dir=offload_root) as tmp:
        tmp_path = Path(tmp)
        offload_dir, events_path, log_path = tmp_path / "offload", tmp_path / "events.jsonl", tmp_path / "log"
        spec = {"system": run.system, "budget": run.budget, "model_path": str(model_path),
                "offload_dir": str(offload_dir), "prompt_ids": prompt, "decode_tokens": settings.decode_tokens,
                "threads": settings.threads}
        drop_page_cache([model_path])
        env = _child_env()
        cg = None
        if cap is not None:
            cg = cap.backend.create(run.label.replace("@", "-"), cap.limit_for(run))
            spec["cgroup"] = {"path": str(cg.path), "version": cg.version}
            result.memory_cap_bytes = cg.limit_bytes
            result.memory_cap_enforced = cg.limit_bytes is not None
        cmd = [sys.executable, "-m", "moe_engine.benchmarks.bench_offload", "--worker", json.dumps(spec), str(events_path)]
        if cg is not None:
            cmd = cg.wrap(cmd)
        t0 = time.perf_counter()
        peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        cache_peak, next_cache_sample = 0, 0.0
        with open(log_path, "w") as log:
            # stderr is shown live (progress bars); stdout of libraries goes to the log.
            try:
                proc = subprocess.Popen(cmd, stdout=log, stderr=None, env=env, start_new_session=True)
            except BaseException:
                if cg is not None:
                    cg.remove()
                raise
            try:
                while proc.poll() is None:
                    try:
                        status = _proc_status(proc.pid)
                        for key in peaks:
                            peaks[key] = max(peaks[key], status.get(key, 0))
                    except (OSError, ValueError):
                        pass
                    if time.perf_counter() >= next_cache_sample:  # fincore: a few ms per call
                        cache_peak = max(cache_peak, page_cache_bytes([model_path, offload_dir]) or 0)
                        next_cache_sample = time.perf_counter() + 2.0
                    if time.perf_counter() - t0 > settings.timeout_s:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        result.status = "timed_out"
                        result.error = f"no result within {settings.timeout_s:.0f} s; killed"
                        break
                    time.sleep(0.1)
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)  # never leave a child running behind an interrupt
                proc.wait()
                raise
            finally:
                figures = cg.figures() if cg is not None else None
                if cg is not None:
                    cg.remove()
        result.wall_s = time.perf_counter() - t0
        events = _events(events_path)
        _fold(result, events, len(prompt))
        if figures is not None:
            result.cgroup = figures
            # v1's peak was reset after loading: the whole run's peak is the larger of the two phases.
            result.cgroup_peak_bytes = max(filter(None, [result.cgroup_peak_bytes, figures["peak_bytes"]]),
                                           default=None)
            result.cgroup_oom_kills = figures["oom_kills"]
            result.cgroup_limit_hits = figures["limit_hits"]
        result.peak_memory_bytes = result.cgroup_peak_bytes or result.peak_rss_bytes
        result.peak_rss_sampled_bytes = peaks["VmRSS"] or None
        result.peak_rss_anon_sampled_bytes = peaks["RssAnon"] or None
        result.peak_rss_file_sampled_bytes = peaks["RssFile"] or None
        result.page_cache_after_bytes = page_cache_bytes([model_path, offload_dir])
        result.peak_page_cache_bytes = max(cache_peak, result.page_cache_after_bytes or 0) or None
        if result.status != "timed_out":
            if proc.returncode == 0 and any(ev["event"] == "done" for ev in events):
                result.status = "ok"
            elif result.cgroup_oom_kills:
                result.status = "oom_killed"
                loaded = any(ev["event"] == "loaded" for ev in events)
                result.error = (f"killed by the kernel at the memory cap of {(result.memory_cap_bytes or 0) / 2**20:.0f}"
                                f" MiB (cgroup OOM kill, exit code {proc.returncode}) "
                                + (f"while generating, after {len(result.token_times_s)} tokens" if loaded
                                   else "while loading"))
            elif result.error is None:
                tail = log_path.read_text()[-1500:] if log_path.exists() else ""
                result.error = f"exit code {proc.returncode}: {tail.strip()}"
    return result


# --------------------------------------------------------------------------------------------------
# The whole benchmark


def median_run(attempts: list[RunResult]) -> RunResult:
    """The run of median decode speed among the successful ``attempts`` (the lower middle one for an
    even count), so every figure reported for a system comes from one real run; the last attempt when
    none succeeded."""
    ok = sorted((a for a in attempts if a.status == "ok" and a.decode_tok_s), key=lambda a: a.decode_tok_s or 0.0)
    return ok[(len(ok) - 1) // 2] if ok else attempts[-1]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _reference_for(result: RunResult, baseline: str, by_label: dict[str, RunResult],
                   ref_budget: float) -> RunResult | None:
    """The ``baseline`` run a result is compared with: same budget, else the reference budget."""
    for label in (f"{baseline}@{result.budget:g}", f"{baseline}@{ref_budget:g}"):
        ref = by_label.get(label)
        if ref is not None and ref.status == "ok":
            return ref
    return None


def _checks(by_label: dict[str, RunResult], ref_budget: float, read_rate: dict | None = None) -> list[dict]:
    """The issues' acceptance bars, evaluated on this run's figures."""
    b = f"{ref_budget:g}"
    lru, pre = by_label.get(f"lru@{b}"), by_label.get(f"prefetch@{b}")
    checks = []

    def ok(r: RunResult | None) -> bool:
        return r is not None and r.status == "ok"

    # The engine as configured by hand (lru: cache, no prediction) and as it ships (prefetch: the
    # cross-layer gate is from_pretrained's default), each against every baseline.
    for engine_name, engine in (("lru", lru), ("prefetch", pre)):
        for baseline in BASELINES:
            acc = by_label.get(f"{baseline}@{b}")
            if engine is None or acc is None:
                continue
            speedup = _ratio(engine.decode_tok_s, acc.decode_tok_s) if ok(engine) and ok(acc) else None
            # Peak memory: the cgroup's peak charge (RSS + page cache) where measured, else peak RSS.
            mem = (engine.peak_memory_bytes, acc.peak_memory_bytes)
            mem_ok = mem[0] is not None and mem[1] is not None and mem[0] <= mem[1]
            measured = engine.cgroup_peak_bytes is not None and acc.cgroup_peak_bytes is not None
            what = "cgroup peak" if measured else "peak RSS"
            checks.append({
                "name": f"{engine_name}@{b} decode >= {BAR_ENGINE_VS_ACCELERATE:g}x {baseline}@{b} at no more {what}",
                "baseline_status": acc.status,
                "baseline_capped": acc.memory_cap_enforced,
                "decode_speedup": speedup,
                "peak_memory_bytes": {engine_name: mem[0], baseline: mem[1]},
                "peak_memory_measure": what,
                "peak_rss_bytes": {engine_name: engine.peak_rss_bytes, baseline: acc.peak_rss_bytes},
                "passed": bool(speedup is not None and speedup >= BAR_ENGINE_VS_ACCELERATE and mem_ok),
            })
    if lru is not None and pre is not None:
        speedup = _ratio(pre.decode_tok_s, lru.decode_tok_s) if ok(lru) and ok(pre) else None
        checks.append({
            "name": f"prefetch@{b} decode >= {BAR_PREFETCH_VS_LRU:g}x lru@{b}",
            "decode_speedup": speedup,
            "ceiling": prefetch_ceiling(lru, by_label.get("lru@1"), read_rate),
            "passed": bool(speedup is not None and speedup >= BAR_PREFETCH_VS_LRU),
        })
    return checks


def prefetch_ceiling(lru: RunResult, resident: RunResult | None, read_rate: dict | None) -> dict | None:
    """The most any prefetcher could speed ``lru``'s decode up in this run, if it moved LRU's bytes.

    Perfect prefetch overlaps every read with compute, so a token still takes at least
    max(compute with every expert resident (``resident``, lru@1), LRU's bytes per token / the measured
    cold read rate). The ceiling is LRU's seconds per token over that floor.
    """
    prof = _decode_profile(lru) if lru.status == "ok" else None
    rate = (read_rate or {}).get("read_gbytes_per_s")
    if prof is None or resident is None or resident.status != "ok" or not resident.decode_s or not rate:
        return None
    compute = resident.decode_s / max(resident.new_tokens - 1, 1)  # decode steps after the first token
    reads = prof["bytes_moved_per_token"] / (rate * 1e9)
    floor = max(compute, reads)
    return {"speedup": prof["decode_s_per_token"] / floor, "lru_s_per_token": prof["decode_s_per_token"],
            "resident_s_per_token": compute, "read_s_per_token": reads, "read_gbytes_per_s": rate}


def _decode_profile(r: RunResult) -> dict | None:
    """Where an engine run's decode time went: waiting on expert reads (stall) vs everything else."""
    d = r.engine_decode_stats
    if not d or not r.decode_s or r.new_tokens < 2:
        return None
    steps = r.new_tokens - 1
    stall = d["stall_seconds"]
    th = r.decode_threads or {}
    per_tok = {f"{k}_per_token": v / steps for k, v in th.items()}
    if d.get("predict_seconds") is not None:
        per_tok["predict_s_per_token"] = d["predict_seconds"] / steps
    return {
        **per_tok,
        "decode_steps": steps,
        "decode_s_per_token": r.decode_s / steps,
        "stall_s_per_token": stall / steps,
        "compute_s_per_token": (r.decode_s - stall) / steps,  # attention, experts, routing, prediction
        "stall_share": stall / r.decode_s,
        "bytes_moved_per_token": d["bytes_moved"] / steps,
        "prefetch_bytes_per_token": d["prefetch_bytes"] / steps,
        "misses_per_token": d["misses"] / steps,
        "hit_rate": d["hit_rate"],
        "prefetches": d["prefetches"],
        "prefetch_accuracy": d["prefetch_accuracy"],
        "wasted_prefetches": d["wasted_prefetches"],
        # decode-time read rate the engine saw (bytes moved / decode time)
        "read_gbytes_per_s": d["bytes_moved"] / r.decode_s / 1e9,
    }


def memory_cap_plan(settings: BenchSettings, sizes: CheckpointBytes, runs: list[SystemRun],
                    progress: bool) -> tuple[MemoryCapPlan | None, dict]:
    """The cgroup plan for ``settings.memory_cap`` (None for "none") and its description for the report."""
    info: dict[str, Any] = {"mode": settings.memory_cap}
    if settings.memory_cap == "none":
        info["note"] = ("no kernel memory cap: accelerate's max_memory bounds its RSS only; the page cache "
                        "its offloaded weights are read through is not bounded")
        return None, info
    backend, why = detect_backend()
    if backend is None:
        raise RuntimeError(f"memory cap 'cgroup' is not available here: {why}")
    info["backend"] = why
    allowance: dict[str, Any]
    if settings.runtime_allowance_bytes is not None:
        allowance = {"allowance_bytes": settings.runtime_allowance_bytes, "how": "given in the settings"}
    else:
        if progress:
            print("[bench] measuring the runtime allowance (imports + a tiny model's forward pass) ...",
                  file=sys.stderr)
        root = Path(settings.offload_root) if settings.offload_root else Path(settings.model_path).resolve().parent
        allowance = measure_runtime_allowance(backend, settings.threads, root)
    info["runtime_allowance"] = allowance
    plan = MemoryCapPlan(backend, allowance["allowance_bytes"], sizes)
    info["formula"] = "non_expert_bytes + budget * expert_bytes + runtime allowance (accelerate_plain: no limit)"
    info["limits_bytes"] = {r.label: plan.limit_for(r) for r in runs}
    if progress:
        print(f"[bench] memory cap: {why}; runtime allowance {allowance['allowance_bytes'] / 2**20:.0f} MiB",
              file=sys.stderr)
    return plan, info


def run_benchmark(settings: BenchSettings, *, progress: bool = True) -> dict:
    """Run every system of ``settings`` one after the other; return the report (JSON-ready dict)."""
    from tqdm.auto import tqdm

    sizes = checkpoint_bytes(settings.model_path)
    prompt = prompt_ids(settings.model_path, settings.prompt_tokens, settings.seed)
    runs = [SystemRun(name, float(budget)) for name, _, budget in (s.partition("@") for s in settings.systems)]
    cap, cap_info = memory_cap_plan(settings, sizes, runs, progress)
    read_rate = None
    if any(r.system == "prefetch" for r in runs):
        # Best of three: the ceiling it feeds is an upper bound, and a probe that meets another job's
        # disk writeback reads far slower than the disk can.
        probes = [measure_read_rate(settings.model_path, seed=i) for i in range(3)]
        read_rate = max(probes, key=lambda p: p["read_gbytes_per_s"] or 0.0)
        read_rate["probes_gbytes_per_s"] = [p["read_gbytes_per_s"] for p in probes]
        if progress and read_rate["read_gbytes_per_s"] is None:
            tqdm.write(f"[bench] cold expert reads not measured: {read_rate['note']} (no prefetch ceiling)")
        elif progress:
            tqdm.write(f"[bench] cold expert reads: {read_rate['read_gbytes_per_s']:.2f} GB/s "
                       f"({read_rate['bytes'] / 2**20:.0f} MiB, engine read path, page cache dropped)")
    # Rounds interleave the systems (A B C, A B C, ...) so that a slow spell of a shared machine does not
    # land on one system alone; each system is then represented by its median-speed run.
    attempts: dict[str, list[RunResult]] = {r.label: [] for r in runs}
    schedule = [(rep, run) for rep in range(settings.repeats) for run in runs]
    bar = tqdm(schedule, desc="systems", unit="run", disable=not progress)
    for rep, run in bar:
        tag = run.label if settings.repeats == 1 else f"{run.label} (round {rep + 1}/{settings.repeats})"
        bar.set_postfix_str(tag)
        if progress:
            tqdm.write(f"[bench] {tag}: loading, then decoding {settings.decode_tokens} tokens ...")
        res = run_system(run, settings, prompt, cap)
        attempts[run.label].append(res)
        if progress:
            tqdm.write(f"[bench] {tag}: {res.status}"
                       + (f", decode {res.decode_tok_s:.2f} tok/s" if res.decode_tok_s else "")
                       + (f" ({res.error.splitlines()[-1][:200]})" if res.error else ""))
    results = [median_run(attempts[r.label]) for r in runs]
    by_label = {r.label: r for r in results}
    rows = []
    first_ok = next((r for r in results if r.status == "ok"), None)
    for r in results:
        row = dataclasses.asdict(r)
        for baseline in BASELINES:
            ref = _reference_for(r, baseline, by_label, settings.ref_budget)
            row[f"vs_{baseline}"] = None if ref is None else {
                "run": ref.label,
                "decode_speedup": _ratio(r.decode_tok_s, ref.decode_tok_s),
                "prefill_speedup": _ratio(r.prefill_tok_s, ref.prefill_tok_s),
                "peak_rss_ratio": _ratio(r.peak_rss_bytes, ref.peak_rss_bytes),
                "peak_memory_ratio": _ratio(r.peak_memory_bytes, ref.peak_memory_bytes),
                "peak_rss_generate_ratio": _ratio(r.peak_rss_generate_bytes, ref.peak_rss_generate_bytes),
                "disk_read_generate_ratio": _ratio(r.disk_read_generate_bytes, ref.disk_read_generate_bytes),
            }
        row["decode_profile"] = _decode_profile(r)
        row["rounds"] = [{"status": a.status, "decode_tok_s": a.decode_tok_s, "prefill_tok_s": a.prefill_tok_s,
                          "peak_memory_bytes": a.peak_memory_bytes} for a in attempts[r.label]]
        row["same_tokens_as_first_run"] = (None if first_ok is None or r.status != "ok"
                                           else r.tokens == first_ok.tokens)
        rows.append(row)
    import platform

    import torch
    import transformers

    return {
        "settings": dataclasses.asdict(settings),
        "model": {"path": str(Path(settings.model_path).resolve()), "name": settings.model_name,
                  "expert_bytes": sizes.expert_bytes, "non_expert_bytes": sizes.non_expert_bytes,
                  "expert_dtype": sizes.expert_dtype},
        "memory_cap": cap_info,
        "prompt_ids": prompt,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "cpus": os.cpu_count(),
                        "machine": platform.machine()},
        "results": rows,
        "read_rate": read_rate,
        "checks": _checks(by_label, settings.ref_budget, read_rate),
        "first_run_reference": None if first_ok is None else first_ok.label,
    }


# --------------------------------------------------------------------------------------------------
# Output: table and chart


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def format_table(report: dict) -> str:
    """A fixed-width table of every run's figures (MiB/GiB in binary units)."""
    mib, gib = 2**20, 2**30
    head = (f"{'system':<22}{'status':<11}{'prefill':>8}{'decode':>8}{'x acc':>7}{'x plain':>8}{'x cold':>7}"
            f"{'cap':>7}{'cg peak':>8}{'cg gen':>7}{'OOM':>4}{'peak RSS':>9}{'gen RSS':>8}{'pcache':>7}"
            f"{'read gen':>9}{'moved':>7}{'hits':>6}{'load':>6}")
    units = (f"{'':<22}{'':<11}{'tok/s':>8}{'tok/s':>8}{'':>7}{'':>8}{'':>7}{'MiB':>7}{'MiB':>8}{'MiB':>7}{'':>4}"
             f"{'MiB':>9}{'MiB':>8}{'MiB':>7}{'GiB':>9}{'GiB':>7}{'':>6}{'s':>6}")
    lines = [head, units, "-" * len(head)]
    for r in report["results"]:
        hit_rate = (r.get("engine_stats") or {}).get("hit_rate")
        speed = [(r.get(f"vs_{b}") or {}).get("decode_speedup") for b in BASELINES]
        cap = r.get("memory_cap_bytes") if r.get("memory_cap_enforced") else None
        oom = r.get("cgroup_oom_kills")
        lines.append(
            f"{r['label']:<22}{r['status']:<11}{_fmt(r['prefill_tok_s'], digits=1):>8}"
            f"{_fmt(r['decode_tok_s']):>8}{_fmt(speed[0]):>7}{_fmt(speed[1]):>8}{_fmt(speed[2]):>7}"
            f"{_fmt(cap, mib, 0) if cap else 'none':>7}{_fmt(r.get('cgroup_peak_bytes'), mib, 0):>8}"
            f"{_fmt(r.get('cgroup_peak_generate_bytes'), mib, 0):>7}{'-' if oom is None else oom:>4}"
            f"{_fmt(r['peak_rss_bytes'], mib, 0):>9}{_fmt(r['peak_rss_generate_bytes'], mib, 0):>8}"
            f"{_fmt(r['peak_page_cache_bytes'], mib, 0):>7}{_fmt(r['disk_read_generate_bytes'], gib):>9}"
            f"{_fmt(r['engine_bytes_moved'], gib):>7}{_fmt(hit_rate):>6}{_fmt(r['load_s'], digits=1):>6}"
        )
    profiles = [(r["label"], r["decode_profile"]) for r in report["results"] if r.get("decode_profile")]
    if profiles:
        lines.append("")
        lines.append(f"{'decode profile':<22}{'s/tok':>7}{'stall':>7}{'other':>7}{'stall%':>7}{'MiB/tok':>8}"
                     f"{'pref MiB':>9}{'miss/tok':>9}{'hits':>6}{'pref acc':>9}{'GB/s':>6}{'predict':>8}"
                     f"{'main cpu':>9}{'main rq':>8}{'io cpu':>7}")
        for label, p in profiles:
            lines.append(
                f"{label:<22}{p['decode_s_per_token']:>7.3f}{p['stall_s_per_token']:>7.3f}"
                f"{p['compute_s_per_token']:>7.3f}{100 * p['stall_share']:>6.0f}%"
                f"{p['bytes_moved_per_token'] / mib:>8.1f}{p['prefetch_bytes_per_token'] / mib:>9.1f}"
                f"{p['misses_per_token']:>9.1f}{_fmt(p['hit_rate']):>6}{_fmt(p['prefetch_accuracy']):>9}"
                f"{p['read_gbytes_per_s']:>6.2f}{_fmt(p.get('predict_s_per_token'), digits=3):>8}"
                f"{_fmt(p.get('main_cpu_s_per_token'), digits=3):>9}"
                f"{_fmt(p.get('main_runqueue_wait_s_per_token'), digits=3):>8}"
                f"{_fmt(p.get('other_threads_cpu_s_per_token'), digits=3):>7}")
        lines.append("decode profile (decode steps only, seconds per token): s/tok = stall (waiting on expert "
                     "reads) + other (compute, routing, prediction); MiB/tok moved, of which prefetched; pref "
                     "acc: share of prefetched experts then used; predict: predictor time; main cpu / main rq: "
                     "compute thread on a CPU / waiting for one; io cpu: CPU of the other threads (reads)")
    m = report["model"]
    lines.append("")
    lines.append(f"model {m['name']}: experts {m['expert_bytes'] / gib:.2f} GiB ({m['expert_dtype']}), "
                 f"other weights {m['non_expert_bytes'] / mib:.0f} MiB; prompt {report['settings']['prompt_tokens']}"
                 f" tokens, {report['settings']['decode_tokens']} decoded, batch 1, torch threads "
                 f"{report['settings']['threads'] or 'default'}"
                 + (f"; each system: its median run of {rounds} interleaved rounds"
                    if (rounds := report["settings"].get("repeats", 1)) > 1 else ""))
    cap_info = report.get("memory_cap") or {}
    if cap_info.get("mode") == "cgroup":
        allowance = cap_info["runtime_allowance"]["allowance_bytes"]
        lines.append(f"memory cap: {cap_info['backend']}; cap = non-expert + budget x expert bytes + runtime "
                     f"allowance {allowance / mib:.0f} MiB (page cache charged); accelerate_plain uncapped")
    else:
        lines.append("memory cap: none (accelerate's max_memory bounds its RSS only, not its page cache)")
    lines.append("x acc / x plain / x cold: decode speed over accelerate (capped) / accelerate_plain / "
                 "accelerate_cold at the same budget (else at "
                 f"{report['settings']['ref_budget']:g}); cap: kernel memory cap; cg peak / cg gen: the "
                 "cgroup's peak charge (RSS + page cache) over the run / while generating; OOM: kills at the "
                 "cap; gen RSS: peak RSS while generating; pcache: peak page cache held by the model's and "
                 "offload folder's files; read gen: bytes read from disk while generating; moved: engine's "
                 "expert bytes loaded; hits: engine's hit rate")
    for c in report["checks"]:
        extra = ""
        if "peak_memory_bytes" in c:
            extra = ", peak " + " vs ".join(f"{_fmt(v, mib, 0)} MiB" for v in c["peak_memory_bytes"].values())
        if c.get("ceiling"):
            ce = c["ceiling"]
            extra = (f"; ceiling for any prefetcher moving LRU's bytes {ce['speedup']:.2f}x: reads "
                     f"{ce['read_s_per_token']:.3f} s/tok at {ce['read_gbytes_per_s']:.2f} GB/s, compute "
                     f"{ce['resident_s_per_token']:.3f} s/tok with every expert resident")
        lines.append(f"{'PASS' if c['passed'] else 'FAIL'}: {c['name']} (measured {_fmt(c['decode_speedup'])}x"
                     f"{extra})")
    return "\n".join(lines)


def plot(report: dict, png_path: str | os.PathLike) -> Path:
    """Decode tok/s and peak RSS against budget (% of expert bytes), one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    style = {"lru": ("o", "C0"), "prefetch": ("s", "C1"), "ondemand": ("^", "C2"), "accelerate": ("D", "C3"),
             "accelerate_plain": ("P", "C5"), "accelerate_cold": ("v", "C4")}
    capped = (report.get("memory_cap") or {}).get("mode") == "cgroup"
    budgets: set[float] = set()
    for system in SYSTEMS:
        rows = sorted((r for r in report["results"] if r["system"] == system and r["status"] == "ok"),
                      key=lambda r: r["budget"])
        if not rows:
            continue
        marker, color = style[system]
        x = [100 * r["budget"] for r in rows]
        budgets.update(x)
        ax_speed.plot(x, [r["decode_tok_s"] for r in rows], marker=marker, color=color, label=system)
        ax_mem.plot(x, [(r["peak_memory_bytes"] or 0) / 2**20 for r in rows], marker=marker, color=color,
                    label=f"{system}: whole run")
        gen = [r["cgroup_peak_generate_bytes"] if capped else r["peak_rss_generate_bytes"] for r in rows]
        if None not in gen:
            ax_mem.plot(x, [g / 2**20 for g in gen], marker=marker, color=color, linestyle=":", alpha=0.6,
                        label=f"{system}: generation")
    caps = sorted({(100 * r["budget"], r["memory_cap_bytes"]) for r in report["results"]
                   if r.get("memory_cap_enforced") and r.get("memory_cap_bytes")})
    if caps:
        ax_mem.plot([c[0] for c in caps], [c[1] / 2**20 for c in caps], color="k", linestyle="--", linewidth=1,
                    marker="_", markersize=18, label="kernel memory cap")
    mem_title = "peak memory: cgroup charge, RSS + page cache" if capped else "peak RSS"
    for ax, title, ylabel in ((ax_speed, "decode speed (higher is better)", "tokens / s"),
                              (ax_mem, f"{mem_title} (lower is better)", "MiB")):
        ax.set_xlabel("expert budget (% of expert bytes)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xticks(sorted(budgets), [f"{b:g}" for b in sorted(budgets)])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 if ax is ax_speed else 2)
    m = report["model"]
    fig.suptitle(f"{m['name']}: {m['expert_bytes'] / 2**30:.2f} GiB of experts, batch 1, "
                 f"{report['settings']['decode_tokens']} decoded tokens, cold page cache, "
                 + ("kernel memory cap (cgroup) on all but accelerate_plain" if capped else "no kernel memory cap")
                 + (f"\neach system: its median run of {rounds} interleaved rounds"
                    if (rounds := report["settings"].get("repeats", 1)) > 1 else ""))
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(report: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``bench_<model>.json`` and ``bench_<model>.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", report["model"]["name"])
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return json_path, plot(report, out / f"{stem}.png")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker(json.loads(sys.argv[2]), sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--calibrate":
        _calibrate_child(sys.argv[2], int(sys.argv[3]))
    else:
        print("usage: moe-engine bench --help  (this module's own entry point is for the benchmark's children)",
              file=sys.stderr)
        sys.exit(2)
