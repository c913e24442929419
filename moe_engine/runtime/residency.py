"""The residency core: which expert holds which fast-tier slot, in which state, and what happens next.

Pure bookkeeping (no tensors, no threads, no clocks). Two drivers run it: the runtime cache
(``moe_engine.runtime.cache``: real slots, a mover, wall time) and the trace-driven simulator
(``moe_engine.offline.simulator``: a virtual clock). Both call the same methods in the same order,
so a simulated hit rate, prefetch count or eviction sequence is what the runtime does on that trace.

Glossary:

* key: ``(layer, expert)``; layer is the index among the model's MoE layers.
* slot: one of ``num_slots`` fast-tier places of one expert each (``num_slots * expert_bytes <= budget``).
* state of a resident key: ``LOADING`` (a copy into its slot was started and has not been seen to
  finish) or ``READY``. A failed copy frees the slot at once (``failed``): the key is absent again and
  the next use loads it anew. Absent keys have no entry.
* protected: keys the running layer still needs; never evicted. A key stops being protected once the
  layer has computed it (``release``), so a layer needing more experts than there are slots runs in
  *waves* that reuse slots.
* ready hit / late hit / miss: a demanded key that was READY / LOADING (a prefetch still in flight:
  its remaining copy time is a stall) / absent when its layer started.
* prefetch rule (one for both drivers): after a layer's demand loads are started, the predicted keys of
  the next layers, best first, take free slots or the policy's victims among keys neither protected nor
  predicted, at most ``limit`` new loads per layer step. The eviction policy sees the prediction
  scores through ``observe_scores`` before any victim is chosen.

* streaming (the prefill policy): while ``streaming`` is set (a prefill forward pass, which touches
  most experts of every layer), loads become *stream entries*: the first victims of any later load,
  whatever the eviction policy says, until a non-streaming layer uses them (then they are ordinary
  entries). Hits do not reach the policy (a prefill does not reorder the decode working set), and a
  streaming pass may displace at most ``stream_window`` non-stream entries (the decode working set);
  beyond that its loads run in waves through the stream entries' slots. ``stream_ahead(keys)``
  queues read-ahead for the next layer: loaded as this layer's computes free window room.

A layer runs as a *schedule* (``layer_schedule``): a generator yielding ``Load`` (start copying a key
into a slot), one ``Predict`` (issue prefetches now: behind this layer's demand loads, before compute)
and ``Compute`` (the key's weights are needed now), in a deterministic order: hits in expert order,
then misses in expert order. Deterministic, so that the runtime's decisions never depend on how fast
a copy happened to be, only its stall times do.

Every operation costs O(1) (plus the policy's victim search, O(log n) or O(skipped keys)), so the core
scales to DeepSeek-V3's 14,848 experts.

Example::

    core = Residency(num_slots=4, policy=make_policy("lru", num_layers=2, num_experts=8, capacity=4),
                     num_layers=2, expert_bytes=1024)
    for step in core.layer_schedule(0, [1, 5], ready=lambda key: True):
        if isinstance(step, Load):
            ...  # start the copy of step.key into step.slot; later: core.loaded(step.key)
        elif isinstance(step, Compute):
            ...  # wait for the copy, compute with the slot
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from moe_engine.runtime.policies import EvictionPolicy, ExpertKey
from moe_engine.runtime.stats import EngineStats, LayerStats

LOADING, READY = 1, 2


class Load:
    """Start copying ``key`` into ``slot`` (a demand load, or a prefetch when ``prefetch``); ``variant``:
    which stored copy of the expert (0: its own precision; see ``Residency(size_of=...)``)."""

    __slots__ = ("key", "slot", "prefetch", "variant")

    def __init__(self, key: ExpertKey, slot: int, prefetch: bool = False, variant: int = 0) -> None:
        self.key, self.slot, self.prefetch, self.variant = key, slot, prefetch, variant

    def __repr__(self) -> str:
        return f"Load({self.key}, slot={self.slot}, prefetch={self.prefetch})"


class Compute:
    """The running layer needs ``key`` (in ``slot``) now; ``hit`` when it was resident as the layer began."""

    __slots__ = ("key", "slot", "hit")

    def __init__(self, key: ExpertKey, slot: int, hit: bool) -> None:
        self.key, self.slot, self.hit = key, slot, hit

    def __repr__(self) -> str:
        return f"Compute({self.key}, slot={self.slot}, hit={self.hit})"


class Predict:
    """This layer's demand loads are started: issue prefetches for the next layers now."""

    __slots__ = ()


PREDICT = Predict()


class _Entry:
    __slots__ = ("slot", "state", "prefetched", "nbytes", "variant")

    def __init__(self, slot: int, state: int, prefetched: bool, nbytes: int, variant: int = 0) -> None:
        self.slot = slot
        self.state = state
        self.prefetched = prefetched  # resident by a prefetch that no layer has used yet
        self.nbytes = nbytes
        self.variant = variant


@dataclass
class Counters:
    """Per-layer counters, as lists indexed by MoE layer (cheap to bump); ``snapshot`` names them."""

    num_layers: int
    hits: list[int] = field(default_factory=list)
    late_hits: list[int] = field(default_factory=list)
    misses: list[int] = field(default_factory=list)
    prefetches: list[int] = field(default_factory=list)
    prefetch_hits: list[int] = field(default_factory=list)
    wasted_prefetches: list[int] = field(default_factory=list)
    mispredictions: list[int] = field(default_factory=list)
    evictions: list[int] = field(default_factory=list)
    failed_loads: list[int] = field(default_factory=list)
    reduced_loads: list[int] = field(default_factory=list)  # loads of a lower-precision copy (size_of)
    stall_seconds: list[float] = field(default_factory=list)
    late_stall_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in self.names():
            setattr(self, name, [0.0 if name.endswith("seconds") else 0] * self.num_layers)

    @staticmethod
    def names() -> tuple[str, ...]:
        return (
            "hits", "late_hits", "misses", "prefetches", "prefetch_hits", "wasted_prefetches",
            "mispredictions", "evictions", "failed_loads", "reduced_loads", "stall_seconds", "late_stall_seconds",
        )  # fmt: skip


class Residency:
    """Slots, states, protection, policy events, prefetch admission and counters of one fast tier.

    ``log``: when a list, every decision is appended to it as ``(event, key)`` with event one of
    ``"hit"`` (resident when its layer started, ready or late), ``"miss"``, ``"load"`` (a demand load
    started), ``"prefetch"``, ``"preload"``, ``"evict"`` and ``"fail"``: the sequence the simulator/runtime
    equivalence test compares.
    """

    def __init__(
        self,
        *,
        num_slots: int,
        policy: EvictionPolicy,
        num_layers: int,
        expert_bytes: int,
        budget_bytes: int | None = None,
        keep_resident: bool = True,
        log: list[tuple[str, ExpertKey]] | None = None,
        size_of: Callable[[ExpertKey, bool], tuple[int, int]] | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"the fast tier needs at least one slot, got {num_slots}")
        # Entries of several sizes: ``size_of(key, prefetch) -> (bytes, variant)`` says which copy of an
        # expert a load brings and its size; admission then keeps the *bytes* of resident entries within
        # the budget (``num_slots`` only bounds how many entries there can be). None: every entry is
        # ``expert_bytes`` and a slot count is the budget.
        self.size_of = size_of
        self.used_bytes = 0
        self._evicted_bytes = 0
        self.on_free: Callable[[int], None] | None = None  # byte mode: a slot id left unused (its buffer can go)
        self.num_slots = num_slots
        self.policy = policy
        self.num_layers = num_layers
        self.expert_bytes = expert_bytes
        self.budget_bytes = budget_bytes if budget_bytes is not None else num_slots * expert_bytes
        self.keep_resident = keep_resident
        self.log = log
        self.entries: dict[ExpertKey, _Entry] = {}
        self.free: list[int] = list(range(num_slots - 1, -1, -1))
        self.protected: set[ExpertKey] = set()
        self._keep: set[ExpertKey] = set()  # predicted keys during a prefetch call: not victims either
        self._unjudged: dict[int, set[ExpertKey]] = {}  # layer -> prefetched for it, not judged yet
        self._observe = type(policy).observe_scores is not EvictionPolicy.observe_scores
        self._layer_start = type(policy).layer_start is not EvictionPolicy.layer_start
        self._key_cache: list[list[ExpertKey]] = []  # [layer][expert] -> (layer, expert)
        self.c = Counters(num_layers)
        self.bytes_moved = [0] * num_layers
        self.prefetch_bytes = [0] * num_layers
        self.peak_resident = 0
        self.predict_seconds = 0.0
        # The prefill policy (module docstring, "streaming"): stream entries in load order (oldest first).
        self.streaming = False
        self.stream_window = max(1, num_slots // 4)
        self._stream: dict[ExpertKey, None] = {}
        self._displaced = 0  # non-stream entries evicted by the current streaming pass
        self._ahead: deque[ExpertKey] = deque()  # read-ahead keys for the next layer (streaming)
        self._held: set[ExpertKey] = set()  # read-ahead admitted: not victims before their layer begins
        self._reading_ahead = False

    # ------------------------------------------------------------------ queries
    def __contains__(self, key: ExpertKey) -> bool:
        return key in self.entries

    def slot_of(self, key: ExpertKey) -> int | None:
        e = self.entries.get(key)
        return None if e is None else e.slot

    def state(self, key: ExpertKey) -> int | None:
        e = self.entries.get(key)
        return None if e is None else e.state

    def loading(self) -> list[tuple[ExpertKey, int]]:
        """``(key, slot)`` of every key whose copy has not been seen to finish."""
        return [(k, e.slot) for k, e in self.entries.items() if e.state == LOADING]

    @property
    def resident_bytes(self) -> int:
        return self.used_bytes if self.size_of is not None else len(self.entries) * self.expert_bytes

    def variant_of(self, key: ExpertKey) -> int:
        """Which stored copy of ``key`` is resident (0 when it is absent or sizes are uniform)."""
        e = self.entries.get(key)
        return 0 if e is None else e.variant

    def _evictable(self, key: ExpertKey) -> bool:
        return key not in self.protected and key not in self._keep and key not in self._held

    def set_streaming(self, on: bool, window: int | None = None, new_pass: bool = False) -> None:
        """Enter or leave streaming mode (module docstring); ``new_pass``: a streaming pass begins (its
        window of displaced entries starts anew). ``window``: how many non-stream entries one pass may
        displace (default ``num_slots // 4``, at least 1)."""
        if on and (new_pass or not self.streaming):
            self._displaced = 0
        if window is not None:
            if window < 1:
                raise ValueError(f"the prefill stream window must be at least one expert, got {window}")
            self.stream_window = window
        self.streaming = on
        if not on:
            self._ahead.clear()

    def stream_ahead(self, keys: Sequence[ExpertKey]) -> None:
        """Streaming: read ``keys`` (the next layer's, best first) ahead as window room frees up."""
        if self.streaming and self.keep_resident:
            self._ahead = deque(k for k in keys if k not in self.entries)

    # ------------------------------------------------------------------ state changes
    def loaded(self, key: ExpertKey) -> None:
        """The copy of ``key`` finished: it is READY."""
        e = self.entries.get(key)
        if e is not None:
            e.state = READY

    def count_failure(self, key: ExpertKey) -> None:
        """A copy of ``key`` failed and is being retried into the same slot (the state stays LOADING)."""
        self.c.failed_loads[key[0]] += 1

    def failed(self, key: ExpertKey) -> None:
        """The copy of ``key`` failed and has stopped: free its slot; the next use loads it again."""
        e = self.entries.pop(key, None)
        if e is None:
            return
        self._stream.pop(key, None)
        self._release(e)
        self.policy.evict(key)
        self.c.failed_loads[key[0]] += 1
        self.protected.discard(key)
        if self.log is not None:
            self.log.append(("fail", key))

    def _release(self, e: _Entry) -> None:
        """An entry left: its slot id is free again (and its bytes, in byte mode)."""
        self.free.append(e.slot)
        if self.size_of is not None:
            self.used_bytes -= e.nbytes
            if self.on_free is not None:
                self.on_free(e.slot)

    def _stream_victim(self) -> ExpertKey | None:
        """The oldest evictable stream entry (stream entries leave before any other). A key an interrupted
        operation left in the stream list but not in the entries is forgotten here."""
        stale = None
        found = None
        for k in self._stream:
            if k not in self.entries:
                stale = k
                break
            if self._evictable(k):
                found = k
                break
        if stale is not None:
            self._stream = {k: None for k in self._stream if k in self.entries}
            return self._stream_victim()
        return found

    def _evict_one(self) -> int | None:
        """Free a slot by evicting a stream entry, else the policy's victim; None when every resident key
        is protected (or, streaming, when the pass has displaced its window of other entries)."""
        while True:
            victim = self._stream_victim() if self._stream else None
            if victim is None and self.streaming and self._displaced >= self.stream_window:
                # The window is used up: read-ahead waits; a demand load waits for a computed stream entry
                # (a wave) if this layer holds one, else (nothing would ever free) displaces one more.
                if self._reading_ahead or any(k in self.protected for k in self._stream):
                    return None
            if victim is None:
                victim = self.policy.victim(self._evictable)
            if victim is None:
                # Every key is protected, or the policy lost track of some (an interrupt inside one of
                # its updates): take any evictable key so a lost key never pins its slot for good.
                victim = next((k for k in self.entries if self._evictable(k)), None)
                if victim is None:
                    return None
            e = self.entries.pop(victim, None)
            if e is None:  # the policy (or the stream list) knew a key the core had already dropped: forget it
                self._stream.pop(victim, None)
                self.policy.evict(victim)
                continue
            self.policy.evict(victim)
            if victim in self._stream:
                del self._stream[victim]
            elif self.streaming:
                self._displaced += 1  # an entry of the decode working set left for the prefill
            self._evicted_bytes = e.nbytes
            layer = victim[0]
            self.c.evictions[layer] += 1
            if e.prefetched:
                self.c.wasted_prefetches[layer] += 1
            if self.log is not None:
                self.log.append(("evict", victim))
            return e.slot

    def _admit(self, key: ExpertKey, prefetch: bool, state: int = LOADING) -> int | None:
        """Give ``key`` a slot (free, or the policy's victim's) in ``state`` (LOADING: a copy will run;
        READY: a driver with nothing to copy); None if no slot can be had."""
        if self.size_of is not None:
            return self._admit_sized(key, prefetch, state)
        if self.free:
            slot = self.free.pop()
        else:
            got = self._evict_one()
            if got is None:
                return None
            slot = got
        self.entries[key] = _Entry(slot, state, prefetch, self.expert_bytes)
        self.policy.insert(key, prefetch)
        if self.streaming:
            self._stream[key] = None
        layer = key[0]
        self.bytes_moved[layer] += self.expert_bytes
        if prefetch:
            self.prefetch_bytes[layer] += self.expert_bytes
        n = len(self.entries)
        if n > self.peak_resident:
            self.peak_resident = n
        return slot

    def _admit_sized(self, key: ExpertKey, prefetch: bool, state: int) -> int | None:
        """``_admit`` for entries of several sizes: evict until the copy's bytes fit the budget."""
        assert self.size_of is not None
        nbytes, variant = self.size_of(key, prefetch)
        if nbytes > self.budget_bytes:
            raise ValueError(f"expert {key} needs {nbytes} bytes, more than the whole budget {self.budget_bytes}")
        reuse: int | None = None  # a victim's slot id, taken over (with its buffer, when sizes match)
        while self.used_bytes + nbytes > self.budget_bytes or (reuse is None and not self.free):
            got = self._evict_one()
            if got is None:  # every resident key is protected
                if reuse is not None:
                    self._free_id(reuse)
                return None
            self.used_bytes -= self._evicted_bytes
            if reuse is not None:
                self._free_id(reuse)
            reuse = got
        slot = reuse if reuse is not None else self.free.pop()
        self.used_bytes += nbytes
        self.entries[key] = _Entry(slot, state, prefetch, nbytes, variant)
        self.policy.insert(key, prefetch)
        if self.streaming:
            self._stream[key] = None
        layer = key[0]
        self.bytes_moved[layer] += nbytes
        if variant:
            self.c.reduced_loads[layer] += 1
        if prefetch:
            self.prefetch_bytes[layer] += nbytes
        if self.used_bytes > self.peak_resident:
            self.peak_resident = self.used_bytes
        return slot

    def _free_id(self, slot: int) -> None:
        self.free.append(slot)
        if self.on_free is not None:
            self.on_free(slot)

    def _grow_keys(self, layer: int) -> list[ExpertKey]:
        while len(self._key_cache) <= layer:
            self._key_cache.append([])
        return self._key_cache[layer]

    def _repair(self) -> None:
        """Rebuild the free list if an interrupted operation lost a slot (never seen in normal runs)."""
        used = {e.slot for e in self.entries.values()}
        self.free = [s for s in range(self.num_slots - 1, -1, -1) if s not in used]
        self._stream = {k: None for k in self._stream if k in self.entries}
        if self.size_of is not None:
            self.used_bytes = sum(e.nbytes for e in self.entries.values())

    # ------------------------------------------------------------------ one layer
    def _begin(self, layer: int, experts: Sequence[int], ready: Callable[[ExpertKey], bool]) -> tuple[list, list]:
        """Start MoE layer ``layer``: judge its prefetches, protect its keys, count and report its hits
        and misses to the policy. Returns (hits, misses), each in ascending expert order."""
        if len(self.free) + len(self.entries) != self.num_slots:
            self._repair()
        if self._layer_start:
            self.policy.layer_start(layer)
        c = self.c
        # One order for every driver: ascending expert ids. Key tuples are made once per (layer, e).
        order = sorted(set(experts))
        made = self._key_cache[layer] if layer < len(self._key_cache) else self._grow_keys(layer)
        if order and order[-1] >= len(made):
            made.extend((layer, e) for e in range(len(made), order[-1] + 1))
        keys = [made[e] for e in order]
        self._ahead.clear()  # read-ahead aimed at this layer: whatever did not start is a demand load now
        self._held.clear()
        judged = self._unjudged.pop(layer, None)
        if judged:  # prefetches aimed at this layer that it does not use were mispredictions
            c.mispredictions[layer] += len(judged.difference(keys))
        self.protected = set(keys)  # also drops protection left by an interrupted layer
        log = self.log
        hits: list[ExpertKey] = []
        misses: list[ExpertKey] = []
        entries = self.entries
        ready_hits = 0
        for k in keys:
            e = entries.get(k)
            if e is None:
                misses.append(k)
                continue
            if e.state == READY or ready(k):
                e.state = READY
                ready_hits += 1
            if e.prefetched:
                e.prefetched = False
                c.prefetch_hits[layer] += 1
            hits.append(k)
        if log is not None:
            log.extend(("miss" if entries.get(k) is None else "hit", k) for k in keys)
        if hits and not self.streaming:  # a prefill's hits leave the decode working set's order alone
            if self._stream:  # used by a non-streaming layer: ordinary entries from now on
                for k in hits:
                    self._stream.pop(k, None)
            self.policy.access_hits(hits)
        c.hits[layer] += ready_hits
        if len(hits) > ready_hits:
            c.late_hits[layer] += len(hits) - ready_hits
        if misses:
            c.misses[layer] += len(misses)
        return hits, misses

    def layer_schedule(
        self, layer: int, experts: Sequence[int], ready: Callable[[ExpertKey], bool]
    ) -> Generator[Load | Predict | Compute, None, None]:
        """Run MoE layer ``layer`` needing ``experts``; see the module docstring for the steps.

        ``ready(key)`` tells whether a LOADING key's copy has finished (the runtime polls its ticket;
        the simulator asks its clock). The driver must perform each ``Load`` before resuming the
        generator, issue prefetches (``prefetch``) at ``Predict``, and finish using a ``Compute``'s slot
        before resuming; closing the generator early (an exception) leaves the core consistent.
        """
        hits, misses = self._begin(layer, experts, ready)
        entries = self.entries
        try:
            to_load = deque(misses)
            if to_load:
                yield from self._start_loads(to_load)
            yield PREDICT
            if self._ahead and not to_load:
                yield from self._read_ahead()
            nh = len(hits)
            for i, k in enumerate(hits + misses if misses else hits):
                e = entries.get(k)
                if e is None:  # a wave: its load waited for a slot that earlier computes freed
                    yield from self._start_loads(to_load)
                    e = entries.get(k)
                    if e is None:
                        raise RuntimeError(f"residency: no slot for expert {k} (all {self.num_slots} protected)")
                yield Compute(k, e.slot, i < nh)
                self.protected.discard(k)
                if not self.keep_resident:
                    self._drop(k)
                elif to_load:
                    yield from self._start_loads(to_load)
                elif self._ahead:
                    yield from self._read_ahead()
        finally:
            self.protected = set()

    def run_layer(
        self, layer: int, experts: Sequence[int], ready: Callable[[ExpertKey], bool], predict: Callable[[], None] | None
    ) -> None:
        """``layer_schedule`` for a driver with nothing to copy, compute or time (the simulator without a
        time projection): the same decisions in the same order, without a generator. ``predict`` runs at
        the ``Predict`` point. The simulator/runtime equivalence test holds the two to the same log."""
        hits, misses = self._begin(layer, experts, ready)
        try:
            to_load = deque(misses)
            if misses:
                self._start_loads(to_load, make=False)  # admitted READY: nothing to copy
            if predict is not None:
                predict()
            if self._ahead and not to_load:
                self._read_ahead(make=False)
            if to_load or not self.keep_resident or self._ahead:  # waves: computing frees slots for the rest
                for k in hits + misses:
                    if k not in self.entries:
                        self._start_loads(to_load, make=False)
                        if k not in self.entries:
                            raise RuntimeError(f"residency: no slot for expert {k} (all {self.num_slots} protected)")
                    self.entries[k].state = READY
                    self.protected.discard(k)
                    if not self.keep_resident:
                        self._drop(k)
                    elif to_load:
                        self._start_loads(to_load, make=False)
                    elif self._ahead:
                        self._read_ahead(make=False)
        finally:
            self.protected = set()

    def _start_loads(self, to_load: deque[ExpertKey], make: bool = True) -> list[Load]:
        """Admit queued demand loads while slots can be had; returns the loads to perform (none are
        made when ``make`` is False: a driver with nothing to copy)."""
        loads: list[Load] = []
        log = self.log
        access = self.policy.access
        admit = self._admit
        state = LOADING if make else READY
        while to_load:
            k = to_load[0]
            slot = admit(k, False, state)
            if slot is None:
                break
            to_load.popleft()
            access(k, False)
            if log is not None:
                log.append(("load", k))
            if make:
                loads.append(Load(k, slot))
        return loads

    def _read_ahead(self, make: bool = True) -> list[Load]:
        """Streaming: admit queued read-ahead keys (prefetches of the next layer) while the window has
        room; never evicts a protected key. Returns the loads to perform (none when ``make`` is False)."""
        loads: list[Load] = []
        ahead = self._ahead
        while ahead:
            k = ahead[0]
            if k in self.entries:
                ahead.popleft()
                continue
            self._reading_ahead = True
            try:
                slot = self._admit(k, True, LOADING if make else READY)
            finally:
                self._reading_ahead = False
            if slot is None:
                break
            ahead.popleft()
            self._held.add(k)
            layer = k[0]
            self.c.prefetches[layer] += 1
            self._unjudged.setdefault(layer, set()).add(k)
            if self.log is not None:
                self.log.append(("prefetch", k))
            if make:
                loads.append(Load(k, slot, prefetch=True))
        return loads

    def _drop(self, key: ExpertKey) -> None:
        """Load-on-demand mode: the key leaves as soon as it was used."""
        e = self.entries.pop(key, None)
        if e is not None:
            self._stream.pop(key, None)
            self._release(e)
            self.policy.evict(key)

    def drop_reduced(self, layers: set[int]) -> int:
        """Drop every resident lower-precision copy (variant > 0) of ``layers``' experts, so their next use
        loads the expert's own format (the guardrail's fallback). Returns how many were dropped."""
        gone = [k for k, e in self.entries.items() if e.variant and k[0] in layers and k not in self.protected]
        for k in gone:
            self._drop(k)
            if self.log is not None:
                self.log.append(("evict", k))
        return len(gone)

    # ------------------------------------------------------------------ prefetch
    def observe(self, scores: Mapping[ExpertKey, float]) -> None:
        """Predictor probabilities for upcoming keys reach the policy (prediction-aware policies)."""
        if self._observe and scores:
            self.policy.observe_scores(scores)

    def prefetch(self, ranked: Sequence[ExpertKey], limit: int) -> list[Load]:
        """Start loads for the best-ranked absent keys; never evicts a protected or ranked key."""
        if not self.keep_resident or limit <= 0 or not ranked:
            return []
        self._keep = set(ranked)
        loads: list[Load] = []
        try:
            for k in ranked:
                if len(loads) >= limit:
                    break
                if k in self.entries:
                    continue
                slot = self._admit(k, prefetch=True)
                if slot is None:
                    break
                layer = k[0]
                self.c.prefetches[layer] += 1
                self._unjudged.setdefault(layer, set()).add(k)
                if self.log is not None:
                    self.log.append(("prefetch", k))
                loads.append(Load(k, slot, prefetch=True))
        finally:
            self._keep = set()
        return loads

    def preload(self, keys: Sequence[ExpertKey]) -> list[Load]:
        """Fill room that is free now with ``keys``, in order, evicting nothing (a cold start: the
        cache filled before the first forward pass, as stock offloading fills its memory at load).
        Entries are ordinary (not prefetched, not stream); counters are left alone except bytes moved,
        which the caller resets. Stops at the first key that does not fit. Returns the loads."""
        loads: list[Load] = []
        if not self.keep_resident:
            return loads
        for k in keys:
            if k in self.entries:
                continue
            if not self.free:
                break
            if self.size_of is not None and self.used_bytes + self.size_of(k, True)[0] > self.budget_bytes:
                break
            slot = self._admit(k, True)  # the prefetch copy (balanced quality: the expert's own format)
            assert slot is not None  # there was room: nothing is evicted
            e = self.entries[k]
            e.prefetched = False
            self.prefetch_bytes[k[0]] -= e.nbytes
            if self.log is not None:
                self.log.append(("preload", k))
            loads.append(Load(k, slot, prefetch=True))
        return loads

    # ------------------------------------------------------------------ stats
    def record_stall(self, key: ExpertKey, seconds: float, late: bool) -> None:
        self.c.stall_seconds[key[0]] += seconds
        if late:
            self.c.late_stall_seconds[key[0]] += seconds

    def stats(self) -> EngineStats:
        """A snapshot of the counters: totals, per layer, budget facts."""
        c = self.c
        per_layer = []
        for layer in range(self.num_layers):
            ls = LayerStats(**{n: getattr(c, n)[layer] for n in Counters.names()})
            ls.bytes_moved = self.bytes_moved[layer]
            ls.prefetch_bytes = self.prefetch_bytes[layer]
            per_layer.append(ls)
        total = EngineStats(
            **{n: sum(getattr(c, n)) for n in Counters.names()},
            bytes_moved=sum(self.bytes_moved),
            prefetch_bytes=sum(self.prefetch_bytes),
            predict_seconds=self.predict_seconds,
            budget_bytes=self.budget_bytes,
            expert_bytes=self.expert_bytes,
            num_slots=self.num_slots,
            resident_bytes=self.resident_bytes,
            peak_resident_bytes=self.peak_resident if self.size_of is not None else self.peak_resident * self.expert_bytes,
            per_layer=per_layer,
        )
        return total

    def reset_stats(self) -> None:
        """Zero the counters; residency is kept and the peak restarts from the current residency."""
        self.c = Counters(self.num_layers)
        self.bytes_moved = [0] * self.num_layers
        self.prefetch_bytes = [0] * self.num_layers
        self.peak_resident = self.used_bytes if self.size_of is not None else len(self.entries)
        self.predict_seconds = 0.0


def preload_order(experts_per_layer: Sequence[int], owned: Sequence[Sequence[int]] | None = None) -> list[ExpertKey]:
    """The keys a cold start fills the fast tier with (``Residency.preload``), best first: layers take
    turns, experts in index order, so each layer gets the same share (no routing is known yet).
    ``owned``: per layer, the only experts this process computes (expert parallelism: its rank's
    copies); default every expert."""
    lists = [range(n) if owned is None else sorted(owned[layer]) for layer, n in enumerate(experts_per_layer)]
    most = max((len(experts) for experts in lists), default=0)
    return [(layer, experts[i]) for i in range(most) for layer, experts in enumerate(lists) if i < len(experts)]


# ---------------------------------------------------------------------- predictions, shared by both drivers


def scores_to_probs(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Per-row ``[..., E]`` scores to pseudo-probabilities of being chosen: softmax scaled to sum to K, clipped.

    Predictors return scores on different scales (logits, counts, probabilities); the prefetch rule and
    the prediction-aware policy need one scale to compare experts of different layers.
    """
    s = np.asarray(scores, dtype=np.float64)
    nonneg = bool((s >= 0).all())
    if nonneg and bool((np.abs(s.sum(-1)) <= 1e-8).all()):  # np.allclose(sums, 0), at a tenth of its cost
        return np.zeros_like(s)
    if nonneg:  # counts or probabilities: normalise linearly
        p = s / np.maximum(s.sum(-1, keepdims=True), 1e-12)
    else:
        z = s - s.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
    return np.minimum(p * top_k, 1.0)


def prediction_probs(scores: np.ndarray, top_k: int) -> np.ndarray:
    """``scores_to_probs`` as both drivers keep them: float32 (so the rule sees the same numbers)."""
    return scores_to_probs(scores, top_k).astype(np.float32)


@dataclass(frozen=True)
class PrefetchRule:
    """Which predicted experts are prefetched: at most ``per_layer`` per predicted layer and step, each
    with probability >= ``min_prob``; probabilities above ``observe_min`` reach the policy."""

    per_layer: int = 6
    min_prob: float = 0.25
    observe_min: float = 1e-3

    def __post_init__(self) -> None:
        if self.per_layer < 0:
            raise ValueError(f"prefetch per layer must be >= 0, got {self.per_layer}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"prefetch min_prob must be in [0, 1], got {self.min_prob}")

    def layer_candidates(self, target: int, probs: np.ndarray) -> tuple[list[ExpertKey], dict[ExpertKey, float]]:
        """``probs [T, E]`` (one row per token) for MoE layer ``target`` -> (ranked keys, observed scores).

        Tokens are combined as the probability that at least one of them needs the expert.
        """
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim == 2:
            p = p[0] if p.shape[0] == 1 else 1.0 - np.prod(1.0 - p, axis=0)
        scored = {(target, int(e)): float(p[e]) for e in np.flatnonzero(p > self.observe_min).tolist()}
        ranked: list[ExpertKey] = []
        for e in np.argsort(-p, kind="stable")[: self.per_layer].tolist():
            if p[e] <= 0 or p[e] < self.min_prob:
                break
            ranked.append((target, int(e)))
        return ranked, scored
