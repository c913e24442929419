"""Probes of ``moe-engine bench``: facts about the checkpoint and the machine, read without side effects
on what is measured.

Owns: the checkpoint's expert / non-expert byte split (``checkpoint_bytes``, from the headers the
engine's own store reads and validates: ``CheckpointStore.open``), the cold read rate of whole experts
through the engine's read path (``measure_read_rate``), the fixed prompt (``prompt_ids``), the OS page
cache of a set of files (``drop_page_cache``, ``page_cache_bytes``), Linux ``/proc`` readers (memory
``proc_status``, I/O ``proc_io``, peak-RSS reset ``reset_peak_rss``, per-thread scheduling
``thread_sched`` / ``sched_delta``) and the token clock streamer that timestamps each generated token.

Glossary: *expert bytes* are the stored bytes of every routed expert's tensors (names with
``.experts.N.`` or a fused ``.experts.gate_up_proj`` ...); *non-expert bytes* are everything else.

Example::

    sizes = checkpoint_bytes("ckpt/")              # CheckpointBytes(expert_bytes=..., ...)
    rate = measure_read_rate("ckpt/", threads=2)   # {"read_gbytes_per_s": ..., "bytes": ..., ...}
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_EXPERT_TENSOR = re.compile(r"\.experts\.(\d+\.|gate_up_proj|down_proj|gate_proj|up_proj)")


# --------------------------------------------------------------------------------------------------
# Checkpoint facts


@dataclass(frozen=True)
class CheckpointBytes:
    """A checkpoint's stored bytes: routed experts vs everything else."""

    expert_bytes: int  # all routed experts, as stored
    non_expert_bytes: int  # everything else (embeddings, attention, norms, routers, shared experts)
    expert_dtype: str  # safetensors dtype of the expert tensors, e.g. "BF16"


def checkpoint_bytes(path: str | os.PathLike) -> CheckpointBytes:
    """Split a checkpoint's stored bytes into routed experts and the rest, from the file headers as the
    engine's store reads and validates them (an FP8 tensor's block scales count with the tensor)."""
    from moe_engine.runtime.store import _DTYPES, CheckpointStore

    store = CheckpointStore.open(path)  # CheckpointError (a ValueError) names a bad file and the fix
    try:
        tensors = dict(store.tensors)
    finally:
        store.close()
    names = {dtype: name for name, dtype in _DTYPES.items()}  # torch dtype -> safetensors dtype ("BF16")
    expert = other = 0
    dtypes: set[str] = set()
    for name, loc in tensors.items():
        nbytes = loc.nbytes + (loc.scale.loc.nbytes if loc.scale is not None else 0)
        if _EXPERT_TENSOR.search(name):
            expert += nbytes
            dtypes.add(names.get(loc.dtype, str(loc.dtype)))
        else:
            other += nbytes
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
# Page cache, memory, I/O and scheduling counters (Linux)


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


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` ... of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


def proc_io() -> dict[str, int]:
    """This process's I/O counters (``read_bytes``: bytes read from the block device, ...)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so a phase's peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def thread_sched() -> dict[int, tuple[int, int]]:
    """Per thread of this process: (ns on a CPU, ns waiting on a run queue), from ``schedstat``."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            cpu, wait, _ = (task / "schedstat").read_text().split()
            out[int(task.name)] = (int(cpu), int(wait))
        except (OSError, ValueError):
            pass
    return out


def sched_delta(first: dict[int, tuple[int, int]], last: dict[int, tuple[int, int]]) -> dict:
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


# --------------------------------------------------------------------------------------------------
# Token clock


class TokenClock:
    """A ``generate()`` streamer that timestamps each new token and reports it to the parent."""

    def __init__(self, emit: Callable[[dict], None], start: float, total: int,
                 on_first: Callable[[], None] | None = None) -> None:
        from tqdm.auto import tqdm

        self.emit, self.start, self.prompt_seen, self.on_first = emit, start, False, on_first
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.bar = tqdm(total=total, desc="  decoding", unit="tok", leave=False)

    def put(self, value: Any) -> None:
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
