"""The parent side of ``moe-engine bench``: run every system in its own child process and build the report.

Owns: running one system (``run_system``: page cache dropped first, a fresh memory cgroup when capped,
``python -m moe_engine.bench.worker`` as a subprocess with a timeout, RSS and page cache sampled
meanwhile, the child's events folded into a ``RunResult``), the memory-cap plan (``memory_cap_plan``:
limit = non-expert bytes + budget x expert bytes + a runtime allowance measured once by
``measure_runtime_allowance``), and the whole benchmark (``run_benchmark``: read-rate probe, systems in
interleaved rounds, each reported by its median run, ratios against the baselines, the checks).

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
fresh memory cgroup (``moe_engine.bench.memory_cap``) whose limit is the same for every system at a
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
(best of three) and the prefetch check reports the most any prefetcher moving LRU's bytes could gain
(``moe_engine.bench.checks.prefetch_ceiling``).

Example::

    from moe_engine.bench import BenchSettings, format_table, run_benchmark
    report = run_benchmark(BenchSettings(model_path="ckpt/", systems=("lru@0.25", "accelerate@0.25")))
    print(format_table(report))
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_engine.bench.checkpoint import QUANTIZED_SYSTEMS, CheckpointSpec, ensure_checkpoint, ensure_quantized
from moe_engine.bench.checks import acceptance_checks, decode_profile, median_run, ratio, reference_for
from moe_engine.bench.memory_cap import CgroupBackend, detect_backend
from moe_engine.bench.probes import (
    CheckpointBytes,
    checkpoint_bytes,
    drop_page_cache,
    measure_read_rate,
    page_cache_bytes,
    proc_status,
    prompt_ids,
)
from moe_engine.bench.settings import BASELINES, QUANTIZED, UNCAPPED, BenchSettings, RunResult, SystemRun

# The folder holding the ``moe_engine`` package, put on the children's PYTHONPATH.
_REPO_ROOT = Path(__file__).resolve().parents[2]


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


def measure_runtime_allowance(backend: CgroupBackend | None, threads: int | None, work_dir: Path) -> dict:
    """Peak memory of a child that imports torch, transformers, accelerate and moe_engine and runs a tiny
    model's forward pass and a 2-token ``generate()``: the memory every run needs besides its weights.
    The allowance is the larger of the child's peak RSS and its cgroup's peak charge."""
    with tempfile.TemporaryDirectory(prefix=".bench-allowance-", dir=work_dir) as tmp:
        path = ensure_checkpoint(Path(tmp) / "tiny", ALLOWANCE_SPEC, progress=False)
        cmd = [sys.executable, "-m", "moe_engine.bench.worker", "--calibrate", str(path), str(threads or 0)]
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
        cmd = [sys.executable, "-m", "moe_engine.bench.worker", "--worker", json.dumps(spec), str(events_path)]
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
                        status = proc_status(proc.pid)
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
    for system in dict.fromkeys(r.system for r in runs if r.system in QUANTIZED):
        if progress:
            print(f"[bench] {system}: quantizing a copy of the checkpoint (once; cached) ...", file=sys.stderr)
        ensure_quantized(settings.model_path, QUANTIZED_SYSTEMS[system], progress=progress)
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
            ref = reference_for(r, baseline, by_label, settings.ref_budget)
            row[f"vs_{baseline}"] = None if ref is None else {
                "run": ref.label,
                "decode_speedup": ratio(r.decode_tok_s, ref.decode_tok_s),
                "prefill_speedup": ratio(r.prefill_tok_s, ref.prefill_tok_s),
                "peak_rss_ratio": ratio(r.peak_rss_bytes, ref.peak_rss_bytes),
                "peak_memory_ratio": ratio(r.peak_memory_bytes, ref.peak_memory_bytes),
                "peak_rss_generate_ratio": ratio(r.peak_rss_generate_bytes, ref.peak_rss_generate_bytes),
                "disk_read_generate_ratio": ratio(r.disk_read_generate_bytes, ref.disk_read_generate_bytes),
            }
        row["decode_profile"] = decode_profile(r)
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
        "checks": acceptance_checks(by_label, settings.ref_budget, read_rate),
        "first_run_reference": None if first_ok is None else first_ok.label,
    }
