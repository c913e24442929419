"""``moe-engine plan``: place experts across devices from routing traces (see placement/)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator

NAME = "plan"
HELP = "plan expert placement across devices from routing traces (ILP over inter-layer affinity)"
DESCRIPTION = """\
Place each MoE layer's experts on devices so that tokens cross devices as little as possible between
consecutive layers, from recorded routing traces (moe-routing-trace/1 .npz files).

The planner chains layers by exact assignments, improves whole layers by local search, solves the
integer program exactly for small models (windows of layers on request with --ilp windows), reports a
lower bound and the gap to it, and optionally adds replicas of hot experts in spare slots. Progress
goes to stderr; the plan is written as moe-placement/1 JSON.

Example:
  moe-engine plan --trace law.npz --trace intent.npz --devices 8 --time-limit 60 --out plan.json
  moe-engine plan --trace t.npz --devices 32 --nodes 4 --balance 0.1 --replicas 32 --out plan.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", action="append", required=True, metavar="T.npz",
                        help="routing trace to plan from; repeat to pool several traces")
    parser.add_argument("--devices", type=int, required=True, help="number of devices (GPUs) G")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes N; must divide G (default 1)")
    parser.add_argument("--replicas", type=int, default=0,
                        help="redundant expert copies per layer; G must divide experts + replicas (default 0)")
    parser.add_argument("--balance", type=float, default=None, metavar="EPS",
                        help="keep each device's measured load <= (1 + EPS) x mean (default: no balance constraint)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds for the whole plan (default 60)")
    parser.add_argument("--solver", choices=["auto", "highs", "cbc"], default="auto",
                        help="MILP solver: HiGHS when highspy is installed, else CBC (default auto)")
    parser.add_argument("--ilp", choices=["auto", "exact", "windows", "off"], default="auto",
                        help="ILP stage: exact full model (small instances), layer windows, or off (default auto)")
    parser.add_argument("--affinity-power", default="auto",
                        help="fit pair counts raised to this power in (0, 1]; 1 fits the trace exactly, lower "
                             "generalises better to unseen routing; auto chooses by validation, leaving one "
                             "--trace out when several are given (default auto)")
    parser.add_argument("--weighted", action="store_true", help="weight expert pairs by router weights")
    parser.add_argument("--inter-node-cost", type=float, default=2.0,
                        help="cost of a cross-node transition relative to a cross-device one (default 2)")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="plan on this first share of each trace's sequences; the summary also reports "
                             "the rest as held-out (default 1: use everything)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="where to write the moe-placement/1 JSON plan")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from moe_engine.cli import UserError
    from moe_engine.offline.traces import concat_traces, load_trace
    from moe_engine.placement import PlannerConfig, evaluate_plan, plan_placement, round_robin_plan, save_plan

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path, e.g. {out / 'plan.json'}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if not 0 < args.train_fraction <= 1:
        raise UserError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    traces = [load_trace(p) for p in args.trace]
    experts = {t.num_experts for t in traces}
    if len(experts) != 1:
        raise UserError(f"traces disagree on the number of experts: {sorted(experts)}")
    num_experts = experts.pop()
    train_parts, test_parts = [], []
    for t in traces:
        if args.train_fraction < 1 and t.num_sequences > 1:
            tr, te = t.split_sequences(args.train_fraction)
            train_parts.append(tr)
            test_parts.append(te)
        else:
            train_parts.append(t)
    train = concat_traces(train_parts)
    groups = np.concatenate([np.full(t.num_sequences, i) for i, t in enumerate(train_parts)])
    test = concat_traces(test_parts) if test_parts else None
    try:
        power = None if args.affinity_power == "auto" else float(args.affinity_power)
    except ValueError:
        raise UserError(f"--affinity-power must be a number or auto, got {args.affinity_power!r}") from None
    try:
        config = PlannerConfig(
            num_devices=args.devices, num_nodes=args.nodes, replicas=args.replicas, balance=args.balance,
            time_limit=args.time_limit, solver=args.solver, ilp=args.ilp, affinity_power=power,
            weighted=args.weighted, inter_node_cost=args.inter_node_cost, seed=args.seed,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    meta = traces[0].meta
    with _native_stdout_to_stderr() if args.json else contextlib.nullcontext():
        result = plan_placement(
            train.expert_ids, config, weights=train.expert_weights, num_experts=num_experts,
            moe_layers=meta.get("moe_layers"),
            trace_info={"files": list(args.trace), "model": meta.get("model"), "tokens": train.num_tokens,
                        "sequences": train.num_sequences, "train_fraction": args.train_fraction},
            progress=progress, sequence_starts=train.sequence_starts, groups=groups,
        )
    save_plan(result.plan, args.out)
    rr = round_robin_plan(train.num_layers, num_experts, args.devices, args.nodes)
    rows: list[dict] = []
    for label, trace in (("train", train), ("held-out", test)):
        if trace is None or trace.num_tokens == 0:
            continue
        ours, base = evaluate_plan(result.plan, trace.expert_ids), evaluate_plan(rr, trace.expert_ids)
        rows.append({"tokens": label, "plan": ours.to_json(), "round_robin": base.to_json(),
                     "reduction": 1 - ours.cross_device_share / base.cross_device_share if base.cross_device_share else 0.0})
    summary = {"out": args.out, "seconds": round(result.seconds, 2), "gap": result.gap, "bound": result.bound,
               "objective": result.objective, "ilp": result.stats.get("ilp"), "evaluation": rows}
    if args.json:
        print(json.dumps(summary, indent=1, default=float))
        return 0
    print(f"plan written to {args.out} in {result.seconds:.1f} s; fitted cost {result.objective:.4g}, "
          f"bound {result.bound:.4g}, gap {100 * result.gap:.1f}%")
    print(f"{'tokens':<9} {'placement':<12} {'cross-dev':>9} {'cross-node':>10} {'max/mean load':>13}")
    for row in rows:
        for name, key in (("planned", "plan"), ("round-robin", "round_robin")):
            m = row[key]
            print(f"{row['tokens']:<9} {name:<12} {m['cross_device_share']:>9.4f} {m['cross_node_share']:>10.4f} "
                  f"{m['max_load_ratio']:>13.3f}")
        print(f"{row['tokens']:<9} {'reduction':<12} {100 * row['reduction']:>8.1f}%")
    return 0


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to stderr meanwhile (HiGHS prints its banner
    on stdout whatever its options), so that ``--json`` leaves nothing but JSON on stdout."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable stdout descriptor: nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
