"""Fast tier: preallocated expert slots under the budget, driven by the residency core.

Mechanism only. *Which* expert holds which slot, and which one leaves, is decided by the residency
core (``moe_engine.runtime.residency``) and its eviction policy; the copy itself is the mover's
(``moe_engine.runtime.mover``). This module connects them: it performs each step of the core's
layer schedule (start a copy, issue prefetches, wait for a copy and hand the weights to compute) and
reports what happened back to the core (a copy finished, a copy failed, a stall).

Glossary: a *slot* is one preallocated buffer ``[slot_numel]`` holding one expert (``gate_up [2I, H]``
then ``down [H, I]``). A *ticket* is the mover's handle on the last copy into a slot.

Invariants: ``num_slots * expert_bytes <= budget`` (checked at construction), so resident expert
bytes never exceed the budget. A slot is handed to compute only after its copy finished without
error; a failed copy frees the slot (the next use reads the expert again) and raises
``ExpertReadError``; a copy into a slot never starts writing before the slot's previous copy stopped.

Example::

    cache = ExpertCache(core=Residency(...), intermediate=I, hidden=H, dtype=torch.float32,
                        device=torch.device("cpu"), mover=ThreadMover(store), locate=locs.__getitem__)
    for expert, gate_up, down in cache.iter_experts(layer=0, experts=[1, 5]):
        ...  # compute with the expert's weights
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from moe_engine.runtime.interrupts import deferred_interrupts
from moe_engine.runtime.mover import Mover, MoverClosedError, Ticket
from moe_engine.runtime.policies import ExpertKey
from moe_engine.runtime.residency import LOADING, Compute, Load, Predict, Residency
from moe_engine.runtime.store import CheckpointError, ExpertLocation


class DenseLayout:
    """A slot of a plain expert: ``gate_up [2I, H]`` then ``down [H, I]`` at the compute dtype."""

    def __init__(self, intermediate: int, hidden: int, dtype: torch.dtype) -> None:
        self.intermediate, self.hidden, self.dtype = intermediate, hidden, dtype
        self.numel = 3 * intermediate * hidden

    def nbytes(self, key: ExpertKey, variant: int = 0) -> int:
        return self.numel * self.dtype.itemsize

    def views(self, buf: torch.Tensor, key: ExpertKey, variant: int = 0) -> tuple[Any, Any]:
        i, h = self.intermediate, self.hidden
        return buf[: 2 * i * h].view(2 * i, h), buf[2 * i * h :].view(h, i)


class PackedLayout:
    """A slot of a quantized expert (``moe_engine.quant``): uint8 bytes, gate_up's packed form at 0 and
    down's after it (``moe_engine.quant.slots``); ``views`` unpacks them (views into the slot, no copy)
    in the format of the resident copy: ``formats(key, variant)``. ``numel``: bytes of the largest copy
    (the size of every slot when sizes are uniform)."""

    dtype = torch.uint8

    def __init__(self, intermediate: int, hidden: int, formats: Callable[[ExpertKey, int], str]) -> None:
        from moe_engine.quant.slots import expert_packing

        self.intermediate, self.hidden = intermediate, hidden
        self.formats = formats
        self._packing = expert_packing
        self.numel = 0  # set by the loader: max packed bytes over the experts

    def nbytes(self, key: ExpertKey, variant: int = 0) -> int:
        from moe_engine.quant.slots import expert_slot_bytes

        return expert_slot_bytes(self.formats(key, variant), self.intermediate, self.hidden)

    def views(self, buf: torch.Tensor, key: ExpertKey, variant: int = 0) -> tuple[Any, Any]:
        from moe_engine.quant.formats import unpack

        fmt = self.formats(key, variant)
        i, h = self.intermediate, self.hidden
        (gu_off, gu_bytes), (dn_off, dn_bytes) = self._packing(fmt, i, h)
        gate_up = unpack(buf[gu_off : gu_off + gu_bytes], fmt, (2 * i, h))
        down = unpack(buf[dn_off : dn_off + dn_bytes], fmt, (h, i))
        gate_up.in_slot = down.in_slot = True  # only these views read the slot until the next copy into it
        return gate_up, down


class ExpertReadError(OSError):
    """Reading an expert from the slow tier failed. The cache stays consistent: the next use reads it again."""


class ExpertCache:
    def __init__(
        self,
        *,
        core: Residency,
        intermediate: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        mover: Mover,
        locate: Callable[[ExpertKey], ExpertLocation],
        retries: int = 1,
        layout: DenseLayout | PackedLayout | None = None,
        locate_variant: Callable[[ExpertKey, int], ExpertLocation] | None = None,
    ) -> None:
        self.layout = layout if layout is not None else DenseLayout(intermediate, hidden, dtype)
        dtype = self.layout.dtype
        self.slot_numel = self.layout.numel
        self.expert_bytes = self.slot_numel * dtype.itemsize
        self.sized = core.size_of is not None  # entries of several sizes: one buffer per slot id
        if not self.sized and (core.expert_bytes != self.expert_bytes or core.num_slots * self.expert_bytes > core.budget_bytes):
            raise ValueError(
                f"{core.num_slots} slots of {self.expert_bytes} bytes do not fit the budget {core.budget_bytes}"
            )
        self.core = core
        self.intermediate, self.hidden = intermediate, hidden
        self.num_slots = core.num_slots
        self.device = device
        # Uniform sizes: one preallocated [num_slots, slot_numel] tensor. Several sizes: each slot id gets a
        # buffer of its entry's size when a copy into it starts, dropped when the id is freed (the core
        # keeps the sum of entry sizes within the budget; a copy still writing keeps its own reference).
        self.slots = torch.empty(0 if self.sized else core.num_slots, self.slot_numel, dtype=dtype, device=device)
        self.buffers: list[torch.Tensor | None] = [None] * core.num_slots if self.sized else []
        if self.sized:
            core.on_free = self._drop_buffer
        self.locate_variant = locate_variant
        # slot -> (key, its views): unpacking a quantized slot builds several views, so the views of a slot
        # are kept until the next copy into it (``_submit``) or its buffer is dropped.
        self._views: dict[int, tuple[ExpertKey, tuple[Any, Any]]] = {}
        self.mover = mover
        self.locate = locate
        self.retries = retries  # a failed copy is read again this many times before the error is raised
        # slot -> (key, ticket) of the last copy started into it. The key is kept with the ticket so a
        # ticket is never taken for another key's copy (a load admitted but not yet submitted).
        self.tickets: dict[int, tuple[ExpertKey, Ticket]] = {}

    # ------------------------------------------------------------------ helpers
    def views(self, slot: int, key: ExpertKey) -> tuple[Any, Any]:
        """(gate_up [2I, H], down [H, I]) views of a slot holding ``key``: tensors, or for a quantized
        model the ``moe_engine.quant.QTensor`` packed forms."""
        cached = self._views.get(slot)
        if cached is not None and cached[0] == key:  # unchanged since the last copy into the slot
            return cached[1]
        if not self.sized:
            views = self.layout.views(self.slots[slot], key)
        else:
            buf = self.buffers[slot]
            assert buf is not None, f"slot {slot} of {key} has no buffer"
            views = self.layout.views(buf, key, self.core.variant_of(key))
        self._views[slot] = (key, views)
        return views

    def _drop_buffer(self, slot: int) -> None:
        self._views.pop(slot, None)
        if slot < len(self.buffers):
            self.buffers[slot] = None

    def _slot_tensor(self, load: Load) -> torch.Tensor:
        """The tensor a load copies into: the slot's row, or (several sizes) a buffer of the entry's size."""
        if not self.sized:
            return self.slots[load.slot]
        entry = self.core.entries.get(load.key)
        nbytes = entry.nbytes if entry is not None else self.slot_numel
        numel = nbytes // self.layout.dtype.itemsize
        buf = self.buffers[load.slot]
        if buf is None or buf.numel() != numel:
            buf = self.buffers[load.slot] = torch.empty(numel, dtype=self.layout.dtype, device=self.device)
        return buf

    def free_memory(self) -> None:
        """Drop every slot (the model was closed)."""
        self.slots = torch.empty(0, dtype=self.slots.dtype, device=self.slots.device)
        self.buffers = [None] * len(self.buffers)
        self._views.clear()

    def resident(self, key: ExpertKey) -> bool:
        return key in self.core

    def _ready(self, key: ExpertKey) -> bool:
        """Has the copy of a LOADING key finished without error? (Polls; never blocks.)"""
        slot = self.core.slot_of(key)
        kt = None if slot is None else self.tickets.get(slot)
        if kt is None or kt[0] != key or not kt[1].done():
            return False
        t = kt[1]
        try:
            t.wait()  # returns at once; raises if the copy failed
        except BaseException:
            return False  # the failure is handled when the key is computed
        return True

    def _submit(self, load: Load) -> None:
        with deferred_interrupts():
            self._views.pop(load.slot, None)
            prev = self.tickets.get(load.slot)
            variant = self.core.variant_of(load.key) if self.sized else 0
            loc = self.locate(load.key) if variant == 0 or self.locate_variant is None else self.locate_variant(load.key, variant)
            ticket = self.mover.submit(
                loc, self._slot_tensor(load), load.slot, load.key, prefetch=load.prefetch,
                after=None if prev is None else prev[1],
            )  # fmt: skip
            self.tickets[load.slot] = (load.key, ticket)

    def _await(self, step: Compute) -> None:
        """Block until ``step.key``'s copy has finished; record the stall; on failure free the slot and raise."""
        core, key, slot = self.core, step.key, step.slot
        if core.state(key) != LOADING:
            return
        kt = self.tickets.get(slot)
        if kt is None or kt[0] != key:  # admitted but never submitted (an interrupt in between): submit now
            self._submit(Load(key, slot))
            kt = self.tickets[slot]
        stall = 0.0
        for attempt in range(1 + self.retries):
            t = kt[1]
            try:
                stall += t.wait()
                break
            except BaseException as exc:
                if not t.done() or isinstance(exc, MoverClosedError):
                    raise  # e.g. Ctrl-C while waiting: the copy goes on, the key stays LOADING
                if attempt < self.retries and not isinstance(exc, CheckpointError):
                    # A transient error (EIO, a prefetch that failed earlier): read it again, same slot.
                    with deferred_interrupts():
                        core.count_failure(key)
                        self._submit(Load(key, slot))
                        kt = self.tickets[slot]
                    continue
                with deferred_interrupts():
                    core.failed(key)
                if isinstance(exc, CheckpointError):
                    raise
                raise ExpertReadError(
                    f"reading expert {key[1]} of MoE layer {key[0]} failed {attempt + 1} times "
                    f"({type(exc).__name__}: {exc}); nothing was cached from it, the next call reads it again"
                ) from exc
        with deferred_interrupts():
            core.loaded(key)
            core.record_stall(key, stall, late=step.hit)

    # ------------------------------------------------------------------ demand path
    def iter_experts(
        self, layer: int, experts: Sequence[int], predict: Callable[[], list[Load]] | None = None
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(expert, gate_up, down)`` for each requested expert once its weights are in a slot.

        The order is the core's: resident experts first (their copies overlap nothing else), then the
        misses, whose copies were all started before anything is computed. ``predict`` runs once,
        after this layer's demand loads are queued and before compute: it returns the prefetch loads
        the core admitted, which queue behind the demand loads and overlap this layer's compute. The
        slot stays reserved for the consumer until it asks for the next expert (or closes the generator).
        """
        sched = self.core.layer_schedule(layer, experts, ready=self._ready)
        try:
            while True:
                with deferred_interrupts():
                    step = next(sched, None)
                if step is None:
                    return
                if isinstance(step, Load):
                    self._submit(step)
                elif isinstance(step, Predict):
                    if predict is not None:
                        for load in predict():
                            self._submit(load)
                else:
                    assert isinstance(step, Compute)
                    self._await(step)
                    gate_up, down = self.views(step.slot, step.key)
                    try:
                        yield step.key[1], gate_up, down
                    finally:
                        self.mover.release(step.slot)
        finally:
            with deferred_interrupts():
                sched.close()

    def wait_all(self) -> None:
        """Wait for every copy in flight (errors are left to the next use of the key)."""
        for _, t in list(self.tickets.values()):
            try:
                t.wait()
            except Exception:
                pass
