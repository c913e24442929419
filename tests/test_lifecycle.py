"""Lifecycle and threads: close(), the context manager, dropping a model without close(), several
threads generating on one model, and grad mode."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import psutil
import pytest
import torch
from tiny_models import PAD_ID, VOCAB_SIZE

import moe_engine
from moe_engine.runtime.engine import ModelClosedError


def _prompts(n: int, length: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(4, VOCAB_SIZE, (1, length), generator=g) for _ in range(n)]


def _gen(model, ids, steps: int = 8) -> torch.Tensor:
    return model.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None)


def test_close_then_generate_raises_quickly_and_close_is_idempotent(tiny_checkpoint):
    model = moe_engine.from_pretrained(tiny_checkpoint("mixtral"), budget=0.25, device="cpu")
    ids = _prompts(1)[0]
    _gen(model, ids)
    model.close()
    model.close()
    t0 = time.perf_counter()
    with pytest.raises(ModelClosedError, match="closed"):
        _gen(model, ids)
    assert time.perf_counter() - t0 < 1.0
    assert model.engine.cache.slots.numel() == 0  # slot memory released


def test_context_manager_closes(tiny_checkpoint):
    with moe_engine.from_pretrained(tiny_checkpoint("qwen3_moe"), budget=0.5, device="cpu") as model:
        out = _gen(model, _prompts(1)[0])
        assert out.shape[1] == 6 + 8
    assert model.engine.closed
    assert not [t for t in threading.enumerate() if t.name.startswith("moe-io") and t.is_alive()
                and t in getattr(model.engine.mover, "_threads", [])]


def _io_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("moe-io"))


def _open_files(path) -> int:
    root = str(path)
    return sum(1 for f in psutil.Process().open_files() if f.path.startswith(root))


def test_dropping_models_without_close_frees_threads_files_and_slots(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    gc.collect()
    threads0, files0 = _io_threads(), _open_files(path)
    ids = _prompts(1)[0]
    slot_refs = []
    for _ in range(20):
        model = moe_engine.from_pretrained(path, budget=1.0, device="cpu")
        _gen(model, ids, steps=2)
        slot_refs.append(weakref.ref(model.engine.cache.slots))
        del model
    gc.collect()
    assert _io_threads() == threads0, f"{_io_threads() - threads0} I/O threads left behind"
    assert _open_files(path) == files0, "checkpoint files left open"
    assert all(r() is None for r in slot_refs), "slot tensors still alive"


@pytest.mark.parametrize("n_threads", [2, 4])
def test_threads_generating_on_one_model_match_single_threaded(tiny_checkpoint, n_threads):
    path = tiny_checkpoint("qwen2_moe")
    model = moe_engine.from_pretrained(path, budget=0.25, device="cpu")
    prompts = _prompts(n_threads)
    want = [_gen(model, p) for p in prompts]
    results: list[torch.Tensor | BaseException | None] = [None] * n_threads
    barrier = threading.Barrier(n_threads)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = _gen(model, prompts[i])
                assert torch.equal(results[i], want[i])
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, r in enumerate(results):
        assert not isinstance(r, BaseException), f"thread {i}: {r!r}"
        assert torch.equal(r, want[i]), f"thread {i}: tokens differ from the single-threaded run"
    model.close()


def test_forward_records_no_autograd_graph(tiny_checkpoint):
    model = moe_engine.from_pretrained(tiny_checkpoint("olmoe"), budget=0.25, device="cpu")
    out = model(_prompts(1)[0])
    assert not out.logits.requires_grad  # parameters are frozen: nothing to backpropagate into
    assert all(not p.requires_grad for p in model.parameters())
    model.close()

