"""Eviction policies for the fast-tier expert cache: policy only, no tensors, no devices.

Glossary: a *key* is ``(layer, expert)`` with ``layer`` the index among the model's MoE layers
(0-based) and ``expert`` the routed expert id. A policy sees the cache's events and, when a slot is
needed, picks a *victim* among the candidates the cache offers (resident experts that are neither
pinned by the running layer nor needed by it). The same policy objects drive the runtime cache
(``moe_engine.cache``) and the trace-driven simulator, so a hit rate measured in simulation is the
hit rate the runtime gets for the same access sequence.

Event contract (the cache calls, in this order for a demand miss): ``insert(key, prefetch=False)``
then ``access(key, hit=False)``; for a demand hit: ``access(key, hit=True)``; for a prefetch:
``insert(key, prefetch=True)``; when a slot is reclaimed: ``evict(key)``. ``layer_start(layer)``
is called when a MoE layer begins (policies that care about depth or time use it).
``observe_scores(scores)`` passes predictor scores ``{key: score}`` to prediction-aware policies.

Example::

    policy = make_policy("lru", num_layers=8, num_experts=16, capacity=32)
    policy.insert((0, 3), prefetch=False); policy.access((0, 3), hit=False)
    victim = policy.victim([(0, 3), (1, 5)])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

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

    def evict(self, key: ExpertKey) -> None:
        """``key`` lost its slot."""

    def observe_scores(self, scores: Mapping[ExpertKey, float]) -> None:
        """Predictor scores for upcoming experts (higher = more likely needed soon)."""

    @abstractmethod
    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        """Pick one of ``candidates`` (non-empty, all resident and evictable) to evict."""


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
        self._order[key] = None
        self._order.move_to_end(key)

    def evict(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        allowed = set(candidates)
        for key in self._order:  # oldest first
            if key in allowed:
                return key
        return candidates[0]


@register_policy("lfu")
class LFUPolicy(EvictionPolicy):
    """Least frequently used, counting every demand access since the start (ties: least recent)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._count: dict[ExpertKey, int] = {}
        self._last: dict[ExpertKey, int] = {}
        self._clock = 0

    def _touch(self, key: ExpertKey) -> None:
        self._clock += 1
        self._last[key] = self._clock

    def insert(self, key: ExpertKey, prefetch: bool) -> None:
        self._count.setdefault(key, 0)
        self._touch(key)

    def access(self, key: ExpertKey, hit: bool) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._touch(key)

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        return min(candidates, key=lambda k: (self._count.get(k, 0), self._last.get(k, 0)))
