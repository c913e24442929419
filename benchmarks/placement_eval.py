"""Expert placement: every acceptance figure of the planner, measured in one run, written as JSON.

Sections (each a fresh run of the planner on the same inputs as its baselines):
  in-domain  plan on the first 70 % of each shared domain's sequences, test on the rest;
  lodo       plan on three domains, test on the fourth (leave one domain out), every fold;
  both at 4 and 8 devices, balance off and on (eps 0.1), against round-robin and a random-restart
  layer-by-layer swap search given the same trace (fitted on raw counts, a few seconds); the planner's
  bound gap (LP relaxation of its ILP) and max/mean device load on fitted and held-out tokens; and an
  ablation of the affinity power (1.0 = fit raw counts);
  replicas   in-domain at 8 devices with 8 or 16 spare slots per layer, with and without copies in them;
  scale      DeepSeek-V3 shape (256 experts, 58 layers, top-8) synthetic trace with planted affinity,
  on 8 / 32 / 64 devices in 1 / 4 / 8 nodes, planned within the time limit, against the planted plan,
  measured on held-out synthetic tokens.

Run:  python -m moe_engine.benchmarks.placement_eval [--time-limit 20] [--sections in-domain,lodo,scale]
Writes benchmarks/results/placement_eval.json (rewritten after every section).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from moe_engine.placement import (
    PlacementPlan,
    PlannerConfig,
    Topology,
    compute_affinity,
    evaluate_plan,
    plan_placement,
)
from moe_engine.placement.affinity import select_rows
from moe_engine.placement.search import improve_layer_swaps, layer_cost_matrix, placement_cost
from moe_engine.placement.synthetic import planted_assignment, planted_trace

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
DOMAINS = ("intent", "law", "summary", "translation")
NUM_EXPERTS = 64


def load_domain(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(TRACES / f"dsv2lite-esft-{name}.npz")
    return data["expert_ids"], data["sequence_starts"]


def split(ids: np.ndarray, starts: np.ndarray, fraction: float = 0.7):
    """(train ids, train sequence starts), test ids: the first ``fraction`` of the sequences and the rest
    (as moe_engine.offline.traces.RoutingTrace.split_sequences)."""
    n = len(starts) - 1
    cut = min(max(1, int(round(n * fraction))), n - 1)
    return (ids[select_rows(starts, range(cut))], starts[: cut + 1]), ids[select_rows(starts, range(cut, n))]


def pool(parts):
    """Concatenate (ids, starts) parts; returns ids, starts and the part index of every sequence."""
    ids = np.concatenate([p[0] for p in parts])
    offsets = np.cumsum([0] + [len(p[0]) for p in parts])
    starts = np.concatenate([[0]] + [p[1][1:] + o for p, o in zip(parts, offsets)])
    groups = np.concatenate([np.full(len(p[1]) - 1, i) for i, p in enumerate(parts)])
    return ids, starts, groups


def swap_search(expert_ids: np.ndarray, num_devices: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Baseline: random placements improved layer by layer with best-improvement swaps, random restarts."""
    aff = compute_affinity(expert_ids, NUM_EXPERTS)
    cost = Topology(num_devices).cost_matrix()
    num_layers = aff.num_layers
    capacity = np.full((num_layers, num_devices), NUM_EXPERTS // num_devices)
    rng = np.random.default_rng(seed)
    deadline = time.monotonic() + seconds
    best, best_cost = None, np.inf
    while best is None or time.monotonic() < deadline:
        assign = np.stack([rng.permutation(np.arange(NUM_EXPERTS) % num_devices) for _ in range(num_layers)])
        current = placement_cost(aff.pairs, assign, cost)
        while time.monotonic() < deadline:
            for layer in range(num_layers):
                lc = layer_cost_matrix(aff.pairs, assign, cost, layer)
                assign[layer] = improve_layer_swaps(lc, assign[layer], capacity[layer])
            new = placement_cost(aff.pairs, assign, cost)
            if new >= current - 1e-9:
                break
            current = new
        if current < best_cost:
            best, best_cost = assign.copy(), current
    return best


def rr_plan(num_layers: int, num_devices: int) -> PlacementPlan:
    return PlacementPlan(np.tile(np.arange(NUM_EXPERTS) % num_devices, (num_layers, 1)), num_devices)


def run_case(train_set, test: np.ndarray, num_devices: int, balance: float | None, args, baseline: bool,
             power: float | None) -> dict:
    train, starts, groups = train_set
    cfg = PlannerConfig(num_devices=num_devices, balance=balance, time_limit=args.time_limit, affinity_power=power,
                        seed=args.seed)
    res = plan_placement(train, cfg, num_experts=NUM_EXPERTS, sequence_starts=starts, groups=groups)
    num_layers = train.shape[1]
    rr_test = evaluate_plan(rr_plan(num_layers, num_devices), test)
    ours_test = evaluate_plan(res.plan, test)
    ours_train = evaluate_plan(res.plan, train)
    out = {
        "devices": num_devices,
        "balance": balance,
        "affinity_power": power if power is not None else "auto",
        "chosen_power": res.stats["power"],
        "round_robin_share": rr_test.cross_device_share,
        "planner_share": ours_test.cross_device_share,
        "planner_reduction": 1 - ours_test.cross_device_share / rr_test.cross_device_share,
        "planner_train_share": ours_train.cross_device_share,
        "load_ratio_fitted": ours_train.max_load_ratio,
        "load_ratio_held_out": ours_test.max_load_ratio,
        "round_robin_load_ratio_held_out": rr_test.max_load_ratio,
        "fitted_cost": res.objective,
        "bound": res.bound,
        "gap_to_bound": res.gap,
        "planner_seconds": round(res.seconds, 2),
        "search": {"starts": res.stats["starts"], "perturbations": res.stats["perturbations"]},
    }
    if baseline:
        t0 = time.monotonic()
        assign = swap_search(train, num_devices, args.baseline_seconds, seed=args.seed)
        base = evaluate_plan(PlacementPlan(assign, num_devices), test)
        out["swap_search_share"] = base.cross_device_share
        out["swap_search_reduction"] = 1 - base.cross_device_share / rr_test.cross_device_share
        out["swap_search_seconds"] = round(time.monotonic() - t0, 2)
    return out


def summarise(cases: list[dict]) -> dict:
    groups: dict[str, list[dict]] = {}
    for c in cases:
        key = f"G={c['devices']} balance={'on' if c['balance'] is not None else 'off'} power={c['affinity_power']}"
        groups.setdefault(key, []).append(c)
    out = {}
    for key, cs in groups.items():
        row = {
            "planner_reduction_mean": float(np.mean([c["planner_reduction"] for c in cs])),
            "planner_share_mean": float(np.mean([c["planner_share"] for c in cs])),
            "round_robin_share_mean": float(np.mean([c["round_robin_share"] for c in cs])),
            "gap_to_bound_mean": float(np.mean([c["gap_to_bound"] for c in cs])),
            "load_ratio_fitted_max": float(np.max([c["load_ratio_fitted"] for c in cs])),
            "load_ratio_held_out_max": float(np.max([c["load_ratio_held_out"] for c in cs])),
        }
        if all("swap_search_reduction" in c for c in cs):
            row["swap_search_reduction_mean"] = float(np.mean([c["swap_search_reduction"] for c in cs]))
        out[key] = row
    return out


def section_real(kind: str, args, log) -> dict:
    data = {d: load_domain(d) for d in DOMAINS}
    cases = []
    for name in DOMAINS:
        if kind == "in-domain":
            (ids, starts), test = split(*data[name])
            train = (ids, starts, None)
        else:
            train = pool([data[o] for o in DOMAINS if o != name])
            test = data[name][0]
        for num_devices in (4, 8):
            settings = [(None, args.power, True), (args.balance, args.power, False)]
            if args.ablation:
                settings += [(None, 1.0, False), (None, 0.5, False)]
            for balance, power, baseline in settings:
                case = run_case(train, test, num_devices, balance, args, baseline, power)
                case["fold" if kind == "lodo" else "domain"] = name
                cases.append(case)
                log(f"{kind} {name} G={num_devices} balance={balance} power={power}: planner "
                    f"{100 * case['planner_reduction']:.1f}% "
                    + (f"swap {100 * case['swap_search_reduction']:.1f}% " if baseline else "")
                    + f"gap {100 * case['gap_to_bound']:.1f}% load fitted {case['load_ratio_fitted']:.3f} "
                    f"held-out {case['load_ratio_held_out']:.3f}")
    return {"cases": cases, "summary": summarise(cases)}


def section_scale(args, log) -> dict:
    t0 = time.monotonic()
    train = planted_trace(num_tokens=args.scale_tokens, num_layers=58, num_experts=256, top_k=8, seed=0)
    test = planted_trace(num_tokens=args.scale_tokens // 2, num_layers=58, num_experts=256, top_k=8, seed=1)
    log(f"scale traces generated in {time.monotonic() - t0:.1f} s")
    runs = []
    for num_devices, num_nodes in ((8, 1), (32, 4), (64, 8)):
        cfg = PlannerConfig(num_devices=num_devices, num_nodes=num_nodes, time_limit=args.scale_time_limit, seed=args.seed)
        t1 = time.monotonic()
        res = plan_placement(train.expert_ids, cfg, num_experts=256)
        wall = time.monotonic() - t1
        planted = PlacementPlan(planted_assignment(train.positions, num_devices), num_devices, num_nodes)
        rr = PlacementPlan(np.tile(np.arange(256) % num_devices, (58, 1)), num_devices, num_nodes)
        m, p, r = (evaluate_plan(x, test.expert_ids) for x in (res.plan, planted, rr))
        run = {
            "devices": num_devices, "nodes": num_nodes, "time_limit": args.scale_time_limit, "wall_seconds": round(wall, 2),
            "planner_share": m.cross_device_share, "planted_share": p.cross_device_share, "round_robin_share": r.cross_device_share,
            "planner_node_share": m.cross_node_share, "planted_node_share": p.cross_node_share,
            "round_robin_node_share": r.cross_node_share,
            "planner_cost_per_pair": m.cost_per_pair, "planted_cost_per_pair": p.cost_per_pair,
            "recovered": (r.cost_per_pair - m.cost_per_pair) / (r.cost_per_pair - p.cost_per_pair),
            "gap_to_bound": res.gap,
        }
        runs.append(run)
        log(f"scale G={num_devices} N={num_nodes}: {wall:.1f} s, share {m.cross_device_share:.4f} vs planted "
            f"{p.cross_device_share:.4f} (round-robin {r.cross_device_share:.4f}), node share {m.cross_node_share:.4f} vs "
            f"{p.cross_node_share:.4f}, recovered {100 * run['recovered']:.1f}% of the planted cost reduction")
    return {"tokens": args.scale_tokens, "runs": runs}


def section_replicas(args, log) -> dict:
    """In-domain at 8 devices: spare slots (E + R slots) with and without replicas in them."""
    cases = []
    for name in DOMAINS:
        (ids, starts), test = split(*load_domain(name))
        for replicas in (0, 8, 16):
            for balance in (None, args.balance):
                cfg = PlannerConfig(num_devices=8, replicas=replicas, balance=balance, time_limit=args.replica_time_limit,
                                    seed=args.seed)
                res = plan_placement(ids, cfg, num_experts=NUM_EXPERTS, sequence_starts=starts)
                with_copies = evaluate_plan(res.plan, test)
                primaries = evaluate_plan(PlacementPlan(res.plan.experts, 8), test)
                rr = evaluate_plan(rr_plan(ids.shape[1], 8), test)
                case = {
                    "domain": name, "replicas": replicas, "balance": balance,
                    "copies": int(sum(len(r.devices) - 1 for reps in res.plan.replicas.values() for r in reps.values())),
                    "share_with_replicas": with_copies.cross_device_share,
                    "share_primaries_only": primaries.cross_device_share,
                    "round_robin_share": rr.cross_device_share,
                    "load_ratio_with_replicas": with_copies.max_load_ratio,
                    "load_ratio_primaries_only": primaries.max_load_ratio,
                    "load_ratio_fitted": evaluate_plan(res.plan, ids).max_load_ratio,
                }
                cases.append(case)
                log(f"replicas {name} R={replicas} balance={balance}: share {case['share_with_replicas']:.4f} "
                    f"(primaries only {case['share_primaries_only']:.4f}, round-robin {case['round_robin_share']:.4f}), "
                    f"load {case['load_ratio_with_replicas']:.3f} (primaries only {case['load_ratio_primaries_only']:.3f})")
    summary = {}
    for replicas in (0, 8, 16):
        for balance in (None, args.balance):
            cs = [c for c in cases if c["replicas"] == replicas and c["balance"] == balance]
            summary[f"R={replicas} balance={'on' if balance is not None else 'off'}"] = {
                k: float(np.mean([c[k] for c in cs]))
                for k in ("share_with_replicas", "share_primaries_only", "round_robin_share",
                          "load_ratio_with_replicas", "load_ratio_primaries_only", "load_ratio_fitted")
            }
    return {"cases": cases, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-limit", type=float, default=20.0, help="planner seconds per real-trace case")
    parser.add_argument("--baseline-seconds", type=float, default=4.0, help="swap-search baseline seconds per case")
    parser.add_argument("--balance", type=float, default=0.1, help="eps for the balance-on cases")
    parser.add_argument("--power", type=float, default=None,
                        help="affinity power of the planner (default: chosen by validation)")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the power=1.0 ablation")
    parser.add_argument("--scale-time-limit", type=float, default=100.0, help="planner seconds per scale run")
    parser.add_argument("--scale-tokens", type=int, default=8192, help="tokens in the scale training trace")
    parser.add_argument("--replica-time-limit", type=float, default=10.0, help="planner seconds per replicas case")
    parser.add_argument("--sections", default="in-domain,lodo,scale,replicas", help="comma-separated sections to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "placement_eval.json"))
    args = parser.parse_args()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    if out_path.exists():  # keep sections not rerun
        try:
            old = json.loads(out_path.read_text())
            results.update({k: v for k, v in old.items() if k in ("in-domain", "lodo", "scale", "replicas")})
        except json.JSONDecodeError:
            pass

    def log(msg: str) -> None:
        print(msg, flush=True)

    for section in args.sections.split(","):
        t0 = time.monotonic()
        if section in ("in-domain", "lodo"):
            results[section] = section_real(section, args, log)
        elif section == "scale":
            results[section] = section_scale(args, log)
        elif section == "replicas":
            results[section] = section_replicas(args, log)
        else:
            raise SystemExit(f"unknown section {section!r}")
        results[section]["seconds"] = round(time.monotonic() - t0, 1)
        results[section]["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "sections")}
        results["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1, default=float) + "\n")
        tmp.replace(out_path)
        if section in ("in-domain", "lodo", "replicas"):
            for key, row in results[section]["summary"].items():
                log(f"{section} {key}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
