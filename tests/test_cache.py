"""Fast-tier cache mechanics on real tiny checkpoints: waves, pinning, policies, prefetch admission."""

from __future__ import annotations

import shutil

import pytest
import tiny_models
import torch
from transformers import AutoConfig

import moe_engine
from moe_engine.runtime.store import CheckpointError


def _load(path, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("predictor", None)
    kw.setdefault("preload", False)  # a cold cache (no preload): the calls under test read the experts they use (tests/test_preload.py: preload)
    return moe_engine.from_pretrained(path, **kw)


@pytest.mark.parametrize("prefill_policy", ["shared", "stream"])
def test_one_slot_runs_a_long_prefill_in_waves(tiny_checkpoint, prefill_policy):
    path = tiny_checkpoint("mixtral")
    cfg = AutoConfig.from_pretrained(path)
    one = tiny_models.expert_bytes(cfg)
    model = _load(path, budget=one, prefill_policy=prefill_policy)
    ids = torch.arange(3, 3 + 40).unsqueeze(0) % cfg.vocab_size
    with torch.no_grad():
        model(ids)
    s = model.engine.stats()
    assert s.num_slots == 1
    assert s.peak_resident_bytes <= s.budget_bytes == one
    # 40 tokens x top-2 over 8 experts: every layer used several experts, each loaded once per layer
    # (streaming: the next layer's first expert is read ahead into the slot the last compute freed).
    for i, layer in enumerate(s.per_layer):
        assert layer.misses >= 2
        assert layer.hits == layer.prefetch_hits == (1 if prefill_policy == "stream" and i > 0 else 0)
    assert s.bytes_moved == (s.misses + s.prefetches) * one


def test_policy_none_keeps_nothing_resident(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    model = _load(path, budget=1.0, policy="none")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model(ids)
        model(ids)
    s = model.engine.stats()
    assert s.hits == 0 and s.misses > 0
    assert len(model.engine.core.entries) == 0
    # A full-budget LRU cache makes the second pass all hits.
    cached = _load(path, budget=1.0, policy="lru")
    with torch.no_grad():
        cached(ids)
        first = cached.engine.stats().misses
        cached(ids)
    assert cached.engine.stats().misses == first


def test_lru_evicts_least_recent_in_the_real_cache(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    cfg = AutoConfig.from_pretrained(path)
    model = _load(path, budget=2 * tiny_models.expert_bytes(cfg))
    cache = model.engine.cache

    def use(*experts):
        for _ in cache.iter_experts(0, list(experts)):
            pass

    use(0)
    use(1)
    use(0)
    use(2)  # evicts expert 1, the least recently used
    assert cache.resident((0, 0)) and cache.resident((0, 2)) and not cache.resident((0, 1))
    s = model.engine.stats()
    assert (s.hits, s.misses) == (1, 3)


def test_prefetch_never_evicts_current_layer_experts(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    cfg = AutoConfig.from_pretrained(path)
    model = _load(path, budget=2 * tiny_models.expert_bytes(cfg))
    cache, core = model.engine.cache, model.engine.core
    gen = cache.iter_experts(0, [3, 4])
    next(gen)  # expert 3 in use, 4 still needed: both protected, and they fill both slots
    assert core.prefetch([(1, 0), (1, 1)], limit=2) == []
    for _ in gen:
        pass
    assert cache.resident((0, 3)) and cache.resident((0, 4))
    # Between layers nothing is protected: a prefetch takes the policy's victim (LRU: expert 3).
    loads = core.prefetch([(1, 0)], limit=1)
    assert [(ld.key, ld.prefetch) for ld in loads] == [((1, 0), True)]
    for ld in loads:
        cache._submit(ld)
    assert cache.resident((1, 0)) and cache.resident((0, 4)) and not cache.resident((0, 3))
    # Predicted keys are never victims of their own prefetch call.
    assert core.prefetch([(1, 0), (1, 1)], limit=2)[0].key == (1, 1)
    assert cache.resident((1, 0)) and not cache.resident((0, 4))
    # The prefetched experts are prefetch hits when their layer runs.
    for _ in cache.iter_experts(1, [0, 1]):
        pass
    s = model.engine.stats()
    assert s.prefetch_hits == 2 and s.prefetches == 2 and s.misses == 2


def test_read_error_at_run_time_names_the_file(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    model = _load(path, budget=0.25)
    file = path / "model.safetensors"
    with open(file, "r+b") as f:  # truncate after loading: the next expert read hits end of file
        f.truncate(file.stat().st_size // 3)
    with pytest.raises(CheckpointError, match="changed since loading"):
        with torch.no_grad():
            model(torch.arange(10, 40).unsqueeze(0))


def test_unknown_policy_is_rejected_before_loading(tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'; choose one of"):
        _load(tiny_checkpoint("mixtral"), policy="fifo")


def test_prefetches_queue_behind_the_layers_demand_loads(tiny_checkpoint):
    """The engine asks for the next layer's experts only after this layer's misses are queued, so a
    demand load never waits behind a prefetch the I/O threads picked up first."""
    path = tiny_checkpoint("mixtral")
    model = _load(path, budget=0.25, predictor="cross_layer_gate")
    engine, mover = model.engine, model.engine.mover
    runs: list[list[bool]] = []  # per decode-step layer run: prefetch flag of each read it submitted
    real_submit, real_forward = mover.submit, engine.experts_forward

    def recording_submit(loc, slot, slot_index, key, prefetch=False, after=None):
        runs[-1].append(prefetch)
        return real_submit(loc, slot, slot_index, key, prefetch=prefetch, after=after)

    def recording_forward(layer, hidden_states, *args):
        runs.append([])
        return real_forward(layer, hidden_states, *args)

    mover.submit, engine.experts_forward = recording_submit, recording_forward
    model.generate(torch.tensor([[5, 6, 7, 8, 9, 10]]), max_new_tokens=8, do_sample=False)
    decode = runs[len(engine.layers):]  # one token per step: no waves
    assert any(any(r) for r in decode) and any(not all(r) for r in decode if r)
    for reads in decode:
        assert reads == sorted(reads), reads  # every demand load (False) before any prefetch (True)


def test_budget_below_one_tokens_working_set_warns(tiny_checkpoint):
    from moe_engine.runtime.loader import BudgetWarning

    path = tiny_checkpoint("mixtral")  # 2 MoE layers x top-2: one token needs 4 experts
    one = tiny_models.expert_bytes(AutoConfig.from_pretrained(path))
    with pytest.warns(BudgetWarning, match="holds 3 experts, less than one token's working set"):
        _load(path, budget=3 * one)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        _load(path, budget=4 * one)  # exactly the working set: no warning


def _logged_prefetcher(tiny_checkpoint, slots: int, **kw):
    """A tiny qwen3_moe model with cross-layer-gate prefetch, ``slots`` experts of budget and its core's
    decision log: ``(model, config, log)``."""
    path = tiny_checkpoint("qwen3_moe")
    cfg = AutoConfig.from_pretrained(path)
    model = _load(path, budget=slots * tiny_models.expert_bytes(cfg), predictor="cross_layer_gate", **kw)
    log: list = []
    model.engine.core.log = log
    return model, cfg, log


def test_a_callers_plan_replaces_the_predictor_for_prefetch(tiny_checkpoint):
    """``engine.expected_experts(keys)``: a decode step prefetches exactly the planned experts of each next
    layer (the server's token-route memory), not the predictor's; outside the context the predictor runs."""
    model, cfg, log = _logged_prefetcher(tiny_checkpoint, slots=6, prefetch_min_prob=0.0)
    engine = model.engine
    plan = {(1, 3), (1, 6), (2, 0)}
    with torch.no_grad(), engine.expected_experts(plan):
        model(torch.tensor([[7]]))
    # the cache started empty, so every planned key of the layers after the first was prefetched
    assert {key for event, key in log if event == "prefetch"} == plan
    log.clear()
    with torch.no_grad():
        model(torch.tensor([[9]]))
    assert {key for event, key in log if event == "prefetch"} - plan  # the predictor's own choices again


def test_a_callers_plan_is_capped_per_layer_most_expected_first(tiny_checkpoint):
    """A plan naming most of a layer (a big batch) prefetches at most ``prefetch_per_layer`` of its keys
    per layer and step: those the most sequences expect (keys repeat, one per sequence)."""
    model, cfg, log = _logged_prefetcher(tiny_checkpoint, slots=8, prefetch_per_layer=2)
    engine = model.engine
    plan = [(1, e) for e in range(cfg.num_experts)] + [(1, 5), (1, 5), (1, 2)]  # 5 twice more, 2 once more
    with torch.no_grad(), engine.expected_experts(plan):
        model(torch.tensor([[7]]))
    assert [key for event, key in log if event == "prefetch" and key[0] == 1] == [(1, 5), (1, 2)]
