"""Comparisons of ``moe-engine bench``: from measured runs to the figures the report states.

Owns: which run represents a system over repeated rounds (``median_run``), which baseline run a result
is compared with (``reference_for``), the acceptance checks against the issues' bars
(``acceptance_checks``), where an engine run's decode time went (``decode_profile``) and the most any
prefetcher could gain in this run (``prefetch_ceiling``). Pure functions over ``RunResult``s: no
processes, no I/O.

Prefetch ceiling: perfect prefetch overlaps every read with compute, so a token still takes at least
max(compute with every expert resident (``lru@1``), LRU's bytes per token / the cold read rate); the
ceiling is LRU's seconds per token over that floor.

Example::

    best = median_run([run_a, run_b, run_c])     # one real run, never an average
    checks = acceptance_checks({r.label: r for r in results}, ref_budget=0.25, read_rate=rate)
"""

from __future__ import annotations

from moe_engine.bench.settings import BAR_ENGINE_VS_ACCELERATE, BAR_PREFETCH_VS_LRU, BASELINES, RunResult


def median_run(attempts: list[RunResult]) -> RunResult:
    """The run of median decode speed among the successful ``attempts`` (the lower middle one for an
    even count), so every figure reported for a system comes from one real run; the last attempt when
    none succeeded."""
    ok = sorted((a for a in attempts if a.status == "ok" and a.decode_tok_s), key=lambda a: a.decode_tok_s or 0.0)
    return ok[(len(ok) - 1) // 2] if ok else attempts[-1]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def reference_for(result: RunResult, baseline: str, by_label: dict[str, RunResult],
                   ref_budget: float) -> RunResult | None:
    """The ``baseline`` run a result is compared with: same budget, else the reference budget."""
    for label in (f"{baseline}@{result.budget:g}", f"{baseline}@{ref_budget:g}"):
        ref = by_label.get(label)
        if ref is not None and ref.status == "ok":
            return ref
    return None


def acceptance_checks(by_label: dict[str, RunResult], ref_budget: float, read_rate: dict | None = None) -> list[dict]:
    """The issues' acceptance bars, evaluated on this run's figures."""
    b = f"{ref_budget:g}"
    lru, pre, default = by_label.get(f"lru@{b}"), by_label.get(f"prefetch@{b}"), by_label.get(f"default@{b}")
    checks = []

    def ok(r: RunResult | None) -> bool:
        return r is not None and r.status == "ok"

    # The engine as configured by hand (lru: cache, no prediction; prefetch: LRU + the cross-layer gate)
    # and as it ships (default: from_pretrained's default policy and predictor), each against every baseline.
    for engine_name, engine in (("lru", lru), ("prefetch", pre), ("default", default)):
        for baseline in BASELINES:
            acc = by_label.get(f"{baseline}@{b}")
            if engine is None or acc is None:
                continue
            speedup = ratio(engine.decode_tok_s, acc.decode_tok_s) if ok(engine) and ok(acc) else None
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
        speedup = ratio(pre.decode_tok_s, lru.decode_tok_s) if ok(lru) and ok(pre) else None
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
    prof = decode_profile(lru) if lru.status == "ok" else None
    rate = (read_rate or {}).get("read_gbytes_per_s")
    if prof is None or resident is None or resident.status != "ok" or not resident.decode_s or not rate:
        return None
    compute = resident.decode_s / max(resident.new_tokens - 1, 1)  # decode steps after the first token
    reads = prof["bytes_moved_per_token"] / (rate * 1e9)
    floor = max(compute, reads)
    return {"speedup": prof["decode_s_per_token"] / floor, "lru_s_per_token": prof["decode_s_per_token"],
            "resident_s_per_token": compute, "read_s_per_token": reads, "read_gbytes_per_s": rate}


def decode_profile(r: RunResult) -> dict | None:
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
        # prefetch_bytes and wasted_prefetches are optional counters (None when the engine has none)
        "prefetch_bytes_per_token": None if d.get("prefetch_bytes") is None else d["prefetch_bytes"] / steps,
        "misses_per_token": d["misses"] / steps,
        "hit_rate": d["hit_rate"],
        "prefetches": d["prefetches"],
        "prefetch_accuracy": d["prefetch_accuracy"],
        "wasted_prefetches": d.get("wasted_prefetches"),
        # decode-time read rate the engine saw (bytes moved / decode time)
        "read_gbytes_per_s": d["bytes_moved"] / r.decode_s / 1e9,
    }
