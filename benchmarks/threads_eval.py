"""`moe-engine generate` speed with its default thread count against torch's default (one per core),
on a quiet machine and beside one busy process (a pure-Python spin loop on one core).

Each run is a fresh `moe-engine generate` on the default model (64 new tokens, greedy), with
`OMP_NUM_THREADS` removed from the environment so torch's and the engine's own defaults apply; tok/s
is read from its stats line. Settings interleave, `--repeats` rounds, median per setting.

Example::

    python -m moe_engine.benchmarks.threads_eval --repeats 3 --out benchmarks/results/threads_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"engine default": [], "torch default (one per core)": ["--threads", str(os.cpu_count() or 1)]}


def generate_tok_s(extra: list[str], tokens: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, "-m", "moe_engine", "generate", "--max-new-tokens", str(tokens), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    m = re.search(r"\(([\d.]+) tok/s", proc.stderr)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"generate failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return float(m.group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="rounds over all settings (default 3)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per run (default 64)")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    runs: dict[str, list[float]] = {f"{load}, {name}": [] for load in ("quiet", "busy") for name in SETTINGS}
    for r in range(args.repeats):
        for load in ("quiet", "busy"):
            spinner = None
            if load == "busy":
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            try:
                for name, extra in SETTINGS.items():
                    tok_s = generate_tok_s(extra, args.tokens)
                    runs[f"{load}, {name}"].append(tok_s)
                    print(f"round {r + 1}: {load:5} {name:28} {tok_s:7.2f} tok/s", flush=True)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    med = {k: statistics.median(v) for k, v in runs.items()}
    report = {
        "command": "python -m moe_engine.benchmarks.threads_eval " + " ".join(argv or sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs_tok_s": runs,
        "median_tok_s": med,
        "busy_over_quiet": {name: med[f"busy, {name}"] / med[f"quiet, {name}"] for name in SETTINGS},
    }
    for name in SETTINGS:
        print(f"{name:28} quiet {med[f'quiet, {name}']:7.2f}  busy {med[f'busy, {name}']:7.2f}  "
              f"busy/quiet {report['busy_over_quiet'][name]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
