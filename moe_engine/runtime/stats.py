"""Counters of the engine: named dataclasses, per MoE layer and in total. The residency core
(``moe_engine.runtime.residency``) owns and updates them; ``Engine.stats()`` returns a snapshot.

Glossary: a *ready hit* (``hits``) is a demanded expert whose weights were in its slot when its layer
started; a *late hit* (``late_hits``) was resident but its copy (a prefetch) was still in flight: the
layer waited for the rest of it (``late_stall_seconds``); a *miss* had to be loaded on demand. A
*prefetch hit* is a ready or late hit owed to a prefetch; a *wasted prefetch* was evicted before any
layer used it; a *misprediction* is a prefetch whose target layer then ran without it (it may still
be used later). *Stall* is time compute waited for copies (misses and late hits). A *failed load* is
a copy that raised (the slot was freed, the expert is loaded again on next use). A *reduced load*
brought a lower-precision stored copy of the expert instead of its own precision (``quality`` other
than "lossless", ``moe_engine.runtime.quality``); *guardrail fallbacks* count layers the guardrail
switched back to full precision because sampled logits diverged beyond its bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerStats:
    """Counters of one MoE layer (``EngineStats`` holds the same counters summed over layers)."""

    hits: int = 0
    late_hits: int = 0
    misses: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    wasted_prefetches: int = 0
    mispredictions: int = 0
    evictions: int = 0
    failed_loads: int = 0
    reduced_loads: int = 0
    bytes_moved: int = 0
    prefetch_bytes: int = 0
    stall_seconds: float = 0.0
    late_stall_seconds: float = 0.0

    @property
    def accesses(self) -> int:
        return self.hits + self.late_hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Share of demanded experts that were ready (late hits are not counted as hits)."""
        n = self.accesses
        return self.hits / n if n else 0.0

    @property
    def resident_rate(self) -> float:
        """Share of demanded experts that were resident, ready or still loading (no demand load)."""
        n = self.accesses
        return (self.hits + self.late_hits) / n if n else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Share of prefetched experts that a layer then used."""
        return self.prefetch_hits / self.prefetches if self.prefetches else 0.0


@dataclass
class EngineStats(LayerStats):
    """Totals over all MoE layers plus ``per_layer`` (index = MoE layer) and the budget facts."""

    predict_seconds: float = 0.0
    budget_bytes: int = 0
    expert_bytes: int = 0
    num_slots: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    guardrail_checks: int = 0
    guardrail_fallbacks: int = 0
    guardrail_max_kl: float = 0.0
    per_layer: list[LayerStats] = field(default_factory=list)

    def summary(self) -> str:
        gib = 2**30
        return (
            f"hit rate {self.hit_rate:.1%} ({self.hits} ready, {self.late_hits} late, {self.misses} misses), "
            f"moved {self.bytes_moved / gib:.2f} GiB, stall {self.stall_seconds:.2f} s, "
            f"prefetch {self.prefetch_hits}/{self.prefetches} used"
        )
