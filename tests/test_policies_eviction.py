"""Eviction policies added beside lru/lfu: ARC, Fate's shallow-favoring allocation, prediction-aware
eviction, and the reuse model behind it."""

from __future__ import annotations

import numpy as np
import pytest

from moe_engine.offline.simulator import SimConfig, simulate
from moe_engine.offline.traces import RoutingTrace
from moe_engine.runtime.policies import (
    DEFAULT_REUSE_WEIGHTS,
    REUSE_FEATURES,
    ReuseFeatures,
    available_policies,
    fit_reuse_weights,
    make_policy,
)


def among(keys):
    """``evictable`` for ``victim``: only these keys may be evicted."""
    allowed = set(keys)
    return allowed.__contains__


def drive(policy, events):
    """Replay ('miss'|'hit'|'pf'|'evict', key) events through a policy."""
    for kind, key in events:
        if kind == "miss":
            policy.insert(key, prefetch=False)
            policy.access(key, hit=False)
        elif kind == "hit":
            policy.access(key, hit=True)
        elif kind == "pf":
            policy.insert(key, prefetch=True)
        elif kind == "evict":
            policy.evict(key)


def test_registry_has_the_new_policies():
    assert {"lru", "lfu", "arc", "fate", "predictive"} <= set(available_policies())
    with pytest.raises(ValueError, match="unknown cache policy 'mru'; choose one of: arc, auto, fate, lfu, lrfu, lru, predictive"):
        make_policy("mru", num_layers=1, num_experts=1, capacity=1)


def test_arc_keeps_a_reused_key_through_a_scan():
    # Key A is used twice (so it sits in T2); then a scan of once-used keys fills T1. ARC evicts from T1
    # (the scan) while LRU evicts A, the least recent.
    A = (0, 0)
    scan = [(0, i) for i in range(1, 4)]
    events = [("miss", A), ("hit", A)] + [("miss", k) for k in scan]
    arc = make_policy("arc", num_layers=1, num_experts=8, capacity=4)
    lru = make_policy("lru", num_layers=1, num_experts=8, capacity=4)
    drive(arc, events)
    drive(lru, events)
    cands = [A, *scan]
    assert lru.victim(among(cands)) == A
    assert arc.victim(among(cands)) == scan[0]


def test_arc_ghost_hit_adapts_the_target():
    arc = make_policy("arc", num_layers=1, num_experts=8, capacity=3)
    drive(arc, [("miss", (0, 1)), ("miss", (0, 2)), ("hit", (0, 2)), ("miss", (0, 3))])
    v = arc.victim(among([(0, 1), (0, 2), (0, 3)]))
    assert v == (0, 1)  # T1's least recent: (0, 2) is in T2
    drive(arc, [("evict", v), ("miss", (0, 4))])
    assert (0, 1) in arc.b1 and arc.p == 0
    # (0, 1) comes back: a B1 ghost hit grows T1's target size and puts the key in T2.
    drive(arc, [("evict", arc.victim(among([(0, 2), (0, 3), (0, 4)]))), ("miss", (0, 1))])
    assert arc.p == 1 and (0, 1) in arc.t2 and (0, 1) not in arc.b1


def test_arc_prefetch_is_not_a_reference():
    arc = make_policy("arc", num_layers=2, num_experts=4, capacity=4)
    drive(arc, [("pf", (1, 0)), ("hit", (1, 0))])
    assert (1, 0) in arc.t1 and (1, 0) not in arc.t2
    drive(arc, [("hit", (1, 0))])
    assert (1, 0) in arc.t2


def test_fate_evicts_from_the_layer_most_over_its_quota():
    fate = make_policy("fate", num_layers=4, num_experts=8, capacity=10, shallow_layers=1, shallow_boost=2.0)
    assert fate.quota[0] == pytest.approx(4.0) and fate.quota[1] == pytest.approx(2.0)
    # Layer 0 holds 4 (at quota), layer 1 holds 3 (one over): the victim is layer 1's least recent.
    drive(fate, [("miss", (0, e)) for e in range(4)] + [("miss", (1, e)) for e in range(3)])
    cands = [(0, e) for e in range(4)] + [(1, e) for e in range(3)]
    assert fate.victim(among(cands)) == (1, 0)
    assert fate.victim(among([(0, 2), (0, 3)])) == (0, 2)  # only layer 0 offered: its least recent
    with pytest.raises(ValueError, match="shallow_boost"):
        make_policy("fate", num_layers=4, num_experts=8, capacity=10, shallow_boost=0)


def test_fate_keeps_more_shallow_experts_than_lru():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 16, size=(300, 8, 1)).astype(np.uint8)  # uniform: every layer equally hot
    tr = RoutingTrace(ids, np.ones(ids.shape, np.float16), np.array([0, 300]), {"num_experts": 16})
    fate = simulate(tr, SimConfig(budget=0.25, policy="fate", profile=None), with_belady=False)
    lru = simulate(tr, SimConfig(budget=0.25, policy="lru", profile=None), with_belady=False)
    assert fate.per_layer_hit_rate[0] > lru.per_layer_hit_rate[0]
    assert fate.per_layer_hit_rate[-1] < lru.per_layer_hit_rate[-1]


def test_reuse_features_remember_paths_and_match_repeats():
    feats = ReuseFeatures(num_layers=2, num_experts=4, memory=8)
    paths = [[0, 1], [2, 3], [0, 1]]  # pass 2 repeats pass 0, whose successor used (0, 2) and (1, 3)
    for p in paths:
        for layer, e in enumerate(p):
            feats.layer_start(layer)
            feats.use(layer, e)
    feats.layer_start(0)  # pass 3 begins
    feats.use(0, 0)  # ... and starts like passes 0 and 2
    x = feats.features(np.arange(8))
    col = {n: i for i, n in enumerate(REUSE_FEATURES)}
    # Best match: pass 2 (most recent of the two identical ones); it used (1, 1) at the layer still to come.
    assert x[1 * 4 + 1, col["match1_now"]] == 1.0
    assert x[1 * 4 + 3, col["match1_now"]] == 0.0
    assert x[:, col["upcoming"]].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # Age: (0, 0) was used by the running pass, so its next opportunity is one pass away.
    assert x[0, col["log_age"]] == pytest.approx(np.log(1))
    # Second match: pass 0, whose successor (pass 1) used (0, 2) at layer 0 -> soon for the next pass.
    assert x[0 * 4 + 2, col["match2_soon"]] > 0


def test_predictive_policy_evicts_the_key_used_last():
    # Weights that read only log_age: older keys are predicted farther away.
    w = [0.0] * len(REUSE_FEATURES)
    w[REUSE_FEATURES.index("log_age")] = 1.0
    pol = make_policy("predictive", num_layers=2, num_experts=4, capacity=3, weights=w)
    for e in (0, 1, 2):
        pol.layer_start(0)
        pol.insert((0, e), prefetch=False)
        pol.access((0, e), hit=False)
    pol.layer_start(0)
    assert pol.victim(among([(0, 0), (0, 1), (0, 2)])) == (0, 0)
    assert pol.victim(among([(0, 1), (0, 2)])) == (0, 1)  # next best from the same step's ranking
    with pytest.raises(ValueError, match="weights needs"):
        make_policy("predictive", num_layers=2, num_experts=4, capacity=3, weights=[1.0])
    assert len(DEFAULT_REUSE_WEIGHTS) == len(REUSE_FEATURES)


def test_fit_reuse_weights_and_predictive_beats_lru_on_repeats():
    # A repeated "template" of 5 tokens with noise tokens in between: path matches predict the template.
    rng = np.random.default_rng(1)
    L, E = 4, 16
    template = rng.integers(0, E, size=(5, L, 1))
    rows = []
    for _ in range(40):
        rows.extend(template)
        rows.extend(rng.integers(0, E, size=(3, L, 1)))
    ids = np.array(rows).astype(np.uint8)
    tr = RoutingTrace(ids, np.ones(ids.shape, np.float16), np.array([0, len(ids)]), {"num_experts": E})
    w = fit_reuse_weights([ids[:160]], E, sample_every=1, keys_per_sample=64)
    assert len(w) == len(REUSE_FEATURES) and all(np.isfinite(w))
    assert w[REUSE_FEATURES.index("score")] == 0.0  # no predictor scores given
    pred = simulate(tr, SimConfig(budget=0.2, policy="predictive", profile=None, policy_kwargs={"weights": w}))
    lru = simulate(tr, SimConfig(budget=0.2, policy="lru", profile=None))
    assert pred.hit_rate > lru.hit_rate
    assert pred.hit_rate <= pred.belady_hit_rate
