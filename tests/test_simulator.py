"""Trace-driven cache simulator: Belady golden cases, LRU counts, prefetch accounting, the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from moe_engine.predictors import make_predictor

from moe_engine.cli import main
from moe_engine.offline.simulator import (
    PROFILES,
    SimConfig,
    belady_hit_rate,
    capacity_for,
    measure_cold_read_bandwidth,
    scores_to_probs,
    simulate,
)
from moe_engine.offline.traces import RoutingTrace
from moe_engine.runtime.policies import available_policies


def make_trace(ids: np.ndarray, starts=None, num_experts: int | None = None) -> RoutingTrace:
    ids = np.asarray(ids, dtype=np.uint8)
    starts = np.array([0, ids.shape[0]]) if starts is None else np.asarray(starts)
    return RoutingTrace(
        expert_ids=ids,
        expert_weights=np.ones(ids.shape, dtype=np.float16),
        sequence_starts=starts.astype(np.int64),
        meta={"num_experts": num_experts or int(ids.max()) + 1},
    )


def random_trace(T=80, L=3, E=6, K=2, seed=0) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    # Skewed popularity so caching matters.
    p = np.linspace(3, 1, E) ** 2
    p /= p.sum()
    ids = np.stack([[rng.choice(E, size=K, replace=False, p=p) for _ in range(L)] for _ in range(T)])
    return make_trace(ids, starts=[0, T // 2, T], num_experts=E)


def brute_force_optimum(seq: list[int], capacity: int) -> int:
    """Most hits any eviction choice reaches on a single-layer, top-1 sequence (exhaustive search)."""
    best = 0

    def go(i: int, cache: frozenset, hits: int) -> None:
        nonlocal best
        if i == len(seq):
            best = max(best, hits)
            return
        x = seq[i]
        if x in cache:
            go(i + 1, cache, hits + 1)
        elif len(cache) < capacity:
            go(i + 1, cache | {x}, hits)
        else:
            for v in cache:
                go(i + 1, (cache - {v}) | {x}, hits)

    go(0, frozenset(), 0)
    return best


def test_belady_golden_hand_made_sequence():
    # One layer, top-1, 3 slots: a b c d a b e a b c d e (the textbook example).
    seq = [0, 1, 2, 3, 0, 1, 4, 0, 1, 2, 3, 4]
    ids = np.array(seq)[:, None, None]
    rate, per_layer = belady_hit_rate(ids, capacity=3)
    assert rate == pytest.approx(5 / 12)  # 7 faults: the known optimum for this string with 3 frames
    assert per_layer == [pytest.approx(5 / 12)]


@pytest.mark.parametrize("seed", range(4))
def test_belady_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, 5, size=11).tolist()
    ids = np.array(seq)[:, None, None]
    rate, _ = belady_hit_rate(ids, capacity=2)
    assert round(rate * len(seq)) == brute_force_optimum(seq, 2)


def test_lru_golden_hit_counts():
    # Two layers, top-1, 2 slots. Decode order: (t0,l0)=0 (t0,l1)=1 (t1,l0)=0 (t1,l1)=2 (t2,l0)=0 (t2,l1)=1
    ids = np.array([[[0], [1]], [[0], [2]], [[0], [1]]])
    tr = make_trace(ids, num_experts=3)
    cap = 2 / 6  # 2 of the 6 keys
    lru = simulate(tr, SimConfig(budget=cap, policy="lru", profile=None))
    # LRU: miss, miss, hit (0@l0), miss (evict 1@l1), hit (0@l0), miss (1@l1 was evicted) -> 2 hits.
    assert (lru.capacity, lru.hits, lru.accesses) == (2, 2, 6)
    assert lru.demand_loads == 4 and lru.bytes_moved == 4 * lru.expert_bytes
    assert lru.belady_hit_rate == pytest.approx(2 / 6)


def test_every_policy_respects_capacity_and_never_beats_belady():
    tr = random_trace()
    for policy, budget in itertools.product(available_policies(), (0.25, 0.5)):
        res = simulate(tr, SimConfig(budget=budget, policy=policy, profile=None))
        assert res.hits + res.demand_loads == res.accesses
        assert res.hit_rate <= res.belady_hit_rate + 1e-12, policy
        assert res.prefetch_loads == 0 and res.wasted_prefetch == 0


def test_full_budget_only_compulsory_misses():
    tr = random_trace()
    res = simulate(tr, SimConfig(budget=1.0, policy="lru", profile=None))
    distinct = len({(layer, e) for t in tr.expert_ids for layer, row in enumerate(t) for e in row})
    assert res.demand_loads == distinct
    assert res.hit_rate == pytest.approx(res.belady_hit_rate)


def test_oracle_prefetch_hides_every_later_layer_miss():
    tr = random_trace(T=40)
    oracle = make_predictor("oracle", expert_ids=tr.expert_ids, num_experts=tr.num_experts)
    cfg = SimConfig(budget=0.5, policy="lru", prefetch=True, distance=1, prefetch_min_prob=0.0, profile="pcie4-x16")
    res = simulate(tr, cfg, predictor=oracle)
    # Only layer 0 can still miss: every later layer's experts were prefetched one layer ahead.
    assert all(r == 1.0 for r in res.per_layer_hit_rate[1:])
    assert res.bytes_moved == res.demand_bytes + res.prefetch_bytes
    assert res.prefetch_used + res.wasted_prefetch == res.prefetch_loads
    assert res.wasted_prefetch == 0  # the oracle prefetches only what is used
    assert res.time_per_token_s is not None and res.time_per_token_s > 0


def test_prefetch_needs_a_predictor_and_config_is_validated():
    tr = random_trace(T=4)
    with pytest.raises(ValueError, match="prefetch needs a predictor"):
        simulate(tr, SimConfig(budget=0.5, prefetch=True))
    with pytest.raises(ValueError, match="budget must be a share"):
        SimConfig(budget=0.0)
    with pytest.raises(ValueError, match="unknown hardware profile"):
        SimConfig(budget=0.5, profile="floppy")


def test_capacity_and_probabilities():
    assert capacity_for(0.25, 26, 64, 6) == 416
    assert capacity_for(0.001, 26, 64, 6) == 6  # at least one layer's experts
    p = scores_to_probs(np.array([[10.0, 0.0, 0.0, -10.0]]), top_k=2)
    assert p.shape == (1, 4) and 0 <= p.min() and p.max() <= 1
    q = scores_to_probs(np.array([[3.0, 1.0, 0.0, 0.0]]), top_k=2)
    np.testing.assert_allclose(q, [[1.0, 0.5, 0.0, 0.0]])


def test_profiles_carry_their_provenance():
    disk = PROFILES["disk"]
    assert disk.transfer_bytes_per_s < PROFILES["pcie4-x16"].transfer_bytes_per_s
    assert "2026" in disk.measured


def test_measure_cold_read_bandwidth(tmp_path):
    rate = measure_cold_read_bandwidth(tmp_path, size_bytes=1 << 20, repeats=1)
    assert rate > 0
    assert list(tmp_path.iterdir()) == []  # the probe file is removed


def test_simulate_cli_json(tmp_path, capsys):
    path = tmp_path / "t.npz"
    random_trace().save(path)
    rc = main(["simulate", "--trace", str(path), "--budget", "0.25", "--policy", "arc", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("hit_rate", "belady_hit_rate", "bytes_moved", "prefetch_bytes", "wasted_prefetch_bytes", "settings"):
        assert key in out
    assert out["settings"]["policy"] == "arc" and out["settings"]["budget"] == 0.25
    rc = main(["simulate", "--trace", str(path), "--budget", "0.5", "--policy", "lru", "--predictor", "transition",
               "--train", str(path), "--distance", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "demand hit rate" in text and "prefetch" in text
    rc = main(["simulate", "--trace", str(path), "--budget", "0.5", "--policy", "nope"])
    assert rc == 2 and "unknown cache policy 'nope'" in capsys.readouterr().err
    rc = main(["simulate", "--trace", str(path), "--budget", "1.5"])
    assert rc == 2 and "budget must be a share" in capsys.readouterr().err
