"""``moe-engine bench`` on a tiny generated checkpoint: the generator, every system, the outputs."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

import pytest

from moe_engine.bench.checkpoint import CheckpointSpec, ensure_checkpoint
from moe_engine.bench.checks import decode_profile, median_run, prefetch_ceiling
from moe_engine.bench.probes import checkpoint_bytes, measure_read_rate
from moe_engine.bench.runner import run_benchmark
from moe_engine.bench.settings import BenchSettings, RunResult, parse_systems
from moe_engine.bench.worker import STATS_FIELDS, _decode_delta, _scalar_stats
from moe_engine.cli import main

TINY = CheckpointSpec(num_layers=2, num_experts=4, hidden_size=64, intermediate_size=128, num_heads=4,
                      num_kv_heads=2, vocab_size=256)


@pytest.fixture(scope="module")
def tiny_bench_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", TINY, progress=False)


def test_generated_checkpoint_is_a_complete_mixtral(tiny_bench_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_bench_checkpoint
    # Written atomically: nothing but the final folder (and its lock file) is left beside it.
    assert sorted(p.name for p in path.parent.iterdir()) == [".tiny.lock", "tiny"]
    assert (path / "model.safetensors.index.json").is_file()
    assert checkpoint_bytes(path).expert_bytes == TINY.total_expert_bytes
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.num_local_experts == 4
    # Cached: asking again for the same spec does not rewrite it.
    mtime = (path / "config.json").stat().st_mtime_ns
    assert ensure_checkpoint(path, TINY, progress=False) == path
    assert (path / "config.json").stat().st_mtime_ns == mtime


def test_bench_cli_end_to_end(tiny_bench_checkpoint: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from moe_engine.predictors import available_predictors

    # The prefetching system needs the cross-layer-gate predictor (predictors/gate.py). Each system is a
    # subprocess importing torch and transformers; to keep this test short, "ondemand" (which differs
    # from "lru" by its policy name only) and "accelerate" (which differs from "accelerate_cold" by the
    # page-cache hook only) are left out.
    # Runs under the default memory cap: cgroup where this machine allows it (see the assertions below).
    with_prefetch = "cross_layer_gate" in available_predictors()
    systems = "lru@0.25," + ("prefetch@0.25," if with_prefetch else "") + "accelerate_cold@0.25"
    rc = main(["bench", "--model", str(tiny_bench_checkpoint), "--systems", systems, "--decode-tokens", "2",
               "--prompt-tokens", "8", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert (tmp_path / "bench_tiny.png").stat().st_size > 0
    results = {r["label"]: r for r in report["results"]}
    assert list(results) == systems.split(",")
    for r in results.values():
        assert r["status"] == "ok", r["error"]
        assert r["new_tokens"] == 2 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["peak_rss_bytes"] > 0 and r["disk_read_generate_bytes"] is not None
        assert r["vs_accelerate"] is None and r["vs_accelerate_cold"]["run"] == "accelerate_cold@0.25"
    for label in [k for k in results if not k.startswith("accelerate")]:
        stats = results[label]["engine_stats"]
        assert stats["bytes_moved"] > 0 and 0 < stats["peak_resident_bytes"] <= 0.25 * report["model"]["expert_bytes"]
        # Prefetch and caching change timing only, never the tokens.
        assert results[label]["tokens"] == results["lru@0.25"]["tokens"]
    assert results["accelerate_cold@0.25"]["max_memory_bytes"] > 0
    if report["memory_cap"]["mode"] == "cgroup":  # the default where cgroups can be used (root, Linux)
        allowance = report["memory_cap"]["runtime_allowance"]["allowance_bytes"]
        sizes = report["model"]
        for r in results.values():
            assert r["memory_cap_enforced"] and r["cgroup_oom_kills"] == 0
            # The same cap for every system at a budget (v1 rounds it down to whole pages).
            expected = sizes["non_expert_bytes"] + int(0.25 * sizes["expert_bytes"]) + allowance
            assert expected - 4096 < r["memory_cap_bytes"] <= expected
            assert 0 < r["cgroup_peak_generate_bytes"] <= r["cgroup_peak_bytes"] <= r["memory_cap_bytes"]
            assert r["peak_memory_bytes"] == r["cgroup_peak_bytes"]
    checked = [c["name"] for c in report["checks"]]
    # lru vs accelerate_cold; with prefetch also prefetch vs accelerate_cold and prefetch vs lru.
    assert len(checked) == 1 + 2 * with_prefetch and "accelerate_cold@0.25" in checked[0]
    if with_prefetch:
        assert checked[1].startswith("prefetch@0.25") and "accelerate_cold@0.25" in checked[1]
        # No lru@1 run here, so no ceiling for prefetching; the read rate was measured all the same.
        assert checked[2].startswith("prefetch@0.25 decode >=") and report["checks"][2]["ceiling"] is None
        assert report["read_rate"]["read_gbytes_per_s"] > 0
    out = capsys.readouterr().out
    assert "accelerate_cold@0.25" in out and "decode" in out


def test_bench_quantized_system_and_ep(tiny_bench_checkpoint: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # int4: the engine on a quantized copy (written once, here under tmp_path), same memory cap as the others.
    monkeypatch.setenv("MOE_ENGINE_QUANTIZED_DIR", str(tmp_path / "quantized"))
    rc = main(["bench", "--model", str(tiny_bench_checkpoint), "--systems", "default@0.25,int4@0.25,fast@0.25",
               "--decode-tokens", "2", "--prompt-tokens", "8", "--threads", "1", "--memory-cap", "none",
               "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    results = {r["label"]: r for r in report["results"]}
    assert results["int4@0.25"]["status"] == "ok", results["int4@0.25"]["error"]
    assert list((tmp_path / "quantized").iterdir())  # the copy went where it was told, not into the repo
    q, d = results["int4@0.25"]["engine_stats"], results["default@0.25"]["engine_stats"]
    assert 0 < q["peak_resident_bytes"] <= 0.25 * report["model"]["expert_bytes"]
    assert q["bytes_moved"] < d["bytes_moved"]  # the same accesses move fewer bytes at 4.5 bits
    # fast: stored precision plus an int4 copy per expert, quality="fast": every miss loads the copy.
    f = results["fast@0.25"]["engine_stats"]
    assert results["fast@0.25"]["status"] == "ok", results["fast@0.25"]["error"]
    assert f["reduced_loads"] == f["misses"] + f["prefetches"] > 0
    assert 0 < f["peak_resident_bytes"] <= 0.25 * report["model"]["expert_bytes"]
    # --ep: the expert-parallel counters next to single-process, from real gloo ranks.
    assert main(["bench", "--model", str(tiny_bench_checkpoint), "--ep", "2", "--out", str(tmp_path)]) == 2
    assert "no usable tokenizer" in capsys.readouterr().err  # refused before any rank starts
    rc = main(["bench", "--ep", "2", "--ep-text", str(_text(tmp_path)), "--ep-tokens", "64", "--out", str(tmp_path)])
    assert rc == 0
    ep = json.loads((tmp_path / "bench_ep2_default.json").read_text())
    assert ep["world_size"] == 2 and ep["single_process_seconds"] > 0
    modes = {(r["mode"], r["regroup"]): r for r in ep["results"]}
    assert modes[("standard", False)]["a2a_calls_per_token"] == 2 * modes[("coherent", False)]["a2a_calls_per_token"]
    assert all(r["cross_device_share"] == pytest.approx(r["plan_eval_cross_device_share"]) for r in ep["results"])
    assert "coherent" in capsys.readouterr().out


def _text(tmp_path: Path) -> Path:
    p = tmp_path / "ep.txt"
    p.write_text(" ".join(f"word{i % 37}" for i in range(400)))
    return p


def test_a_run_past_its_timeout_is_reported_as_timed_out(tiny_bench_checkpoint: Path) -> None:
    settings = BenchSettings(model_path=str(tiny_bench_checkpoint), model_name="tiny", systems=("lru@0.5",),
                             decode_tokens=2, prompt_tokens=4, timeout_s=0.3, threads=1)
    (result,) = run_benchmark(settings, progress=False)["results"]
    assert result["status"] == "timed_out" and "0 s" in result["error"]
    assert result["decode_tok_s"] is None


def test_a_run_killed_at_the_memory_cap_is_reported_as_such(tiny_bench_checkpoint: Path) -> None:
    from moe_engine.bench.memory_cap import detect_backend

    backend, why = detect_backend()
    if backend is None:
        pytest.skip(f"no memory cgroup here: {why}")
    # A 1 MiB runtime allowance: the child cannot even import torch under its cap.
    settings = BenchSettings(model_path=str(tiny_bench_checkpoint), model_name="tiny", systems=("lru@0.5",),
                             decode_tokens=2, prompt_tokens=4, threads=1, memory_cap="cgroup",
                             runtime_allowance_bytes=2**20)
    report = run_benchmark(settings, progress=False)
    (result,) = report["results"]
    assert result["status"] == "oom_killed", result["error"]
    assert result["cgroup_oom_kills"] >= 1 and result["memory_cap_enforced"]
    assert "killed by the kernel at the memory cap" in result["error"] and "while loading" in result["error"]
    assert report["memory_cap"]["runtime_allowance"]["how"] == "given in the settings"


def test_parse_systems() -> None:
    runs = parse_systems("lru,prefetch,accelerate@0.5", budgets=(0.125, 1.0), ref_budget=0.25)
    assert [r.label for r in runs] == ["lru@0.125", "lru@1", "prefetch@0.25", "accelerate@0.5"]
    with pytest.raises(ValueError, match="unknown system 'vllm'"):
        parse_systems("vllm", budgets=(0.25,), ref_budget=0.25)
    with pytest.raises(ValueError, match=r"budget must be a fraction of expert bytes in \(0, 1\]"):
        parse_systems("lru@2", budgets=(0.25,), ref_budget=0.25)


def test_bench_cli_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", str(tmp_path / "nowhere")]) == 2
    assert "no config.json there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--budgets", "0.25,half"])
    assert "expected comma-separated fractions" in capsys.readouterr().err


def test_cold_read_rate_reads_every_expert_once(tiny_bench_checkpoint: Path) -> None:
    rate = measure_read_rate(tiny_bench_checkpoint, threads=2)
    assert rate["bytes"] == TINY.total_expert_bytes and rate["experts"] == TINY.num_layers * TINY.num_experts
    assert rate["read_gbytes_per_s"] > 0
    capped = measure_read_rate(tiny_bench_checkpoint, max_bytes=1, threads=1)
    assert capped["experts"] == 1 and capped["bytes"] == TINY.expert_bytes


def _run(label: str, tok_s: float | None, status: str = "ok", **kw) -> RunResult:
    return RunResult(label=label, system=label.split("@")[0], budget=0.25, status=status, decode_tok_s=tok_s, **kw)


def test_median_run_picks_one_real_run() -> None:
    runs = [_run("lru@0.25", 3.0, wall_s=1.0), _run("lru@0.25", 1.0, wall_s=2.0), _run("lru@0.25", 2.0, wall_s=3.0)]
    assert median_run(runs).wall_s == 3.0
    assert median_run(runs[:2]).decode_tok_s == 1.0  # even count: the lower middle, not an average
    failed = [_run("lru@0.25", None, status="timed_out"), _run("lru@0.25", 2.0)]
    assert median_run(failed).decode_tok_s == 2.0
    assert median_run(failed[:1]).status == "timed_out"
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        BenchSettings(model_path="x", repeats=0)


def test_prefetch_ceiling_is_reads_or_compute_bound() -> None:
    # LRU: 1 s per token moving 1 GB per token; every expert resident: 0.1 s per token.
    lru = _run("lru@0.25", 1.0, decode_s=10.0, new_tokens=11,
               engine_decode_stats={"stall_seconds": 6.0, "bytes_moved": 10e9, "prefetch_bytes": 0, "misses": 10,
                                    "hit_rate": 0.2, "prefetches": 0, "prefetch_accuracy": None,
                                    "wasted_prefetches": 0})
    resident = _run("lru@1", 10.0, decode_s=1.0, new_tokens=11)
    io_bound = prefetch_ceiling(lru, resident, {"read_gbytes_per_s": 2.0})
    assert io_bound is not None and io_bound["read_s_per_token"] == pytest.approx(0.5)
    assert io_bound["speedup"] == pytest.approx(2.0)  # 1 s / max(0.1 s compute, 0.5 s reads)
    compute_bound = prefetch_ceiling(lru, resident, {"read_gbytes_per_s": 100.0})
    assert compute_bound is not None and compute_bound["speedup"] == pytest.approx(10.0)
    assert prefetch_ceiling(lru, None, {"read_gbytes_per_s": 2.0}) is None


def test_cli_and_bench_never_import_the_benchmarks_folder() -> None:
    # The CLI and its bench machinery must not depend on the top-level benchmarks/ folder (installed as
    # moe_engine.benchmarks): no import of it, and no "python -m moe_engine.benchmarks..." child either.
    import moe_engine

    root = Path(moe_engine.__file__).parent
    sources = sorted((root / "commands").glob("*.py")) + sorted((root / "bench").glob("*.py"))
    assert {p.name for p in sources} >= {"bench.py", "runner.py", "worker.py"}
    found = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [w for w in node.value.split() if w.startswith(("moe_engine.benchmarks", "benchmarks."))]
            if any(n in ("benchmarks", "moe_engine.benchmarks") or n.startswith(("benchmarks.", "moe_engine.benchmarks."))
                   for n in names):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, f"these lines use the benchmarks/ folder: {found}"


def test_bench_without_matplotlib_prints_the_table_and_writes_json(
        tiny_bench_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # matplotlib "not installed": None in sys.modules makes `import matplotlib` raise ImportError. The
    # systems run in children, which never import it; a 0.3 s timeout keeps this test short (the run is
    # reported as timed out, a row of the table all the same).
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    rc = main(["bench", "--model", str(tiny_bench_checkpoint), "--systems", "lru@0.5", "--decode-tokens", "2",
               "--prompt-tokens", "4", "--threads", "1", "--timeout", "0.3", "--memory-cap", "none",
               "--out", str(tmp_path)])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_tiny.json"]
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert [r["label"] for r in report["results"]] == ["lru@0.5"]
    out, err = capsys.readouterr()
    assert "lru@0.5" in out and "timed_out" in out and "wrote " + str(tmp_path / "bench_tiny.json") in out
    assert ".png" not in out
    notes = [line for line in err.splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and "no chart" in notes[0]


def test_bench_out_defaults_outside_the_source_tree() -> None:
    import moe_engine
    from moe_engine.cli import build_parser

    # Absolute (a relative default would land in the checkout when run from it) and not in the checkout.
    out = Path(build_parser().parse_args(["bench"]).out).expanduser()
    assert out.is_absolute(), out
    assert not out.resolve().is_relative_to(Path(moe_engine.__file__).resolve().parents[1]), out


@dataclasses.dataclass
class _FutureStats:
    """Stats as a reworked engine may report them: only the fields the bench relies on, plus new ones."""

    hits: int
    misses: int
    bytes_moved: int
    stall_seconds: float
    prefetches: int
    prefetch_hits: int
    predict_seconds: float
    peak_resident_bytes: int
    late_prefetches: int = 0  # a field the bench does not know
    per_layer: list = dataclasses.field(default_factory=list)


def test_engine_stats_are_read_defensively() -> None:
    from moe_engine.runtime.stats import EngineStats

    first = _scalar_stats(_FutureStats(2, 2, 100, 0.5, 4, 1, 0.1, 50, late_prefetches=1, per_layer=[1, 2]))
    last = _scalar_stats(_FutureStats(8, 4, 700, 1.5, 8, 5, 0.3, 60, late_prefetches=3))
    assert "per_layer" not in last and last["late_prefetches"] == 3  # unknown scalars pass through
    assert last["hit_rate"] == pytest.approx(8 / 12) and last["prefetch_accuracy"] == pytest.approx(5 / 8)
    delta = _decode_delta(first, last)
    assert delta["hits"] == 6 and delta["bytes_moved"] == 600 and delta["hit_rate"] == pytest.approx(6 / 8)
    assert "prefetch_bytes" not in delta and "wasted_prefetches" not in delta
    # The decode profile and its table row work without the counters this engine does not have.
    run = RunResult(label="lru@0.25", system="lru", budget=0.25, status="ok", decode_s=2.0, new_tokens=3,
                    decode_tok_s=1.0, engine_decode_stats=delta)
    profile = decode_profile(run)
    assert profile is not None and profile["prefetch_bytes_per_token"] is None
    assert profile["bytes_moved_per_token"] == 300 and profile["stall_s_per_token"] == pytest.approx(0.5)
    # Today's EngineStats: every field the bench relies on is there, and the rates are its own.
    stats = EngineStats(hits=3, misses=1, prefetches=2, prefetch_hits=1)
    scalars = _scalar_stats(stats)
    assert set(STATS_FIELDS) <= set(scalars)
    assert scalars["hit_rate"] == stats.hit_rate and scalars["prefetch_accuracy"] == stats.prefetch_accuracy


def test_package_exports_resolve() -> None:
    import moe_engine.bench as bench

    assert bench.run_benchmark is run_benchmark and bench.BenchSettings is BenchSettings
    assert all(callable(getattr(bench, name)) for name in bench.__all__)
    with pytest.raises(AttributeError, match="no attribute 'bench_offload'"):
        bench.bench_offload  # noqa: B018  (the old module name is gone)


def test_quality_speed_bound_projects_belady_loads_at_the_measured_cost_per_load() -> None:
    import numpy as np
    from moe_engine.benchmarks.quality_speed import _bound

    # One MoE layer, top-1, 2 slots, experts A B A C A B: Belady loads A, B, C (evicting B, used last), B:
    # 4 loads over 6 tokens.
    ids = np.array([0, 1, 0, 2, 0, 1]).reshape(6, 1, 1)
    def run(tok_s: float, loads: float) -> dict:
        return {"routing": ids, "num_slots": 2, "decode_tok_s": tok_s, "decode_loads_per_token": loads}
    # 10 ms per token resident; 20 ms with 5 loads per token: 2 ms per load.
    res = {"lossless": run(50.0, 5.0), "resident": run(100.0, 0.0), "fast": run(50.0, 5.0),
           "fast_resident": run(100.0, 0.0)}  # fmt: skip
    b = _bound(res)
    assert b["fast"]["belady_loads_per_token"] == pytest.approx(4 / 6)
    assert b["fast"]["per_load_ms"] == pytest.approx(2.0)
    assert b["fast"]["projected_tok_s"] == pytest.approx(1 / (0.010 + (4 / 6) * 0.002))
    assert b["fast_projected_vs_lossless"] == pytest.approx(b["fast"]["projected_tok_s"] / 50.0)
