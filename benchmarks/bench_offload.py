"""Offloading benchmark: the engine at several expert budgets against the baselines a user would try.

Systems (each run in its own subprocess, on the same prompt, page cache dropped first):

* ``lru``        ``moe_engine.from_pretrained(path, budget=f, policy="lru", device="cpu", predictor=None)``
* ``prefetch``   the same with ``predictor="cross_layer_gate"`` (asynchronous prefetch of the next layer)
* ``ondemand``   ``policy="none"``: every expert is read from disk when needed, nothing is kept
* ``accelerate`` ``AutoModelForCausalLM.from_pretrained(path, device_map="auto",
  max_memory={"cpu": cap}, offload_folder=...)`` with ``cap = non-expert bytes + f * expert bytes``.
  Its offloaded weights are read through the OS page cache, which keeps them between forward passes
  when RAM is free: the cap bounds its RSS, not the memory it really uses.
* ``accelerate_cold`` the same, with the page cache of the model's and offload folder's files dropped
  before every forward pass: accelerate on a machine whose RAM really is the cap.

Figures per run: prefill tok/s (prompt tokens / time to the first new token), decode tok/s (new
tokens after the first / their time), peak RSS (``VmHWM`` of the child for the whole run, and for the
generation alone after resetting it through ``/proc/self/clear_refs``), bytes read from the block
device (``read_bytes`` of ``/proc/self/io``) during loading and during generation, the engine's own
``bytes_moved`` and counters, and the page cache held by the checkpoint's and offload folder's files
(peak, sampled every few seconds, and after the run).

Cold start, for every system alike: the parent drops the checkpoint's pages from the page cache before
starting the child, and the child drops the checkpoint's (and accelerate's offload folder's) pages
again after loading, so generation starts with nothing cached but what the system holds itself.

A *budget* ``f`` is a fraction of all expert bytes. A *system label* is ``name@f`` (``lru@0.25``).

Example::

    from benchmarks.bench_offload import BenchSettings, run_benchmark, format_table
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

SYSTEMS = ("lru", "prefetch", "ondemand", "accelerate", "accelerate_cold")
BASELINES = ("accelerate", "accelerate_cold")
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
                                "ondemand@0.25", "accelerate@0.25", "accelerate_cold@0.25")
    ref_budget: float = DEFAULT_REF_BUDGET
    prompt_tokens: int = 64
    decode_tokens: int = 32
    seed: int = 0
    timeout_s: float = 900.0
    threads: int | None = None
    offload_root: str | None = None  # where accelerate's offload folders go (default: beside the model)

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.decode_tokens < 1:
            raise ValueError("prompt and decode token counts must be at least 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout must be positive")
        for label in self.systems:
            name, _, budget = label.partition("@")
            SystemRun(name, float(budget))  # validates


@dataclass
class RunResult:
    """Figures of one system run; ``status`` is ``ok``, ``timed_out`` or ``failed``."""

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
    memory_cap_bytes: int | None = None  # accelerate's max_memory["cpu"]
    device_map_summary: dict | None = None
    engine_stats: dict | None = None
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

    def __init__(self, emit, start: float, total: int) -> None:
        from tqdm.auto import tqdm

        self.emit, self.start, self.prompt_seen = emit, start, False
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
        emit({"event": "placement", "memory_cap_bytes": cap, "device_map_summary": placement})
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
    emit({"event": "loaded", "load_s": load_s, "peak_rss_load": peak_load,
          "disk_read_load": io1["read_bytes"] - io0["read_bytes"],
          "disk_write_load": io1["write_bytes"] - io0["write_bytes"]})

    input_ids = torch.tensor([spec["prompt_ids"]], dtype=torch.long)
    n = spec["decode_tokens"]
    io2 = _proc_io()
    start = time.perf_counter()
    clock = _TokenClock(emit, start, n)
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, streamer=clock, pad_token_id=0)
    io3 = _proc_io()
    status = _proc_status()
    done = {"event": "done", "disk_read_generate": io3["read_bytes"] - io2["read_bytes"],
            "peak_rss_generate": status["VmHWM"] if reset else None,
            "peak_rss": max(peak_load, status["VmHWM"])}
    engine = getattr(model, "engine", None)
    if engine is not None:
        stats = _scalar_stats(engine.stats())
        done["engine_stats"] = stats
        done["engine_bytes_moved"] = stats.get("bytes_moved")
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
            result.memory_cap_bytes = ev["memory_cap_bytes"]
            result.device_map_summary = ev["device_map_summary"]
        elif kind == "loaded":
            result.load_s = ev["load_s"]
            result.peak_rss_load_bytes = ev["peak_rss_load"]
            result.peak_rss_bytes = ev["peak_rss_load"]
            result.disk_read_load_bytes = ev["disk_read_load"]
            result.disk_write_load_bytes = ev["disk_write_load"]
        elif kind == "token":
            result.token_times_s.append(ev["t"])
            result.tokens.append(ev["token"])
        elif kind == "done":
            result.disk_read_generate_bytes = ev["disk_read_generate"]
            result.peak_rss_generate_bytes = ev["peak_rss_generate"]
            result.peak_rss_bytes = ev["peak_rss"]
            result.engine_stats = ev.get("engine_stats")
            result.engine_bytes_moved = ev.get("engine_bytes_moved")
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


def run_system(run: SystemRun, settings: BenchSettings, prompt: list[int]) -> RunResult:
    """Run one system in a fresh subprocess (page cache dropped first); never raises for its failures."""
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
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "benchmarks.bench_offload", "--worker", json.dumps(spec), str(events_path)]
        t0 = time.perf_counter()
        peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        cache_peak, next_cache_sample = 0, 0.0
        with open(log_path, "w") as log:
            # stderr is shown live (progress bars); stdout of libraries goes to the log.
            proc = subprocess.Popen(cmd, stdout=log, stderr=None, env=env, start_new_session=True)
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
        result.wall_s = time.perf_counter() - t0
        events = _events(events_path)
        _fold(result, events, len(prompt))
        result.peak_rss_sampled_bytes = peaks["VmRSS"] or None
        result.peak_rss_anon_sampled_bytes = peaks["RssAnon"] or None
        result.peak_rss_file_sampled_bytes = peaks["RssFile"] or None
        result.page_cache_after_bytes = page_cache_bytes([model_path, offload_dir])
        result.peak_page_cache_bytes = max(cache_peak, result.page_cache_after_bytes or 0) or None
        if result.status != "timed_out":
            if proc.returncode == 0 and any(ev["event"] == "done" for ev in events):
                result.status = "ok"
            elif result.error is None:
                tail = log_path.read_text()[-1500:] if log_path.exists() else ""
                result.error = f"exit code {proc.returncode}: {tail.strip()}"
    return result


# --------------------------------------------------------------------------------------------------
# The whole benchmark


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


def _checks(by_label: dict[str, RunResult], ref_budget: float) -> list[dict]:
    """The issues' acceptance bars, evaluated on this run's figures."""
    b = f"{ref_budget:g}"
    lru, pre = by_label.get(f"lru@{b}"), by_label.get(f"prefetch@{b}")
    checks = []

    def ok(r: RunResult | None) -> bool:
        return r is not None and r.status == "ok"

    for baseline in BASELINES:
        acc = by_label.get(f"{baseline}@{b}")
        if lru is None or acc is None:
            continue
        speedup = _ratio(lru.decode_tok_s, acc.decode_tok_s) if ok(lru) and ok(acc) else None
        rss = (lru.peak_rss_bytes, acc.peak_rss_bytes)
        rss_ok = rss[0] is not None and rss[1] is not None and rss[0] <= rss[1]
        checks.append({
            "name": f"lru@{b} decode >= {BAR_ENGINE_VS_ACCELERATE:g}x {baseline}@{b} at no more peak RSS",
            "decode_speedup": speedup,
            "peak_rss_bytes": {"lru": rss[0], baseline: rss[1]},
            "passed": bool(speedup is not None and speedup >= BAR_ENGINE_VS_ACCELERATE and rss_ok),
        })
    if lru is not None and pre is not None:
        speedup = _ratio(pre.decode_tok_s, lru.decode_tok_s) if ok(lru) and ok(pre) else None
        checks.append({
            "name": f"prefetch@{b} decode >= {BAR_PREFETCH_VS_LRU:g}x lru@{b}",
            "decode_speedup": speedup,
            "passed": bool(speedup is not None and speedup >= BAR_PREFETCH_VS_LRU),
        })
    return checks


def run_benchmark(settings: BenchSettings, *, progress: bool = True) -> dict:
    """Run every system of ``settings`` one after the other; return the report (JSON-ready dict)."""
    from tqdm.auto import tqdm

    sizes = checkpoint_bytes(settings.model_path)
    prompt = prompt_ids(settings.model_path, settings.prompt_tokens, settings.seed)
    runs = [SystemRun(name, float(budget)) for name, _, budget in (s.partition("@") for s in settings.systems)]
    results: list[RunResult] = []
    bar = tqdm(runs, desc="systems", unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.label)
        if progress:
            tqdm.write(f"[bench] {run.label}: loading, then decoding {settings.decode_tokens} tokens ...")
        res = run_system(run, settings, prompt)
        results.append(res)
        if progress:
            tqdm.write(f"[bench] {run.label}: {res.status}"
                       + (f", decode {res.decode_tok_s:.2f} tok/s" if res.decode_tok_s else "")
                       + (f" ({res.error.splitlines()[-1][:200]})" if res.error else ""))
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
                "peak_rss_generate_ratio": _ratio(r.peak_rss_generate_bytes, ref.peak_rss_generate_bytes),
                "disk_read_generate_ratio": _ratio(r.disk_read_generate_bytes, ref.disk_read_generate_bytes),
            }
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
        "prompt_ids": prompt,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "cpus": os.cpu_count(),
                        "machine": platform.machine()},
        "results": rows,
        "checks": _checks(by_label, settings.ref_budget),
        "first_run_reference": None if first_ok is None else first_ok.label,
    }


# --------------------------------------------------------------------------------------------------
# Output: table and chart


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def format_table(report: dict) -> str:
    """A fixed-width table of every run's figures (MiB/GiB in binary units)."""
    mib, gib = 2**20, 2**30
    head = (f"{'system':<22}{'status':<10}{'prefill':>8}{'decode':>8}{'x acc':>7}{'x cold':>7}{'peak RSS':>9}"
            f"{'gen RSS':>8}{'pcache':>8}{'read gen':>9}{'moved':>7}{'hits':>6}{'load':>6}")
    units = (f"{'':<22}{'':<10}{'tok/s':>8}{'tok/s':>8}{'':>7}{'':>7}{'MiB':>9}{'MiB':>8}{'MiB':>8}{'GiB':>9}"
             f"{'GiB':>7}{'':>6}{'s':>6}")
    lines = [head, units, "-" * len(head)]
    for r in report["results"]:
        hit_rate = (r.get("engine_stats") or {}).get("hit_rate")
        speed = [(r.get(f"vs_{b}") or {}).get("decode_speedup") for b in BASELINES]
        lines.append(
            f"{r['label']:<22}{r['status']:<10}{_fmt(r['prefill_tok_s'], digits=1):>8}"
            f"{_fmt(r['decode_tok_s']):>8}{_fmt(speed[0]):>7}{_fmt(speed[1]):>7}"
            f"{_fmt(r['peak_rss_bytes'], mib, 0):>9}{_fmt(r['peak_rss_generate_bytes'], mib, 0):>8}"
            f"{_fmt(r['peak_page_cache_bytes'], mib, 0):>8}{_fmt(r['disk_read_generate_bytes'], gib):>9}"
            f"{_fmt(r['engine_bytes_moved'], gib):>7}{_fmt(hit_rate):>6}{_fmt(r['load_s'], digits=1):>6}"
        )
    m = report["model"]
    lines.append("")
    lines.append(f"model {m['name']}: experts {m['expert_bytes'] / gib:.2f} GiB ({m['expert_dtype']}), "
                 f"other weights {m['non_expert_bytes'] / mib:.0f} MiB; prompt {report['settings']['prompt_tokens']}"
                 f" tokens, {report['settings']['decode_tokens']} decoded, batch 1, torch threads "
                 f"{report['settings']['threads'] or 'default'}")
    lines.append("x acc / x cold: decode speed over accelerate / accelerate_cold at the same budget (else at "
                 f"{report['settings']['ref_budget']:g}); gen RSS: peak RSS while generating; pcache: peak "
                 "page cache held by the model's and offload folder's files; read gen: bytes read from disk "
                 "while generating; moved: engine's expert bytes loaded; hits: engine's hit rate")
    for c in report["checks"]:
        lines.append(f"{'PASS' if c['passed'] else 'FAIL'}: {c['name']} (measured {_fmt(c['decode_speedup'])}x)")
    return "\n".join(lines)


def plot(report: dict, png_path: str | os.PathLike) -> Path:
    """Decode tok/s and peak RSS against budget (% of expert bytes), one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    style = {"lru": ("o", "C0"), "prefetch": ("s", "C1"), "ondemand": ("^", "C2"), "accelerate": ("D", "C3"),
             "accelerate_cold": ("v", "C4")}
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
        ax_mem.plot(x, [r["peak_rss_bytes"] / 2**20 for r in rows], marker=marker, color=color,
                    label=f"{system}: whole run")
        gen = [r["peak_rss_generate_bytes"] for r in rows]
        if None not in gen:
            ax_mem.plot(x, [g / 2**20 for g in gen], marker=marker, color=color, linestyle=":", alpha=0.6,
                        label=f"{system}: generation")
    for ax, title, ylabel in ((ax_speed, "decode speed (higher is better)", "tokens / s"),
                              (ax_mem, "peak RSS (lower is better)", "MiB")):
        ax.set_xlabel("expert budget (% of expert bytes)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xticks(sorted(budgets), [f"{b:g}" for b in sorted(budgets)])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = report["model"]
    fig.suptitle(f"{m['name']}: {m['expert_bytes'] / 2**30:.2f} GiB of experts, batch 1, "
                 f"{report['settings']['decode_tokens']} decoded tokens, cold page cache")
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
    else:
        print("usage: moe-engine bench --help  (this module's own entry point is for the benchmark's children)",
              file=sys.stderr)
        sys.exit(2)
