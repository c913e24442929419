"""Trace-driven simulator of the fast-tier expert cache: policy, prefetch and projected time, no tensors moved.

It replays a routing trace in decode order (token by token, and within a token MoE layer by MoE layer)
through the runtime's own residency core (``moe_engine.runtime.residency``: the same slots, states,
layer schedule, prefetch rule and eviction policies the runtime cache runs, with a virtual clock in
place of real copies), and reports what the runtime would see: demand hit rate, bytes moved (demand loads + prefetches),
wasted prefetches, and, with a hardware profile, projected time per token. Belady's offline optimum
(evict the resident expert whose next use is farthest away) runs on the same access sequence as the
reference no online policy can beat without prefetch.

Glossary:

* step: one (token, MoE layer) pair; its K routed experts must all be resident before it computes.
* demand hit rate: share of the K experts per step already resident (possibly thanks to a prefetch) when
  the step starts, ready or late. ``ready_hits`` / ``late_hits`` split them on the reported profile's
  clock: a late hit was still in flight and its remaining transfer time shows up as stall time.
* wasted prefetch: a prefetched expert evicted (or left at the end) without ever being used.
* capacity: number of expert slots, ``max(K, round(budget * L * E))`` unless ``SimConfig.capacity``
  gives it (below K the layer runs in waves, as in the runtime).
* prefetch: after a step's demand loads are started, the predictor's probabilities for the next
  ``distance`` layers of the same token reach the policy (``observe_scores``); with prefetch on, the
  likeliest non-resident experts (``PrefetchRule``: at most ``prefetch_per_layer`` per predicted layer,
  probability >= ``prefetch_min_prob``) are loaded, evicting the policy's victims but never the running
  step's experts or this step's predictions: the runtime's rule, from the same code.
* time projection, per hardware profile: one copy stream serving copies in issue order (a step's demand
  loads, then its prefetches); a step computes once its experts have arrived (``K`` experts streamed at
  ``compute_bytes_per_s``, plus ``layer_overhead_s``); stall = time a step waits for copies.

Example::

    trace = load_trace("../shared/traces/dsv2lite-esft-intent.npz")
    res = simulate(trace, SimConfig(budget=0.25, policy="lru"))
    res.hit_rate, res.belady_hit_rate, res.bytes_moved
"""

from __future__ import annotations

import heapq
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from moe_engine.offline.traces import RoutingTrace
from moe_engine.runtime.policies import EvictionPolicy, ExpertKey, fit_reuse_weights, make_policy
from moe_engine.runtime.residency import (
    Compute,
    Load,
    PrefetchRule,
    Residency,
    prediction_probs,
    preload_order,
    scores_to_probs,
)

if TYPE_CHECKING:
    from moe_engine.predictors.base import Predictor

#: bf16 bytes of one routed expert of DeepSeek-V2-Lite (3 matrices of 2048 x 1408), the model of the
#: shared traces; traces recorded by ``moe-engine trace`` carry their own ``expert_bytes`` in ``meta``.
DSV2_LITE_EXPERT_BYTES = 3 * 2048 * 1408 * 2


@dataclass(frozen=True)
class HardwareProfile:
    """Costs of the two tiers, for the time projection.

    ``transfer_bytes_per_s``: slow -> fast tier copy bandwidth (one copy stream, transfers in FIFO order).
    ``compute_bytes_per_s``: expert weight bytes the compute device streams through per second in a decode
    step (decode is memory-bound: one token's expert FFN reads the whole expert once).
    ``measured``: where the transfer figure comes from (a date for figures measured on this machine).
    """

    name: str
    transfer_bytes_per_s: float
    compute_bytes_per_s: float
    measured: str

    def __post_init__(self) -> None:
        if self.transfer_bytes_per_s <= 0 or self.compute_bytes_per_s <= 0:
            raise ValueError(f"hardware profile {self.name!r}: bandwidths must be > 0")


PROFILES: dict[str, HardwareProfile] = {
    # PCIe 4.0 x16: 31.5 GB/s raw per direction; pinned host-to-device copies reach about 25 GB/s.
    # Compute: an H100-class GPU streams expert weights at about 2 TB/s in a decode step.
    "pcie4-x16": HardwareProfile(
        name="pcie4-x16",
        transfer_bytes_per_s=25e9,
        compute_bytes_per_s=2.0e12,
        measured="nominal: PCIe 4.0 x16 effective pinned host-to-device copy rate; GPU compute at 2 TB/s",
    ),
    # This machine's disk with the page cache bypassed, and its CPU. Measured with
    # `measure_cold_read_bandwidth()` (a 1 GiB file written, fsync'd, posix_fadvise DONTNEED, read in
    # 16 MiB chunks; median of 3 reads: 0.54 GB/s, range 0.52-0.81) and a one-thread bf16 matvec through a
    # DeepSeek-V2-Lite-sized expert (1.42 GB/s of weights, 12.2 ms per expert), both while another
    # training job shared the 2 cores.
    "disk": HardwareProfile(
        name="disk",
        transfer_bytes_per_s=0.54e9,
        compute_bytes_per_s=1.42e9,
        measured="2026-11-22, this machine (2 vCPU, virtio disk)",
    ),
}


def measure_cold_read_bandwidth(directory: str | os.PathLike, size_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """Bytes/s of a sequential read of a fresh file after ``posix_fadvise(DONTNEED)`` (median of repeats).

    Writes ``size_bytes`` of random data in ``directory``, fsyncs it so the page cache holds no dirty
    pages, then drops it from the page cache before each timed read. The file is removed afterwards.
    """
    chunk = np.random.default_rng(0).bytes(16 << 20)
    fd_, path = tempfile.mkstemp(prefix="coldread-", suffix=".bin", dir=directory)
    try:
        with os.fdopen(fd_, "wb") as f:
            for _ in range(max(1, size_bytes // len(chunk))):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        rates = []
        for _ in range(repeats):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                n = 0
                while b := os.read(fd, 16 << 20):
                    n += len(b)
                rates.append(n / (time.perf_counter() - t0))
            finally:
                os.close(fd)
        return float(np.median(rates))
    finally:
        os.unlink(path)


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. ``budget`` is the cache capacity as a share of all L * E experts."""

    budget: float
    policy: str = "auto"  # the runtime's default (moe_engine.runtime.policies.DEFAULT_POLICY)
    predictor: str | None = None  # only used for naming in results; the predictor object is passed apart
    distance: int = 1  # prediction distance: layers l+1..l+distance are scored after layer l is routed
    prefetch: bool = False  # prefetch predicted experts (needs a predictor)
    prefetch_per_layer: int = 6  # at most this many prefetches issued per step and predicted layer
    prefetch_min_prob: float = 0.25  # prefetch only experts whose predicted probability reaches this
    profile: str | None = "pcie4-x16"
    expert_bytes: int | None = None  # None: trace meta["expert_bytes"], else DeepSeek-V2-Lite's
    layer_overhead_s: float = 0.0  # non-expert compute per token and MoE layer (model-specific)
    max_tokens: int | None = None  # replay only the first tokens of the trace
    capacity: int | None = None  # slots; None: ``capacity_for(budget, ...)``
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    preload: bool = False  # start with the cache filled as the runtime's load does (Engine.preload)

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be a share of all experts in (0, 1], got {self.budget}")
        if self.distance < 1:
            raise ValueError(f"distance must be >= 1, got {self.distance}")
        if self.prefetch_per_layer < 0:
            raise ValueError("prefetch_per_layer must be >= 0")
        if self.profile is not None and self.profile not in PROFILES:
            raise ValueError(f"unknown hardware profile {self.profile!r}; choose one of: {', '.join(PROFILES)}")


@dataclass
class SimResult:
    """Counts are in experts (one expert = ``expert_bytes``), rates are shares of demand accesses."""

    settings: dict[str, Any]
    capacity: int
    tokens: int
    accesses: int
    hits: int  # resident when the step started: ready + late
    hit_rate: float  # hits / accesses (comparable with Belady's, which has no prefetch)
    ready_hits: int
    late_hits: int  # resident but still in flight on the reported profile's clock
    evictions: int
    belady_hit_rate: float
    demand_loads: int
    prefetch_loads: int
    prefetch_used: int
    wasted_prefetch: int
    bytes_moved: int
    demand_bytes: int
    prefetch_bytes: int
    wasted_prefetch_bytes: int
    expert_bytes: int
    time_per_token_s: float | None = None
    stall_per_token_s: float | None = None
    compute_per_token_s: float | None = None
    profile: dict[str, Any] | None = None
    projections: dict[str, dict[str, float]] = field(default_factory=dict)  # every profile
    per_layer_hit_rate: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def capacity_for(budget: float, num_layers: int, num_experts: int, top_k: int) -> int:
    """Slots for a budget share; at least one layer's worth of experts so every step can run."""
    return max(top_k, int(round(budget * num_layers * num_experts)))


def belady_hit_rate(expert_ids: np.ndarray, capacity: int) -> tuple[float, list[float]]:
    """Belady's offline optimum over the decode-order access sequence of ``expert_ids [T, L, K]``.

    On a miss it evicts the resident expert (not needed by the running step) whose next use is the
    farthest away. Returns (hit rate, per-layer hit rates).
    """
    ids = np.asarray(expert_ids, dtype=np.int64)
    T, L, K = ids.shape
    never = T * L + 1
    # next_step[t, l, k]: the step index at which expert ids[t, l, k] is next used at layer l after token t.
    next_step = np.full((T, L, K), never, dtype=np.int64)
    for layer in range(L):
        last: dict[int, int] = {}
        col = ids[:, layer, :].tolist()
        for t in range(T - 1, -1, -1):
            row = col[t]
            for k, e in enumerate(row):
                next_step[t, layer, k] = last.get(e, never)
            for e in row:
                last[e] = (t * L) + layer
    nxt = next_step.tolist()
    cur_next: dict[int, int] = {}  # key code -> step of next use
    heap: list[tuple[int, int]] = []  # (-next_use, key code), lazily invalidated
    hits = 0
    layer_hits = [0] * L
    all_ids = ids.tolist()
    for t in range(T):
        for layer in range(L):
            row = all_ids[t][layer]
            codes = [layer * 65536 + e for e in row]
            missing = [c for c in codes if c not in cur_next]
            h = K - len(missing)
            hits += h
            layer_hits[layer] += h
            now = t * L + layer
            for c in codes:  # pin the running step's experts: their next use is now
                if c in cur_next:
                    cur_next[c] = now
            for c in missing:
                if len(cur_next) >= capacity:
                    while True:
                        neg, v = heapq.heappop(heap)
                        if cur_next.get(v) == -neg and -neg != now:
                            del cur_next[v]
                            break
                cur_next[c] = now
            for k, c in enumerate(codes):
                nu = nxt[t][layer][k]
                cur_next[c] = nu
                heapq.heappush(heap, (-nu, c))
            if len(heap) > 8 * capacity + 64:  # drop stale entries now and then
                heap = [(-nu, c) for c, nu in cur_next.items()]
                heapq.heapify(heap)
    total = T * L * K
    return hits / total, [layer_hits[i] / (T * K) for i in range(L)]


def _expert_bytes(trace: RoutingTrace, cfg: SimConfig) -> int:
    if cfg.expert_bytes is not None:
        return int(cfg.expert_bytes)
    return int(trace.meta.get("expert_bytes", DSV2_LITE_EXPERT_BYTES))


class _Timeline:
    """Projected time on one hardware profile: one FIFO copy stream, compute after a step's experts arrive."""

    def __init__(self, profile: HardwareProfile, expert_bytes: int, layer_overhead_s: float, top_k: int) -> None:
        self.profile = profile
        self.t_copy = expert_bytes / profile.transfer_bytes_per_s
        self.t_step = layer_overhead_s + top_k * expert_bytes / profile.compute_bytes_per_s
        self.now = self.link_free = self.stall = self.compute = 0.0
        self.start = self.ready = 0.0
        self.arrival: dict[ExpertKey, float] = {}  # prefetches in flight (or arrived, not yet used)

    def step_begin(self) -> None:
        self.start = self.ready = self.now

    def hit(self, key: ExpertKey) -> None:
        a = self.arrival.pop(key, None)
        if a is not None:  # a prefetch still in flight: wait for the rest of it
            self.ready = max(self.ready, a)

    def demand_load(self) -> None:
        self.link_free = max(self.link_free, self.start) + self.t_copy
        self.ready = max(self.ready, self.link_free)

    def step_end(self) -> None:
        self.stall += self.ready - self.start
        self.compute += self.t_step
        self.now = self.ready + self.t_step

    def prefetch(self, key: ExpertKey) -> None:
        # Issued once the layer is routed; the copy queues behind earlier copies.
        self.link_free = max(self.link_free, self.start) + self.t_copy
        self.arrival[key] = self.link_free

    def evict(self, key: ExpertKey) -> None:
        self.arrival.pop(key, None)

    def summary(self, tokens: int) -> dict[str, float]:
        return {
            "time_per_token_s": self.now / tokens,
            "stall_per_token_s": self.stall / tokens,
            "compute_per_token_s": self.compute / tokens,
        }


def fit_policy_kwargs(
    policy: str,
    train: Sequence[RoutingTrace],
    num_experts: int,
    predictor: Predictor | None = None,
    distance: int = 1,
) -> dict[str, Any]:
    """Keyword arguments fitting ``policy`` to training traces (only ``predictive`` has any: its reuse
    weights, with the predictor's scores on the training traces when a predictor is given)."""
    if policy != "predictive" or not train:
        return {}
    scores = None
    if predictor is not None:
        scores = []
        for tr in train:
            L = tr.num_layers
            scores.append(
                [scores_to_probs(predictor.trace_scores(tr, d), tr.top_k).astype(np.float32) for d in range(1, min(distance, L - 1) + 1)]
            )
    return {"weights": fit_reuse_weights([t.expert_ids for t in train], num_experts, scores=scores)}


def simulate(
    trace: RoutingTrace,
    cfg: SimConfig,
    predictor: Predictor | None = None,
    policy: EvictionPolicy | None = None,
    with_belady: bool = True,
    log: list[tuple[str, ExpertKey]] | None = None,
    progress: bool = False,
) -> SimResult:
    """Replay ``trace`` in decode order through the residency core; see the module docstring.

    ``log``: when a list, the core appends every decision to it (the runtime equivalence test).
    ``progress``: a progress bar over tokens on stderr.
    """
    t0 = time.perf_counter()
    ids = np.asarray(trace.expert_ids, dtype=np.int64)
    starts = trace.sequence_starts
    if cfg.max_tokens is not None:
        n = min(cfg.max_tokens, ids.shape[0])
        ids = ids[:n]
        starts = np.concatenate([starts[starts < n], [n]])
        trace = RoutingTrace(
            expert_ids=trace.expert_ids[:n],
            expert_weights=trace.expert_weights[:n],
            sequence_starts=starts.astype(np.int64),
            meta=trace.meta,
            gate_inputs=None if trace.gate_inputs is None else trace.gate_inputs[:n],
        )
    T, L, K = ids.shape
    E = trace.num_experts
    capacity = cfg.capacity if cfg.capacity is not None else capacity_for(cfg.budget, L, E, K)
    if policy is None:
        policy = make_policy(cfg.policy, num_layers=L, num_experts=E, capacity=capacity, **cfg.policy_kwargs)
    if cfg.prefetch and predictor is None:
        raise ValueError("prefetch needs a predictor (--predictor NAME)")
    expert_bytes = _expert_bytes(trace, cfg)
    # With a profile, every profile is projected (cheap); cfg.profile picks the one reported in the
    # top-level fields and the clock that decides whether a prefetched expert has arrived (ready) or is
    # late. Without one (profile=None) nothing is timed and every copy counts as arrived.
    clocks = [_Timeline(p, expert_bytes, cfg.layer_overhead_s, K) for p in PROFILES.values()] if cfg.profile else []
    main = next((c for c in clocks if c.profile.name == cfg.profile), None)
    core = Residency(num_slots=capacity, policy=policy, num_layers=L, expert_bytes=expert_bytes)
    if cfg.preload:  # the runtime's cold start (Engine.preload): filled at load, nothing counted
        for load in core.preload(preload_order([E] * L)):
            core.loaded(load.key)
        core.reset_stats()
    core.log = log
    rule = PrefetchRule(per_layer=cfg.prefetch_per_layer, min_prob=cfg.prefetch_min_prob)

    # probs[d - 1][t, l]: predicted probabilities for layer l + d, known after token t's layer l is routed.
    probs: list[np.ndarray] = []
    if predictor is not None:
        for d in range(1, cfg.distance + 1):
            if d >= L:
                break
            s = predictor.trace_scores(trace, d)  # [T, L - d, E]
            probs.append(prediction_probs(s, K))

    if main is None:
        def ready(key: ExpertKey) -> bool:
            return True
    else:
        def ready(key: ExpertKey) -> bool:
            return main.arrival.get(key, 0.0) <= main.start

    def predictions(t: int, layer: int) -> list[ExpertKey]:
        """This step's predictions for the next layers of token ``t``: observed, and ranked for prefetch."""
        ranked: list[ExpertKey] = []
        scored: dict[ExpertKey, float] = {}
        for d, pd in enumerate(probs, start=1):
            if layer + d >= L:
                break
            r, sc = rule.layer_candidates(layer + d, pd[t, layer])
            ranked.extend(r)
            scored.update(sc)
        core.observe(scored)
        return ranked

    all_ids = ids.tolist()
    for t in tqdm(range(T), desc="simulating", unit="token", disable=not progress, mininterval=1.0):
        for layer in range(L):
            row = all_ids[t][layer]
            if not clocks:  # nothing to time: the core's generator-free path (same decisions)
                predict = None
                if probs:

                    def predict(t: int = t, layer: int = layer) -> None:
                        ranked = predictions(t, layer)
                        if cfg.prefetch:
                            core.prefetch(ranked, limit=len(ranked))

                core.run_layer(layer, row, ready, predict)
                continue
            for c in clocks:
                c.step_begin()
            for step in core.layer_schedule(layer, row, ready):
                if type(step) is Compute:
                    if step.hit:
                        for c in clocks:
                            c.hit(step.key)
                    core.loaded(step.key)
                elif type(step) is Load:
                    for c in clocks:
                        c.demand_load()
                elif probs:  # Predict
                    ranked = predictions(t, layer)
                    if cfg.prefetch:
                        for load in core.prefetch(ranked, limit=len(ranked)):
                            for c in clocks:
                                c.prefetch(load.key)
            for c in clocks:
                c.step_end()

    st = core.stats()
    leftover = sum(1 for e in core.entries.values() if e.prefetched)  # prefetched, never used
    wasted = st.wasted_prefetches + leftover
    accesses = T * L * K
    hits = st.hits + st.late_hits
    bel, _ = belady_hit_rate(ids, capacity) if with_belady else (float("nan"), [])
    res = SimResult(
        settings={**asdict(cfg), "predictor": cfg.predictor or (predictor.name if predictor else None)},
        capacity=capacity,
        tokens=T,
        accesses=accesses,
        hits=hits,
        hit_rate=hits / accesses,
        ready_hits=st.hits,
        late_hits=st.late_hits,
        evictions=st.evictions,
        belady_hit_rate=bel,
        demand_loads=st.misses,
        prefetch_loads=st.prefetches,
        prefetch_used=st.prefetch_hits,
        wasted_prefetch=wasted,
        bytes_moved=(st.misses + st.prefetches) * expert_bytes,
        demand_bytes=st.misses * expert_bytes,
        prefetch_bytes=st.prefetches * expert_bytes,
        wasted_prefetch_bytes=wasted * expert_bytes,
        expert_bytes=expert_bytes,
        per_layer_hit_rate=[(ls.hits + ls.late_hits) / (T * K) for ls in st.per_layer],
    )
    res.projections = {c.profile.name: c.summary(T) for c in clocks}
    if cfg.profile is not None:
        proj = res.projections[cfg.profile]
        res.time_per_token_s = proj["time_per_token_s"]
        res.stall_per_token_s = proj["stall_per_token_s"]
        res.compute_per_token_s = proj["compute_per_token_s"]
        res.profile = asdict(PROFILES[cfg.profile])
    res.wall_s = time.perf_counter() - t0
    return res
