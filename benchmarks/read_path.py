"""Cost of one expert read from the slow tier: ``O_DIRECT`` (the default where the filesystem has it)
against buffered reads with ``DONTNEED``, the same experts in the same run; and (``--interference``)
what reads on another thread cost the compute thread.

A model is loaded with ``moe_engine.from_pretrained`` (the embedded default model unless ``--model``) for
its expert locations and slot layout; two ``CheckpointStore``s of its checkpoint (``direct=True`` and
``direct=False``) then read ``--reads`` experts, chosen at random (the same sequence for both), into a
slot of the compute dtype (``--dtype``, default float32: the server's), page cache dropped first.
``--rounds`` rounds, the two modes interleaved; reported per expert: wall and CPU time (this process,
one thread), medians over rounds, and the ratios. CPU time matters as much as wall time here: the I/O
threads share the GIL and two cores with the compute thread.

``--interference`` (default model only): every expert resident (budget 1.0), the server's batcher decodes
16 prompts x 48 tokens at once (fp32), in rounds alternating between quiet and with a thread reading
random experts through the store (as an I/O thread does) the whole time; reported: tokens/s of each,
their ratio, and the compute thread's delay per read (``(1/noisy - 1/quiet)`` seconds per token over
reads per token).

Example::

    python -m moe_engine.benchmarks.read_path --out /tmp/read_path.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path


def interference(rounds: int) -> dict:
    import threading

    import torch
    from moe_engine.benchmarks.serve_eval import prompts
    from transformers import AutoTokenizer

    from moe_engine.default_model import default_model_path
    from moe_engine.runtime.loader import from_pretrained
    from moe_engine.runtime.store import CheckpointStore
    from moe_engine.serve.batcher import Batcher, BatcherConfig, SamplingParams

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = from_pretrained(path, budget=1.0, dtype=torch.float32, threads=1)
    store = CheckpointStore.open(path)
    cache = model.engine.cache
    keys = [(layer, e) for layer, info in enumerate(model.engine.layers) for e in range(info.num_experts)]
    on, stop, reads = threading.Event(), threading.Event(), [0]

    def reader() -> None:
        slot = torch.empty(cache.layout.nbytes(keys[0], 0) // cache.layout.dtype.itemsize, dtype=cache.layout.dtype)
        rng = random.Random(0)
        while not stop.is_set():
            if on.wait(0.1):
                store.read_expert_into(cache.locate(rng.choice(keys)), slot)
                reads[0] += 1

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    batcher = Batcher(model, BatcherConfig(max_seqs=32))
    batcher.start()
    ids = [tok(p)["input_ids"] for p in prompts(16, seed=2)]

    def batch() -> tuple[float, int]:
        done, count = threading.Semaphore(0), [0]

        def sink(ev) -> None:
            count[0] += ev.token is not None
            if ev.finish_reason:
                done.release()

        t0 = time.perf_counter()
        for x in ids:
            batcher.submit(x, SamplingParams(max_new_tokens=48), sink)
        for _ in ids:
            done.acquire()
        return count[0] / (time.perf_counter() - t0), count[0]

    out: dict[str, list] = {"quiet": [], "reading": []}
    try:
        batch()  # warm-up
        for r in range(rounds):
            for mode in ("quiet", "reading"):
                (on.set if mode == "reading" else on.clear)()
                before = reads[0]
                tok_s, tokens = batch()
                out[mode].append({"tok_s": tok_s, "reads_per_token": (reads[0] - before) / tokens})
                print(f"  interference round {r + 1} {mode:7} {tok_s:6.1f} tok/s, "
                      f"{out[mode][-1]['reads_per_token']:.1f} reads/token", flush=True)  # fmt: skip
    finally:
        on.clear()
        stop.set()
        batcher.stop()
        thread.join()
        store.close()
        model.close()
    quiet = statistics.median(x["tok_s"] for x in out["quiet"])
    noisy = statistics.median(x["tok_s"] for x in out["reading"])
    per_token = statistics.median(x["reads_per_token"] for x in out["reading"])
    return {"rounds": out, "quiet_tok_s": quiet, "reading_tok_s": noisy, "ratio": noisy / quiet,
            "reads_per_token": per_token, "delay_per_read_ms": 1e3 * (1 / noisy - 1 / quiet) / per_token}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--dtype", default="float32", help="slot dtype (default float32)")
    p.add_argument("--reads", type=int, default=600, help="experts read per mode and round (default 600)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, modes interleaved (default 3)")
    p.add_argument("--interference", action="store_true", help="also measure reads' cost to a concurrent batch")
    p.add_argument("--out", default=str(Path.home() / ".cache/moe-engine/bench/read_path.json"), help="JSON output")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from moe_engine.runtime.loader import from_pretrained
    from moe_engine.runtime.store import CheckpointStore

    if args.model is None:
        from moe_engine.default_model import default_model_path

        path = default_model_path()
    else:
        path = Path(args.model)
    model = from_pretrained(path, budget=0.05, dtype=getattr(torch, args.dtype), predictor=None)
    try:
        cache = model.engine.cache
        keys = [(layer, e) for layer, info in enumerate(model.engine.layers) for e in range(info.num_experts)]
        rng = random.Random(0)
        order = [rng.choice(keys) for _ in range(args.reads)]
        stores = {"direct": CheckpointStore.open(path), "buffered": CheckpointStore.open(path, direct=False)}
        have_direct = any(f.direct_fd is not None for f in stores["direct"]._files.values())
        rounds: dict[str, list[dict]] = {m: [] for m in stores}
        for r in range(args.rounds):
            for mode, store in stores.items():
                store.drop_page_cache()
                buf = torch.empty(cache.layout.nbytes(order[0], 0) // cache.layout.dtype.itemsize, dtype=cache.layout.dtype)
                read0 = store.bytes_read
                t0, c0 = time.perf_counter(), time.process_time()
                for key in order:
                    n = cache.layout.nbytes(key, 0) // cache.layout.dtype.itemsize
                    if buf.numel() != n:
                        buf = torch.empty(n, dtype=cache.layout.dtype)
                    store.read_expert_into(cache.locate(key), buf)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                res = {"wall_ms": 1e3 * wall / len(order), "cpu_ms": 1e3 * cpu / len(order),
                       "bytes_per_read": (store.bytes_read - read0) / len(order)}  # fmt: skip
                rounds[mode].append(res)
                print(f"  round {r + 1} {mode:8} {res['wall_ms']:.3f} ms wall, {res['cpu_ms']:.3f} ms CPU per expert "
                      f"({res['bytes_per_read'] / 1e3:.0f} KB)", flush=True)  # fmt: skip
        for s in stores.values():
            s.close()
    finally:
        model.close()
    med = {m: {k: statistics.median(x[k] for x in rs) for k in ("wall_ms", "cpu_ms")} for m, rs in rounds.items()}
    result = {
        "model": str(path), "dtype": args.dtype, "reads": args.reads, "o_direct_available": have_direct,
        "rounds": rounds, "median": med,
        "buffered_over_direct_wall": med["buffered"]["wall_ms"] / med["direct"]["wall_ms"],
        "buffered_over_direct_cpu": med["buffered"]["cpu_ms"] / med["direct"]["cpu_ms"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1},
        "command": " ".join(["python -m moe_engine.benchmarks.read_path", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }  # fmt: skip
    if args.interference:
        result["interference"] = interference(args.rounds)
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
