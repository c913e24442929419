"""``moe-engine generate`` and ``--help``, run as a user would: a separate process on a tiny checkpoint
with a tokenizer saved beside it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def cli() -> list[str]:
    """The installed console script when it sits beside this interpreter, else ``python -m moe_engine``."""
    script = Path(sys.executable).with_name("moe-engine")
    if script.exists():
        return [str(script)]
    found = shutil.which("moe-engine")
    if found and Path(found).resolve().parent == Path(sys.executable).resolve().parent:
        return [found]
    return [sys.executable, "-m", "moe_engine"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*cli(), *args], capture_output=True, text=True, timeout=timeout, env=env)


def stats_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if "tok/s" in ln]


@pytest.mark.parametrize(
    "extra",
    [[], ["--policy", "lfu", "--predictor", "none"]],
    ids=["defaults", "lfu-no-prefetch"],
)
def test_generate_prints_text_and_one_stats_line(tiny_checkpoint, extra):
    path = tiny_checkpoint("qwen3_moe", tokenizer=True)
    args = [
        "generate",
        "--model",
        str(path),
        "--prompt",
        "hello world",
        "--budget",
        "0.5",
        "--max-new-tokens",
        "4",
    ]
    proc = run_cli(*args, *extra)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    )
    assert "hello world" in proc.stdout, proc.stdout  # the prompt streams first
    lines = stats_lines(proc)
    assert len(lines) == 1, f"want one stats line with tok/s, got {lines}"
    assert "[moe-engine]" not in proc.stdout, "the stats line goes to stderr, apart from the generated text"
    line = lines[0]
    assert re.search(r"(?i)hit rate", line), line
    assert re.search(r"\d+(\.\d+)? tok/s", line), line
    assert "Traceback" not in proc.stderr


def test_generate_bad_model_path_is_a_clean_error(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_cli("generate", "--model", str(missing), "--prompt", "hi", "--max-new-tokens", "1")
    assert proc.returncode != 0
    assert str(missing) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_generate_bad_budget_is_a_clean_error(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe", tokenizer=True)
    proc = run_cli("generate", "--model", str(path), "--prompt", "hi", "--budget", "12 parsecs")
    assert proc.returncode != 0
    assert "budget" in proc.stderr.lower(), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_help():
    top = run_cli("--help", timeout=60)
    assert top.returncode == 0, top.stderr
    assert "generate" in top.stdout
    sub = run_cli("generate", "--help", timeout=60)
    assert sub.returncode == 0, sub.stderr
    for option in ("--model", "--prompt", "--budget", "--max-new-tokens", "--policy"):
        assert option in sub.stdout, f"{option} missing from generate --help"
