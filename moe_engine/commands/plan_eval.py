"""``moe-engine plan-eval``: measure a placement plan on a routing trace."""

from __future__ import annotations

import argparse
import json

NAME = "plan-eval"
HELP = "evaluate a placement plan on a routing trace (cross-device share, cross-node share, load)"
DESCRIPTION = """\
Replay a routing trace against a moe-placement/1 plan and report, over every token and every pair of
consecutive MoE layers (all top-k x top-k expert pairs): the share of pairs on different devices, on
different nodes, and the max/mean device load per layer; round-robin placement alongside.

Example:
  moe-engine plan-eval --plan plan.json --trace held_out.npz --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, help="moe-placement/1 JSON plan (from `moe-engine plan`)")
    parser.add_argument("--trace", required=True, help="moe-routing-trace/1 .npz trace to replay")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from moe_engine.cli import UserError
    from moe_engine.offline.traces import load_trace
    from moe_engine.placement import evaluate_plan, load_plan, round_robin_plan

    plan = load_plan(args.plan)
    trace = load_trace(args.trace)
    if trace.num_layers != plan.num_layers:
        raise UserError(f"trace has {trace.num_layers} MoE layers but the plan has {plan.num_layers}")
    if trace.num_experts > plan.num_experts:
        raise UserError(f"trace has {trace.num_experts} experts per layer but the plan places {plan.num_experts}")
    ours = evaluate_plan(plan, trace.expert_ids)
    base = evaluate_plan(round_robin_plan(plan.num_layers, plan.num_experts, plan.num_devices, plan.num_nodes),
                         trace.expert_ids)
    reduction = 1 - ours.cross_device_share / base.cross_device_share if base.cross_device_share else 0.0
    if args.json:
        print(json.dumps({"plan": args.plan, "trace": args.trace, "metrics": ours.to_json(),
                          "round_robin": base.to_json(), "reduction": reduction}, indent=1))
        return 0
    print(f"{'placement':<12} {'cross-dev':>9} {'cross-node':>10} {'max/mean load':>13}")
    for name, m in (("plan", ours), ("round-robin", base)):
        print(f"{name:<12} {m.cross_device_share:>9.4f} {m.cross_node_share:>10.4f} {m.max_load_ratio:>13.3f}")
    print(f"cross-device reduction vs round-robin: {100 * reduction:.1f}% over {ours.num_tokens} tokens")
    return 0
