"""Measure expert parallelism on text: wire counters per rank, next to plan-eval and single-process.

``python -m moe_engine.distributed.evaluate --text FILE --ep 4 --plan plan.json --out ep.json`` spawns
``--ep`` local gloo ranks. Each runs the model over the text cut into ``--seq-len`` sequences, batched
``--batch-size`` at a time exactly as ``moe-engine trace`` batches them (so token t here is row t of a
trace of the same text), once per configuration: round-robin and the plan (when given), standard and
coherent mode, standard with regrouping. For each it reports bytes, rows, messages and all-to-all calls
per token, comm and compute seconds (max over ranks), and the tokens sent across ranks (cross-rank
handoffs, ``moe_engine.distributed.ep``) as a share of consecutive-layer copy pairs, next to what
``evaluate_plan`` (``moe-engine plan-eval``) computes on the routing the run recorded. Rank 0 then times
the same forwards single-process. Every figure comes from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _batches(path: str, text_file: str, seq_len: int, batch_size: int, max_tokens: int) -> list[list[list[int]]]:
    from transformers import AutoTokenizer

    from moe_engine.offline.trace_recorder import split_into_sequences

    ids = AutoTokenizer.from_pretrained(path)(Path(text_file).read_text())["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    seqs = split_into_sequences(ids, seq_len)
    by_len: dict[int, list[list[int]]] = {}
    for s in seqs:  # as record_trace: equal lengths together, original order inside a group
        by_len.setdefault(len(s), []).append(s)
    return [g[b : b + batch_size] for g in by_len.values() for b in range(0, len(g), batch_size)]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import warnings

    import numpy as np
    import torch
    import torch.distributed as dist

    import moe_engine
    from moe_engine.distributed import attach
    from moe_engine.placement.plan import evaluate_plan, load_plan, round_robin_plan

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    path = args.model or str(moe_engine.default_model_path())
    batches = _batches(path, args.text, args.seq_len, args.batch_size, args.max_tokens)
    configs = [("round-robin", None)] + ([("plan", args.plan)] if args.plan else [])
    results: list[dict[str, Any]] = []
    for layout, plan_path in configs:
        for mode, regroup in (("standard", False), ("standard", True), ("coherent", False)):
            model = moe_engine.from_pretrained(path, budget=args.budget, predictor=None, device="cpu", dtype=args.dtype,
                                               plan=plan_path, ep_mode=mode)  # fmt: skip
            ep = attach(model, plan=plan_path, mode=mode, regroup=regroup) if regroup else model.expert_parallel
            ep.record()
            dist.barrier()  # every rank loaded: the wall time below is the forwards'
            t0 = time.perf_counter()
            with torch.inference_mode():
                for batch in batches:
                    model(input_ids=torch.tensor(batch), use_cache=False)
            seconds = time.perf_counter() - t0
            group = ep.gather_stats()
            if rank == 0:
                assert ep.recorded is not None
                ids = np.concatenate(ep.recorded)  # forwards in order: global token numbering
                plan = load_plan(plan_path) if plan_path else round_robin_plan(ep.num_layers, ep.num_experts, world)
                predicted = evaluate_plan(plan, ids)
                row = {"layout": layout, "mode": mode, "regroup": regroup, "seconds": seconds, **group.to_json(),
                       "plan_eval_cross_device_share": predicted.cross_device_share,
                       "plan_eval_max_load_ratio": predicted.max_load_ratio}  # fmt: skip
                row["ranks"] = [{k: v for k, v in r.items() if k in ("rank", "comm_seconds", "compute_seconds", "bytes_sent", "a2a_calls")}
                                for r in row["ranks"]]  # fmt: skip
                results.append(row)
                print(f"[ep-eval] {layout:11s} {mode:8s} regroup={regroup!s:5s} wire {group.cross_device_share:.4f} "
                      f"plan-eval {predicted.cross_device_share:.4f} bytes/token {row['bytes_per_token']:.0f} "
                      f"messages/token {row['messages_per_token']:.2f} comm {row['comm_seconds_max']:.2f} s "
                      f"compute {row['compute_seconds_max']:.2f} s wall {seconds:.2f} s", file=sys.stderr, flush=True)  # fmt: skip
            model.close()
    dist.destroy_process_group()
    if rank == 0:
        with moe_engine.from_pretrained(path, budget=args.budget, predictor=None, device="cpu", dtype=args.dtype) as model:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for batch in batches:
                    model(input_ids=torch.tensor(batch), use_cache=False)
            single = time.perf_counter() - t0
        Path(args.out).write_text(json.dumps({
            "command": " ".join(sys.argv), "world_size": world, "tokens": sum(len(s) for b in batches for s in b),
            "single_process_seconds": single, "results": results}, indent=1))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    from moe_engine.distributed.launch import free_port

    p = argparse.ArgumentParser(prog="python -m moe_engine.distributed.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--text", required=True, help="UTF-8 text to run (unseen by the plan, for a fair figure)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--plan", default=None, help="moe-placement/1 plan for --ep devices (round-robin always runs)")
    p.add_argument("--ep", type=int, default=4, help="ranks (default 4)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens of the text to run (default 2048)")
    p.add_argument("--seq-len", type=int, default=256, help="as moe-engine trace (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="as moe-engine trace (default 8)")
    p.add_argument("--budget", default="1.0", help="expert budget per rank (default 1.0)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--out", required=True, help="JSON output")
    args = p.parse_args(argv)
    mp.start_processes(_worker, args=(args.ep, free_port(), args), nprocs=args.ep, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
