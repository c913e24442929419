"""One trace validator for every command: bad traces give one `error:` line and exit status 2 in
simulate, eval-predictors, plan and plan-eval; expert bytes come from the trace or from --model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moe_engine.offline.traces import FORMAT, RoutingTrace, load_trace


def _write(path, ids, meta=None, starts=None):
    ids = np.asarray(ids)
    meta = {"format": FORMAT, "num_experts": 4} if meta is None else meta
    starts = np.array([0, ids.shape[0]]) if starts is None else starts
    np.savez(path, expert_ids=ids, expert_weights=np.ones(ids.shape, np.float16), sequence_starts=starts,
             meta=json.dumps(meta))
    return path


GOOD = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]] * 4)

BAD = {
    "expert id past num_experts": (np.where(GOOD == 3, 7, GOOD), None, "expert 7 but num_experts is 4"),
    "negative expert id": (np.where(GOOD == 3, -1, GOOD), None, "negative expert ids"),
    "no tokens": (np.zeros((0, 2, 2), np.int64), None, "the trace is empty"),
    "meta not an object": (GOOD, ["not", "a", "dict"], "meta must be a JSON object"),
    "float ids": (GOOD.astype(np.float32), None, "must hold integers"),
    "bad num_experts": (GOOD, {"format": FORMAT, "num_experts": "four"}, "num_experts must be a positive integer"),
}


@pytest.mark.parametrize("case", BAD)
def test_load_trace_rejects_bad_traces(tmp_path, case):
    ids, meta, msg = BAD[case]
    path = _write(tmp_path / "bad.npz", ids, meta, starts=np.array([0, ids.shape[0]]))
    with pytest.raises(ValueError, match=msg):
        load_trace(path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_engine", *args], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


COMMANDS = {
    "simulate": lambda t, d: ["simulate", "--trace", t, "--budget", "0.5"],
    "eval-predictors": lambda t, d: ["eval-predictors", "--train", t, "--test", t, "--predictors", "transition"],
    "plan": lambda t, d: ["plan", "--trace", t, "--devices", "2", "--out", str(d / "plan.json")],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", ["expert id past num_experts", "meta not an object"])
def test_every_command_reports_a_bad_trace_in_one_line(tmp_path, command, case):
    ids, meta, msg = BAD[case]
    path = str(_write(tmp_path / "bad.npz", ids, meta))
    proc = _cli(*COMMANDS[command](path, tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_simulate_takes_expert_bytes_from_the_model(tiny_checkpoint, tmp_path):
    import tiny_models

    path = tiny_checkpoint("mixtral")
    one = tiny_models.expert_bytes(tiny_models.tiny_config("mixtral"))
    trace = _write(tmp_path / "t.npz", np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]] * 3),
                   {"format": FORMAT, "num_experts": 8})
    proc = _cli("simulate", "--trace", str(trace), "--budget", "0.5", "--model", str(path), "--json", "--no-belady")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["expert_bytes"] == one


def test_recorded_traces_carry_expert_bytes(tiny_checkpoint):
    import tiny_models
    import torch
    from transformers import AutoModelForCausalLM

    from moe_engine.offline.trace_recorder import record_trace

    path = tiny_checkpoint("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tr = record_trace(model, [list(range(4, 12))])
    assert isinstance(tr, RoutingTrace)
    assert tr.meta["expert_bytes"] == tiny_models.expert_bytes(tiny_models.tiny_config("qwen3_moe"))


def test_simulate_list_works_alone():
    proc = _cli("simulate", "--list")
    assert proc.returncode == 0 and "policies:" in proc.stdout and "auto" in proc.stdout, proc.stderr
    proc = _cli("simulate", "--budget", "0.5")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --trace is required (or use --list)"
