"""``moe-engine simulate``: replay a routing trace through a cache policy (and prefetch) against Belady."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "simulate"
HELP = "replay a routing trace through an expert cache policy (+ predictor prefetch) against Belady's optimum"
DESCRIPTION = """\
Replay a routing trace in decode order (token by token, MoE layer by MoE layer) against one expert cache
shared by all layers holding --budget of all L*E experts, with an eviction policy and optionally a
predictor: after each layer is routed, the predictor scores the experts of the next --distance layers;
the scores reach prediction-aware policies, and with prefetch the likeliest missing experts are loaded
ahead. Reports the demand hit rate next to Belady's offline optimum (no prefetch), bytes moved (demand +
prefetch, wasted prefetch) and, with a hardware profile, projected time per token.

Profiles: pcie4-x16 (25 GB/s host-to-GPU copies, GPU compute) and disk (this machine's disk read with
the page cache bypassed, CPU compute; measured on the date stored in the profile).

examples:
  moe-engine simulate --trace intent.npz --budget 0.25 --policy lru --json
  moe-engine simulate --trace intent.npz --budget 0.25 --policy predictive --train law.npz summary.npz
  moe-engine simulate --trace intent.npz --budget 0.25 --policy predictive --predictor mlp_history \\
      --distance 2 --train law.npz summary.npz translation.npz --profile disk
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=None, help="routing trace (.npz) to replay (required unless --list)")
    p.add_argument("--budget", type=float, default=None,
                   help="cache capacity as a share of all experts, in (0, 1] (required unless --list)")
    p.add_argument("--policy", default="auto", help="eviction policy (default auto); see --list")
    p.add_argument("--predictor", default=None, help="predictor whose scores drive prefetch (and predictive eviction)")
    p.add_argument("--preload", action="store_true",
                   help="start with the cache filled as moe_engine.from_pretrained does at load (default: empty)")
    p.add_argument("--distance", type=int, default=1, help="layers ahead the predictor scores (default 1)")
    p.add_argument(
        "--prefetch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prefetch predicted experts (default: on when --predictor is given)",
    )
    p.add_argument("--prefetch-per-layer", type=int, default=None, help="most prefetches per predicted layer and step")
    p.add_argument("--prefetch-min-prob", type=float, default=None, help="prefetch only above this predicted probability")
    p.add_argument("--train", nargs="*", default=[], help="traces to fit the predictor and the predictive policy on")
    p.add_argument("--model", default=None, help="checkpoint directory (cross_layer_gate's router weights)")
    p.add_argument("--learned", default=None, help="saved learned predictor (.pt) to load, or to save to after training")
    p.add_argument("--profile", default="pcie4-x16", help="hardware profile for the time projection (pcie4-x16, disk)")
    p.add_argument("--expert-bytes", type=int, default=None,
                   help="bytes per expert (default: the trace's own record, else --model's experts, else "
                        "DeepSeek-V2-Lite's bf16 expert, the model of the shared traces)")
    p.add_argument("--max-tokens", type=int, default=None, help="replay only the first N tokens")
    p.add_argument("--no-belady", action="store_true", help="skip the Belady reference")
    p.add_argument("--list", action="store_true", help="list policies, predictors and profiles, then exit")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from moe_engine.cli import UserError
    from moe_engine.offline.simulator import PROFILES, SimConfig, fit_policy_kwargs, simulate
    from moe_engine.predictors import available_predictors
    from moe_engine.runtime.policies import available_policies

    if args.list:
        print("policies:  ", ", ".join(available_policies()))
        print("predictors:", ", ".join(available_predictors()))
        print("profiles:  ", ", ".join(PROFILES))
        return 0
    missing = [flag for flag, value in (("--trace", args.trace), ("--budget", args.budget)) if value is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (or use --list)")
    if args.policy not in available_policies():
        raise UserError(f"unknown cache policy {args.policy!r}; choose one of: {', '.join(available_policies())}")
    if args.profile not in PROFILES:
        raise UserError(f"unknown hardware profile {args.profile!r}; choose one of: {', '.join(PROFILES)}")
    prefetch = bool(args.predictor) if args.prefetch is None else args.prefetch
    if prefetch and not args.predictor:
        raise UserError("--prefetch needs --predictor")

    from dataclasses import replace

    from moe_engine.offline.predictor_factory import build_predictor
    from moe_engine.offline.traces import load_trace

    trace = load_trace(args.trace)
    train = [load_trace(p) for p in args.train]
    if args.expert_bytes is None and "expert_bytes" not in trace.meta and args.model:
        args.expert_bytes = _checkpoint_expert_bytes(args.model)
    if args.expert_bytes is not None and args.expert_bytes < 1:
        raise UserError(f"--expert-bytes must be a positive number of bytes, got {args.expert_bytes}")
    extra = {}
    if args.prefetch_per_layer is not None:
        extra["prefetch_per_layer"] = args.prefetch_per_layer
    if args.prefetch_min_prob is not None:
        extra["prefetch_min_prob"] = args.prefetch_min_prob
    try:
        cfg = SimConfig(
            budget=args.budget,
            policy=args.policy,
            predictor=args.predictor,
            distance=args.distance,
            prefetch=prefetch,
            preload=args.preload,
            profile=args.profile,
            expert_bytes=args.expert_bytes,
            max_tokens=args.max_tokens,
            **extra,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    pred = None
    if args.predictor:
        pred = build_predictor(
            args.predictor,
            train,
            trace,
            model_dir=args.model,
            learned_path=args.learned,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    # The predictive policy's reuse weights, fitted on --train (with the predictor's scores).
    cfg = replace(cfg, policy_kwargs=fit_policy_kwargs(args.policy, train, trace.num_experts, pred, args.distance))
    res = simulate(trace, cfg, predictor=pred, with_belady=not args.no_belady, progress=sys.stderr.isatty())
    if args.json:
        out = res.to_dict()
        out["trace"] = args.trace
        out["train"] = args.train
        print(json.dumps(out, indent=1))
        return 0
    gib = 1024**3
    print(f"trace {args.trace}: {res.tokens} tokens, {res.capacity} slots ({args.budget:.0%} of experts), policy {args.policy}"
          + (f", predictor {args.predictor} d={args.distance}" + (" + prefetch" if prefetch else "") if args.predictor else ""))
    print(f"demand hit rate   {res.hit_rate:.4f}   (Belady, no prefetch: {res.belady_hit_rate:.4f})")
    print(f"bytes moved       {res.bytes_moved / gib:.2f} GiB  (demand {res.demand_bytes / gib:.2f}, prefetch "
          f"{res.prefetch_bytes / gib:.2f}, wasted prefetch {res.wasted_prefetch_bytes / gib:.2f})")
    if res.time_per_token_s is not None:
        print(f"time per token    {1e3 * res.time_per_token_s:.2f} ms on {args.profile}  (stall "
              f"{1e3 * (res.stall_per_token_s or 0):.2f} ms, compute {1e3 * (res.compute_per_token_s or 0):.2f} ms)")
    return 0


def _checkpoint_expert_bytes(model_dir: str) -> int:
    """Bytes of one routed expert in a checkpoint (its first MoE layer's expert 0), from the headers."""
    from moe_engine.runtime.adapters import get_adapter, parse_expert_key
    from moe_engine.runtime.loader import _load_config
    from moe_engine.runtime.store import CheckpointStore

    path = Path(model_dir)
    adapter = get_adapter(_load_config(path))
    store = CheckpointStore.open(path)
    try:
        first: dict[int, int] = {}  # decoder layer -> bytes of its expert 0
        for name, loc in store.tensors.items():
            parsed = parse_expert_key(name, adapter)
            if parsed is None:
                continue
            dec, expert, _ = parsed
            if expert is None:  # fused [E, ...]: one row per expert
                first[dec] = first.get(dec, 0) + loc.nbytes // loc.shape[0]
            elif expert == 0:
                first[dec] = first.get(dec, 0) + loc.nbytes
        if not first:
            raise ValueError(f"{model_dir}: no routed expert tensors found in the checkpoint")
        return first[min(first)]
    finally:
        store.close()
