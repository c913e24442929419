"""Cache policies on real routing: the default ("auto") against lru, lfu, arc, fate and predictive.

Traces: the four shared DeepSeek-V2-Lite traces (26 MoE layers x 64 experts, top-6) and the default
model's routing on its held-out validation text (8 x 16, top-2; ``.cache/predictors/default-val.npz``,
recorded here with ``predictors_eval.record_trace`` when missing). One expert cache shared by all layers
holding 5 / 10 / 25 / 50 % of the experts, decode order (token by token, layer by layer), the runtime's
residency core driven by the simulator. Per policy, trace and budget: demand hit rate, its ratio to
Belady's offline optimum, bytes moved relative to LRU.

Generalisation protocol: ``predictive`` runs twice, as constructed by default (online refit from the
default weights, no offline fit) and with weights fitted offline by ``fit_reuse_weights`` on the *train*
domains (law, summary); intent, translation and the default model are held out (another domain, and
another model). Prefetch: ``--prefetch-budgets`` rerun auto, lru and both predictive variants with the
``transition_ho`` predictor (fitted on the train domains) on the shared traces and the cross-layer gate
on the default model.

Writes ``benchmarks/results/cache_policies_eval.json``; every figure comes from this run.

Usage::

    python -m moe_engine.benchmarks.cache_policies_eval                     # --max-tokens 1200, 2 jobs
    python -m moe_engine.benchmarks.cache_policies_eval --traces intent --budgets 0.25 --max-tokens 300
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
TRAIN = ("law", "summary")  # the offline-fitted predictive policy sees only these
DEFAULT_VAL = REPO / ".cache" / "predictors" / "default-val.npz"
POLICIES = ("auto", "lru", "lfu", "arc", "fate", "predictive", "predictive-offline")
PREFETCH_POLICIES = ("auto", "lru", "predictive", "predictive-offline")
PREFETCH = {"distance": 1, "prefetch_min_prob": 0.2}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(name: str, max_tokens: int):
    from moe_engine.offline.traces import RoutingTrace, load_trace

    tr = load_trace(DEFAULT_VAL if name == "default" else SHARED / f"dsv2lite-esft-{name}.npz")
    n = min(max_tokens * (2 if name == "default" else 1), tr.num_tokens)  # the default model is 3x cheaper per token
    starts = np.concatenate([tr.sequence_starts[tr.sequence_starts < n], [n]]).astype(np.int64)
    gi = None if tr.gate_inputs is None else tr.gate_inputs[:n]
    return RoutingTrace(tr.expert_ids[:n], tr.expert_weights[:n], starts, tr.meta, gate_inputs=gi)


def run_trace(name: str, a: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from moe_engine.default_model import default_model_path
    from moe_engine.offline.predictor_factory import build_predictor
    from moe_engine.offline.simulator import SimConfig, belady_hit_rate, capacity_for, simulate
    from moe_engine.offline.traces import load_trace
    from moe_engine.runtime.policies import fit_reuse_weights

    tr = load(name, a["max_tokens"])
    T, L, K = tr.expert_ids.shape
    E = tr.num_experts
    out: dict[str, Any] = {"trace": name, "tokens": T, "layers": L, "experts": E, "top_k": K,
                           "held_out": name not in TRAIN, "runs": []}
    offline_kw: dict[str, Any] = {}
    pred = None
    if name != "default":
        train = [load_trace(SHARED / f"dsv2lite-esft-{d}.npz") for d in TRAIN if d != name]
        t0 = time.perf_counter()
        offline_kw = {"weights": fit_reuse_weights([t.expert_ids[: a["fit_tokens"]] for t in train], E)}
        log(f"[{name}] offline reuse weights fitted on {[d for d in TRAIN if d != name]} in {time.perf_counter() - t0:.0f} s")
        if a["prefetch_budgets"]:
            pred = build_predictor("transition_ho", train, tr)
    else:
        # Another model: its own reuse weights cannot come from DeepSeek traces; fit them on the first
        # half of its validation trace and score the whole (offline fit at its most favourable).
        offline_kw = {"weights": fit_reuse_weights([tr.expert_ids[: T // 2]], E)}
        if a["prefetch_budgets"]:
            pred = build_predictor("cross_layer_gate", [], tr, model_dir=default_model_path())
    out["offline_weights"] = offline_kw["weights"]
    for budget in a["budgets"]:
        cap = capacity_for(budget, L, E, K)
        belady, _ = belady_hit_rate(tr.expert_ids, cap)
        out["runs"].append({"budget": budget, "policy": "belady", "prefetch": False, "hit_rate": belady,
                            "belady_hit_rate": belady, "capacity": cap})
        jobs = [(p, False) for p in POLICIES]
        if pred is not None and budget in a["prefetch_budgets"]:
            jobs += [(p, True) for p in PREFETCH_POLICIES]
        for policy, prefetch in jobs:
            kw = offline_kw | {"online": False} if policy == "predictive-offline" else {}
            cfg = SimConfig(budget=budget, policy=policy.split("-")[0], policy_kwargs=kw, prefetch=prefetch,
                            predictor=pred.name if prefetch and pred is not None else None,
                            **(PREFETCH if prefetch else {}))
            res = simulate(tr, cfg, predictor=pred if prefetch else None, with_belady=False)
            row = {k: v for k, v in res.to_dict().items() if k not in ("settings", "per_layer_hit_rate", "profile")}
            row.update({"budget": budget, "policy": policy, "prefetch": prefetch, "belady_hit_rate": belady,
                        "ratio_to_belady": res.hit_rate / belady})
            out["runs"].append(row)
            log(f"[{name}] {budget:.2f} {policy}{' + prefetch' if prefetch else ''}: hit {res.hit_rate:.4f} "
                f"({res.hit_rate / belady:.3f}x Belady {belady:.4f}) in {res.wall_s:.0f} s")
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    for name, r in results.items():
        runs = r["runs"]
        for budget in sorted({x["budget"] for x in runs}):
            at = [x for x in runs if x["budget"] == budget]
            lru = next(x for x in at if x["policy"] == "lru" and not x["prefetch"])
            rows = {}
            for x in at:
                key = x["policy"] + (" + prefetch" if x["prefetch"] else "")
                rows[key] = {"hit_rate": round(x["hit_rate"], 4), "x_belady": round(x["hit_rate"] / x["belady_hit_rate"], 3)}
                if x["policy"] != "belady":
                    rows[key]["bytes_vs_lru"] = round(x["bytes_moved"] / lru["bytes_moved"], 3)
            table.setdefault(name, {})[f"{budget:.2f}"] = rows
            online = {k: v["hit_rate"] for k, v in rows.items() if k in POLICIES}
            best = max(online, key=lambda k: online[k])
            checks.append({"trace": name, "budget": budget, "auto": online["auto"], "lfu": online["lfu"],
                           "auto_ge_lfu": online["auto"] >= online["lfu"], "best": best,
                           "auto_vs_best": round(online["auto"] / online[best], 3)})
    return {"table": table, "auto_vs_lfu": checks, "auto_never_below_lfu": all(c["auto_ge_lfu"] for c in checks)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default=",".join((*DOMAINS, "default")), help="shared domains and/or 'default'")
    p.add_argument("--budgets", default="0.05,0.10,0.25,0.50", help="cache budgets as shares of all experts")
    p.add_argument("--prefetch-budgets", default="0.10,0.25", help="budgets also run with prefetch ('' = none)")
    p.add_argument("--max-tokens", type=int, default=1200, help="tokens of each shared trace (2x for the default model)")
    p.add_argument("--fit-tokens", type=int, default=3000, help="tokens of each train trace for the offline fit")
    p.add_argument("--jobs", type=int, default=2, help="traces simulated in parallel")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cache_policies_eval.json"))
    args = p.parse_args(argv)
    names = [n for n in args.traces.split(",") if n]
    if "default" in names and not DEFAULT_VAL.exists():
        from moe_engine.benchmarks.predictors_eval import record_trace

        record_trace(DEFAULT_VAL, "validation", None, 8000)
    a = {"budgets": [float(b) for b in args.budgets.split(",")], "max_tokens": args.max_tokens,
         "fit_tokens": args.fit_tokens,
         "prefetch_budgets": [float(b) for b in args.prefetch_budgets.split(",") if b]}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = dict(zip(names, pool.map(run_trace, names, [a] * len(names))))
    import torch

    report = {
        "protocol": "one cache shared by all MoE layers, capacity = budget x layers x experts (at least top_k); "
                    "decode order; demand hit rate over all token x layer x top_k accesses; Belady = offline "
                    "optimum without prefetch; bytes_vs_lru = bytes moved (demand + prefetch) / LRU's without "
                    f"prefetch. predictive-offline: weights fitted on {', '.join(TRAIN)} (the default model: on "
                    "the first half of its own trace); intent, translation and default are held out.",
        "command": "python -m moe_engine.benchmarks.cache_policies_eval " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
        "settings": {**a, "prefetch": PREFETCH, "prefetch_predictor": {"shared": "transition_ho", "default": "cross_layer_gate"}},
        "traces": results,
        **summarize(results),
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    log(f"wrote {out}")
    print(json.dumps({"auto_never_below_lfu": report["auto_never_below_lfu"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
