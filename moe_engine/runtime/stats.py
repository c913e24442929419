"""Counters the engine keeps: named dataclasses, per MoE layer and in total.

Glossary: a *hit* is a demanded expert that was resident (or already loading by prefetch) when its
layer started; a *miss* had to be loaded on demand. A *prefetch hit* is a hit owed to a prefetch; a
*wasted prefetch* was evicted before any layer used it; a *misprediction* is a prefetch whose
target layer then ran without it (it may still be used later). *Stall* is time compute waited for copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerStats:
    """Counters of one MoE layer (``EngineStats`` holds the same counters summed over layers)."""

    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    prefetches: int = 0
    wasted_prefetches: int = 0
    mispredictions: int = 0
    bytes_moved: int = 0
    prefetch_bytes: int = 0
    stall_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

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
    per_layer: list[LayerStats] = field(default_factory=list)

    def summary(self) -> str:
        gib = 2**30
        return (
            f"hit rate {self.hit_rate:.1%} ({self.hits} hits, {self.misses} misses), "
            f"moved {self.bytes_moved / gib:.2f} GiB, stall {self.stall_seconds:.2f} s, "
            f"prefetch {self.prefetch_hits}/{self.prefetches} used"
        )
