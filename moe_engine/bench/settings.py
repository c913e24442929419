"""Settings and results of ``moe-engine bench``: which systems run at which budgets, and what one run measured.

Owns: the system names (``SYSTEMS``, ``BASELINES``, ``UNCAPPED``), the acceptance bars, ``SystemRun``
(one system at one budget) and its ``--systems`` grammar (``parse_systems``), ``BenchSettings`` (one
benchmark invocation, validated) and ``RunResult`` (every figure of one system run, as the JSON keeps it).

Glossary: a *budget* ``f`` is a fraction of all expert bytes; a *system label* is ``name@f``
(``lru@0.25``); a *baseline* is one of the accelerate systems the engine is compared with.

Example::

    runs = parse_systems("lru,accelerate@0.5", budgets=(0.125, 1.0), ref_budget=0.25)
    [r.label for r in runs]     # ['lru@0.125', 'lru@1', 'accelerate@0.5']
"""

from __future__ import annotations

from dataclasses import dataclass, field

SYSTEMS = ("lru", "prefetch", "default", "ondemand", "int8", "int4", "fast", "accelerate", "accelerate_plain", "accelerate_cold")
# The engine as it ships on a copy of the checkpoint with every expert quantized (moe_engine.quant): the
# budget stays a fraction of the *stored* expert bytes, so every system runs under the same memory cap.
QUANTIZED = ("int8", "int4", "fast")
BASELINES = ("accelerate", "accelerate_plain", "accelerate_cold")
UNCAPPED = ("accelerate_plain",)  # never under the memory cap (a reference)
MEMORY_CAPS = ("none", "cgroup")
DEFAULT_BUDGETS = (0.125, 0.25, 0.5, 1.0)
DEFAULT_REF_BUDGET = 0.25
# Acceptance bars (issue 2: engine vs accelerate at 25 %; issue 4: prefetch vs LRU on demand).
BAR_ENGINE_VS_ACCELERATE = 3.0
BAR_PREFETCH_VS_LRU = 1.5


@dataclass(frozen=True)
class SystemRun:
    """One system at one budget: what a child process runs."""

    system: str
    budget: float

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown system {self.system!r}; choose from {', '.join(SYSTEMS)}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be a fraction of expert bytes in (0, 1], got {self.budget}")

    @property
    def label(self) -> str:
        return f"{self.system}@{self.budget:g}"


def parse_systems(text: str, budgets: tuple[float, ...], ref_budget: float) -> tuple[SystemRun, ...]:
    """``"lru,prefetch@0.5,accelerate"`` -> runs. ``lru`` alone sweeps ``budgets``; the other names
    alone run at ``ref_budget``; ``name@f`` runs at ``f``."""
    runs: list[SystemRun] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, budget = item.partition("@")
        if budget:
            try:
                runs.append(SystemRun(name, float(budget)))
            except ValueError as exc:
                raise ValueError(f"bad system {item!r}: {exc}") from None
        elif name == "lru":
            runs.extend(SystemRun(name, b) for b in budgets)
        else:
            runs.append(SystemRun(name, ref_budget))
    if not runs:
        raise ValueError("--systems names no system")
    return tuple(dict.fromkeys(runs))  # drop repeats, keep order


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark invocation: the checkpoint, the system labels to run, prompt, decode length, limits."""

    model_path: str
    model_name: str = "model"
    systems: tuple[str, ...] = ("lru@0.125", "lru@0.25", "lru@0.5", "lru@1", "prefetch@0.25", "default@0.25",
                                "ondemand@0.25", "accelerate@0.25", "accelerate_plain@0.25", "accelerate_cold@0.25")
    ref_budget: float = DEFAULT_REF_BUDGET
    prompt_tokens: int = 64
    decode_tokens: int = 32
    seed: int = 0
    timeout_s: float = 900.0
    threads: int | None = None
    offload_root: str | None = None  # where accelerate's offload folders go (default: beside the model)
    memory_cap: str = "none"  # "cgroup": every run but accelerate_plain in a memory cgroup (see module doc)
    runtime_allowance_bytes: int | None = None  # added to each cgroup cap; None: measured once
    repeats: int = 1  # rounds over all systems, interleaved; each system is reported by its median run

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError("repeats must be at least 1")
        if self.memory_cap not in MEMORY_CAPS:
            raise ValueError(f"memory_cap must be one of {', '.join(MEMORY_CAPS)}, got {self.memory_cap!r}")
        if self.prompt_tokens < 1 or self.decode_tokens < 1:
            raise ValueError("prompt and decode token counts must be at least 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout must be positive")
        for label in self.systems:
            name, _, budget = label.partition("@")
            SystemRun(name, float(budget))  # validates


@dataclass
class RunResult:
    """Figures of one system run; ``status`` is ``ok``, ``timed_out``, ``oom_killed`` (by the memory cap)
    or ``failed``."""

    label: str
    system: str
    budget: float
    status: str = "failed"
    error: str | None = None
    wall_s: float | None = None
    load_s: float | None = None
    prefill_s: float | None = None
    prefill_tok_s: float | None = None
    decode_s: float | None = None
    decode_tok_s: float | None = None
    new_tokens: int = 0
    rss_after_import_bytes: int | None = None
    peak_rss_bytes: int | None = None  # VmHWM over the whole child (imports, loading, generation)
    peak_rss_load_bytes: int | None = None
    peak_rss_generate_bytes: int | None = None  # VmHWM of the generation alone
    peak_rss_sampled_bytes: int | None = None  # parent's 10 Hz sampling of VmRSS, a cross-check
    peak_rss_anon_sampled_bytes: int | None = None
    peak_rss_file_sampled_bytes: int | None = None  # file pages mapped into the process (mmap)
    disk_read_load_bytes: int | None = None
    disk_read_generate_bytes: int | None = None
    disk_write_load_bytes: int | None = None
    engine_bytes_moved: int | None = None
    peak_page_cache_bytes: int | None = None  # checkpoint + offload bytes in the page cache, sampled
    page_cache_after_bytes: int | None = None  # the same, after the run
    max_memory_bytes: int | None = None  # accelerate's max_memory["cpu"]
    device_map_summary: dict | None = None
    # Kernel memory cap (cgroup): the limit, whether one was enforced, the cgroup's peak charge
    # (anonymous memory + page cache + kernel memory) for the whole run and for the generation alone,
    # OOM kills and how often the charge hit the limit (each hit reclaims page cache in the cgroup).
    memory_cap_bytes: int | None = None
    memory_cap_enforced: bool = False
    cgroup_peak_bytes: int | None = None
    cgroup_peak_generate_bytes: int | None = None
    cgroup_oom_kills: int | None = None
    cgroup_limit_hits: int | None = None
    cgroup: dict | None = None
    peak_memory_bytes: int | None = None  # the figure compared: cgroup peak when measured, else peak RSS
    engine_stats: dict | None = None
    engine_decode_stats: dict | None = None  # engine counters over the decode steps alone (after token 1)
    decode_threads: dict | None = None  # CPU / run-queue-wait seconds of the threads over the decode steps
    tokens: list[int] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)  # since generate() was called
