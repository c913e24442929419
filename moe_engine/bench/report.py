"""Output of ``moe-engine bench``: the printed table, the chart and the files written.

Owns: ``format_table`` (a fixed-width table of every run's figures, the decode profile, the memory-cap
line, the checks), ``plot`` (decode tok/s and peak memory against budget; needs matplotlib, the
``bench`` extra) and ``write_report`` (``bench_<model>.json``, and ``bench_<model>.png`` when matplotlib
is installed). Reads only the report dict ``run_benchmark`` returns (or one loaded from its JSON).

Example::

    json_path, png_path = write_report(report, "~/.cache/moe-engine/bench")   # png_path: None without matplotlib
    print(format_table(report))
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from moe_engine.bench.settings import BASELINES, SYSTEMS

# Where ``moe-engine bench`` writes by default: outside any checkout, so a run in the repository never
# overwrites the committed ``benchmarks/results/`` (pass ``--out benchmarks/results`` to update those).
DEFAULT_RESULTS_DIR = Path("~/.cache/moe-engine/bench")


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
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
                f"{p['bytes_moved_per_token'] / mib:>8.1f}{_fmt(p['prefetch_bytes_per_token'], mib, 1):>9}"
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
    style = {"lru": ("o", "C0"), "prefetch": ("s", "C1"), "default": ("*", "C6"), "ondemand": ("^", "C2"),
             "int8": ("x", "C7"), "int4": ("X", "C8"), "fast": ("h", "C9"), "accelerate": ("D", "C3"),
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


def write_report(report: dict, out_dir: str | os.PathLike) -> tuple[Path, Path | None]:
    """Write ``bench_<model>.json`` and ``bench_<model>.png`` into ``out_dir``. Without matplotlib (the
    ``bench`` extra) the JSON is written all the same, the chart is skipped with a one-line note on
    stderr and the PNG path returned is None."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", report["model"]["name"])
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib  # noqa: F401  (only to know whether the chart can be drawn)
    except ImportError:
        print("note: matplotlib is not installed, so no chart was drawn (pip install 'moe-engine[bench]'); "
              "the table and the JSON are complete", file=sys.stderr)
        return json_path, None
    return json_path, plot(report, out / f"{stem}.png")
