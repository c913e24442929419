"""Cache policies and prefetch on real routing: the trace-driven simulator, leave-one-domain-out.

For each of the four shared DeepSeek-V2-Lite traces in turn (the test domain), with the other three as
training traces: one expert cache shared by all 26 MoE layers holding 10 / 25 / 50 % of the 1,664
experts, decode order (token by token, layer by layer, sequences one after another). Runs lru, lfu, arc,
fate and predictive (reuse weights fitted on the training domains) without prefetch, Belady's offline
optimum as the reference, then predictor-driven prefetch (the learned history predictor of
``predictors_eval.py``, trained without the test domain) with the predictive policy and with lru.
Reports demand hit rate, its ratio to Belady, bytes moved (demand + prefetch, wasted prefetch) and the
projected time per token on both hardware profiles.

Writes ``benchmarks/results/cache_policies_eval.json``; every figure comes from this run (the learned
predictors are loaded from ``.cache/predictors/`` when ``predictors_eval.py`` left them there, else
trained here).

Usage::

    python -m moe_engine.benchmarks.cache_policies_eval              # about 2 hours on 2 busy cores (--jobs 2)
    python -m moe_engine.benchmarks.cache_policies_eval --domains intent --budgets 0.25 --max-tokens 2000
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "traces"
DOMAINS = ("intent", "law", "summary", "translation")
POLICIES = ("lru", "lfu", "arc", "fate", "predictive")
# Prefetch settings: the next layer's predicted experts with probability >= 0.2, at most 6 (top-k) per step.
PREFETCH = {"distance": 1, "prefetch_min_prob": 0.2, "prefetch_per_layer": 6}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _CachedScores:
    """Wraps a predictor so its trace scores are computed once per (trace, distance) across simulations."""

    def __init__(self, pred) -> None:
        self.pred, self.name, self.inputs = pred, pred.name, pred.inputs
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def trace_scores(self, trace, distance: int) -> np.ndarray:
        key = (id(trace), distance)
        if key not in self._cache:
            self._cache[key] = self.pred.trace_scores(trace, distance)
        return self._cache[key]


def run_domain(test: str, args_d: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from moe_engine.offline.predictor_factory import build_predictor
    from moe_engine.offline.simulator import (
        SimConfig,
        belady_hit_rate,
        capacity_for,
        fit_policy_kwargs,
        simulate,
    )
    from moe_engine.offline.traces import RoutingTrace, load_trace

    traces = {d: load_trace(Path(args_d["traces"]) / f"dsv2lite-esft-{d}.npz") for d in DOMAINS}
    train = [traces[d] for d in DOMAINS if d != test]
    tr = traces[test]
    if args_d["max_tokens"]:
        n = args_d["max_tokens"]
        starts = tr.sequence_starts
        starts = np.concatenate([starts[starts < n], [n]]).astype(np.int64)
        tr = RoutingTrace(tr.expert_ids[:n], tr.expert_weights[:n], starts, tr.meta)
    T, L, K = tr.expert_ids.shape
    E = tr.num_experts
    out: dict[str, Any] = {"test": test, "train": [d for d in DOMAINS if d != test], "tokens": T, "runs": []}

    t0 = time.perf_counter()
    weights = fit_policy_kwargs("predictive", train, E)
    out["predictive_fit_seconds"] = time.perf_counter() - t0
    out["predictive_weights"] = weights["weights"]
    log(f"[{test}] predictive reuse weights fitted in {out['predictive_fit_seconds']:.0f} s")

    model_path = Path(args_d["models"]) / f"mlp_history-dsv2-lodo-{test}.pt"
    pred = build_predictor("mlp_history", train, tr, learned_path=model_path, log=log, epochs=args_d["epochs"], threads=1)
    pred = _CachedScores(pred)

    for budget in args_d["budgets"]:
        cap = capacity_for(budget, L, E, K)
        t0 = time.perf_counter()
        belady, _ = belady_hit_rate(tr.expert_ids, cap)
        out["runs"].append({"budget": budget, "policy": "belady", "prefetch": False, "hit_rate": belady,
                            "belady_hit_rate": belady, "wall_s": time.perf_counter() - t0})
        configs: list[tuple[str, dict[str, Any], bool]] = [(p, weights if p == "predictive" else {}, False) for p in POLICIES]
        configs += [("predictive", weights, True), ("lru", {}, True)]
        for policy, kw, prefetch in configs:
            cfg = SimConfig(budget=budget, policy=policy, policy_kwargs=kw, prefetch=prefetch,
                            predictor="mlp_history" if prefetch else None, **(PREFETCH if prefetch else {}))
            res = simulate(tr, cfg, predictor=pred if prefetch else None, with_belady=False)
            row = res.to_dict()
            row.pop("settings")
            row["policy_kwargs"] = None
            row.update({"budget": budget, "policy": policy, "prefetch": prefetch, "belady_hit_rate": belady,
                        "ratio_to_belady": res.hit_rate / belady,
                        "predictor": "mlp_history" if prefetch else None,
                        "prefetch_settings": PREFETCH if prefetch else None})
            out["runs"].append(row)
            log(f"[{test}] budget {budget:.2f} {policy}{' + prefetch' if prefetch else ''}: hit {res.hit_rate:.4f} "
                f"({res.hit_rate / belady:.3f}x Belady {belady:.4f}), moved {res.bytes_moved / 2**30:.1f} GiB "
                f"({res.wall_s:.0f} s)")
    return out


def summarize(domains: dict[str, Any], budgets: list[float]) -> dict[str, Any]:
    def get(d: str, budget: float, policy: str, prefetch: bool) -> dict[str, Any]:
        return next(r for r in domains[d]["runs"] if r["budget"] == budget and r["policy"] == policy
                    and r["prefetch"] == prefetch)

    names = list(domains)
    table: dict[str, Any] = {}
    for budget in budgets:
        rows: dict[str, Any] = {}
        for policy, prefetch in [("belady", False), *((p, False) for p in POLICIES), ("predictive", True), ("lru", True)]:
            key = policy + (" + prefetch" if prefetch else "")
            per = {d: get(d, budget, policy, prefetch) for d in names}
            lru_bytes = {d: get(d, budget, "lru", False)["bytes_moved"] for d in names} if policy != "belady" else None
            rows[key] = {
                "hit_rate": {d: per[d]["hit_rate"] for d in names},
                "ratio_to_belady": {d: per[d]["hit_rate"] / per[d]["belady_hit_rate"] for d in names},
            }
            if lru_bytes is not None:
                rows[key]["bytes_vs_lru"] = {d: per[d]["bytes_moved"] / lru_bytes[d] for d in names}
                rows[key]["wasted_prefetch_share"] = {
                    d: per[d]["wasted_prefetch"] / max(per[d]["prefetch_loads"], 1) for d in names}
                rows[key]["time_per_token_s"] = {
                    prof: {d: per[d]["projections"][prof]["time_per_token_s"] for d in names}
                    for prof in per[names[0]]["projections"]}
            for k in list(rows[key]):
                v = rows[key][k]
                if isinstance(v, dict) and all(isinstance(x, float) for x in v.values()):
                    v["average"] = float(np.mean(list(v.values())))
        table[f"{budget:.2f}"] = rows
    acc: dict[str, Any] = {}
    if "0.25" in table:
        t = table["0.25"]
        online = {k: v["ratio_to_belady"]["average"] for k, v in t.items() if k in POLICIES}
        best = max(online, key=lambda k: online[k])
        pf = t["predictive + prefetch"]
        per_domain_ok = {d: pf["hit_rate"][d] >= t["belady"]["hit_rate"][d] and pf["bytes_vs_lru"][d] <= 1.5
                         for d in names}
        acc = {
            "budget": 0.25,
            "no_prefetch_ratio_to_belady": online,
            "best_online_policy": best,
            "best_online_ratio": online[best],
            "best_online_ratio_per_domain": {d: t[best]["ratio_to_belady"][d] for d in names},
            "bar_ratio": 0.78,
            "no_prefetch_met": online[best] >= 0.78,
            "prefetch": {
                "demand_hit_rate": pf["hit_rate"],
                "belady_no_prefetch_hit_rate": t["belady"]["hit_rate"],
                "bytes_vs_lru": pf["bytes_vs_lru"],
                "met_per_domain": per_domain_ok,
                "met": all(per_domain_ok.values()),
            },
        }
    return {"table": table, "acceptance": acc}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default=str(SHARED), help="folder of the shared dsv2lite-esft-*.npz traces")
    p.add_argument("--models", default=str(REPO / ".cache" / "predictors"), help="learned predictors (saved / loaded)")
    p.add_argument("--domains", default=",".join(DOMAINS), help="test domains (comma-separated)")
    p.add_argument("--budgets", default="0.10,0.25,0.50", help="cache budgets as shares of all experts")
    p.add_argument("--max-tokens", type=int, default=0, help="replay only the first N tokens of each test trace")
    p.add_argument("--epochs", type=int, default=3, help="epochs when a learned predictor must be trained here")
    p.add_argument("--jobs", type=int, default=2, help="test domains simulated in parallel")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cache_policies_eval.json"))
    args = p.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    args_d = {"traces": args.traces, "models": args.models, "budgets": budgets, "max_tokens": args.max_tokens,
              "epochs": args.epochs}
    Path(args.models).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    domains = [d for d in args.domains.split(",") if d]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = dict(zip(domains, pool.map(run_domain, domains, [args_d] * len(domains))))
    import torch

    report = {
        "protocol": "leave-one-domain-out over the four shared DeepSeek-V2-Lite traces; one cache shared by all "
                    "26 MoE layers, capacity = budget x 1,664 experts; decode order; demand hit rate over all "
                    "token x layer x top-6 accesses; Belady = offline optimum without prefetch",
        "command": "python -m moe_engine.benchmarks.cache_policies_eval " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
        "prefetch_settings": PREFETCH,
        "domains": results,
        **summarize(results, budgets),
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    log(f"wrote {out}")
    print(json.dumps(report["acceptance"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
