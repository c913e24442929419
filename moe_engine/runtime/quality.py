"""Per-miss choice of which stored copy of an expert to load, under the user's ``quality`` setting.

A checkpoint written by ``moe-engine quantize`` stores each expert in its own format (variant 0) and
optionally lower-precision copies (``copies``, variants 1..). Which copy a load brings decides both its
bytes on the slow tier's link and its bytes in the fast tier, so the residency core asks this module at
each admission (``Residency(size_of=...)``):

* ``"lossless"`` (default): always the expert's own format. Outputs are those of the checkpoint.
* ``"balanced"``: a demand miss (compute is waiting) loads the smallest copy; a prefetch (overlapping
  compute) loads the expert's own format. Misses stall less and take less of the budget; experts the
  predictor saw coming keep full quality.
* ``"fast"``: every load brings the smallest copy: the most experts under the budget, the fewest bytes.

Lossy choices are counted (``reduced_loads`` in ``engine.stats()``); the guardrail
(``moe_engine.runtime.guardrail``) measures their cost on sampled steps and turns a layer back to its
own format when the logits diverge beyond the user's bound (``force_full``).

Glossary: *variant* -- index of a stored copy of an expert (0: its own format); *sizes* -- bytes each
variant takes in a cache slot.

Example::

    sizing = ExpertSizing({(0, 0): (1_000, 300), (0, 1): (1_000, 300)}, quality="fast")
    sizing.size_of((0, 0), prefetch=False)     # (300, 1)
"""

from __future__ import annotations

from collections.abc import Mapping

from moe_engine.runtime.policies import ExpertKey

QUALITIES = ("lossless", "balanced", "fast")


def check_quality(quality: str) -> str:
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {', '.join(QUALITIES)}, got {quality!r}")
    return quality


class ExpertSizing:
    """Bytes of each stored copy of each expert, and the copy each load brings under ``quality``."""

    def __init__(self, sizes: Mapping[ExpertKey, tuple[int, ...]], quality: str = "lossless") -> None:
        self.quality = check_quality(quality)
        self.sizes = dict(sizes)
        if not self.sizes or any(not v or min(v) <= 0 for v in self.sizes.values()):
            raise ValueError("every expert needs at least one stored copy of positive size")
        self.force_full: set[int] = set()  # MoE layers the guardrail turned back to their own format
        self._small = {k: min(range(len(v)), key=v.__getitem__) for k, v in self.sizes.items()}

    @property
    def uniform(self) -> bool:
        """Every load brings one size: the fixed-slot cache suffices."""
        loadable = {s for k, v in self.sizes.items() for s in self._loadable(k, v)}
        return len(loadable) == 1

    def _loadable(self, key: ExpertKey, sizes: tuple[int, ...]) -> list[int]:
        if self.quality == "lossless":
            return [sizes[0]]
        if self.quality == "fast":
            return [sizes[self._small[key]]]
        return [sizes[0], sizes[self._small[key]]]

    @property
    def total_bytes(self) -> int:
        """All experts at their own format: what a fractional budget is a fraction of."""
        return sum(v[0] for v in self.sizes.values())

    @property
    def max_bytes(self) -> int:
        return max(s for k, v in self.sizes.items() for s in self._loadable(k, v))

    @property
    def min_bytes(self) -> int:
        return min(s for k, v in self.sizes.items() for s in self._loadable(k, v))

    def size_of(self, key: ExpertKey, prefetch: bool) -> tuple[int, int]:
        """``(bytes, variant)`` of the copy a load of ``key`` brings now."""
        sizes = self.sizes[key]
        if self.quality == "lossless" or key[0] in self.force_full:
            return sizes[0], 0
        if self.quality == "balanced" and prefetch:
            return sizes[0], 0
        v = self._small[key]
        return sizes[v], v
