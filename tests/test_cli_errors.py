"""Every user error in every sub-command is one ``error: ...`` line on stderr and exit status 2: no
traceback, no usage block, nothing half-run. A table of bad arguments, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_engine.cli import main
from moe_engine.offline.traces import FORMAT

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-errors")
    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]] * 4)
    np.savez(d / "t.npz", expert_ids=ids, expert_weights=np.ones(ids.shape, np.float16),
             sequence_starts=np.array([0, 4, 8]), meta=json.dumps({"format": FORMAT, "num_experts": 4}))
    np.savez(d / "bad.npz", something=np.zeros(3))
    (d / "notes.txt").write_text("not a trace")
    (d / "empty").mkdir()
    (d / "plan.json").write_text("{not json")
    return d


# (argv, a fragment of the error message); {d} is the fixture's folder.
CASES = [
    # generate
    (["generate", "--budget", "2.5"], "budget"),
    (["generate", "--budget", "0"], "budget"),
    (["generate", "--budget", "lots"], "budget"),
    (["generate", "--budget", "150%"], "budget"),
    (["generate", "--budget", "1B"], "smaller than one expert"),
    (["generate", "--policy", "fifo"], "unknown cache policy 'fifo'"),
    (["generate", "--dtype", "foo"], "dtype 'foo'"),
    (["generate", "--device", "gpu"], "device 'gpu'"),
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "--max-new-tokens", "1000000000000"], "exceed the model's context"),
    (["generate", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "--temperature", "nan"], "--temperature must be >= 0"),
    (["generate", "--threads", "0"], "threads must be a positive integer"),
    (["generate", "--max-new-tokens", "many"], "invalid int value"),
    (["generate", "--model", "{d}/missing"], "does not exist"),
    (["generate", "--model", "{d}/empty"], "no config.json"),
    (["generate", "--bogus"], "unrecognized arguments"),
    # simulate
    (["simulate"], "--trace and --budget are required"),
    (["simulate", "--trace", "{d}/t.npz"], "--budget is required"),
    (["simulate", "--trace", "{d}/t.npz", "--budget", "0"], "budget"),
    (["simulate", "--trace", "{d}/t.npz", "--budget", "2"], "budget"),
    (["simulate", "--trace", "{d}/t.npz", "--budget", "0.5", "--policy", "fifo"], "unknown cache policy"),
    (["simulate", "--trace", "{d}/t.npz", "--budget", "0.5", "--profile", "floppy"], "unknown hardware profile"),
    (["simulate", "--trace", "{d}/t.npz", "--budget", "0.5", "--prefetch"], "--prefetch needs --predictor"),
    (["simulate", "--trace", "{d}/missing.npz", "--budget", "0.5"], "does not exist"),
    (["simulate", "--trace", "{d}/bad.npz", "--budget", "0.5"], "missing array"),
    (["simulate", "--trace", "{d}/notes.txt", "--budget", "0.5"], "not a readable .npz"),
    (["simulate", "--trace", "{d}/t.npz", "--budget", "0.5", "--expert-bytes", "0"], "--expert-bytes must be"),
    # eval-predictors
    (["eval-predictors"], "required"),
    (["eval-predictors", "--test", "{d}/missing.npz"], "does not exist"),
    (["eval-predictors", "--test", "{d}/t.npz", "--predictors", "popularity", "--distances", "1"],
     "give training traces"),
    (["eval-predictors", "--test", "{d}/t.npz", "--predictors", "crystal_ball", "--distances", "1"], "crystal_ball"),
    (["eval-predictors", "--test", "{d}/t.npz", "--distances", "1,2,3"], "distances must be in 1..1"),
    # plan / plan-eval
    (["plan", "--trace", "{d}/t.npz", "--devices", "2", "--out", "{d}/empty"], "is a directory"),
    (["plan", "--trace", "{d}/t.npz", "--devices", "2", "--out", "{d}/no/such/plan.json"], "does not exist"),
    (["plan", "--trace", "{d}/t.npz", "--devices", "2", "--time-limit", "nan", "--out", "{d}/p.json"],
     "time_limit must be a positive number"),
    (["plan", "--trace", "{d}/t.npz", "--devices", "0", "--out", "{d}/p.json"], "devices"),
    (["plan", "--trace", "{d}/t.npz", "--devices", "2", "--train-fraction", "1.5", "--out", "{d}/p.json"],
     "--train-fraction"),
    (["plan-eval", "--plan", "{d}/plan.json", "--trace", "{d}/t.npz"], "plan"),
    (["plan-eval", "--plan", "{d}/missing.json", "--trace", "{d}/t.npz"], "missing.json"),
    # project
    (["project", "--trace", "{d}/t.npz"], "give --devices G"),
    (["project", "--trace", "{d}/t.npz", "--devices", "0"], "--devices must be at least 1"),
    (["project", "--trace", "{d}/t.npz", "--devices", "2", "--batch", "0"], "--batch must be at least 1"),
    (["project", "--trace", "{d}/t.npz", "--devices", "2", "--link", "pigeon"], "unknown link 'pigeon'"),
    (["project", "--trace", "{d}/t.npz", "--devices", "2", "--nodes", "3"], "must divide num_devices"),
    (["project", "--trace", "{d}/missing.npz", "--devices", "2"], "does not exist"),
    (["project", "--trace", "{d}/t.npz", "--plan", "{d}/plan.json"], "plan"),
    (["project", "--trace", "{d}/t.npz", "--devices", "2", "--hidden-size", "0"], "hidden_size"),
    # trace / bench
    (["trace", "--model", "{d}/missing", "--prompt", "x", "--out", "{d}/tr.npz"], "does not exist"),
    (["trace"], "the following arguments are required: --out"),
    (["bench", "--budgets", "0,2"], "budgets"),
    (["bench", "--systems", "warp_drive"], "warp_drive"),
    (["nonsense"], "invalid choice"),
    # quantize (the default model: H 192, I 128)
    (["quantize", "--out", "{d}/q", "--bits", "5"], "unsupported bits 5"),
    (["quantize", "--out", "{d}/q", "--bits", "4", "--group-size", "48"], "unsupported --group-size 48"),
    (["quantize", "--out", "{d}/q", "--bits", "4", "--group-size", "128"], "group size 128 does not divide"),
    (["quantize", "--out", "{d}", "--bits", "4"], "already exists and is not empty"),
    (["quantize", "--model", "{d}/missing", "--out", "{d}/q", "--bits", "4"], "does not exist"),
    (["quantize", "--model", "{d}/empty", "--out", "{d}/q", "--bits", "4"], "no config.json"),
    (["quantize", "--out", "{d}/q"], "give --bits"),
    (["quantize", "--out", "{d}/q", "--allocation", "ilp", "--mean-bits", "3"], "needs --mean-bits B and --calibration"),
    (["quantize", "--out", "{d}/q", "--allocation", "ilp", "--mean-bits", "9", "--calibration", "{d}/notes.txt"],
     "between 2 and 8"),
    (["quantize", "--out", "{d}/q", "--allocation", "ilp", "--mean-bits", "3", "--calibration", "{d}/notes.txt"],
     "is too small"),
    (["quantize", "--out", "{d}/q", "--bits", "4", "--copies", "int5"], "unknown format 'int5'"),
    (["quantize", "--out", "{d}/q", "--bits", "16"], "give --copies"),
    (["generate", "--quality", "fast", "--max-new-tokens", "2"], "lower-precision copies"),
    (["generate", "--quality", "fast", "--guardrail", "0", "--max-new-tokens", "2"], "KL bound"),
    (["generate", "--guardrail", "0.1", "--max-new-tokens", "2"], "balanced' or 'fast"),
    (["bench", "--ep", "1"], "needs N >= 2"),
    (["bench", "--ep", "2", "--plan", "{d}/missing.json"], "no such file"),
]


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_arguments_give_one_error_line(files, capfd, argv, fragment):
    argv = [a.replace("{d}", str(files)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert len(lines) == 1, f"want one stderr line, got:\n{err}"
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert {a[0] for a, _ in CASES} >= {"generate", "simulate", "eval-predictors", "plan", "plan-eval", "trace", "bench"}
