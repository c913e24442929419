"""Eviction policies for the fast-tier expert cache: policy only, no tensors, no devices.

Glossary: a *key* is ``(layer, expert)`` with ``layer`` the index among the model's MoE layers
(0-based) and ``expert`` the routed expert id. A policy sees the residency core's events
(``moe_engine.runtime.residency``) and, when a slot is needed, picks a *victim*: the resident key it
would evict first among those the core allows (``evictable(key)``: not needed by the running layer,
not just predicted). The core drives both the runtime cache and the trace-driven simulator, so a hit
rate measured in simulation is the hit rate the runtime gets for the same access sequence.

Cost: the policy keeps its own order of resident keys and walks it from the best victim, skipping the
few keys that are not evictable (at most the running layer's and the predicted ones), so a victim
costs O(log n + skipped), not O(resident).

Event contract (the cache calls, in this order for a demand miss): ``insert(key, prefetch=False)``
then ``access(key, hit=False)``; for a demand hit: ``access(key, hit=True)``; for a prefetch:
``insert(key, prefetch=True)``; when a slot is reclaimed: ``evict(key)``. ``layer_start(layer)``
is called when a MoE layer begins (policies that care about depth or time use it).
``observe_scores(scores)`` passes predictor scores ``{key: score}`` to prediction-aware policies.

Example::

    policy = make_policy("lru", num_layers=8, num_experts=16, capacity=32)
    policy.insert((0, 3), prefetch=False); policy.access((0, 3), hit=False)
    victim = policy.victim(lambda key: True)
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

ExpertKey = tuple[int, int]

_REGISTRY: dict[str, type[EvictionPolicy]] = {}


def register_policy(name: str) -> Callable[[type[EvictionPolicy]], type[EvictionPolicy]]:
    """Class decorator: make a policy available to ``make_policy(name)`` and ``--policy name``."""

    def deco(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
        if name in _REGISTRY:
            raise ValueError(f"eviction policy {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


#: The policy ``from_pretrained``, ``moe-engine generate`` and ``moe-engine simulate`` use by default.
DEFAULT_POLICY = "auto"


def working_set_warning(num_slots: int, num_layers: int, top_k: int) -> str | None:
    """A one-line warning when ``num_slots`` expert slots hold less than one token's working set, else None.

    A decode token uses ``top_k`` experts in each of ``num_layers`` MoE layers, one layer after the other;
    with fewer slots than that, every token must evict experts the same token needs again a few layers
    on, so hit rates are low whatever the policy (LRU's collapse to ~0: it evicts exactly the next
    layers' experts).
    """
    if num_slots < 1 or num_layers < 1 or top_k < 1:
        raise ValueError(f"working_set_warning: num_slots, num_layers and top_k must be >= 1, got "
                         f"{num_slots}, {num_layers}, {top_k}")
    need = num_layers * top_k
    if num_slots >= need:
        return None
    return (f"the expert budget holds {num_slots} experts, less than one token's working set "
            f"({num_layers} layers x top-{top_k} = {need}): expect low cache hit rates; a budget of at least "
            f"{need} experts avoids this")


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str, *, num_layers: int, num_experts: int, capacity: int, **kwargs) -> EvictionPolicy:
    """Build the policy registered under ``name``; unknown names raise ValueError listing the known ones."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown cache policy {name!r}; choose one of: {', '.join(available_policies())}"
        ) from None
    return cls(num_layers=num_layers, num_experts=num_experts, capacity=capacity, **kwargs)


class EvictionPolicy(ABC):
    """Decides which resident expert leaves the fast tier. Subclasses override what they need."""

    name: str = "abstract"

    def __init__(self, *, num_layers: int, num_experts: int, capacity: int) -> None:
        assert num_layers > 0 and num_experts > 0 and capacity > 0
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.capacity = capacity

    def layer_start(self, layer: int) -> None:
        """A MoE layer begins computing."""

    def insert(self, key: ExpertKey, prefetch: bool) -> None:
        """``key`` was given a slot (demand load or prefetch)."""

    def access(self, key: ExpertKey, hit: bool) -> None:
        """The running layer uses ``key`` (already resident when ``hit``)."""

    def access_hits(self, keys: Sequence[ExpertKey]) -> None:
        """``access(key, hit=True)`` for each of ``keys``, in order (policies may do it in one go)."""
        for key in keys:
            self.access(key, hit=True)

    def evict(self, key: ExpertKey) -> None:
        """``key`` lost its slot."""

    def observe_scores(self, scores: Mapping[ExpertKey, float]) -> None:
        """Predictor scores for upcoming experts (higher = more likely needed soon)."""

    @abstractmethod
    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """The resident key to evict first among those with ``evictable(key)``; None if there is none.

        Resident = inserted and not evicted since. The core then calls ``evict(victim)``.
        """


def _heap_victim(heap: list, current: Callable[[tuple], bool], evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
    """The best evictable key of a lazily invalidated min-heap of ``(..., key)`` items: stale items
    (``not current(item)``) are dropped, non-evictable ones skipped and pushed back. O((skipped + stale) log n)."""
    skipped, found = [], None
    while heap:
        item = heapq.heappop(heap)
        if not current(item):
            continue
        if evictable(item[-1]):
            found = item[-1]
            heapq.heappush(heap, item)  # still resident until the core evicts it
            break
        skipped.append(item)
    for item in skipped:
        heapq.heappush(heap, item)
    return found


@register_policy("lru")
class LRUPolicy(EvictionPolicy):
    """Least recently used: evict the candidate whose last insert/access is oldest."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def insert(self, key: ExpertKey, prefetch: bool) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: ExpertKey, hit: bool) -> None:
        try:
            self._order.move_to_end(key)
        except KeyError:
            self._order[key] = None

    def access_hits(self, keys: Sequence[ExpertKey]) -> None:
        order = self._order
        move = order.move_to_end
        for key in keys:
            try:
                move(key)
            except KeyError:  # hits are resident, but an interrupted update may have lost one
                order[key] = None

    def evict(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        for key in self._order:  # oldest first; non-evictable keys are recent, so few are skipped
            if evictable(key):
                return key
        return None


@register_policy("lfu")
class LFUPolicy(EvictionPolicy):
    """Least frequently used, counting every demand access since the start (ties: least recent)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._count: dict[ExpertKey, int] = {}
        self._last: dict[ExpertKey, int] = {}
        self._resident: set[ExpertKey] = set()
        self._heap: list[tuple[int, int, ExpertKey]] = []  # (count, last, key), stale entries skipped
        self._clock = 0

    def _touch(self, key: ExpertKey) -> None:
        self._clock += 1
        self._last[key] = self._clock
        if key in self._resident:
            heapq.heappush(self._heap, (self._count.get(key, 0), self._clock, key))
            if len(self._heap) > 4 * len(self._resident) + 64:  # drop stale entries now and then
                self._heap = [(self._count.get(k, 0), self._last[k], k) for k in self._resident]
                heapq.heapify(self._heap)

    def insert(self, key: ExpertKey, prefetch: bool) -> None:
        self._count.setdefault(key, 0)
        self._resident.add(key)
        self._touch(key)

    def access(self, key: ExpertKey, hit: bool) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._touch(key)

    def evict(self, key: ExpertKey) -> None:
        self._resident.discard(key)

    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        def current(item: tuple[int, int, ExpertKey]) -> bool:
            count, last, key = item
            return key in self._resident and self._last.get(key) == last and self._count.get(key, 0) == count

        return _heap_victim(self._heap, current, evictable)


@register_policy("arc")
class ARCPolicy(EvictionPolicy):
    """Adaptive Replacement Cache (Megiddo & Modha, 2003), as Fate uses it for expert caches.

    Resident keys sit in T1 (seen once recently) or T2 (seen at least twice); ghost lists B1 / B2 remember
    keys recently evicted from each. A demand miss on a B1 ghost grows the target size ``p`` of T1, one on
    a B2 ghost shrinks it; the victim is T1's least recent key while T1 is above ``p``, else T2's. A
    prefetched key enters T1 and its first demand use keeps it there (a prefetch is not a reference).
    With a restricted candidate set, the first candidate in that order is taken.
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.p = 0.0
        self.t1: OrderedDict[ExpertKey, None] = OrderedDict()
        self.t2: OrderedDict[ExpertKey, None] = OrderedDict()
        self.b1: OrderedDict[ExpertKey, None] = OrderedDict()
        self.b2: OrderedDict[ExpertKey, None] = OrderedDict()
        self._unreferenced: set[ExpertKey] = set()  # prefetched, not used yet

    def insert(self, key: ExpertKey, prefetch: bool) -> None:
        c = self.capacity
        if prefetch:
            self.b1.pop(key, None)
            self.b2.pop(key, None)
            self.t1[key] = None
            self._unreferenced.add(key)
        elif key in self.b1:
            self.p = min(float(c), self.p + max(len(self.b2) / len(self.b1), 1.0))
            del self.b1[key]
            self.t2[key] = None
        elif key in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
            del self.b2[key]
            self.t2[key] = None
        else:
            self.t1[key] = None
        self._trim_ghosts()

    def access(self, key: ExpertKey, hit: bool) -> None:
        if not hit:
            return
        if key in self._unreferenced:
            self._unreferenced.discard(key)
            if key in self.t1:
                self.t1.move_to_end(key)
            return
        if key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        elif key in self.t2:
            self.t2.move_to_end(key)

    def evict(self, key: ExpertKey) -> None:
        self._unreferenced.discard(key)
        if key in self.t1:
            del self.t1[key]
            self.b1[key] = None
        elif key in self.t2:
            del self.t2[key]
            self.b2[key] = None
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        c = self.capacity
        while self.b1 and len(self.t1) + len(self.b1) > c:
            self.b1.popitem(last=False)
        while len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * c and (self.b2 or self.b1):
            (self.b2 or self.b1).popitem(last=False)

    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        first, second = (self.t1, self.t2) if (self.t1 and len(self.t1) > self.p) or not self.t2 else (self.t2, self.t1)
        for order in (first, second):
            for key in order:  # least recent first
                if evictable(key):
                    return key
        return None


@register_policy("fate")
class ShallowFavoringPolicy(EvictionPolicy):
    """Fate's shallow-favoring allocation: shallow MoE layers get a larger share of the slots.

    The cross-layer gate predicts shallow layers worst (their gate inputs change most from one layer to
    the next), so prefetch covers them least; Fate answers by caching more of their experts. Layer ``l``
    gets the quota ``capacity * w_l / sum(w)`` with ``w_l = shallow_boost`` for the first
    ``shallow_layers`` layers (default: a quarter of them) and 1 for the others. The victim comes from
    the layer furthest above its quota (among the candidates' layers), least recently used first, as in
    Fate's per-layer ARC lists reduced to recency.
    """

    def __init__(self, shallow_layers: int | None = None, shallow_boost: float = 2.0, **kw) -> None:
        super().__init__(**kw)
        n = max(1, self.num_layers // 4) if shallow_layers is None else shallow_layers
        if not 0 <= n <= self.num_layers or shallow_boost <= 0:
            raise ValueError("fate: shallow_layers must be in [0, num_layers] and shallow_boost > 0")
        w = [shallow_boost if layer < n else 1.0 for layer in range(self.num_layers)]
        self.quota = [self.capacity * x / sum(w) for x in w]
        self._order: list[OrderedDict[ExpertKey, None]] = [OrderedDict() for _ in range(self.num_layers)]

    def insert(self, key: ExpertKey, prefetch: bool) -> None:
        self._order[key[0]][key] = None
        self._order[key[0]].move_to_end(key)

    def access(self, key: ExpertKey, hit: bool) -> None:
        self.insert(key, False)

    def evict(self, key: ExpertKey) -> None:
        self._order[key[0]].pop(key, None)

    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        layers = sorted(range(self.num_layers), key=lambda layer: len(self._order[layer]) - self.quota[layer], reverse=True)
        for layer in layers:
            for key in self._order[layer]:
                if evictable(key):
                    return key
        return None


@register_policy("lrfu")
class DecayedFrequencyPolicy(EvictionPolicy):
    """LRFU: evict the candidate with the lowest use frequency, decayed with a half-life in passes.

    A key's *weight* is the sum over its demand uses of ``0.5 ** (age / half_life)``, ``age`` counted in
    passes (a pass = one walk through the MoE layers, i.e. one decode token): a short half-life leans
    to recency, a long one to frequency (LFU), and unlike LRU it measures recency in passes, so it does
    not collapse when the cache holds less than one token's working set (layers x top_k). Ties go to
    the least recently used. All layers see top_k uses per pass, so weights compare fairly across
    layers: layers with skewed routing get more slots than flat ones without any quota.

    Cost: the weight is stored as ``log(weight) + age_scale * pass``, which does not change between a
    key's uses (decay shifts every key alike), so resident keys sit in a lazy heap: O(log n + skipped)
    per victim.
    """

    def __init__(self, half_life: float = 8.0, **kw) -> None:
        super().__init__(**kw)
        if not half_life > 0:
            raise ValueError(f"auto: half_life must be > 0 passes, got {half_life}")
        self.half_life = float(half_life)
        self._rate = np.log(2.0) / self.half_life  # log-weight lost per pass
        self._pass = 0
        self._layer = -1
        self._prio: dict[ExpertKey, float] = {}  # key -> log weight referred to pass 0 (all keys ever used)
        self._resident: dict[ExpertKey, int] = {}  # key -> clock of its last event (tie break, staleness)
        self._heap: list[tuple[float, int, ExpertKey]] = []  # (priority, clock, key); stale entries skipped
        self._clock = 0

    def layer_start(self, layer: int) -> None:
        if layer <= self._layer:
            self._pass += 1
        self._layer = layer

    def _push(self, key: ExpertKey) -> None:
        self._clock += 1
        self._resident[key] = self._clock
        heapq.heappush(self._heap, (self._prio.get(key, -np.inf), self._clock, key))
        if len(self._heap) > 4 * len(self._resident) + 64:  # drop stale entries now and then
            self._heap = [(self._prio.get(k, -np.inf), c, k) for k, c in self._resident.items()]
            heapq.heapify(self._heap)

    def insert(self, key: ExpertKey, prefetch: bool) -> None:
        self._push(key)

    def access(self, key: ExpertKey, hit: bool) -> None:
        now = self._pass * self._rate  # log weight of one use made now, referred to pass 0
        old = self._prio.get(key)
        self._prio[key] = now if old is None else max(old, now) + float(np.log1p(np.exp(-abs(old - now))))
        if key in self._resident:
            self._push(key)

    def evict(self, key: ExpertKey) -> None:
        self._resident.pop(key, None)

    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        return _heap_victim(self._heap, lambda item: self._resident.get(item[2]) == item[1], evictable)


#: Policies the default ("auto") chooses among, by name and keyword arguments.
AUTO_CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (("lfu", {}), ("lru", {}), ("lrfu", {"half_life": 8.0}))


@register_policy("auto")
class AutoPolicy(EvictionPolicy):
    """The default: follow whichever candidate policy (LFU, LRU, LRFU) would have hit most lately.

    No single policy wins everywhere on real routing: LRU collapses to ~0 hits when the cache holds
    less than one token's working set (layers x top_k: decode visits layers cyclically, so the least
    recent experts are exactly the next layers'), LFU is best on routing with stable expert
    popularity, and recency wins on text that repeats itself locally (legal text: LRU 0.29 vs LFU 0.23
    at a 10 % cache). Each candidate runs twice: once on the real residency (it sees the core's events
    and ranks the real resident keys), and once on a *shadow* cache of the same capacity fed the same
    demand accesses, which counts the hits it would have had. A shadow hit adds 1 to its candidate's
    score; scores decay by ``decay`` per pass (a memory of about ``1 / (1 - decay)`` passes); the
    victim is the real-residency victim of the *leader*: the first candidate (LFU) at the start; a
    candidate whose score passes the leader's by ``margin`` (a share) plus one hit per layer takes
    over at the next pass (noise in a short window does not make it flap), and the first candidate
    takes back over as soon as its score is level with the leader's (leaving LFU needs evidence,
    returning to it does not). No switch happens in the first ``1 / (1 - decay)`` passes: early
    counts favour recency (LFU's counts are still young), which a lasting switch would pay for later. While one candidate leads throughout, the cache evicts exactly as that
    policy alone would: its ranking does not depend on what the other candidates evicted.

    Cost: 2 x len(candidates) policy updates per event; a victim costs what the leader's costs
    (O(log n + skipped) for the candidates here); a shadow miss costs one shadow victim.
    """

    def __init__(
        self,
        candidates: Sequence[tuple[str, Mapping[str, Any]]] = AUTO_CANDIDATES,
        decay: float = 0.99,
        margin: float = 0.1,
        **kw,
    ) -> None:
        super().__init__(**kw)
        if not candidates or not 0.0 < decay < 1.0:
            raise ValueError("auto: give at least one candidate policy and a decay in (0, 1)")
        if any(name == "auto" for name, _ in candidates):
            raise ValueError("auto: a candidate cannot be 'auto' itself")
        dims = {"num_layers": self.num_layers, "num_experts": self.num_experts, "capacity": self.capacity}
        self.names = [name for name, _ in candidates]
        self.real = [make_policy(name, **dims, **dict(kw_)) for name, kw_ in candidates]
        self.shadow = [make_policy(name, **dims, **dict(kw_)) for name, kw_ in candidates]
        self.shadow_keys: list[set[ExpertKey]] = [set() for _ in candidates]
        self.score = [0.0] * len(candidates)
        self.leader = 0
        self.decay = decay
        self.margin = margin
        self.warmup = round(1.0 / (1.0 - decay))  # passes before the first switch: one memory length
        self._passes = 0
        self._layer = -1
        self._step_keys: set[ExpertKey] = set()  # the running layer's accesses: not shadow victims

    def layer_start(self, layer: int) -> None:
        if layer <= self._layer:  # a new pass: forget a little, pick the leader for it
            self.score = [x * self.decay for x in self.score]
            self._passes += 1
        if layer <= self._layer and self._passes >= self.warmup:
            best = max(range(len(self.score)), key=self.score.__getitem__)
            if self.leader != 0 and self.score[0] >= self.score[self.leader]:
                self.leader = 0  # back to the first candidate as soon as it is level again
            elif self.score[best] > (1.0 + self.margin) * self.score[self.leader] + self.num_layers:
                self.leader = best
        self._layer = layer
        self._step_keys = set()
        for pol in self.real:
            pol.layer_start(layer)
        for pol in self.shadow:
            pol.layer_start(layer)

    def insert(self, key: ExpertKey, prefetch: bool) -> None:
        for pol in self.real:
            pol.insert(key, prefetch)

    def access(self, key: ExpertKey, hit: bool) -> None:
        for pol in self.real:
            pol.access(key, hit)
        self._step_keys.add(key)
        step_keys = self._step_keys
        for i, pol in enumerate(self.shadow):
            keys = self.shadow_keys[i]
            if key in keys:
                self.score[i] += 1.0
                pol.access(key, True)
                continue
            if len(keys) >= self.capacity:
                v = pol.victim(lambda k: k not in step_keys)
                if v is None:
                    continue  # the running layer alone fills the shadow: it runs in waves, keep it out
                keys.discard(v)
                pol.evict(v)
            keys.add(key)
            pol.insert(key, False)
            pol.access(key, False)

    def evict(self, key: ExpertKey) -> None:
        for pol in self.real:
            pol.evict(key)

    def observe_scores(self, scores: Mapping[ExpertKey, float]) -> None:
        for pol in self.real:
            pol.observe_scores(scores)

    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        return self.real[self.leader].victim(evictable)


_MATCHES = 3  # remembered passes matched against the running one
_HORIZON = 8  # successors of a matched pass read as predictions of the next passes

#: Features of the predictive policy's reuse model, in weight order (see ``ReuseFeatures``).
REUSE_FEATURES: tuple[str, ...] = (
    "bias",
    "log_age",  # log of passes between the key's last use and its next opportunity (capped)
    "freq_fast",  # uses, decayed by 0.7 per pass
    "freq_slow",  # uses, decayed by 0.97 per pass
    "log_rate",  # log of the slow use rate per pass (freq_slow * 0.03, clipped to [1e-3, 1])
    "upcoming",  # 1 if the key's layer is still to come in the running pass
    "depth",  # layer / (L - 1)
    "score",  # predictor probability for the key in the running pass (observe_scores), else 0
    *(
        f"match{m}_{kind}"
        for m in range(1, _MATCHES + 1)
        for kind in ("now", "share", "soon")  # similarity x (used there / share of successors using it / 1 / (1 + first))
    ),
)

#: Reuse-model weights from ``fit_reuse_weights`` on the four shared DeepSeek-V2-Lite traces
#: (../shared/traces, all four domains, with distance-1 scores of transition_ho fitted on them);
#: benchmarks refit them on their training traces only.
DEFAULT_REUSE_WEIGHTS: tuple[float, ...] = (
    4.8850, 0.0871, 0.0159, 0.0075, -0.2851, -0.1388,
    0.3392, -1.0502, -0.4668, -0.4457, -1.4256, -0.1782,
    -0.4049, -1.0404, -0.1034, -0.3572, -0.8874,
)

_NEVER = -(10**9)


class ReuseFeatures:
    """Online features that predict how far away each key's next use is, from the access stream alone.

    A *pass* is one walk through the MoE layers (a decode token, or a prefill batch); it ends when a layer
    starts that is not deeper than the previous one. The model remembers the last ``memory`` passes as
    multi-hot ``[L, E]`` paths, and while a pass runs it tracks how much each remembered path overlaps the
    running one on the layers seen so far. Text repeats (a word, a name, a prompt template), and so do
    expert paths: the best-matching remembered passes predict the running pass's later layers, and their
    successors predict the next passes. Decayed use counts and the age of the last use add frequency
    and recency; predictor scores (``observe_scores``) add the running pass's next layers.
    """

    FAST, SLOW = 0.7, 0.97
    MAX_AGE = 4096

    def __init__(self, num_layers: int, num_experts: int, memory: int = 1024) -> None:
        L, E = num_layers, num_experts
        self.L, self.E, self.W = L, E, max(2, memory)
        self.token = 0
        self.layer = -1
        self.last_use = np.full(L * E, _NEVER, dtype=np.int64)
        self.f_fast = np.zeros(L * E)
        self.f_slow = np.zeros(L * E)
        self.cur = np.zeros((L, E), dtype=bool)
        self.mem = np.zeros((self.W, L, E), dtype=bool)
        self.mem_token = np.full(self.W, _NEVER, dtype=np.int64)  # pass number held by each ring slot
        self.overlap = np.zeros(self.W, dtype=np.float64)
        self.scores = np.zeros(L * E)  # predictor probabilities for the running pass
        self._scored = False

    def layer_start(self, layer: int) -> None:
        if layer <= self.layer:
            self._end_pass()
        self.layer = layer

    def _end_pass(self) -> None:
        slot = self.token % self.W
        self.mem[slot] = self.cur
        self.mem_token[slot] = self.token
        self.cur[:] = False
        self.overlap[:] = 0.0
        self.f_fast *= self.FAST
        self.f_slow *= self.SLOW
        if self._scored:
            self.scores[:] = 0.0
            self._scored = False
        self.token += 1

    def use(self, layer: int, expert: int) -> None:
        if self.cur[layer, expert]:
            return
        self.cur[layer, expert] = True
        i = layer * self.E + expert
        self.last_use[i] = self.token
        self.f_fast[i] += 1.0
        self.f_slow[i] += 1.0
        self.overlap += self.mem[:, layer, expert]

    def observe(self, scores: Mapping[ExpertKey, float]) -> None:
        for (layer, e), v in scores.items():
            self.scores[layer * self.E + e] = v
        self._scored = True

    def _matches(self) -> list[tuple[float, int]]:
        """Up to ``_MATCHES`` (similarity, ring slot) of the best remembered passes."""
        seen = int(self.cur[: self.layer + 1].sum()) if self.layer >= 0 else 0
        if seen == 0:
            return []
        valid = self.mem_token >= 0
        # Later passes win ties: the recency term stays far below one shared expert.
        score = np.where(valid, self.overlap + 1e-6 * (self.mem_token - self.token), -1.0)
        best = np.argpartition(-score, _MATCHES)[:_MATCHES] if len(score) > _MATCHES else np.arange(len(score))
        best = best[np.argsort(-score[best])]
        return [(float(self.overlap[b]) / seen, int(b)) for b in best.tolist() if score[b] > 0]

    def features(self, idx: np.ndarray) -> np.ndarray:
        """``[len(idx), len(REUSE_FEATURES)]`` for the keys with flat indices ``layer * E + expert``."""
        L, E, W = self.L, self.E, self.W
        layer = idx // E
        expert = idx % E
        upcoming = layer > self.layer
        next_token = self.token + (~upcoming).astype(np.int64)
        age = np.minimum(next_token - self.last_use[idx], self.MAX_AGE)
        x = np.zeros((len(idx), len(REUSE_FEATURES)))
        x[:, 0] = 1.0
        x[:, 1] = np.log(age)
        x[:, 2] = self.f_fast[idx]
        x[:, 3] = self.f_slow[idx]
        x[:, 4] = np.log(np.clip(self.f_slow[idx] * (1 - self.SLOW), 1e-3, 1.0))
        x[:, 5] = upcoming
        x[:, 6] = layer / max(L - 1, 1)
        if self._scored:
            x[:, 7] = np.where(upcoming, self.scores[idx], 0.0)
        for m, (sim, slot) in enumerate(self._matches()):
            col = 8 + 3 * m
            now = self.mem[slot, layer, expert] & upcoming
            # Successors h = 1.. of the matched pass that are remembered and already over.
            succ_tokens = self.mem_token[slot] + np.arange(1, _HORIZON + 1)
            ok = (succ_tokens < self.token) & (self.mem_token[succ_tokens % W] == succ_tokens)
            n_ok = int(ok.cumprod().sum())
            if n_ok:
                used = self.mem[(succ_tokens[:n_ok] % W)[:, None], layer[None, :], expert[None, :]]  # [h, n]
                # Successor h stands for pass token + h when the key's layer is still to come, else + h - 1.
                first = np.where(used.any(0), used.argmax(0) + 1 - (~upcoming), _HORIZON + 1)
                first = np.where(now, 0, first)
                x[:, col + 1] = sim * used.mean(0)
            else:
                first = np.where(now, 0, _HORIZON + 1)
            x[:, col] = sim * now
            x[:, col + 2] = sim * np.where(first <= _HORIZON, 1.0 / (1.0 + first), 0.0)
        return x


@register_policy("predictive")
class PredictivePolicy(EvictionPolicy):
    """Prediction-aware eviction: evict the candidate whose next use is predicted farthest (online Belady).

    A linear model over ``ReuseFeatures`` (path matches against remembered passes and their successors,
    decayed frequency, age of the last use, predictor scores from ``observe_scores``) predicts the log of
    the number of layer steps until each key is next used; the victim is the candidate with the largest
    prediction. ``weights``: the starting weights, one per ``REUSE_FEATURES`` entry (default:
    ``DEFAULT_REUSE_WEIGHTS``, or ``fit_reuse_weights`` on traces); ``memory``: how many passes the path
    memory keeps.

    Online fitting (``online=True``, the default): the model refits itself to the routing it sees, so it
    needs no offline fit. Whenever the resident keys are ranked, ``samples`` of them are kept with their
    features; a sample's target, the log of the layer steps until its key is next used, is known when
    the key is used again or, capped, once ``horizon`` passes went by without a use. Resolved samples
    enter exponentially forgotten least squares (``forget`` per pass), ridge-regularised towards the
    starting weights with strength ``prior``; the weights are re-solved at every pass once the first
    ``horizon`` passes are over (before that only short distances have resolved: a biased sample).
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        memory: int = 1024,
        online: bool = True,
        horizon: int = 64,
        forget: float = 0.995,
        samples: int = 8,
        prior: float = 10.0,
        seed: int = 0,
        **kw,
    ) -> None:
        super().__init__(**kw)
        self._resident: dict[ExpertKey, None] = {}
        w = DEFAULT_REUSE_WEIGHTS if weights is None else tuple(float(x) for x in weights)
        if len(w) != len(REUSE_FEATURES):
            raise ValueError(f"predictive: weights needs {len(REUSE_FEATURES)} values ({', '.join(REUSE_FEATURES)})")
        if horizon < 1 or not 0.0 < forget <= 1.0 or samples < 0 or prior < 0:
            raise ValueError("predictive: horizon >= 1, forget in (0, 1], samples >= 0 and prior >= 0 are needed")
        self.weights = np.asarray(w)
        self.initial_weights = self.weights.copy()
        self.reuse = ReuseFeatures(self.num_layers, self.num_experts, memory)
        self._ranked: list[ExpertKey] | None = None  # this step's candidates, best victim last
        self.online = online
        self.horizon, self.forget, self.samples, self.prior = horizon, forget, samples, prior
        d = len(REUSE_FEATURES)
        self._rng = np.random.default_rng(seed)
        self._gram = np.zeros((d, d))  # forgotten sum of x x^T over resolved samples
        self._rhs = np.zeros(d)  # forgotten sum of x y
        self.resolved = 0  # samples resolved so far
        # Pending samples: a ring of features, flat key index, layer step of the sample; step < 0 = free.
        cap = max(64, 2 * samples * self.num_layers * horizon) if online else 0
        self._px = np.zeros((cap, d))
        self._pkey = np.zeros(cap, dtype=np.int64)
        self._pstep = np.full(cap, -1, dtype=np.int64)
        self._pnext = 0

    def _now(self) -> int:
        return self.reuse.token * self.num_layers + max(self.reuse.layer, 0)

    def layer_start(self, layer: int) -> None:
        if self.online and layer <= self.reuse.layer:
            self._learn_pass()  # the running pass ends: its uses resolve pending samples
        self.reuse.layer_start(layer)
        self._ranked = None

    def _learn_pass(self) -> None:
        """Resolve the pending samples whose key the ending pass used or whose horizon passed; refit."""
        L, E = self.num_layers, self.num_experts
        live = self._pstep >= 0
        if live.any():
            at = np.flatnonzero(live)
            key, s0 = self._pkey[at], self._pstep[at]
            use_step = self.reuse.token * L + key // E  # each key is used at most once per pass, at its layer
            used = self.reuse.cur.reshape(-1)[key] & (use_step > s0)
            cap = self.horizon * L
            expired = ~used & (self._now() + 1 - s0 >= cap)
            done = used | expired
            if done.any():
                y = np.log(np.where(used, use_step - s0, cap)[done].astype(np.float64))
                x = self._px[at[done]]
                self._gram += x.T @ x
                self._rhs += x.T @ y
                self._pstep[at[done]] = -1
                self.resolved += int(done.sum())
        self._gram *= self.forget
        self._rhs *= self.forget
        if self.reuse.token >= self.horizon and self.resolved:
            d = len(REUSE_FEATURES)
            reg = self.prior * np.eye(d)
            self.weights = np.linalg.solve(self._gram + reg + 1e-9 * np.eye(d), self._rhs + reg @ self.initial_weights)

    def _keep_samples(self, idx: np.ndarray, x: np.ndarray) -> None:
        n = min(self.samples, len(idx))
        if n == 0 or not self.online:
            return
        pick = self._rng.choice(len(idx), size=n, replace=False)
        cap = len(self._pstep)
        slots = (self._pnext + np.arange(n)) % cap  # the oldest pending samples give way when the ring is full
        self._pnext = int((self._pnext + n) % cap)
        self._px[slots] = x[pick]
        self._pkey[slots] = idx[pick]
        self._pstep[slots] = self._now()

    def insert(self, key: ExpertKey, prefetch: bool) -> None:
        self._resident[key] = None

    def evict(self, key: ExpertKey) -> None:
        self._resident.pop(key, None)

    def access(self, key: ExpertKey, hit: bool) -> None:
        # Uses inside the running layer do not re-rank this step's candidates: they move the candidates'
        # features only through match similarities, and re-ranking per miss costs more than it buys.
        self.reuse.use(*key)

    def observe_scores(self, scores: Mapping[ExpertKey, float]) -> None:
        self.reuse.observe(scores)
        self._ranked = None

    def predicted_log_distance(self, keys: Sequence[ExpertKey]) -> np.ndarray:
        """Predicted log of the layer steps until each key's next use."""
        E = self.num_experts
        idx = np.fromiter((k[0] * E + k[1] for k in keys), dtype=np.int64, count=len(keys))
        x = self.reuse.features(idx)
        self._keep_samples(idx, x)
        return x @ self.weights

    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        # Several victims are usually asked for in one layer step: rank the resident keys once per step
        # (O(resident), vectorised) and hand out the best one still resident and evictable.
        for _attempt in range(2):
            if self._ranked is None:
                keys = list(self._resident)
                if not keys:
                    return None
                order = np.argsort(self.predicted_log_distance(keys), kind="stable")  # the best victim last
                self._ranked = [keys[i] for i in order.tolist()]
            for i in range(len(self._ranked) - 1, -1, -1):
                key = self._ranked[i]
                if key not in self._resident:
                    del self._ranked[i]
                    continue
                if evictable(key):
                    del self._ranked[i]
                    return key
            self._ranked = None  # keys inserted since the ranking may be evictable: rank again once
        return None


def fit_reuse_weights(
    traces: Sequence[np.ndarray],
    num_experts: int,
    scores: Sequence[Sequence[np.ndarray]] | None = None,
    memory: int = 1024,
    sample_every: int = 13,
    keys_per_sample: int = 256,
    seed: int = 0,
) -> tuple[float, ...]:
    """Fit ``PredictivePolicy`` weights: least squares on the log of the next-use distance.

    ``traces``: expert ids ``[T, L, K]`` per trace, replayed one after another in decode order as one
    stream. ``scores`` (optional): per trace, predictor probabilities ``[T, L - d, E]`` for d = 1, 2, ...
    as the simulator passes them to ``observe_scores``. Every ``sample_every``-th layer step,
    ``keys_per_sample`` random keys give a sample: their features, and the log of the layer steps until
    their next use (capped at ``MAX_AGE`` passes). Features depend only on the access stream, not on what
    a cache holds, so no cache is simulated. Returns weights in ``REUSE_FEATURES`` order.
    """
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in traces])
    T, L, K = ids.shape
    E = num_experts
    probs = None
    if scores is not None:
        assert len(scores) == len(traces), "one list of score arrays per trace"
        probs = [np.concatenate([np.asarray(s[d]) for s in scores]) for d in range(len(scores[0]))]
    used = np.zeros((T, L, E), dtype=bool)
    np.put_along_axis(used, ids, True, axis=2)
    # next_use[t, l, e]: first pass >= t using e at layer l (T + MAX_AGE when none).
    next_use = np.full((T + 1, L, E), T + ReuseFeatures.MAX_AGE, dtype=np.int64)
    for t in range(T - 1, -1, -1):
        next_use[t] = np.where(used[t], t, next_use[t + 1])
    feats = ReuseFeatures(L, E, memory)
    xs, ys = [], []
    step = 0
    for t in range(T):
        for layer in range(L):
            feats.layer_start(layer)
            for e in ids[t, layer].tolist():
                feats.use(layer, e)
            if probs is not None:  # what observe_scores would pass, written straight into the array
                for d, pd in enumerate(probs, start=1):
                    if layer + d < L:
                        feats.scores[(layer + d) * E : (layer + d + 1) * E] = pd[t, layer]
                feats._scored = True
            step += 1
            if step % sample_every:
                continue
            idx = rng.choice(L * E, size=min(keys_per_sample, L * E), replace=False)
            kl, ke = idx // E, idx % E
            start = np.where(kl > layer, t, t + 1)
            nxt = np.minimum(next_use[np.minimum(start, T), kl, ke], t + ReuseFeatures.MAX_AGE)
            steps = (nxt - t) * L + kl - layer
            xs.append(feats.features(idx))
            ys.append(np.log(np.maximum(steps, 1)))
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    if probs is None:
        x = x.copy()
        x[:, REUSE_FEATURES.index("score")] = 0.0
    # Ridge-regularised least squares (columns that never vary get weight ~0).
    reg = 1e-3 * len(y) * np.eye(x.shape[1])
    reg[0, 0] = 0.0
    w = np.linalg.solve(x.T @ x + reg, x.T @ y)
    return tuple(float(v) for v in w)
