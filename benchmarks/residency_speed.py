"""Speed of the residency core: expert accesses per second through ``simulate()`` (the core, its layer
schedule and the policy, no tensors), at DeepSeek-V3's shape and as the expert count grows.

Workload: a synthetic routing trace with reuse (each token keeps some of the previous token's experts
per layer, Zipf-like popularity for the rest), top-8, budget 25 % of all experts, no prefetch, no
time projection (``profile=None``), no Belady. One process, one thread (``--threads``).

* ``shape``: 58 MoE layers x 256 experts (14,848 experts), per policy.
* ``scaling``: 58 layers x E experts for E = 16 .. 256 (928 .. 14,848 experts): per-access cost should
  stay flat (operations are O(1) / O(log n), not O(resident)).

Example::

    python -m moe_engine.benchmarks.residency_speed --tokens 400 --out /tmp/residency_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def synthetic_trace(tokens: int, layers: int, experts: int, top_k: int, seed: int = 0):
    from moe_engine.offline.traces import RoutingTrace

    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, experts + 1) ** 0.8
    pop /= pop.sum()
    perm = np.stack([rng.permutation(experts) for _ in range(layers)])  # popularity order per layer
    ids = np.zeros((tokens, layers, top_k), dtype=np.int64)
    prev = None
    for t in range(tokens):
        for layer in range(layers):
            keep = [] if prev is None else [e for e in prev[layer] if rng.random() < 0.5]
            chosen = list(dict.fromkeys(keep))
            while len(chosen) < top_k:
                e = int(perm[layer, rng.choice(experts, p=pop)])
                if e not in chosen:
                    chosen.append(e)
            ids[t, layer] = chosen[:top_k]
        prev = ids[t]
    w = np.full(ids.shape, 1.0 / top_k, dtype=np.float32)
    return RoutingTrace(expert_ids=ids, expert_weights=w, sequence_starts=np.array([0, tokens]), meta={"num_experts": experts})


def accesses_per_second(trace, policy: str, budget: float, repeats: int = 3) -> dict:
    from moe_engine.offline.simulator import SimConfig, simulate

    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = simulate(trace, SimConfig(budget=budget, policy=policy, profile=None), with_belady=False)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    n = int(np.prod(trace.expert_ids.shape))
    return {"accesses": n, "seconds": best, "accesses_per_s": n / best, "ns_per_access": 1e9 * best / n,
            "hit_rate": res.hit_rate, "capacity": res.capacity}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=400, help="tokens per trace (default 400)")
    p.add_argument("--budget", type=float, default=0.25, help="cache share of all experts (default 0.25)")
    p.add_argument("--policies", default="lru,lfu,arc,fate", help="policies for the DeepSeek-V3 shape")
    p.add_argument("--threads", type=int, default=1, help="torch threads (pinned; default 1)")
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    layers, top_k = 58, 8
    report: dict = {"settings": vars(args), "platform": platform.platform(), "shape": {}, "scaling": []}
    trace = synthetic_trace(args.tokens, layers, 256, top_k)
    for policy in [x for x in args.policies.split(",") if x]:
        r = accesses_per_second(trace, policy, args.budget)
        report["shape"][policy] = r
        print(f"58 x 256, top-8, {policy:>10}: {r['accesses_per_s'] / 1e6:.2f} M accesses/s "
              f"({r['ns_per_access']:.0f} ns each), hit rate {r['hit_rate']:.3f}", flush=True)
    for experts in (16, 32, 64, 128, 256):
        tr = synthetic_trace(args.tokens, layers, experts, top_k, seed=experts)
        r = accesses_per_second(tr, "lru", args.budget)
        r["experts_total"] = layers * experts
        report["scaling"].append(r)
        print(f"lru, {layers * experts:>6} experts: {r['ns_per_access']:.0f} ns per access", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
