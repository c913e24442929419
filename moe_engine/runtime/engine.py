"""The engine: one object per offloaded model tying store, cache, mover, predictor and stats together,
and the ``OffloadedExperts`` module that replaces each MoE layer's experts module on the model instance.

Data flow of one MoE layer (see DESIGN.md): the model's own router produces ``top_k_index`` and
``top_k_weights``; ``OffloadedExperts.forward`` (same signature as transformers' fused experts) hands
them to ``Engine.experts_forward``, which asks the predictor about the next layers and prefetches,
then computes every routed expert as the cache yields it (resident ones first) and sums the outputs in
expert order, exactly as the stock module does, so results are bit-identical whatever the load order.

Prefill and decode have separate expert policies (``EngineConfig.prefill_policy``): a forward pass
with more than one new position per sequence is a *prefill* (the loader's hook on the decoder says so,
per calling thread; ``Engine.prefill()`` sets it by hand). With ``"stream"`` (the default) a prefill
streams its experts through the residency core's streaming mode: loads are the first victims
afterwards, hits do not reorder the decode working set, at most ``prefill_window`` decode entries are
displaced, and the next layer's experts are read ahead (the predictor's union over the tokens, or all
of them when the batch routes at least 4 tokens per expert) as this layer's computes free room.
``"shared"``: a prefill is treated like any decode step.

Example::

    model = moe_engine.from_pretrained(path, budget=0.25)
    model.engine.stats().hit_rate
    model.engine.reset_stats()
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from moe_engine.runtime.cache import ExpertCache
from moe_engine.runtime.config import EngineConfig
from moe_engine.runtime.interrupts import deferred_interrupts, interruptible
from moe_engine.runtime.kernels import ExpertsKernel, make_kernel
from moe_engine.runtime.mover import Mover
from moe_engine.runtime.policies import ExpertKey
from moe_engine.runtime.residency import (
    Compute,
    Load,
    PrefetchRule,
    Residency,
    prediction_probs,
    preload_order,
)
from moe_engine.runtime.stats import EngineStats
from moe_engine.runtime.store import CheckpointStore


@dataclass(frozen=True)
class MoELayerInfo:
    """One MoE layer of the model: its decoder-layer index and expert shapes."""

    moe_index: int
    decoder_layer: int
    num_experts: int
    top_k: int


# A prefill reads ahead the next layer's experts that at least one token needs with this probability.
STREAM_MIN_PROB = 0.05


class ModelClosedError(RuntimeError):
    """The offloaded model was closed; load it again to use it."""


def _shutdown(mover: Mover, store: CheckpointStore) -> None:
    """Stop the copies and threads and close the files (``close()``, or the finalizer of a dropped engine)."""
    try:
        mover.close()
    finally:
        store.close()


def _serialized(method):
    """Run an engine method under the engine's lock: one MoE layer at a time per model, whatever the
    number of threads calling it (the cache's slots are shared by every caller)."""

    @functools.wraps(method)
    def wrapper(self: Engine, *args, **kwargs):
        # Ctrl-C held back while the lock is taken and given back, acting at once in between
        # (``interruptible``): an interrupt can never leave the lock held for other threads.
        with deferred_interrupts(), self.lock, interruptible():
            if self.closed:
                raise ModelClosedError(
                    "this moe-engine model was closed (close() or the end of its `with` block); "
                    "load it again with moe_engine.from_pretrained to use it"
                )
            if args and args[0] == 0:  # a new forward pass (MoE layer 0): the files must not have changed
                check = getattr(self.store, "check_unchanged", None)
                if check is not None:
                    check()
            return method(self, *args, **kwargs)

    return wrapper


class Engine:
    def __init__(
        self,
        *,
        config: EngineConfig,
        store: CheckpointStore,
        core: Residency,
        cache: ExpertCache,
        mover: Mover,
        layers: list[MoELayerInfo],
        budget_bytes: int,
        predictor=None,
        device: torch.device,
    ) -> None:
        self.config = config
        self.store = store
        self.core = core
        self.cache = cache
        self.mover = mover
        self.layers = layers
        self.budget_bytes = budget_bytes
        self.predictor = predictor
        self.device = device
        self.prefetch_rule = PrefetchRule(per_layer=config.prefetch_per_layer, min_prob=config.prefetch_min_prob)
        self.lock = threading.RLock()
        self.closed = False
        self.sizing = None  # moe_engine.runtime.quality.ExpertSizing when copies of several sizes exist
        self.guardrail = None  # moe_engine.runtime.guardrail.Guardrail when installed
        # During a guardrail reference pass: MoE layer -> relative error of the reduced copies' output.
        self.reference: dict[int, float] | None = None
        self._history: torch.Tensor | None = None  # [T, L, K] experts chosen so far in this forward pass
        self._history_len = 0
        self._phase = threading.local()  # .prefill: the calling thread's forward pass is a prefill
        # Dropping the last reference to the engine (the model) stops its threads and closes its files;
        # the finalizer holds no reference to the engine, the cache or the slots.
        self._finalizer = weakref.finalize(self, _shutdown, mover, store)

    # ------------------------------------------------------------------ stats
    @property
    def expert_bytes(self) -> int:
        return self.cache.expert_bytes

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def predict_seconds(self) -> float:
        """Seconds spent predicting and issuing prefetches since the last reset."""
        return self.core.predict_seconds

    def stats(self) -> EngineStats:
        """A snapshot of the counters (the residency core owns them; the guardrail adds its own)."""
        with deferred_interrupts(), self.lock:
            st = self.core.stats()
            if self.guardrail is not None:
                st.guardrail_checks = self.guardrail.checks
                st.guardrail_fallbacks = self.guardrail.fallbacks
                st.guardrail_max_kl = self.guardrail.max_kl
            return st

    def reset_stats(self) -> None:
        """Zero the counters (residency is kept; peak resident bytes restarts from the current residency)."""
        with deferred_interrupts(), self.lock:
            self.core.reset_stats()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop copies and I/O threads, close the checkpoint files and free the slots. Idempotent;
        afterwards any forward pass raises ``ModelClosedError``."""
        with deferred_interrupts(), self.lock:
            if self.closed:
                return
            self.closed = True
            self._finalizer()  # mover.close() then store.close(); runs once
            self.cache.free_memory()
            self.cache.tickets.clear()

    # ------------------------------------------------------------------ cold start
    def preload(self, progress: bool = False, owned: list[list[int]] | None = None) -> int:
        """Fill the fast tier's free room with experts now, so the first forward passes do not start
        from an empty cache (stock offloading fills its memory at load too). Layers take turns, experts
        in index order, so each MoE layer gets the same share: with no routing seen yet nothing says
        which experts are hot, and a prefill needs every layer's. Counters are reset afterwards (the
        reads are load time, not a forward pass's). ``owned``: per MoE layer, the only experts to read
        (expert parallelism: this rank's). Returns how many experts were read
        (``moe_engine.runtime.residency.preload_order``; the simulator's ``SimConfig(preload=True)``)."""
        with deferred_interrupts(), self.lock, interruptible():
            if self.closed:
                raise ModelClosedError("this model was closed; load it again with moe_engine.from_pretrained")
            keys = preload_order([info.num_experts for info in self.layers], owned)
            with deferred_interrupts():
                loads = self.core.preload(keys)
                for load in loads:
                    self.cache._submit(load)
            from tqdm.auto import tqdm

            for load in tqdm(loads, desc="preloading experts", unit="expert", disable=not progress):
                self.cache._await(Compute(load.key, load.slot, hit=False))
            self.core.reset_stats()
            return len(loads)

    # ------------------------------------------------------------------ prefill vs decode
    @contextlib.contextmanager
    def prefill(self, on: bool = True):
        """Within this context the calling thread's forward passes are prefills (``on``) or decode steps,
        whatever their shape (otherwise the loader's hook on the decoder decides for each forward pass:
        a prefill has more than one new position per sequence)."""
        with self._thread_setting("forced", on):
            yield

    @contextlib.contextmanager
    def expected_experts(self, keys):
        """Within this context the calling thread's decode steps prefetch, for each next MoE layer, the
        ``(layer, expert)`` keys given here instead of asking the predictor: for a caller that knows a
        step's routing better (the server remembers where each token id was routed). ``keys`` may repeat
        a key (one per sequence expecting it): the most expected go first, and at most
        ``prefetch_per_layer`` per layer and step, the predictor's cap (a batch expecting every expert
        of a layer would otherwise prefetch the whole layer at every step). Only where prefetch is on (a
        predictor is configured)."""
        counts = collections.Counter((int(layer), int(e)) for layer, e in keys)
        plan: dict[int, list[int]] = {}
        for (layer, e), _ in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1])):
            plan.setdefault(layer, []).append(e)
        with self._thread_setting("plan", plan):
            yield

    @contextlib.contextmanager
    def _thread_setting(self, name: str, value):
        """Set the calling thread's ``name`` (in ``self._phase``) within the block; the old value after."""
        old = getattr(self._phase, name, None)
        setattr(self._phase, name, value)
        try:
            yield
        finally:
            setattr(self._phase, name, old)

    def _prefetch_planned(self, layer: int, plan: dict[int, list[int]]) -> list[Load]:
        """``_prefetch`` from a caller's plan (``expected_experts``): the next layer's planned experts."""
        t0 = time.perf_counter()
        try:
            ranked = [(layer + 1, e) for e in plan.get(layer + 1, ())]
            with deferred_interrupts():
                return self.core.prefetch(ranked, limit=self.config.prefetch_per_layer)
        finally:
            self.core.predict_seconds += time.perf_counter() - t0

    def mark_forward(self, new_positions: int) -> None:
        """The calling thread starts a forward pass with ``new_positions`` positions per sequence."""
        self._phase.prefill = new_positions > 1

    def _is_prefill(self) -> bool:
        forced = getattr(self._phase, "forced", None)
        return forced if forced is not None else getattr(self._phase, "prefill", False)

    def stream_layer(self, layer: int) -> bool:
        """Put the core in streaming mode for this layer when the calling thread runs a prefill."""
        on = self.config.prefill_policy == "stream" and self._is_prefill()
        if on or self.core.streaming:
            window = max(1, int(self.config.prefill_window * self.core.num_slots))
            ended = self.core.streaming and not on
            self.core.set_streaming(on, window=window, new_pass=layer == 0)
            # A prefill reads each layer's experts in file order: let the kernel read ahead
            # (``moe_engine.runtime.store``), and drop what it read past the stream once it ends.
            self.store.sequential = on
            if (ended or (on and layer == 0)) and not self.store.page_cache:
                self.store.drop_page_cache()  # also restarts the store's record of the stream's position
        return on

    def _read_ahead(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> list[Load]:
        """Streaming: the next layer's experts, ascending (its compute order), for the core to read ahead:
        the predictor's union over the tokens (probability >= ``STREAM_MIN_PROB``), or every expert of
        the layer when there is no predictor and the batch routes at least 4 tokens per expert."""
        target = layer + 1
        info = self.layers[target]
        if self.predictor is not None:
            keys = self._predicted(layer, hidden, top_k_index, target)
        elif top_k_index.numel() >= 4 * info.num_experts:
            keys = [(target, e) for e in range(info.num_experts)]
        else:
            keys = []
        self.core.stream_ahead(keys)
        return []

    def _predicted(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, target: int) -> list[ExpertKey]:
        t0 = time.perf_counter()
        try:
            ctx = self._context(layer, hidden, top_k_index)
            if ctx is None:
                return []
            scores = self.predictor.scores(ctx, target - layer)
            probs = prediction_probs(scores.detach().float().cpu().numpy(), self.layers[target].top_k)
            p = 1.0 - (1.0 - probs.astype("float64")).prod(axis=0)
            return [(target, int(e)) for e in (p >= STREAM_MIN_PROB).nonzero()[0].tolist()]
        finally:
            self.core.predict_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ prefetch
    def _context(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor):
        """The predictor's view of this forward pass at ``layer`` (None when the history was broken)."""
        from moe_engine.predictors.base import PredictionContext

        # The forward pass's experts so far, [T, L, K], written layer by layer (views, no re-stacking).
        hist = self._history
        fits = hist is not None and hist.shape[0] == top_k_index.shape[0] and hist.shape[2] == top_k_index.shape[1]
        if layer == 0 and not fits:
            hist = self._history = top_k_index.new_empty(top_k_index.shape[0], self.num_layers, top_k_index.shape[1])
        elif layer != 0 and (not fits or self._history_len != layer):
            self._history_len = -1  # another caller's pass interleaved, or the batch changed: no history
            return None
        assert hist is not None
        hist[:, layer] = top_k_index
        self._history_len = layer + 1
        return PredictionContext(layer=layer, history=hist[:, : layer + 1], gate_input=hidden)

    def _prefetch(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> list[Load]:
        """Score layers ``layer+1 .. layer+d`` with the predictor; the core admits the prefetches.

        Per target layer, each token's scores become probabilities (``scores_to_probs``), tokens are
        combined and the prefetch rule ranks the candidates (``PrefetchRule``), as in the simulator.
        """
        t0 = time.perf_counter()
        try:
            ctx = self._context(layer, hidden, top_k_index)
            if ctx is None:
                return []
            ranked: list[ExpertKey] = []
            scored: dict[ExpertKey, float] = {}
            for d in range(1, self.config.prefetch_distance + 1):
                target = layer + d
                if target >= self.num_layers:
                    break
                scores = self.predictor.scores(ctx, d)  # [T, E]
                probs = prediction_probs(scores.detach().float().cpu().numpy(), self.layers[target].top_k)
                r, s = self.prefetch_rule.layer_candidates(target, probs)
                ranked.extend(r)
                scored.update(s)
            with deferred_interrupts():
                self.core.observe(scored)
                return self.core.prefetch(ranked, limit=len(ranked))
        finally:
            self.core.predict_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ compute
    @_serialized
    def experts_forward(
        self,
        layer: int,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        kernel: ExpertsKernel,
        num_experts: int,
    ) -> torch.Tensor:
        """Same contract as transformers' fused ``*Experts.forward``: ``hidden_states [T, H]``,
        ``top_k_index [T, K]``, ``top_k_weights [T, K]`` -> ``[T, H]``, computed by ``kernel`` (the
        model's ``experts_implementation``, ``moe_engine.runtime.kernels``) with stock's exact bits."""
        if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
            raise RuntimeError(
                f"moe-engine is inference-only: MoE layer {layer} was called while autograd records "
                "(gradients are enabled and its input requires grad), but offloaded experts live in cache "
                "slots that later copies overwrite and have no gradients. Wrap the call in "
                "`with torch.no_grad():` or `with torch.inference_mode():` (generate() already runs without "
                "grad), and keep the loaded model's parameters frozen (from_pretrained sets requires_grad=False)"
            )
        if self.reference is not None:
            return self._reference_forward(layer, hidden_states, top_k_index, top_k_weights, kernel, num_experts)
        with torch.no_grad():
            plan = kernel.plan(hidden_states, top_k_index, top_k_weights, num_experts)
            streaming = self.stream_layer(layer)
            # Prefetches (or a prefill's read-ahead) for the next layers are issued once this layer's
            # demand loads are queued.
            after_submit = None
            if layer + 1 >= self.num_layers:
                pass  # nothing to predict after the last layer
            elif streaming:
                after_submit = functools.partial(self._read_ahead, layer, hidden_states, top_k_index)
            elif self.predictor is not None:
                expected = getattr(self._phase, "plan", None)
                if expected is not None:
                    after_submit = functools.partial(self._prefetch_planned, layer, expected)
                else:
                    after_submit = functools.partial(self._prefetch, layer, hidden_states, top_k_index)
            # Weights arrive in residency order; the plan keeps only computed rows from each slot and
            # combines them as stock does, so the result does not depend on that order.
            for e, gate_up, down in self.cache.iter_experts(layer, plan.experts, after_submit):
                plan.compute(e, gate_up, down)
            return plan.result()


    def _read_copy(self, key: ExpertKey, variant: int) -> tuple:
        """One copy of an expert read straight from the store into a fresh buffer (no residency change)."""
        cache = self.cache
        loc = cache.locate(key) if variant == 0 or cache.locate_variant is None else cache.locate_variant(key, variant)
        nbytes = cache.layout.nbytes(key, variant)
        buf = torch.empty(nbytes // cache.layout.dtype.itemsize, dtype=cache.layout.dtype)
        self.store.read_expert_into(loc, buf)
        if self.device.type != "cpu":
            buf = buf.to(self.device)
        return cache.layout.views(buf, key, variant)

    def _reference_forward(self, layer, hidden_states, top_k_index, top_k_weights, kernel, num_experts):
        """The guardrail's reference pass: this layer with every routed expert at its own format, read from
        the store (the cache is left alone), and the relative error of the copies a demand load would
        bring under the quality setting, on the same input."""
        with torch.no_grad():
            full = kernel.plan(hidden_states, top_k_index, top_k_weights, num_experts)
            reduced = kernel.plan(hidden_states, top_k_index, top_k_weights, num_experts)
            for e in full.experts:
                key = (layer, e)
                own = self._read_copy(key, 0)
                full.compute(e, *own)
                variant = self.sizing.size_of(key, False)[1] if self.sizing is not None else 0
                reduced.compute(e, *(own if variant == 0 else self._read_copy(key, variant)))
            out, approx = full.result(), reduced.result()
            norm = float(out.float().norm())
            assert self.reference is not None
            self.reference[layer] = float((approx.float() - out.float()).norm()) / norm if norm > 0 else 0.0
            return out


class OffloadedExperts(nn.Module):
    """Drop-in replacement for a transformers fused experts module whose weights live in the engine.

    ``implementation`` is transformers' ``experts_implementation`` the stock module would run
    (``"grouped_mm"``, the 5.x default, or ``"eager"``); the engine reproduces its bits
    (``moe_engine.runtime.kernels``)."""

    def __init__(
        self,
        moe_index: int,
        num_experts: int,
        intermediate: int,
        hidden: int,
        act_fn,
        implementation: str | None = "grouped_mm",
    ) -> None:
        super().__init__()
        self.moe_index = moe_index
        self.num_experts = num_experts
        self.intermediate_dim = intermediate
        self.hidden_dim = hidden
        self.act_fn = act_fn
        self.set_implementation(implementation)
        self._engine: Engine | None = None  # plain attribute: the engine is not a submodule

    def set_implementation(self, implementation: str | None) -> None:
        """Compute with transformers' ``experts_implementation`` ``implementation`` from now on
        (``moe_engine.runtime.kernels.available_kernels()``; ``None``: eager, as transformers does)."""
        self.kernel = make_kernel(implementation, self.act_fn)
        self.implementation = self.kernel.name

    @classmethod
    def from_stock(cls, moe_index: int, stock: nn.Module) -> OffloadedExperts:
        """The replacement for ``stock`` (a transformers fused experts module, possibly on the meta
        device): its shapes, activation and the ``experts_implementation`` its config resolved to."""
        from transformers.integrations.moe import _default_apply_gate

        unsupported = [
            flag for flag, default in (("has_bias", False), ("is_transposed", False), ("has_gate", True),
                                       ("has_post_expert_norm", False), ("is_concatenated", True))
            if getattr(stock, flag, default) != default
        ]  # fmt: skip
        gate_fn = getattr(type(stock), "_apply_gate", _default_apply_gate)
        if unsupported or gate_fn is not _default_apply_gate:
            raise NotImplementedError(
                f"{type(stock).__name__}: moe-engine offloads experts with concatenated gate_up [E, 2I, H] and "
                f"down [E, H, I] weights, no biases and the default gate; this class differs "
                f"({', '.join(unsupported) or 'custom _apply_gate'})"
            )
        n_exp, two_i, hidden = tuple(stock.gate_up_proj.shape)  # type: ignore[arg-type]
        implementation = getattr(getattr(stock, "config", None), "_experts_implementation", None)
        return cls(moe_index, n_exp, two_i // 2, hidden, stock.act_fn, implementation)

    def attach(self, engine: Engine) -> None:
        object.__setattr__(self, "_engine", engine)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self._engine is None:
            raise RuntimeError("OffloadedExperts used before an engine was attached")
        return self._engine.experts_forward(
            self.moe_index, hidden_states, top_k_index, top_k_weights, self.kernel, self.num_experts
        )

    def extra_repr(self) -> str:
        return f"moe_index={self.moe_index}, num_experts={self.num_experts}, implementation={self.implementation}, offloaded"
