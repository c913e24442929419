"""CUDA paths: the pinned arena, the copy stream + events, the disk path's ordering and errors, and the
offloaded model against stock transformers on the GPU. Every test here skips cleanly without CUDA.

Stock is loaded with ``experts_implementation="eager"`` (the per-expert loop the engine reproduces),
so logits are compared bitwise (``torch.equal``), not within a tolerance.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_host_tier import _mixtral_experts
from tiny_models import expert_bytes, tiny_config
from transformers import AutoModelForCausalLM

import moe_engine
from moe_engine.runtime.host_tier import plan_host_tier
from moe_engine.runtime.mover import MoverClosedError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GiB = 2**30
PER_LAYER = 8  # tiny Mixtral: 2 layers x 8 experts


def _mover(store, locs, numel, mode: str, num_slots: int, io_threads: int = 2):
    from moe_engine.runtime.cuda_mover import CudaMover

    nbytes = numel * 4
    budget = len(locs) * nbytes if mode == "none" else num_slots * nbytes
    plan = plan_host_tier(
        nbytes, len(locs), budget, requested="disk" if mode == "disk" else "auto",
        available_ram=64 * GiB, total_ram=64 * GiB,
    )  # fmt: skip
    assert plan.mode == mode
    keyed = [((i // PER_LAYER, i % PER_LAYER), loc) for i, loc in enumerate(locs)]
    return CudaMover(
        store, keyed, numel, torch.float32, torch.device("cuda"), num_slots, plan, io_threads=io_threads
    )


def _key(i: int) -> tuple[int, int]:
    return (i // PER_LAYER, i % PER_LAYER)


def test_arena_is_one_registration_of_exactly_the_expert_bytes(tiny_checkpoint):
    store, locs, want, numel = _mixtral_experts(tiny_checkpoint("mixtral"))
    torch.cuda.init()
    before = torch.cuda.host_memory_stats()
    mover = _mover(store, locs, numel, "pinned", num_slots=2)
    after = torch.cuda.host_memory_stats()
    arena = mover.arena
    assert arena is not None and mover.staging is None
    need = len(locs) * numel * 4
    assert mover.plan.arena_bytes == arena.registered_bytes == mover.pinned_bytes == need
    buf = arena.buffer
    assert buf is not None and buf.untyped_storage().nbytes() == need  # one buffer, no power-of-two rounding
    assert buf.is_pinned() and arena.expert(len(locs) - 1).is_pinned()
    # Nothing came from PyTorch's caching host allocator (which would round and cache per block).
    for stat in ("allocated_bytes.current", "num_host_alloc"):
        assert after.get(stat, 0) == before.get(stat, 0), stat
    for i in range(len(locs)):
        assert torch.equal(arena.expert(i), want[i])
    mover.close()
    mover.close()  # idempotent
    assert mover.pinned_bytes == 0 and not buf.is_pinned()  # unregistered
    with pytest.raises(MoverClosedError, match="closed"):
        mover.submit(locs[0], torch.empty(numel, device="cuda"), 0, _key(0))
    store.close()


@pytest.mark.parametrize("mode", ["pinned", "disk", "none"])
def test_copies_land_in_their_slots(tiny_checkpoint, mode):
    store, locs, want, numel = _mixtral_experts(tiny_checkpoint("mixtral"))
    num_slots = len(locs) if mode == "none" else 2
    mover = _mover(store, locs, numel, mode, num_slots)
    slots = torch.full((num_slots, numel), float("nan"), device="cuda")
    last: dict[int, object] = {}
    for start in range(0, len(locs), 2):  # two copies in flight at a time, one of them a prefetch
        tickets = []
        for i in (start, start + 1):
            s = i % num_slots
            t = mover.submit(locs[i], slots[s], s, _key(i), prefetch=i % 2 == 1, after=last.get(s))
            last[s] = t
            tickets.append((i, s, t))
        for i, s, t in tickets:
            assert t.wait() >= 0.0
            assert t.done()
            # read on the compute stream, ordered after the copy by wait()
            assert torch.equal(slots[s].cpu(), want[i]), f"{mode}: slot {s} does not hold expert {i}"
            mover.release(s)
    if mode == "none":
        assert (
            mover.pinned_bytes == mover.staging.nbytes == 2 * 2 * numel * 4
        )  # two staging buffers per reader
    mover.close()
    store.close()


class _GatedReads:
    """Wraps a store's ``read_expert_into`` (on the instance): reads of ``locs`` block until ``gate`` is set,
    or raise ``error`` after scribbling over the buffer."""

    def __init__(self, store, locs, error: BaseException | None = None) -> None:
        self.store, self.real = store, store.read_expert_into
        self.locs = {id(loc) for loc in locs}
        self.error = error
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, loc, buf):
        if id(loc) in self.locs:
            self.entered.set()
            if self.error is not None:
                buf.fill_(123.0)  # a read that died half-way
                raise self.error
            self.gate.wait(30)
        return self.real(loc, buf)

    def __enter__(self):
        self.store.read_expert_into = self
        return self

    def __exit__(self, *exc) -> None:
        del self.store.read_expert_into


def test_disk_copy_waits_for_the_slots_previous_copy(tiny_checkpoint):
    """A (slow read) then B into the same slot: B's read finishes first, yet B's copy is enqueued after A's,
    so the slot ends up holding B. Without the ``after`` ordering A would overwrite B."""
    store, locs, want, numel = _mixtral_experts(tiny_checkpoint("mixtral"))
    mover = _mover(store, locs, numel, "disk", num_slots=1, io_threads=2)
    slot = torch.full((numel,), float("nan"), device="cuda")
    with _GatedReads(store, [locs[3]]) as gated:
        a = mover.submit(locs[3], slot, 0, _key(3), prefetch=True)
        assert gated.entered.wait(10)  # A is running (its read is blocked): it can no longer be cancelled
        assert not a.cancel()
        b = mover.submit(locs[5], slot, 0, _key(5), after=a)
        time.sleep(0.3)  # B's read is done by now; it must still be waiting for A's copy to be enqueued
        assert not b.done() and not a.done()
        gated.gate.set()
        b.wait()
    assert a.done() and b.done()
    assert torch.equal(slot.cpu(), want[5])
    mover.close()
    store.close()


def test_disk_read_error_reaches_wait_and_writes_nothing(tiny_checkpoint):
    store, locs, want, numel = _mixtral_experts(tiny_checkpoint("mixtral"))
    mover = _mover(store, locs, numel, "disk", num_slots=1)
    slot = torch.full((numel,), float("nan"), device="cuda")
    with _GatedReads(store, [locs[2]], error=OSError(5, "injected EIO")):
        t = mover.submit(locs[2], slot, 0, _key(2))
        with pytest.raises(OSError, match="injected EIO"):
            t.wait()
        assert t.done() and t.cancel()
        assert t.job.future.exception() is not None  # no event was recorded as a success
        torch.cuda.synchronize()  # the test reads the slot directly: let every enqueued copy finish
        assert slot.isnan().all(), "a failed read's staging bytes were copied into the slot"
        t2 = mover.submit(locs[4], slot, 0, _key(4), after=t)  # the slot is usable again
        t2.wait()
    assert torch.equal(slot.cpu(), want[4])
    mover.close()
    store.close()


def test_disk_close_cancels_queued_copies(tiny_checkpoint):
    store, locs, _, numel = _mixtral_experts(tiny_checkpoint("mixtral"))
    mover = _mover(store, locs, numel, "disk", num_slots=2, io_threads=1)
    slots = torch.zeros(2, numel, device="cuda")
    with _GatedReads(store, [locs[0]]) as gated:
        first = mover.submit(locs[0], slots[0], 0, _key(0))
        assert gated.entered.wait(10)  # the only reader is busy: the next copy stays queued
        queued = mover.submit(locs[1], slots[1], 1, _key(1), prefetch=True)
        threading.Timer(0.3, gated.gate.set).start()  # lets the running read finish while close() joins
        mover.close()
    assert queued.job.future.cancelled() and queued.done() and queued.cancel()
    assert first.done()
    first.wait()  # the copy that was running completed normally
    with pytest.raises(MoverClosedError):
        mover.submit(locs[1], slots[1], 1, _key(1))
    store.close()


# ----------------------------------------------------------------------------------------------------
# the whole model on the GPU


@pytest.mark.parametrize("predictor", [None, "cross_layer_gate"])
@pytest.mark.parametrize("host_tier", ["auto", "pinned", "disk"])
@pytest.mark.parametrize("budget", ["one_expert", 1.0], ids=str)
def test_cuda_offload_is_bitwise_stock(tiny_checkpoint, budget, host_tier, predictor):
    path = tiny_checkpoint("mixtral")
    one = expert_bytes(tiny_config("mixtral"), torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").to("cuda").eval()
    model = moe_engine.from_pretrained(
        path, budget=one if budget == "one_expert" else budget, device="cuda", host_tier=host_tier,
        predictor=predictor,
    )  # fmt: skip
    mover = model.engine.mover
    want_mode = "none" if budget == 1.0 else ("disk" if host_tier == "disk" else "pinned")
    assert mover.plan.mode == want_mode
    if want_mode == "pinned":
        assert mover.pinned_bytes == mover.plan.arena_bytes == one * mover.arena.num_experts
    ids = torch.arange(4, 36, device="cuda").view(2, 16)
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids).logits
    assert torch.equal(want, got), f"max abs diff {(want - got).abs().max().item():.3g}"
    assert model.engine.cache.slots.device.type == "cuda"
    s = model.engine.stats()
    assert s.bytes_moved > 0 and s.peak_resident_bytes <= s.budget_bytes
    g_ref = ref.generate(ids, max_new_tokens=8, do_sample=False)
    g = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(g_ref, g)
    model.close()
