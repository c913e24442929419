"""Compute threads: the engine's default, explicit counts, and counts chosen by the user left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moe_engine.runtime.threads import default_threads, set_threads, usable_cores


def test_default_is_half_the_cores_at_least_one():
    assert default_threads() == max(1, usable_cores() // 2)
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def test_explicit_counts_and_bad_ones():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None) == 1  # a count already chosen (here, or by OMP_NUM_THREADS) is kept
        for bad in (0, -2, 1.5, True, "2"):
            with pytest.raises(ValueError, match="threads must be a positive integer"):
                set_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_torch_default_is_lowered_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = ("import torch; from moe_engine.runtime.threads import set_threads, default_threads; "
            "n = torch.get_num_threads(); print(n, set_threads(None), default_threads(), torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    torch_default, got, default, now = map(int, out.stdout.split())
    assert got == now == (default if torch_default >= (os.cpu_count() or 1) else torch_default)


def test_cli_threads_flag_is_checked():
    proc = subprocess.run([sys.executable, "-m", "moe_engine", "generate", "--threads", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: threads must be a positive integer, got 0"
