"""Expert-parallel projection on the shared DeepSeek-V2-Lite traces: plan vs round-robin, standard vs
context-coherent, with and without token regrouping, and replica load balance.

For every held-out domain (plan fitted on the other three: leave one domain out) and 4 and 8 devices:
  pairs     cross-rank (k, k') expert pairs between consecutive layers on the held-out domain, plan vs
            round-robin (bar: >= 20 % fewer at 4 devices);
  variants  wire bytes, messages and communication time per token of every variant
            ({round-robin, plan} x {standard, coherent} x {no regrouping, regrouping}, placement.projection),
            decode batches of --batch tokens interleaved across sequences, link --link;
  replicas  a plan with replicas (and --balance on the primaries) fitted on the first half of the domain's
            sequences, max/mean expert load per rank on the other half (bar: <= 1.15), hot experts' tokens
            split across copies by load (placement.balance), with the primaries-only plan alongside.

Run:  python -m moe_engine.benchmarks.ep_projection [--time-limit 15] [--out PATH]
Skips with a message (exit 0) when the shared traces are absent. Threads pinned to 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from moe_engine.benchmarks.placement_eval import pool  # noqa: E402
from moe_engine.placement import PlacementPlan, PlannerConfig, evaluate_plan, plan_placement, round_robin_plan  # noqa: E402
from moe_engine.placement.affinity import select_rows  # noqa: E402
from moe_engine.placement.projection import LINK_PRESETS, LinkModel, project_variants  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("intent", "law", "summary", "translation")
NUM_EXPERTS = 64
DEFAULT_OUT = Path.home() / ".cache" / "moe-engine" / "bench" / "ep_projection.json"
REPLICAS = {4: 8, 8: 16}  # spare slots per layer: two per device (12.5 % and 25 % more slots)


def find_traces() -> Path | None:
    for base in (ROOT.parent / "shared" / "traces", Path("/work/shared/traces")):
        if all((base / f"dsv2lite-esft-{d}.npz").exists() for d in DOMAINS):
            return base
    return None


def load_domain(traces: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(traces / f"dsv2lite-esft-{name}.npz")
    return data["expert_ids"], data["sequence_starts"]


def halves(ids: np.ndarray, starts: np.ndarray):
    """(fit ids, fit starts), (held-out ids, held-out starts): the first and second half of the sequences."""
    n = len(starts) - 1
    cut = max(1, n // 2)
    fit_rows, test_rows = select_rows(starts, range(cut)), select_rows(starts, range(cut, n))
    return (ids[fit_rows], starts[: cut + 1]), (ids[test_rows], starts[cut:] - starts[cut])


def variants_json(rows) -> dict:
    return {f"{r.placement} {r.mode} {'regroup' if r.regroup else 'plain'}": {
        "calls_per_layer": r.calls_per_layer, "bytes_per_token": r.bytes_per_token,
        "device_bytes_per_token": r.device_bytes_per_token,
        "inter_node_bytes_per_token": r.inter_node_bytes_per_token, "messages_per_token": r.messages_per_token,
        "microseconds_per_token": 1e6 * r.seconds_per_token, "cross_device_pairs": r.cross_device_pairs,
        "calls": r.calls} for r in rows}


def run_fold(data, name: str, num_devices: int, args, link: LinkModel, log) -> dict:
    test_ids, test_starts = data[name]
    train, starts, groups = pool([data[o] for o in DOMAINS if o != name])
    cfg = PlannerConfig(num_devices=num_devices, time_limit=args.time_limit, seed=args.seed)
    res = plan_placement(train, cfg, num_experts=NUM_EXPERTS, sequence_starts=starts, groups=groups)
    num_layers = test_ids.shape[1]
    rr = evaluate_plan(round_robin_plan(num_layers, NUM_EXPERTS, num_devices), test_ids)
    ours = evaluate_plan(res.plan, test_ids)
    t0 = time.monotonic()
    rows = project_variants(test_ids, res.plan, link, batch=args.batch, sequence_starts=test_starts)
    out = {
        "fold": name, "devices": num_devices, "planner_seconds": round(res.seconds, 1),
        "round_robin_pairs": int(round(rr.cross_device_share * rr.num_pairs)),
        "plan_pairs": int(round(ours.cross_device_share * ours.num_pairs)),
        "round_robin_share": rr.cross_device_share, "plan_share": ours.cross_device_share,
        "pair_reduction": 1 - ours.cross_device_share / rr.cross_device_share,
        "variants": variants_json(rows), "projection_seconds": round(time.monotonic() - t0, 1),
    }
    log(f"lodo {name} G={num_devices}: cross-rank pairs plan {out['plan_pairs']} vs round-robin "
        f"{out['round_robin_pairs']} ({100 * out['pair_reduction']:.1f}% fewer)")
    for key, v in out["variants"].items():
        log(f"  {key:<32} {v['bytes_per_token'] / 1e3:9.1f} KB/token ({v['device_bytes_per_token'] / 1e3:7.1f} merged) "
            f"{v['messages_per_token']:8.1f} msgs/token "
            f"{v['microseconds_per_token']:8.2f} us/token")

    # replicas: fit on the first half of the domain, held-out on the second
    (fit_ids, fit_starts), (held_ids, held_starts) = halves(test_ids, test_starts)
    replicas = REPLICAS[num_devices]
    cfg = PlannerConfig(num_devices=num_devices, replicas=replicas, balance=args.balance,
                        time_limit=args.replica_time_limit, seed=args.seed)
    rep = plan_placement(fit_ids, cfg, num_experts=NUM_EXPERTS, sequence_starts=fit_starts)
    with_copies = evaluate_plan(rep.plan, held_ids)
    primaries = evaluate_plan(PlacementPlan(rep.plan.experts, num_devices), held_ids)
    rr_held = evaluate_plan(round_robin_plan(num_layers, NUM_EXPERTS, num_devices), held_ids)
    rep_rows = project_variants(held_ids, rep.plan, link, batch=args.batch, sequence_starts=held_starts)
    out["replicas"] = {
        "replicas": replicas, "balance": args.balance,
        "copies": int(sum(len(r.devices) - 1 for reps in rep.plan.replicas.values() for r in reps.values())),
        "held_out_tokens": int(len(held_ids)),
        "load_max_over_layers": with_copies.max_load_ratio, "load_mean_over_layers": with_copies.mean_load_ratio,
        "primaries_only_load_max": primaries.max_load_ratio, "primaries_only_load_mean": primaries.mean_load_ratio,
        "round_robin_load_max": rr_held.max_load_ratio,
        "load_fitted_max": evaluate_plan(rep.plan, fit_ids).max_load_ratio,
        "share_with_replicas": with_copies.cross_device_share, "share_primaries_only": primaries.cross_device_share,
        "round_robin_share": rr_held.cross_device_share,
        "variants": variants_json(rep_rows),
    }
    r = out["replicas"]
    log(f"replicas {name} G={num_devices} R={replicas}: held-out max/mean load {r['load_max_over_layers']:.3f} "
        f"(mean over layers {r['load_mean_over_layers']:.3f}; primaries only {r['primaries_only_load_max']:.3f}; "
        f"round-robin {r['round_robin_load_max']:.3f}), share {r['share_with_replicas']:.4f}")
    return out


def summarise(folds: list[dict]) -> dict:
    out: dict = {}
    for num_devices in sorted({f["devices"] for f in folds}):
        fs = [f for f in folds if f["devices"] == num_devices]
        keys = list(fs[0]["variants"])
        out[f"G={num_devices}"] = {
            "pair_reduction_mean": float(np.mean([f["pair_reduction"] for f in fs])),
            "pair_reduction_min": float(np.min([f["pair_reduction"] for f in fs])),
            "replica_load_max": float(np.max([f["replicas"]["load_max_over_layers"] for f in fs])),
            "replica_load_mean": float(np.mean([f["replicas"]["load_mean_over_layers"] for f in fs])),
            "primaries_only_load_max": float(np.max([f["replicas"]["primaries_only_load_max"] for f in fs])),
            "variants_mean": {k: {m: float(np.mean([f["variants"][k][m] for f in fs]))
                                  for m in ("bytes_per_token", "device_bytes_per_token", "messages_per_token",
                                            "microseconds_per_token")}
                              for k in keys},
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-limit", type=float, default=15.0, help="planner seconds per leave-one-domain-out plan")
    parser.add_argument("--replica-time-limit", type=float, default=8.0, help="planner seconds per replica plan")
    parser.add_argument("--balance", type=float, default=0.1, help="eps of the primaries' balance in replica plans")
    parser.add_argument("--batch", type=int, default=16, help="decode batch in tokens")
    parser.add_argument("--link", default="nvlink", choices=sorted(LINK_PRESETS), help="link model preset")
    parser.add_argument("--devices", default="4,8", help="comma-separated device counts")
    parser.add_argument("--domains", default=",".join(DOMAINS), help="held-out domains (folds) to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args()
    traces = find_traces()
    if traces is None:
        print("skipped: shared DeepSeek-V2-Lite traces not found (../shared/traces or /work/shared/traces)")
        return 0
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # numpy-only benchmark; torch is pinned only when present
        pass
    link = LinkModel.preset(args.link)
    data = {d: load_domain(traces, d) for d in DOMAINS}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.monotonic()
    folds = []
    for num_devices in (int(x) for x in args.devices.split(",")):
        for name in args.domains.split(","):
            folds.append(run_fold(data, name, num_devices, args, link, log))
            results = {
                "machine": {"platform": platform.platform(), "python": platform.python_version()},
                "settings": {k: v for k, v in vars(args).items() if k != "out"},
                "link": link.__dict__, "folds": folds, "summary": summarise(folds),
                "seconds": round(time.monotonic() - t0, 1),
            }
            tmp = out_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(results, indent=1) + "\n")
            tmp.replace(out_path)
    for key, row in summarise(folds).items():
        log(f"{key}: pairs {100 * row['pair_reduction_mean']:.1f}% fewer (min {100 * row['pair_reduction_min']:.1f}%), "
            f"replica load max {row['replica_load_max']:.3f} (mean over layers {row['replica_load_mean']:.3f})")
    log(f"wrote {out_path} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
