"""Process-group set-up, the per-rank generate run, and spawning local ranks (``moe-engine generate --ep N``).

Each rank reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); ``spawn_local`` sets the same variables for N child processes, so one code path serves
torchrun (one node or several, ``--nnodes``) and the CLI. Backend: NCCL when the rank computes on CUDA
(``cuda:LOCAL_RANK``), gloo otherwise.

Faults: the group is created with a timeout (``--timeout``, default 30 s), so a collective whose peer is
gone fails on every other rank within it (gloo usually at once, on the closed connection) and
``ExpertParallel`` turns the failure into ``RankFailedError`` naming the layer; the rank prints it and
exits with status 1. ``spawn_local`` (like torchrun's agent) then stops the remaining ranks and returns
the first failing rank's status.

Example::

    rc = spawn_local(2, ["--max-new-tokens", "8", "--ep-mode", "coherent"])
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--prompt", default=None, help="prompt text (default: the default model's sample prompt)")
    p.add_argument("--plan", default=None, help="moe-placement/1 plan from `moe-engine plan` (default: round-robin)")
    p.add_argument("--ep-mode", default="standard", choices=["standard", "coherent"],
                   help="standard: dispatch + combine (two all-to-alls per MoE layer); coherent: one (ExFlow)")
    p.add_argument("--budget", default="1.0", help="expert budget per rank, as for moe-engine generate (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--device", default=None, help="cpu or cuda (each rank uses cuda:LOCAL_RANK) (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a collective may wait for a peer (default 30)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--stats-json", default=None, help="rank 0 writes every rank's counters and the tokens here")
    p.add_argument("--quiet", action="store_true", help="no streamed text")


def init_process_group(device: str | None, timeout_s: float):
    """Initialise the default group from torchrun's environment; returns this rank's torch device."""
    import torch
    import torch.distributed as dist

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not set: start the ranks with `torchrun --nproc-per-node N -m moe_engine.distributed` "
            "or `moe-engine generate --ep N`"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    timeout = timedelta(seconds=timeout_s)
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)  # NCCL binds each rank to its own GPU
        dist.init_process_group("nccl", timeout=timeout, device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return dev


def run_rank(args: argparse.Namespace) -> int:
    """One rank: load the model (expert-parallel through ``from_pretrained``), generate, report."""
    import torch
    import torch.distributed as dist

    from moe_engine.distributed.ep import RankFailedError
    from moe_engine.runtime.config import parse_budget

    torch.set_num_threads(max(1, args.threads))
    dev = init_process_group(args.device, args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        from transformers import AutoTokenizer

        import moe_engine

        if args.model is None:
            from moe_engine.default_model import DEFAULT_PROMPT, default_model_path

            path, prompt = default_model_path(), args.prompt if args.prompt is not None else DEFAULT_PROMPT
        else:
            path, prompt = args.model, args.prompt if args.prompt is not None else "Once upon a time"
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = moe_engine.from_pretrained(
            path, budget=parse_budget(args.budget), device=dev, dtype=args.dtype, predictor=None,
            threads=max(1, args.threads), plan=args.plan, ep_mode=args.ep_mode,
        )  # fmt: skip
        ep = model.expert_parallel
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(dev)
        print(f"[moe-engine ep] rank {rank}/{world} ready on {dev}", file=sys.stderr, flush=True)
        streamer = None
        if rank == 0 and not args.quiet:
            from transformers import TextStreamer

            streamer = TextStreamer(tokenizer)
        ep._guard(dist.barrier, "waiting for every rank to load")  # load skew must not count as comm time
        ep.reset_stats()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer,
                                 pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        dt = time.perf_counter() - t0
        group = ep.gather_stats()
        if rank == 0:
            per = group.per_token()
            print(
                f"\n[moe-engine ep] {world} ranks, {args.ep_mode}: {out.shape[1] - ids.shape[1]} tokens in {dt:.2f} s | "
                f"{per['a2a_calls_per_token']:.1f} all-to-alls/token/rank, {per['bytes_per_token']:.0f} B/token on the wire, "
                f"cross-rank token handoffs {group.cross_device_share:.1%} of pairs | comm "
                f"{max(s.comm_seconds for s in group.ranks):.3f} s, compute {max(s.compute_seconds for s in group.ranks):.3f} s",
                file=sys.stderr,
            )
            if args.stats_json:
                Path(args.stats_json).write_text(json.dumps(
                    {"output_ids": out[0].tolist(), "seconds": dt, "mode": args.ep_mode, "world_size": world,
                     "plan": args.plan, **group.to_json()}, indent=1))  # fmt: skip
        model.close()
        dist.destroy_process_group()
        return 0
    except RankFailedError as exc:
        print(f"[moe-engine ep] error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)  # the group is broken: do not wait in destroy_process_group or atexit handlers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_local(nprocs: int, argv: list[str], *, timeout_s: float | None = None) -> int:
    """Run ``python -m moe_engine.distributed ARGV`` as ``nprocs`` local ranks; the first failure stops
    the others (SIGTERM, then SIGKILL after 10 s). Returns 0, or the first failing rank's status."""
    if nprocs < 1:
        raise ValueError(f"--ep must be at least 1, got {nprocs}")
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "moe_engine.distributed", *argv], env=env))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    rc = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, rc = failed[0]
                print(f"[moe-engine ep] rank {rank} exited with status {rc}; stopping the other ranks", file=sys.stderr)
                break
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"[moe-engine ep] ranks still running after {timeout_s} s; stopping them", file=sys.stderr)
                rc = 124
                break
            time.sleep(0.2)  # polling the children; nothing else to wait on
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return rc
