"""Engine configuration: the budget grammar and the frozen ``EngineConfig`` passed down explicitly.

Glossary: the *budget* is the number of bytes of fast tier that expert slots may use (non-expert
weights and activations are separate). It is given as bytes (``123456``), a string with a unit
(``"512MB"``, ``"2GiB"``), a fraction of all expert bytes (``0.25``, ``"0.25"``, ``1.0``, ``"1.0"``) or a
percentage (``"25%"``); see ``parse_budget`` for the exact grammar.

Example::

    cfg = EngineConfig(budget=parse_budget("256MiB"), policy="lru")
    resolve_budget(cfg.budget, total_expert_bytes=10**9)   # -> 268435456
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}  # fmt: skip

BudgetSpec = int | float | str
PREFILL_POLICIES = ("stream", "shared")


def parse_budget(spec: BudgetSpec) -> int | float:
    """Validate a budget: returns an int (bytes) or a float fraction in (0, 1] of all expert bytes.

    The grammar, the same for the library and the CLI:

    * an ``int`` is bytes (``268435456``);
    * a ``float`` is a fraction in (0, 1] (``0.25``; ``1.0`` means all experts);
    * a string with a unit is a size (``"512MB"``, ``"2.5GiB"``) and must come to whole bytes;
    * a string percentage is a fraction (``"25%"``);
    * a bare number string is a fraction when written ``"0.x"``, ``"1.0"`` or ``"1"``, else whole bytes
      (``"268435456"``); ``"2.5"`` is neither and is refused.

    Raises ValueError naming the accepted forms when the spec cannot be read.
    """
    forms = (
        "bytes as an integer (268435456), a size with a unit ('512MB', '2GiB'), a fraction of all expert "
        "bytes written 0.x or 1.0 (0.25, '0.25', '1.0'), or a percentage ('25%')"
    )
    if isinstance(spec, bool):
        raise ValueError(f"budget {spec!r} is not valid; give {forms}")
    if isinstance(spec, int):
        if spec <= 0:
            raise ValueError(f"budget {spec} must be positive; give {forms}")
        return spec
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:  # also refuses nan
            raise ValueError(f"budget fraction {spec} must be in (0, 1] (1.0 = all experts); give {forms}")
        return spec
    if isinstance(spec, str):
        s = spec.strip().lower().replace(" ", "").replace("_", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-z%]*)", s)
        if m is None or m.group(2) not in (*_UNITS, "%"):
            raise ValueError(f"budget {spec!r} is not valid; give {forms}")
        text, unit = m.group(1), m.group(2)
        num = Decimal(text)  # exact: "0.3GB" is 300000000 bytes, not 299999999
        if unit == "%":
            if not 0 < num <= 100:
                raise ValueError(f"budget {spec!r} must be a percentage in (0, 100]; give {forms}")
            return float(num) / 100.0
        if unit == "" and ("." in text or num == 1):
            if 0 < num <= 1:
                return float(num)  # "0.25", "1.0", "1": a fraction of all expert bytes
            if "." in text:  # "2.5" or "2.0": bytes are written without a point
                raise ValueError(
                    f"budget {spec!r} is neither a fraction nor bytes: fractions need a leading '0.' or to be "
                    f"'1.0', and bytes must be whole; give {forms}"
                )
        n_bytes = num * _UNITS[unit]
        if n_bytes != n_bytes.to_integral_value():
            raise ValueError(f"budget {spec!r} is {n_bytes} bytes: bytes must be whole; give {forms}")
        if n_bytes <= 0:
            raise ValueError(f"budget {spec!r} must be positive; give {forms}")
        return int(n_bytes)
    raise ValueError(f"budget {spec!r} of type {type(spec).__name__} is not valid; give {forms}")


def resolve_budget(budget: int | float, total_expert_bytes: int) -> int:
    """Bytes allowed for expert slots: a fraction is taken of ``total_expert_bytes``."""
    if isinstance(budget, float):
        return int(budget * total_expert_bytes)
    return int(budget)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. ``budget`` is bytes (int) or a fraction of all expert bytes (float).

    * ``policy``: eviction policy name from ``moe_engine.runtime.policies`` or ``"none"`` (load on demand,
      nothing kept after use).
    * ``predictor``: predictor name from ``predictors`` (``None`` disables prefetch).
    * ``prefetch_distance``: how many MoE layers ahead to prefetch.
    * ``prefetch_per_layer``: at most this many prefetches per predicted layer and layer step.
    * ``prefetch_min_prob``: prefetch only experts whose predicted probability reaches this.
    * ``page_cache``: allow the OS page cache to keep expert file pages (default off, so the budget is real).
    * ``io_threads``: slow-tier reader threads (CPU mover).
    * ``prefill_policy``: ``"stream"`` (a prefill streams its experts without evicting more than
      ``prefill_window`` of the slots, and reads the next layer ahead; ``moe_engine.runtime.engine``) or
      ``"shared"`` (a prefill is cached like a decode step).
    * ``prefill_window``: fraction of the slots a prefill may take from the decode working set.
    * ``preload``: fill the fast tier with experts at load (``Engine.preload``), so the first forward pass
      does not start from an empty cache.
    * ``host_tier``: on CUDA, ``"auto"`` (pinned host arena when it fits RAM, nothing pinned when every
      expert fits the budget, else disk), ``"pinned"`` or ``"disk"`` (``moe_engine.runtime.host_tier``).
    """

    budget: int | float = 0.25
    policy: str = "auto"
    predictor: str | None = None
    prefetch_distance: int = 1
    prefetch_per_layer: int = 6
    prefetch_min_prob: float = 0.25
    page_cache: bool = False
    io_threads: int = 2
    host_tier: str = "auto"
    prefill_policy: str = "stream"
    prefill_window: float = 0.25
    preload: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", parse_budget(self.budget))
        if self.prefetch_distance < 1:
            raise ValueError(f"prefetch_distance must be >= 1, got {self.prefetch_distance}")
        if self.prefetch_per_layer < 0:
            raise ValueError(f"prefetch_per_layer must be >= 0, got {self.prefetch_per_layer}")
        if not 0.0 <= self.prefetch_min_prob <= 1.0:
            raise ValueError(f"prefetch_min_prob must be in [0, 1], got {self.prefetch_min_prob}")
        if self.io_threads < 1:
            raise ValueError("io_threads must be >= 1")
        if self.prefill_policy not in PREFILL_POLICIES:
            raise ValueError(f"prefill_policy must be one of {', '.join(PREFILL_POLICIES)}, got {self.prefill_policy!r}")
        if not 0.0 < self.prefill_window <= 1.0:
            raise ValueError(f"prefill_window is a fraction of the slots in (0, 1], got {self.prefill_window}")
        if self.host_tier not in ("auto", "pinned", "disk"):
            raise ValueError(f"host_tier must be 'auto', 'pinned' or 'disk', got {self.host_tier!r}")
        if self.policy == "none" and self.predictor is not None:
            raise ValueError("policy='none' keeps nothing resident, so prefetch cannot work: set predictor=None")
