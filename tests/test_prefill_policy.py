"""Separate prefill and decode expert policies: a prefill streams its experts (read-ahead of the next
layer, its loads the first victims afterwards) and displaces at most its window of the decode working
set; outputs stay bit-identical. Core-level tests drive ``Residency`` directly; model-level tests use a
real tiny checkpoint."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from transformers import AutoConfig

import moe_engine
from moe_engine.runtime.policies import make_policy
from moe_engine.runtime.residency import Compute, Load, Residency


def _core(slots: int, layers: int = 4, experts: int = 8, policy: str = "lru", log=None) -> Residency:
    pol = make_policy(policy, num_layers=layers, num_experts=experts, capacity=slots)
    return Residency(num_slots=slots, policy=pol, num_layers=layers, expert_bytes=1, log=log)


def _run(core: Residency, layer: int, experts, ahead=None) -> list:
    """Drive one layer like the runtime does; ``ahead``: read-ahead keys issued at the Predict step."""
    steps = []
    for step in core.layer_schedule(layer, experts, ready=lambda key: True):
        if isinstance(step, Load):
            core.loaded(step.key)
            steps.append(("load", step.key, step.prefetch))
        elif isinstance(step, Compute):
            steps.append(("compute", step.key, step.hit))
        elif ahead is not None:
            core.stream_ahead(ahead)
    return steps


def test_streaming_displaces_at_most_its_window_and_leaves_first():
    core = _core(slots=8)
    for layer in range(4):  # the decode working set: experts 0 and 1 of every layer
        _run(core, layer, [0, 1])
    decode_set = set(core.entries)
    assert len(decode_set) == 8
    core.set_streaming(True, window=2, new_pass=True)
    for layer in range(4):  # a prefill touching every expert of every layer
        _run(core, layer, range(8))
    core.set_streaming(False)
    kept = decode_set & set(core.entries)
    assert len(kept) == 6, kept  # exactly the window (2) of the decode set left
    # The prefill's leftovers are the first victims of the next decode misses, whatever LRU says.
    stream_left = set(core.entries) - decode_set
    assert stream_left and len(stream_left) == 2
    _run(core, 0, [5, 6])  # two decode misses (expert 5, 6 of layer 0 are not resident)
    assert not (stream_left & set(core.entries)) or (0, 5) in stream_left or (0, 6) in stream_left
    assert kept <= set(core.entries)


def test_shared_prefill_evicts_the_decode_working_set():
    """The contrast: without streaming, the same prefill evicts every entry of the decode set (LRU)."""
    core = _core(slots=8)
    for layer in range(4):
        _run(core, layer, [0, 1])
    decode_set = set(core.entries)
    for layer in range(4):
        _run(core, layer, range(8))
    assert len(decode_set & set(core.entries)) <= 2


def test_streaming_hits_do_not_reorder_the_decode_set():
    core = _core(slots=4, layers=2)
    _run(core, 0, [0])
    _run(core, 0, [1])
    _run(core, 0, [2])
    _run(core, 0, [3])  # LRU order: 0 oldest ... 3 newest
    core.set_streaming(True, window=1, new_pass=True)
    _run(core, 0, [0])  # a prefill hit on the oldest
    core.set_streaming(False)
    _run(core, 1, [7])  # a decode miss evicts LRU's victim: still (0, 0), the prefill did not refresh it
    assert (0, 0) not in core.entries and {(0, 1), (0, 2), (0, 3), (1, 7)} == set(core.entries)


def test_read_ahead_loads_the_next_layer_as_computes_free_room():
    log: list = []
    core = _core(slots=4, layers=2, log=log)
    core.set_streaming(True, window=4, new_pass=True)
    steps = _run(core, 0, [0, 1], ahead=[(1, 2), (1, 3), (1, 4)])
    # 2 free slots at the Predict step: read ahead in order; (1, 4) starts once layer 0 has computed an
    # expert (a stream entry: its slot is reused first).
    assert [(kind, key) for kind, key, _ in steps] == [
        ("load", (0, 0)), ("load", (0, 1)), ("load", (1, 2)), ("load", (1, 3)),
        ("compute", (0, 0)), ("load", (1, 4)), ("compute", (0, 1)),
    ]  # fmt: skip
    assert [pf for kind, _, pf in steps if kind == "load"] == [False, False, True, True, True]
    steps = _run(core, 1, [2, 3, 4])
    assert [h for kind, _, h in steps if kind == "compute"] == [True, True, True]
    assert core.stats().prefetch_hits == 3


def test_read_ahead_never_evicts_the_running_layer():
    core = _core(slots=2, layers=2)
    core.set_streaming(True, window=2, new_pass=True)
    steps = _run(core, 0, [0, 1], ahead=[(1, 0), (1, 1)])
    computes = [key for kind, key, _ in steps if kind == "compute"]
    assert computes == [(0, 0), (0, 1)]
    assert core.stats().failed_loads == 0


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_simulator_path_makes_the_same_streaming_decisions(policy):
    """``run_layer`` (the simulator's fast path) and ``layer_schedule`` (the runtime's) agree in streaming mode."""
    logs = []
    for fast in (False, True):
        log: list = []
        core = _core(slots=6, layers=3, policy=policy, log=log)
        for rnd in range(3):
            for layer in range(3):  # decode-like steps
                exp = [(rnd + layer) % 8, (rnd * 3 + layer) % 8]
                core.run_layer(layer, exp, lambda k: True, None) if fast else _run(core, layer, exp)
            core.set_streaming(True, window=2, new_pass=True)
            for layer in range(3):
                ahead = [(layer + 1, e) for e in range(8)] if layer + 1 < 3 else []
                if fast:
                    core.run_layer(layer, range(8), lambda k: True, lambda a=ahead, c=core: c.stream_ahead(a))
                else:
                    _run(core, layer, range(8), ahead=ahead)
            core.set_streaming(False)
        logs.append(log)
    assert logs[0] == logs[1]


def _tiny(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    cfg = AutoConfig.from_pretrained(path)
    return path, cfg, tiny_models.expert_bytes(cfg)


def test_prefill_keeps_the_decode_working_set_in_a_real_model(tiny_checkpoint):
    path, cfg, one = _tiny(tiny_checkpoint)
    total = cfg.num_hidden_layers * cfg.num_experts
    evicted = {}
    for pp in ("stream", "shared"):
        model = moe_engine.from_pretrained(path, budget=(total // 2) * one, device="cpu", predictor=None,
                                           prefill_policy=pp, prefill_window=1 / 16)
        core = model.engine.core
        with torch.no_grad():
            out = model(torch.tensor([[5]]), use_cache=True)  # a one-token "decode" pass
            past = out.past_key_values
            for t in range(6):
                out = model(torch.tensor([[6 + t]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
        decode_set = set(core.entries)
        long = (torch.arange(60) * 7 % (cfg.vocab_size - 3) + 3).unsqueeze(0)
        with torch.no_grad():
            model(long, use_cache=False)  # a prefill touching most experts
        evicted[pp] = len(decode_set - set(core.entries))
        window = max(1, int(core.num_slots / 16))
        model.close()
    assert evicted["stream"] <= window < evicted["shared"], evicted


def test_streaming_prefill_is_bit_identical(tiny_checkpoint):
    path, cfg, one = _tiny(tiny_checkpoint)
    ids = (torch.arange(48) * 5 % (cfg.vocab_size - 3) + 3).unsqueeze(0)
    outs = {}
    for pp in ("stream", "shared"):
        for pred in (None, "cross_layer_gate"):
            model = moe_engine.from_pretrained(path, budget=3 * one, device="cpu", predictor=pred, prefill_policy=pp)
            with torch.no_grad():
                outs[pp, pred] = model(ids).logits
                st = model.engine.stats()
            if pp == "stream":
                assert st.prefetches > 0 and st.prefetch_hits > 0  # the next layers were read ahead
            model.close()
    ref = outs["shared", None]
    assert all(torch.equal(ref, o) for o in outs.values())


def test_engine_prefill_context_overrides_the_shape(tiny_checkpoint):
    path, cfg, one = _tiny(tiny_checkpoint)
    model = moe_engine.from_pretrained(path, budget=3 * one, device="cpu", predictor=None)
    ids = (torch.arange(40) % (cfg.vocab_size - 3) + 3).unsqueeze(0)
    with torch.no_grad(), model.engine.prefill(False):
        model(ids)
    assert model.engine.stats().prefetches == 0  # treated as a decode step: no read-ahead
    with torch.no_grad():
        model(ids)
    assert model.engine.stats().prefetches > 0


def test_bad_prefill_arguments_are_refused(tiny_checkpoint):
    path, _, _ = _tiny(tiny_checkpoint)
    with pytest.raises(ValueError, match="prefill_policy"):
        moe_engine.from_pretrained(path, device="cpu", prefill_policy="fast")
    with pytest.raises(ValueError, match="prefill_window"):
        moe_engine.from_pretrained(path, device="cpu", prefill_window=0.0)


def test_a_stream_key_left_behind_by_an_interrupt_is_forgotten():
    """An interrupt between dropping an entry and forgetting it as a stream entry must not make eviction
    spin on the stale key (it did: tests/test_faults.py's Ctrl-C at every statement hung on it)."""
    core = _core(slots=2, layers=2)
    core.set_streaming(True, window=2, new_pass=True)
    _run(core, 0, [0, 1])
    stale = (0, 0)
    e = core.entries.pop(stale)  # what an interrupted eviction leaves: gone from the entries ...
    core.free.append(e.slot)
    assert stale in core._stream  # ... still listed as a stream entry
    core.set_streaming(False)
    _run(core, 1, [3, 4, 5])  # needs evictions: must finish
    assert stale not in core._stream and {(1, 5)} <= set(core.entries)
