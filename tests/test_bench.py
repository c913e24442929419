"""``moe-engine bench`` on a tiny generated checkpoint: the generator, every system, the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_offload import BenchSettings, checkpoint_bytes, parse_systems, run_benchmark
from benchmarks.make_checkpoint import CheckpointSpec, ensure_checkpoint
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
    from predictors import available_predictors

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
        assert stats["bytes_moved"] > 0 and stats["peak_resident_bytes"] <= stats["budget_bytes"]
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
    assert len(checked) == 1 + with_prefetch and "accelerate_cold@0.25" in checked[0]
    out = capsys.readouterr().out
    assert "accelerate_cold@0.25" in out and "decode" in out


def test_a_run_past_its_timeout_is_reported_as_timed_out(tiny_bench_checkpoint: Path) -> None:
    settings = BenchSettings(model_path=str(tiny_bench_checkpoint), model_name="tiny", systems=("lru@0.5",),
                             decode_tokens=2, prompt_tokens=4, timeout_s=0.3, threads=1)
    (result,) = run_benchmark(settings, progress=False)["results"]
    assert result["status"] == "timed_out" and "0 s" in result["error"]
    assert result["decode_tok_s"] is None


def test_a_run_killed_at_the_memory_cap_is_reported_as_such(tiny_bench_checkpoint: Path) -> None:
    from benchmarks.memory_cap import detect_backend

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
