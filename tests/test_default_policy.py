"""The default eviction policy ("auto") against LFU, the working-set warning, victim cost, and the
predictive policy's online refit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_engine.offline.simulator import SimConfig, capacity_for, simulate
from moe_engine.offline.traces import RoutingTrace, load_trace
from moe_engine.runtime.policies import (
    DEFAULT_POLICY,
    DEFAULT_REUSE_WEIGHTS,
    REUSE_FEATURES,
    available_policies,
    make_policy,
    working_set_warning,
)
from moe_engine.runtime.residency import Compute, Residency

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
BUDGETS = (0.05, 0.1, 0.25, 0.5)


def make_trace(ids: np.ndarray, num_experts: int) -> RoutingTrace:
    ids = np.asarray(ids, dtype=np.uint8)
    return RoutingTrace(ids, np.ones(ids.shape, np.float16), np.array([0, len(ids)]), {"num_experts": num_experts})


def hit_rate(trace: RoutingTrace, budget: float, policy: str, **kw) -> float:
    cfg = SimConfig(budget=budget, policy=policy, profile=None, policy_kwargs=kw)
    return simulate(trace, cfg, with_belady=False).hit_rate


def cyclic_trace(T: int = 300, L: int = 8, E: int = 16, K: int = 2, seed: int = 0) -> RoutingTrace:
    """Decode-like routing: skewed expert popularity per layer, layers visited cyclically."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, E + 1) ** 1.2
    perms = [rng.permutation(E) for _ in range(L)]  # each layer has its own hot experts
    ids = np.zeros((T, L, K), dtype=np.int64)
    for t in range(T):
        for layer in range(L):
            ids[t, layer] = perms[layer][rng.choice(E, size=K, replace=False, p=p / p.sum())]
    return make_trace(ids, E)


def test_default_is_auto_and_registered():
    assert DEFAULT_POLICY == "auto" and "auto" in available_policies() and "lrfu" in available_policies()
    with pytest.raises(ValueError, match="cannot be 'auto'"):
        make_policy("auto", num_layers=2, num_experts=4, capacity=4, candidates=(("auto", {}),))


@pytest.mark.parametrize("budget", BUDGETS)
def test_default_not_below_lfu_on_a_cyclic_trace(budget):
    tr = cyclic_trace()
    auto, lfu, lru = (hit_rate(tr, budget, p) for p in ("auto", "lfu", "lru"))
    assert auto >= lfu
    if budget <= 0.1:  # below one token's working set (8 x 2 of 128 experts): LRU collapses, auto does not
        assert lru < 0.02 and auto > 0.1


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared traces not found at {SHARED}")
@pytest.mark.parametrize("domain", ["law", "translation"])  # recency wins on law, frequency on translation
def test_default_not_below_lfu_on_shared_traces(domain):
    full = load_trace(SHARED / f"dsv2lite-esft-{domain}.npz")
    tr = make_trace(full.expert_ids[:300], full.num_experts)
    for budget in BUDGETS:
        auto, lfu = hit_rate(tr, budget, "auto"), hit_rate(tr, budget, "lfu")
        assert auto >= lfu, (budget, auto, lfu)


def test_working_set_warning():
    # 8 layers x top-2 = 16 experts per token: 12 slots is below it, 16 is not.
    msg = working_set_warning(12, 8, 2)
    assert msg is not None and "12" in msg and "8 layers x top-2 = 16" in msg and "at least 16" in msg
    assert "\n" not in msg
    assert working_set_warning(16, 8, 2) is None and working_set_warning(400, 26, 6) is None
    assert "156" in (working_set_warning(83, 26, 6) or "")  # DeepSeek-V2-Lite at a 5 % budget
    with pytest.raises(ValueError, match="num_slots"):
        working_set_warning(0, 8, 2)


@pytest.mark.parametrize("name", ["lru", "lfu", "arc", "fate", "lrfu", "auto", "predictive"])
def test_one_victim_skips_at_most_the_non_evictable_keys(name):
    L, E = 4, 8
    pol = make_policy(name, num_layers=L, num_experts=E, capacity=L * E)
    rng = np.random.default_rng(0)
    for t in range(20):  # every key resident, used in a random order
        for layer in range(L):
            pol.layer_start(layer)
            for e in rng.permutation(E)[:3].tolist() if t else range(E):
                if t == 0:
                    pol.insert((layer, e), prefetch=False)
                pol.access((layer, e), hit=t > 0)
    pol.layer_start(0)
    blocked = {(0, e) for e in range(E)} | {(1, 0), (1, 1)}  # the running layer and two predicted keys
    calls = []

    def evictable(key):
        calls.append(key)
        return key not in blocked

    v = pol.victim(evictable)
    assert v is not None and v not in blocked
    assert len(calls) <= len(blocked) + 1
    assert calls.count(v) == 1 and set(calls[:-1]) <= blocked


def run_windows(trace: RoutingTrace, policy, capacity: int, window: int) -> list[float]:
    """Demand hit rate of each ``window`` tokens, replaying ``trace`` through the residency core."""
    ids = trace.expert_ids.astype(np.int64).tolist()
    T, L, K = trace.expert_ids.shape
    core = Residency(num_slots=capacity, policy=policy, num_layers=L, expert_bytes=1)
    rates = []
    for t in range(T):
        for layer in range(L):
            for step in core.layer_schedule(layer, ids[t][layer], ready=lambda key: True):
                if type(step) is Compute:
                    core.loaded(step.key)
        if (t + 1) % window == 0:
            st = core.stats()
            rates.append(st.hits / (window * L * K))
            core.reset_stats()
    return rates


def test_predictive_refits_online_where_its_weights_are_wrong():
    # Stable skewed popularity: frequent keys come back soon. Starting weights that say the opposite
    # (the defaults with the frequency and age terms negated) evict the hottest keys first.
    tr = cyclic_trace(T=400, seed=1)
    T, L, K = tr.expert_ids.shape
    wrong = list(DEFAULT_REUSE_WEIGHTS)
    for name in ("log_age", "freq_fast", "freq_slow", "log_rate"):
        i = REUSE_FEATURES.index(name)
        wrong[i] = -abs(wrong[i]) * 10 if name == "log_age" else abs(wrong[i]) * 10 + 1.0
    cap = capacity_for(0.25, L, tr.num_experts, K)
    kw = {"num_layers": L, "num_experts": tr.num_experts, "capacity": cap, "weights": wrong, "horizon": 32}
    online = run_windows(tr, make_policy("predictive", **kw), cap, 100)
    fixed = run_windows(tr, make_policy("predictive", online=False, **kw), cap, 100)
    lfu = run_windows(tr, make_policy("lfu", num_layers=L, num_experts=tr.num_experts, capacity=cap), cap, 100)
    assert online[-1] > online[0] + 0.05  # it learns
    assert online[-1] > fixed[-1] + 0.05  # the same wrong weights kept fixed stay bad
    assert online[-1] >= 0.9 * lfu[-1]  # and it ends near what frequency alone gets here
