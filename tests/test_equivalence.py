"""The simulator and the runtime run one residency core: the same routing trace through both gives the
same sequence of decisions (hits, misses, demand loads, prefetches, evictions), for every policy, with
and without prefetch. The runtime side is a real model reading real experts from a real checkpoint;
its routing is forced to the trace by calling each MoE layer's experts module with the trace's ids."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch
from moe_engine.predictors.transitions import TransitionPredictor

import moe_engine
from moe_engine.offline.simulator import SimConfig, simulate
from moe_engine.offline.traces import RoutingTrace
from moe_engine.runtime.adapters import moe_blocks
from moe_engine.runtime.policies import available_policies

LAYERS, EXPERTS, TOP_K, TOKENS = 5, 16, 2, 60


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_models.make_tiny_moe(
        "qwen3_moe", tmp_path_factory.mktemp("equiv"), num_hidden_layers=LAYERS, mlp_only_layers=[],
        num_experts=EXPERTS, num_experts_per_tok=TOP_K,
    )  # fmt: skip


def _trace(seed: int = 0) -> RoutingTrace:
    """Routing with structure (each expert prefers a few successors) so predictions and reuse matter."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, EXPERTS, size=(LAYERS, EXPERTS, 3))
    ids = np.zeros((TOKENS, LAYERS, TOP_K), dtype=np.int64)
    for t in range(TOKENS):
        prev = rng.choice(EXPERTS, size=TOP_K, replace=False)
        for layer in range(LAYERS):
            if layer:
                pool = np.unique(np.concatenate([succ[layer, e] for e in prev]))
                if len(pool) < TOP_K or rng.random() < 0.2:
                    pool = np.arange(EXPERTS)
                prev = rng.choice(pool, size=TOP_K, replace=False)
            ids[t, layer] = prev
    w = np.full(ids.shape, 1.0 / TOP_K, dtype=np.float32)
    return RoutingTrace(expert_ids=ids, expert_weights=w, sequence_starts=np.array([0, TOKENS]),
                        meta={"num_experts": EXPERTS})


def _runtime_log(path, trace, capacity, policy, predictor, preload: bool = False) -> list:
    one = tiny_models.expert_bytes(tiny_models.tiny_config("qwen3_moe", num_hidden_layers=LAYERS, mlp_only_layers=[],
                                                           num_experts=EXPERTS))
    model = moe_engine.from_pretrained(path, budget=capacity * one, policy=policy, device="cpu",
                                       predictor=predictor, preload=preload)
    engine = model.engine
    assert engine.core.num_slots == capacity
    log: list = []
    engine.core.log = log
    modules = [block.experts for _, block in moe_blocks(model)]
    hidden = torch.randn(1, model.config.hidden_size)
    with torch.no_grad():
        for t in range(trace.expert_ids.shape[0]):
            for layer, mod in enumerate(modules):
                idx = torch.as_tensor(trace.expert_ids[t, layer])[None]
                mod(hidden, idx, torch.full(idx.shape, 0.5))
    model.close()
    return log


@pytest.mark.parametrize("prefetch", [False, True], ids=["no-prefetch", "prefetch"])
@pytest.mark.parametrize("policy", available_policies())
def test_simulator_and_runtime_make_the_same_decisions(checkpoint, policy, prefetch):
    trace = _trace()
    capacity = 12  # 15 % of the 80 experts: evictions in every layer
    pred = TransitionPredictor.fit([_trace(seed=1)]) if prefetch else None
    sim_log: list = []
    res = simulate(trace, SimConfig(budget=0.5, capacity=capacity, policy=policy, prefetch=prefetch, profile=None),
                   predictor=pred, with_belady=False, log=sim_log)
    run_log = _runtime_log(checkpoint, trace, capacity, policy, pred)
    kinds = {k for k, _ in sim_log}
    assert {"hit", "miss", "evict"} <= kinds and (not prefetch or "prefetch" in kinds), kinds
    first = next((i for i, (a, b) in enumerate(zip(sim_log, run_log)) if a != b), None)
    assert first is None, (
        f"first difference at event {first}: simulator {sim_log[first - 4:first + 3]} vs runtime {run_log[first - 4:first + 3]}"
    )
    assert len(run_log) == len(sim_log)
    assert res.hits + res.demand_loads == TOKENS * LAYERS * TOP_K


@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_timed_simulation_makes_the_same_decisions(checkpoint, policy):
    """With a time projection the simulator drives the core's generator (as the runtime does) instead of
    its untimed fast path: still the same decisions."""
    trace = _trace()
    pred = TransitionPredictor.fit([_trace(seed=1)])
    sim_log: list = []
    simulate(trace, SimConfig(budget=0.5, capacity=12, policy=policy, prefetch=True, profile="disk"),
             predictor=pred, with_belady=False, log=sim_log)
    assert sim_log == _runtime_log(checkpoint, trace, 12, policy, pred)


@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_a_preloaded_start_makes_the_same_decisions(checkpoint, policy):
    """The runtime fills its cache at load (``Engine.preload``); ``SimConfig(preload=True)`` starts the same."""
    trace = _trace()
    pred = TransitionPredictor.fit([_trace(seed=1)])
    sim_log: list = []
    res = simulate(trace, SimConfig(budget=0.5, capacity=12, policy=policy, prefetch=True, profile=None, preload=True),
                   predictor=pred, with_belady=False, log=sim_log)
    cold = simulate(trace, SimConfig(budget=0.5, capacity=12, policy=policy, prefetch=True, profile=None),
                    predictor=pred, with_belady=False)
    assert res.hits > cold.hits  # the preloaded experts were used
    assert sim_log == _runtime_log(checkpoint, trace, 12, policy, pred, preload=True)
