"""Fast tier: a fixed set of preallocated expert slots under the budget, and their bookkeeping.

Mechanism only; *which* expert leaves is the eviction policy's call (``moe_engine.runtime.policies``) and
the copy itself is the mover's (``moe_engine.runtime.mover``).

Glossary: a *slot* is one preallocated buffer ``[slot_numel]`` holding one expert (``gate_up [2I, H]``
then ``down [H, I]``). A key is *resident* when it owns a slot (its load may still be in flight);
*pinned* while the running layer computes with it; *protected* while the running layer still needs it
(never evicted, neither by demand loads of the same layer nor by prefetch).

Invariant: ``num_slots * expert_bytes <= budget`` (checked at construction), so resident expert bytes
can never exceed the budget. A layer needing more experts than there are slots runs in waves: experts
are computed as they become ready and their slots are reused for the layer's remaining experts.

Example::

    cache = ExpertCache(num_slots=8, slot_numel=n, dtype=torch.float32, device=torch.device("cpu"),
                        policy=make_policy("lru", ...), mover=ThreadMover(store), locate=locs.__getitem__,
                        stats=EngineStats(), shapes=(I, H))
    for expert, gate_up, down in cache.iter_experts(layer=0, experts=[1, 5]):
        ...  # compute with the expert's weights
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch

from moe_engine.runtime.mover import Mover, Ticket
from moe_engine.runtime.policies import EvictionPolicy, ExpertKey
from moe_engine.runtime.stats import EngineStats, LayerStats
from moe_engine.runtime.store import ExpertLocation


class ExpertCache:
    def __init__(
        self,
        *,
        num_slots: int,
        intermediate: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        policy: EvictionPolicy,
        mover: Mover,
        locate: Callable[[ExpertKey], ExpertLocation],
        stats: EngineStats,
        budget_bytes: int,
        keep_resident: bool = True,
        max_prefetch_inflight: int = 8,
    ) -> None:
        self.slot_numel = 3 * intermediate * hidden
        self.expert_bytes = self.slot_numel * dtype.itemsize
        if num_slots < 1 or num_slots * self.expert_bytes > budget_bytes:
            raise ValueError(f"{num_slots} slots of {self.expert_bytes} bytes do not fit the budget {budget_bytes}")
        self.intermediate, self.hidden = intermediate, hidden
        self.num_slots = num_slots
        self.slots = torch.empty(num_slots, self.slot_numel, dtype=dtype, device=device)
        self.policy = policy
        self.mover = mover
        self.locate = locate
        self.stats = stats
        self.keep_resident = keep_resident
        self.max_prefetch_inflight = max_prefetch_inflight
        self.key_of: list[ExpertKey | None] = [None] * num_slots
        self.slot_of: dict[ExpertKey, int] = {}
        self.pins = [0] * num_slots
        self.tickets: dict[int, Ticket] = {}
        self.prefetched: set[ExpertKey] = set()  # resident by prefetch, not used since
        self._unjudged: set[ExpertKey] = set()  # prefetched for a layer that has not run since
        self.free: list[int] = list(range(num_slots - 1, -1, -1))
        self._protected: set[ExpertKey] = set()

    # ------------------------------------------------------------------ helpers
    def _layer(self, key: ExpertKey) -> LayerStats:
        return self.stats.per_layer[key[0]]

    def views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) views of a slot."""
        i, h = self.intermediate, self.hidden
        buf = self.slots[slot]
        return buf[: 2 * i * h].view(2 * i, h), buf[2 * i * h :].view(h, i)

    def resident(self, key: ExpertKey) -> bool:
        return key in self.slot_of

    def _is_ready(self, slot: int) -> bool:
        t = self.tickets.get(slot)
        if t is None:
            return True
        if t.ready():
            t.wait()  # surfaces a read error; returns at once
            del self.tickets[slot]
            return True
        return False

    def _wait(self, slot: int) -> float:
        t = self.tickets.pop(slot, None)
        return t.wait() if t is not None else 0.0

    def _evict(self, slot: int) -> None:
        key = self.key_of[slot]
        assert key is not None and self.pins[slot] == 0 and slot not in self.tickets
        if key in self.prefetched:
            self.prefetched.discard(key)
            self._layer(key).wasted_prefetches += 1
            self.stats.wasted_prefetches += 1
        self.policy.evict(key)
        del self.slot_of[key]
        self.key_of[slot] = None
        self.free.append(slot)

    def _candidates(self, protected: set[ExpertKey], layer: int | None) -> list[ExpertKey]:
        return [
            k
            for k, s in self.slot_of.items()
            if self.pins[s] == 0 and k not in protected and s not in self.tickets and (layer is None or k[0] == layer)
        ]

    def _claim(self, protected: set[ExpertKey], layer: int | None = None) -> int | None:
        """A free slot, evicting the policy's victim if needed; None if every slot is busy or protected.

        ``layer`` restricts victims to that MoE layer's experts (prefetch: swap within the target layer).
        """
        if self.free:
            return self.free.pop()
        candidates = self._candidates(protected, layer)
        if not candidates:
            # Loads that finished still hold tickets until polled: poll and retry once.
            for s in list(self.tickets):
                self._is_ready(s)
            candidates = self._candidates(protected, layer)
            if not candidates:
                return None
        victim = self.policy.victim(candidates)
        slot = self.slot_of[victim]
        self._evict(slot)
        return self.free.pop()

    def _load(self, key: ExpertKey, slot: int, prefetch: bool) -> None:
        self.key_of[slot] = key
        self.slot_of[key] = slot
        self.tickets[slot] = self.mover.submit(self.locate(key), self.slots[slot], slot, key, prefetch=prefetch)
        nbytes = self.expert_bytes
        self.stats.bytes_moved += nbytes
        self._layer(key).bytes_moved += nbytes
        if prefetch:
            self.stats.prefetch_bytes += nbytes
            self._layer(key).prefetch_bytes += nbytes
        resident = len(self.slot_of) * self.expert_bytes
        self.stats.resident_bytes = resident
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, resident)

    # ------------------------------------------------------------------ demand path
    def iter_experts(
        self, layer: int, experts: list[int], after_submit: Callable[[], object] | None = None
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(expert, gate_up, down)`` for each requested expert once its weights are in a slot.

        Resident experts come first while the misses load; the slot stays pinned until the consumer
        asks for the next expert (or closes the generator). ``after_submit`` runs once, after this
        layer's demand loads are queued and before anything is computed: the engine issues its
        prefetches there, so they queue behind the demand loads and overlap this layer's compute.
        """
        self.policy.layer_start(layer)
        keys = [(layer, e) for e in experts]
        ls = self._layer((layer, 0))
        judged = {k for k in self._unjudged if k[0] == layer}
        if judged:  # prefetches aimed at this layer that it does not use were mispredictions
            wrong = len(judged - set(keys))
            ls.mispredictions += wrong
            self.stats.mispredictions += wrong
            self._unjudged -= judged
        to_load: deque[ExpertKey] = deque()
        for k in keys:
            if k in self.slot_of:
                ls.hits += 1
                self.stats.hits += 1
                if k in self.prefetched:
                    self.prefetched.discard(k)
                    ls.prefetch_hits += 1
                    self.stats.prefetch_hits += 1
                self.policy.access(k, hit=True)
            else:
                ls.misses += 1
                self.stats.misses += 1
                to_load.append(k)
        remaining = list(keys)
        self._protected = set(keys)
        try:
            first = True
            while remaining:
                while to_load:  # start as many demand loads as slots allow
                    slot = self._claim(self._protected)
                    if slot is None:
                        break
                    k = to_load.popleft()
                    self._load(k, slot, prefetch=False)
                    self.policy.insert(k, prefetch=False)
                    self.policy.access(k, hit=False)
                if first:
                    first = False
                    if after_submit is not None:
                        after_submit()
                nxt = next((k for k in remaining if k in self.slot_of and self._is_ready(self.slot_of[k])), None)
                if nxt is None:
                    loading = [k for k in remaining if k in self.slot_of]
                    if loading:
                        nxt = loading[0]
                        stall = self._wait(self.slot_of[nxt])
                    elif self.tickets:  # every slot is held by in-flight prefetches: wait for one
                        stall = self._wait(next(iter(self.tickets)))
                        self.stats.stall_seconds += stall
                        ls.stall_seconds += stall
                        continue
                    else:
                        raise RuntimeError("expert cache: no slot can be freed (all pinned); this is a bug")
                    self.stats.stall_seconds += stall
                    ls.stall_seconds += stall
                slot = self.slot_of[nxt]
                self.pins[slot] += 1
                try:
                    gate_up, down = self.views(slot)
                    yield nxt[1], gate_up, down
                finally:
                    self.pins[slot] -= 1
                    self.mover.release(slot)
                remaining.remove(nxt)
                self._protected.discard(nxt)
                if not self.keep_resident:
                    self._evict(slot)
        finally:
            self._protected = set()

    # ------------------------------------------------------------------ prefetch path
    def inflight_prefetches(self) -> int:
        return sum(1 for s in list(self.tickets) if self.key_of[s] in self.prefetched and not self._is_ready(s))

    def prefetch(self, ranked: list[ExpertKey], protected: set[ExpertKey]) -> int:
        """Start loading the best-ranked experts that fit; returns how many were started.

        Never evicts a pinned, loading, protected (current layer) or ranked expert, and keeps at most
        ``max_prefetch_inflight`` prefetches in flight. When no slot is free, a prefetch for layer t only
        replaces another expert of layer t: in decode, layers run in a cycle, so an unpredicted expert of
        layer t is the resident one needed latest, while evicting the policy's global victim would throw
        out an expert that layers t+1, t+2, ... are about to use.
        """
        if not self.keep_resident or self.max_prefetch_inflight == 0:
            return 0
        keep = protected | set(ranked) | self._protected
        started = 0
        inflight = self.inflight_prefetches()
        for k in ranked:
            if inflight >= self.max_prefetch_inflight:
                break
            if k in self.slot_of:
                continue
            slot = self._claim(keep, layer=k[0])
            if slot is None:
                continue
            self._load(k, slot, prefetch=True)
            self.prefetched.add(k)
            self._unjudged.add(k)
            self.policy.insert(k, prefetch=True)
            self._layer(k).prefetches += 1
            self.stats.prefetches += 1
            started += 1
            inflight += 1
        return started

    def wait_all(self) -> None:
        for s in list(self.tickets):
            self._wait(s)
