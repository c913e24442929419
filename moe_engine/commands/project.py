"""``moe-engine project``: project expert-parallel communication from a routing trace (placement/projection.py)."""

from __future__ import annotations

import argparse
import json

NAME = "project"
HELP = "project expert-parallel wire bytes, messages, all-to-alls and time per token from a routing trace"
DESCRIPTION = """\
Replay a routing trace as decode batches of B tokens on G devices and project, per token, what expert
parallelism would send: token rows (bytes) on the wire, messages, all-to-all calls and communication time
under a link model. Variants: round-robin placement vs a moe-placement/1 plan (replicas split by load);
standard EP (dispatch + combine, two all-to-alls per MoE layer) vs context-coherent (one per layer, a
token's state moving between consecutive layers' copies); without vs with token regrouping (one message
per device pair instead of one per token row). "merged KB": the bytes if a sender merged a token's rows
for one destination (one row per token, source and destination device).

Links: nvlink (NVLink 4 inside a node, 400 Gb/s InfiniBand across), pcie (PCIe 4 inside, 200 Gb/s IB
across), ib (every transfer through a 400 Gb/s NIC). Rows are --hidden-size x --bytes-per-element bytes.

Example:
  moe-engine project --trace law.npz --plan plan.json --batch 16
  moe-engine project --trace law.npz --devices 16 --nodes 2 --link nvlink --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="moe-routing-trace/1 .npz trace to replay")
    parser.add_argument("--plan", default=None, help="moe-placement/1 JSON plan (default: round-robin only)")
    parser.add_argument("--devices", type=int, default=None,
                        help="number of devices G (required without --plan; must match the plan's)")
    parser.add_argument("--nodes", type=int, default=None, help="number of nodes N; must divide G (default: the plan's, else 1)")
    parser.add_argument("--link", default="nvlink", help="link model: nvlink, pcie or ib (default nvlink)")
    parser.add_argument("--batch", type=int, default=16, help="decode batch B in tokens (default 16)")
    parser.add_argument("--hidden-size", type=int, default=2048, help="elements per token row (default 2048)")
    parser.add_argument("--bytes-per-element", type=int, default=2, help="bytes per element (default 2, bf16)")
    parser.add_argument("--json", action="store_true", help="print the variants as JSON")


def run(args: argparse.Namespace) -> int:
    from moe_engine.cli import UserError
    from moe_engine.offline.traces import load_trace
    from moe_engine.placement import load_plan
    from moe_engine.placement.projection import LINK_PRESETS, LinkModel, project_variants

    if args.link not in LINK_PRESETS:
        raise UserError(f"unknown link {args.link!r}; choose one of {', '.join(LINK_PRESETS)}")
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1 token, got {args.batch}")
    if args.plan is None and args.devices is None:
        raise UserError("give --devices G (or --plan plan.json to compare a plan with round-robin)")
    if args.devices is not None and args.devices < 1:
        raise UserError(f"--devices must be at least 1, got {args.devices}")
    link = LinkModel.preset(args.link, hidden_size=args.hidden_size, bytes_per_element=args.bytes_per_element)
    trace = load_trace(args.trace)
    plan = load_plan(args.plan) if args.plan else None
    if plan is not None:
        if trace.num_layers != plan.num_layers:
            raise UserError(f"trace has {trace.num_layers} MoE layers but the plan has {plan.num_layers}; "
                            "use a plan made from traces of the same model")
        if trace.num_experts > plan.num_experts:
            raise UserError(f"trace has {trace.num_experts} experts per layer but the plan places {plan.num_experts}")
        if args.nodes is not None and args.nodes != plan.num_nodes:
            raise UserError(f"the plan is for {plan.num_nodes} node(s), not {args.nodes}; drop --nodes")
    rows = project_variants(trace.expert_ids, plan, link, batch=args.batch, sequence_starts=trace.sequence_starts,
                            num_devices=args.devices, num_nodes=args.nodes or 1, num_experts=trace.num_experts)
    if args.json:
        print(json.dumps({"trace": args.trace, "plan": args.plan, "link": link.__dict__,
                          "variants": [r.to_json() for r in rows]}, indent=1))
        return 0
    first = rows[0]
    devices = plan.num_devices if plan else args.devices
    nodes = plan.num_nodes if plan else (args.nodes or 1)
    print(f"{first.num_tokens} tokens, {devices} devices in {nodes} node(s), link {link.name}, batch {args.batch}, "
          f"row {link.row_bytes} bytes")
    print(f"{'placement':<12} {'mode':<9} {'regroup':<7} {'calls/layer':>11} {'KB/token':>9} {'merged KB':>9} {'inter-node KB':>13} "
          f"{'msgs/token':>10} {'us/token':>9}")
    for r in rows:
        print(f"{r.placement:<12} {r.mode:<9} {'yes' if r.regroup else 'no':<7} {r.calls_per_layer:>11} "
              f"{r.bytes_per_token / 1e3:>9.1f} {r.device_bytes_per_token / 1e3:>9.1f} {r.inter_node_bytes_per_token / 1e3:>13.1f} "
              f"{r.messages_per_token:>10.1f} {1e6 * r.seconds_per_token:>9.2f}")
    return 0
