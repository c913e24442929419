"""A cold start: the fast tier is filled at load (``preload``), and a prefill's reads go through the
store's readahead descriptors (``CheckpointStore.sequential``), their pages dropped afterwards. Outputs
stay bit-identical; a failed read while preloading is an error, never a wrong expert."""

from __future__ import annotations

import errno
import os

import pytest
import tiny_models
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moe_engine
from moe_engine.runtime.cache import ExpertReadError
from moe_engine.runtime.residency import LOADING


def _tiny(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    cfg = AutoConfig.from_pretrained(path)
    return path, cfg, tiny_models.expert_bytes(cfg)


def _ids(cfg, n: int = 40) -> torch.Tensor:
    return (torch.arange(n) * 7 % (cfg.vocab_size - 3) + 3).unsqueeze(0)


def test_preload_gives_each_layer_an_equal_share_and_counts_nothing(tiny_checkpoint):
    path, cfg, one = _tiny(tiny_checkpoint)
    cold = moe_engine.from_pretrained(path, budget=0.5, device="cpu", preload=False)
    layers = cold.engine.num_layers  # MoE layers
    assert not cold.engine.core.entries
    cold.close()
    model = moe_engine.from_pretrained(path, budget=2 * layers * one, device="cpu")
    core = model.engine.core
    assert set(core.entries) == {(li, e) for li in range(layers) for e in (0, 1)}
    assert all(e.state != LOADING or model.engine.cache._ready(k) for k, e in core.entries.items())
    st = model.engine.stats()
    assert st.bytes_moved == 0 and st.misses == 0 and st.prefetches == 0  # load time, not a forward pass
    assert st.resident_bytes == 2 * layers * one
    model.close()


def test_preload_is_bit_identical_and_saves_the_first_pass_reads(tiny_checkpoint):
    path, cfg, one = _tiny(tiny_checkpoint)
    ids = _ids(cfg)
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = stock(ids).logits
    moved = {}
    for preload in (True, False):
        model = moe_engine.from_pretrained(path, budget=0.5, device="cpu", preload=preload)
        with torch.no_grad():
            got = model(ids).logits
        assert torch.equal(got, want), f"preload={preload}"
        moved[preload] = model.engine.stats().bytes_moved
        model.close()
    assert moved[True] < moved[False], moved


def test_a_failed_read_while_preloading_is_an_error_and_nothing_wrong_stays(tiny_checkpoint):
    path, cfg, one = _tiny(tiny_checkpoint)
    ids = _ids(cfg, 12)
    model = moe_engine.from_pretrained(path, budget=0.5, device="cpu", preload=False)
    store = model.engine.store
    calls = []

    def failing(loc, slot):
        calls.append(1)
        slot.fill_(float("nan"))  # a read that died half-way, leaving garbage
        raise OSError(errno.EIO, "injected I/O error")

    store.read_expert_into = failing
    with pytest.raises(ExpertReadError, match="injected I/O error|failed"):
        model.engine.preload()
    del store.read_expert_into  # the class's method again
    assert calls
    with torch.no_grad():
        got = model(ids).logits  # keys whose read failed were freed or read again, never used as garbage
    ref = moe_engine.from_pretrained(path, budget=0.5, device="cpu", preload=False)
    with torch.no_grad():
        want = ref(ids).logits
    assert torch.equal(got, want) and not torch.isnan(got).any()
    model.close()
    ref.close()
    with pytest.raises(moe_engine.ModelClosedError):
        model.engine.preload()


def test_a_prefill_reads_through_the_readahead_descriptors_and_drops_them_after(tiny_checkpoint):
    path, cfg, one = _tiny(tiny_checkpoint)
    model = moe_engine.from_pretrained(path, budget=4 * one, device="cpu", predictor=None, preload=False)
    store = model.engine.store
    seen = []
    real = store.read_expert_into

    def spy(loc, slot):
        seen.append(store.sequential)
        return real(loc, slot)

    store.read_expert_into = spy
    with torch.no_grad():
        out = model(_ids(cfg, 30), use_cache=True)  # a prefill
        assert seen and all(seen) and store._stream_end  # every read went through a readahead descriptor
        seen.clear()
        nxt = out.logits[:, -1:].argmax(-1)
        model(nxt, past_key_values=out.past_key_values, use_cache=True)  # a decode step ends the stream
    assert seen and not any(seen) and not store.sequential
    assert not store._stream_end  # the stream's pages were dropped (drop_page_cache restarts the record)
    del store.read_expert_into
    fds = [fd for f in store._files.values() for fd in f.fds]
    assert all(f.seq_fd is not None for f in store._files.values())
    model.close()
    for fd in fds:  # every descriptor of every shard (random, readahead, O_DIRECT) is closed
        with pytest.raises(OSError):
            os.fstat(fd)


def test_sequential_and_random_reads_give_the_same_bytes(tiny_checkpoint):
    from moe_engine.runtime.store import CheckpointStore

    path, cfg, one = _tiny(tiny_checkpoint)
    store = CheckpointStore.open(path)
    names = [n for n in store.tensors if ".experts." in n][:6]
    try:
        plain = [store.read_tensor(n) for n in names]
        store.sequential = True
        seq = [store.read_tensor(n) for n in reversed(names)][::-1]
        assert all(torch.equal(a, b) for a, b in zip(plain, seq))
        assert store._stream_end
        store.drop_page_cache()
        assert not store._stream_end
    finally:
        store.close()


def test_direct_reads_equal_buffered_reads_and_fall_back(tiny_checkpoint, monkeypatch):
    """O_DIRECT reads (page-aligned spans through a bounce buffer, several chunks per tensor here) give
    the bytes buffered reads give; a filesystem refusing them (EINVAL) falls back to buffered reads."""
    import errno

    from moe_engine.runtime import store as store_mod
    from moe_engine.runtime.store import CheckpointStore

    path, cfg, one = _tiny(tiny_checkpoint)
    buffered = CheckpointStore.open(path, page_cache=True)  # no O_DIRECT descriptor
    names = list(buffered.tensors)[:12]
    direct = CheckpointStore.open(path)
    try:
        if not any(f.direct_fd is not None for f in direct._files.values()):
            pytest.skip("this filesystem has no O_DIRECT")
        monkeypatch.setattr(store_mod, "_DIRECT_CHUNK", store_mod._DIRECT_ALIGN)  # many chunks per tensor
        want = [buffered.read_tensor(n) for n in names]
        got = [direct.read_tensor(n) for n in names]
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        assert direct.bytes_read == buffered.bytes_read and not direct._no_direct

        real = os.preadv
        direct_fds = {f.direct_fd for f in direct._files.values()}

        def refuse(fd, bufs, offset):
            if fd in direct_fds:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, bufs, offset)

        monkeypatch.setattr(os, "preadv", refuse)
        again = [direct.read_tensor(n) for n in names]
        assert all(torch.equal(a, b) for a, b in zip(want, again))
        assert direct._no_direct  # later reads skip O_DIRECT
    finally:
        buffered.close()
        direct.close()


def test_read_path_benchmark_reads_the_same_bytes_both_ways(tmp_path):
    """The read-path benchmark runs (both modes, same experts) and reports per-expert figures."""
    import json

    from moe_engine.benchmarks.read_path import main

    out = tmp_path / "read_path.json"
    assert main(["--reads", "12", "--rounds", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    direct, buffered = result["rounds"]["direct"][0], result["rounds"]["buffered"][0]
    assert direct["bytes_per_read"] == buffered["bytes_per_read"] > 0
    assert direct["wall_ms"] > 0 and buffered["wall_ms"] > 0


def test_preload_order_takes_layers_in_turn_within_what_a_rank_owns():
    from moe_engine.runtime.residency import preload_order

    assert preload_order([3, 2]) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]
    # expert parallelism: only this rank's copies, still one layer after another
    assert preload_order([4, 4], owned=[[3, 1], [2]]) == [(0, 1), (1, 2), (0, 3)]
    assert preload_order([4, 4], owned=[[], []]) == []
