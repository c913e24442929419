"""Faults injected into a running model: each call either raises a clear error or returns exactly stock's
tokens, and the next call on the same model returns exactly stock's tokens.

* Read errors: the store's expert read raises a transient EIO at random reads (seeded), sometimes after
  writing garbage into part of the slot (a read that died half-way).
* Ctrl-C: ``KeyboardInterrupt`` raised at a random line of the runtime's code (any statement of
  ``moe_engine/runtime``, seeded, via ``sys.settrace``), and real SIGINTs (``_thread.interrupt_main``)
  at random moments.

Every architecture, 100 seeds each, prefetch on, at a budget of one expert (every layer runs in waves)
and at 0.5.
"""

from __future__ import annotations

import _thread
import errno
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import tiny_models
import torch
from tiny_models import ARCHITECTURES, PAD_ID, expert_bytes, tiny_config
from transformers import AutoModelForCausalLM

import moe_engine
from moe_engine.runtime.cache import ExpertReadError
from moe_engine.runtime.interrupts import deferring

SEEDS = 100
NEW_TOKENS = 5
RUNTIME_DIR = str(Path(moe_engine.__file__).parent / "runtime")
NOT_TRACED = ("interrupts.py",)  # the deferral itself runs with signals masked by design


def _batch():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(4, tiny_models.VOCAB_SIZE, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2] = PAD_ID
    mask[0, :2] = 0
    return ids, mask


def _generate(model) -> torch.Tensor:
    ids, mask = _batch()
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=PAD_ID, eos_token_id=None,
    )  # fmt: skip


def _stock_tokens(path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _generate(model)


def _models(path, variant):
    one = expert_bytes(tiny_config(variant), torch.float32)
    return [moe_engine.from_pretrained(path, budget=b, device="cpu") for b in (one, 0.5)]


class _FlakyReads:
    """Wraps a store's ``read_expert_into``: each read fails with EIO with probability ``p``; half the
    failures first scribble over the start of the slot."""

    def __init__(self, store, seed: int, p: float) -> None:
        self.store, self.real = store, store.read_expert_into
        self.rng = random.Random(seed)
        self.p = p
        self.lock = threading.Lock()
        self.failures = 0

    def __call__(self, loc, slot):
        with self.lock:
            fail = self.rng.random() < self.p
            partial = self.rng.random() < 0.5
        if fail:
            self.failures += 1
            if partial:
                slot[: max(1, slot.numel() // 3)] = float("nan")
            raise OSError(errno.EIO, "injected transient I/O error")
        return self.real(loc, slot)

    def __enter__(self):
        self.store.read_expert_into = self
        return self

    def __exit__(self, *exc) -> None:
        del self.store.read_expert_into  # back to the class's method


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_transient_read_errors(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    want = _stock_tokens(path)
    failures = raised = 0
    for model in _models(path, variant):
        for seed in range(SEEDS // 2):
            with _FlakyReads(model.engine.store, seed, p=0.15) as flaky:
                try:
                    got = _generate(model)
                except ExpertReadError as exc:
                    assert "injected transient I/O error" in str(exc.__cause__)
                    raised += 1
                else:
                    assert torch.equal(got, want), f"seed {seed}: wrong tokens after {flaky.failures} read errors"
                failures += flaky.failures
            assert torch.equal(_generate(model), want), f"seed {seed}: the next call is wrong"
        model.close()
    assert failures > 0 and raised > 0  # the injection really fired


class _InterruptAtLine:
    """A ``sys.settrace`` tracer counting line events in the runtime's files; raises KeyboardInterrupt
    at line event number ``at`` (never when ``at`` is None: it only counts). Like a real SIGINT, an
    interrupt due inside a ``deferred_interrupts`` block is raised at the first line after it."""

    def __init__(self, at: int | None) -> None:
        self.at, self.count, self.fired, self.pending = at, 0, False, False

    def _local(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.at is not None and self.count >= self.at and not self.fired:
                if deferring():
                    self.pending = True
                else:
                    self.fired = True
                    raise KeyboardInterrupt
        return self._local

    def __call__(self, frame, event, arg):
        file = frame.f_code.co_filename
        if file.startswith(RUNTIME_DIR) and not file.endswith(NOT_TRACED):
            return self._local
        return None


def _traced(model, tracer):
    sys.settrace(tracer)
    try:
        return _generate(model)
    finally:
        sys.settrace(None)


def _call_interrupted(model, tracer, want, where: str) -> bool:
    """One traced call: it returns exactly ``want`` or raises KeyboardInterrupt (then True); afterwards
    another thread can take the engine's lock and the next call returns exactly ``want``."""
    try:
        got = _traced(model, tracer)
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = False
        assert torch.equal(got, want), f"{where}: wrong tokens after the interrupt"
    assert _free_for_another_thread(model.engine.lock), f"{where}: the engine's lock was left held"
    assert torch.equal(_generate(model), want), f"{where}: wrong tokens on the call after the interrupt"
    return interrupted


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_keyboard_interrupt_between_any_two_statements(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    want = _stock_tokens(path)
    interrupted = 0
    for i, model in enumerate(_models(path, variant)):
        counter = _InterruptAtLine(None)
        _traced(model, counter)  # how many runtime lines one call executes
        rng = random.Random(1000 * i + 17)
        for seed in range(SEEDS // 2):
            tracer = _InterruptAtLine(rng.randrange(1, counter.count + 1))
            interrupted += _call_interrupted(model, tracer, want, f"seed {seed}, line event {tracer.at}")
        model.close()
    assert interrupted >= SEEDS // 2  # most runs really were interrupted


class _InterruptAtWithLine(_InterruptAtLine):
    """Counts only line events at the engine's locking ``with`` line (Python 3.11 reports one at its entry
    and one at its exit, before ``__exit__`` runs) and interrupts at the ``at``-th, as a SIGINT would."""

    def __init__(self, at: int | None, file: str, line: int) -> None:
        super().__init__(at)
        self.file, self.line = file, line

    def _local(self, frame, event, arg):
        if event == "line" and frame.f_lineno == self.line and frame.f_code.co_filename == self.file:
            return super()._local(frame, event, arg)
        return self._local


def _free_for_another_thread(lock) -> bool:
    got: list[bool] = []

    def take() -> None:
        if lock.acquire(timeout=5):
            lock.release()
            got.append(True)

    t = threading.Thread(target=take)
    t.start()
    t.join()
    return bool(got)


def test_an_interrupt_at_the_lock_never_leaves_it_held_for_other_threads(tiny_checkpoint):
    """Ctrl-C landing at the entry or exit line of the engine's per-layer lock, at every such moment of a
    call: afterwards another thread can take the lock, Ctrl-C is Python's again, and the model answers
    exactly (the exit-line event comes before ``__exit__``; a plain ``with lock:`` leaked the lock there)."""
    import moe_engine.runtime.engine as engine_module
    from moe_engine.runtime import interrupts

    path = tiny_checkpoint("qwen3_moe")
    want = _stock_tokens(path)
    model = _models(path, "qwen3_moe")[0]
    file = engine_module.__file__
    line = next(i + 1 for i, text in enumerate(Path(file).read_text().splitlines())
                if text.strip() == "with deferred_interrupts(), self.lock, interruptible():")  # fmt: skip
    counter = _InterruptAtWithLine(None, file, line)
    _traced(model, counter)
    assert counter.count >= 8  # entry and exit of each MoE layer call
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupted = 0
        for at in range(1, counter.count + 1):
            interrupted += _call_interrupted(model, _InterruptAtWithLine(at, file, line), want, f"lock event {at}")
            assert not interrupts.deferring() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert interrupted == counter.count
    finally:
        signal.signal(signal.SIGINT, previous)
        model.close()


def test_real_sigint_at_random_moments(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    want = _stock_tokens(path)
    model = _models(path, "qwen3_moe")[0]
    _generate(model)  # the first call pays one-time costs: time a warm one, the calls the timers aim at
    t0 = time.perf_counter()
    _generate(model)
    duration = time.perf_counter() - t0
    rng = random.Random(5)
    interrupted = 0
    # interrupt_main() acts through the SIGINT handler: use Python's default, whatever an earlier test left
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    for seed in range(30):
        timer = threading.Timer(rng.uniform(0, duration), _thread.interrupt_main)
        try:
            timer.start()
            got = _generate(model)
            time.sleep(duration * 0.1)  # a late signal lands here, not in the next check
        except KeyboardInterrupt:
            interrupted += 1
        else:
            assert torch.equal(got, want), f"seed {seed}: wrong tokens"
        finally:
            timer.cancel()
            timer.join()
        try:
            got = _generate(model)
        except KeyboardInterrupt:  # the timer fired after the first call: run the check again
            got = _generate(model)
        assert torch.equal(got, want), f"seed {seed}: the call after an interrupt is wrong"
    model.close()
    signal.signal(signal.SIGINT, previous)
    assert interrupted > 0


def test_interruptible_inside_a_deferred_block():
    """``deferred_interrupts`` holds a real SIGINT back to its end; ``interruptible`` inside it lets one
    act at once, delivers one held back before it on entry, and holds them back again after it."""
    from moe_engine.runtime.interrupts import deferred_interrupts, deferring, interruptible

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        steps: list[str] = []
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                signal.raise_signal(signal.SIGINT)
                steps.append("held")
                with interruptible():  # the held one is raised here
                    steps.append("not reached")
        assert steps == ["held"] and not deferring()
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                with interruptible():
                    assert not deferring()
                    with deferred_interrupts():  # bookkeeping inside stays protected
                        signal.raise_signal(signal.SIGINT)
                        steps.append("inner held")
                    steps.append("not reached")
        assert steps == ["held", "inner held"]
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                with interruptible():
                    pass
                assert deferring()
                signal.raise_signal(signal.SIGINT)
                steps.append("held again")
        assert steps[-1] == "held again" and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with interruptible():  # outside any deferred block: nothing changes
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
