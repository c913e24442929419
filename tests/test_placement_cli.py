"""`moe-engine plan` and `moe-engine plan-eval` on a small synthetic trace."""

from __future__ import annotations

import json

import numpy as np
import pytest
from moe_engine.placement import load_plan
from moe_engine.placement.synthetic import planted_trace

from moe_engine.cli import main
from moe_engine.offline.traces import RoutingTrace


@pytest.fixture()
def trace_path(tmp_path):
    syn = planted_trace(num_tokens=512, num_layers=4, num_experts=16, top_k=2, seed=0, sequence_length=64)
    trace = RoutingTrace(
        expert_ids=syn.expert_ids, expert_weights=syn.expert_weights, sequence_starts=syn.sequence_starts,
        meta={"num_experts": 16, "top_k": 2, "moe_layers": [1, 2, 3, 4]},
    )
    path = tmp_path / "t.npz"
    trace.save(path)
    return path


def test_plan_and_plan_eval(tmp_path, trace_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--trace", str(trace_path), "--devices", "4", "--time-limit", "5", "--train-fraction", "0.75",
               "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "round-robin" in text and "held-out" in text
    plan = load_plan(out)
    assert plan.moe_layers == (1, 2, 3, 4) and plan.num_devices == 4
    rc = main(["plan-eval", "--plan", str(out), "--trace", str(trace_path), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["cross_device_share"] < report["round_robin"]["cross_device_share"]


def test_plan_cli_errors(tmp_path, trace_path, capsys):
    out = str(tmp_path / "p.json")
    assert main(["plan", "--trace", str(trace_path), "--devices", "3", "--out", out]) == 2
    assert "devices do not divide 16 experts" in capsys.readouterr().err
    assert main(["plan", "--trace", str(trace_path), "--devices", "4", "--nodes", "3", "--out", out]) == 2
    assert "must divide num_devices" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    assert main(["plan", "--trace", str(bad), "--devices", "4", "--out", out]) == 2
    assert "not in the moe-routing-trace/1 format" in capsys.readouterr().err
    bad_plan = tmp_path / "bad.json"
    bad_plan.write_text(json.dumps({"format": "x"}))
    assert main(["plan-eval", "--plan", str(bad_plan), "--trace", str(trace_path)]) == 2
    assert "not a moe-placement/1 plan" in capsys.readouterr().err


def test_plan_json_stdout_is_only_json(tmp_path, trace_path):
    """Solvers print banners from native code (HiGHS on file descriptor 1); --json keeps stdout parseable."""
    import subprocess
    import sys

    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moe_engine", "plan", "--trace", str(trace_path), "--devices", "4",
         "--time-limit", "3", "--ilp", "exact", "--out", str(out), "--quiet", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    summary = json.loads(proc.stdout)
    assert summary["out"] == str(out) and out.exists()
