"""The engine: one object per offloaded model tying store, cache, mover, predictor and stats together,
and the ``OffloadedExperts`` module that replaces each MoE layer's experts module on the model instance.

Data flow of one MoE layer (see DESIGN.md): the model's own router produces ``top_k_index`` and
``top_k_weights``; ``OffloadedExperts.forward`` (same signature as transformers' fused experts) hands
them to ``Engine.experts_forward``, which asks the predictor about the next layers and prefetches,
then computes every routed expert as the cache yields it (resident ones first) and sums the outputs in
expert order, exactly as the stock module does, so results are bit-identical whatever the load order.

Example::

    model = moe_engine.from_pretrained(path, budget=0.25)
    model.engine.stats().hit_rate
    model.engine.reset_stats()
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from moe_engine.runtime.cache import ExpertCache
from moe_engine.runtime.config import EngineConfig
from moe_engine.runtime.interrupts import deferred_interrupts
from moe_engine.runtime.mover import Mover
from moe_engine.runtime.policies import ExpertKey
from moe_engine.runtime.residency import Load, PrefetchRule, Residency, scores_to_probs
from moe_engine.runtime.stats import EngineStats
from moe_engine.runtime.store import CheckpointStore


@dataclass(frozen=True)
class MoELayerInfo:
    """One MoE layer of the model: its decoder-layer index and expert shapes."""

    moe_index: int
    decoder_layer: int
    num_experts: int
    top_k: int


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
        with self.lock:
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
        self._history: torch.Tensor | None = None  # [T, L, K] experts chosen so far in this forward pass
        self._history_len = 0
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
        """A snapshot of the counters (the residency core owns them)."""
        with self.lock:
            return self.core.stats()

    def reset_stats(self) -> None:
        """Zero the counters (residency is kept; peak resident bytes restarts from the current residency)."""
        with self.lock:
            self.core.reset_stats()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop copies and I/O threads, close the checkpoint files and free the slots. Idempotent;
        afterwards any forward pass raises ``ModelClosedError``."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self._finalizer()  # mover.close() then store.close(); runs once
            self.cache.slots = torch.empty(0, dtype=self.cache.slots.dtype, device=self.cache.slots.device)
            self.cache.tickets.clear()

    # ------------------------------------------------------------------ prefetch
    def _prefetch(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> list[Load]:
        """Score layers ``layer+1 .. layer+d`` with the predictor; the core admits the prefetches.

        Per target layer, each token's scores become probabilities (``scores_to_probs``), tokens are
        combined and the prefetch rule ranks the candidates (``PrefetchRule``), as in the simulator.
        """
        from moe_engine.predictors.base import PredictionContext

        t0 = time.perf_counter()
        try:
            # The forward pass's experts so far, [T, L, K], written layer by layer (views, no re-stacking).
            hist = self._history
            fits = hist is not None and hist.shape[0] == top_k_index.shape[0] and hist.shape[2] == top_k_index.shape[1]
            if layer == 0 and not fits:
                hist = self._history = top_k_index.new_empty(top_k_index.shape[0], self.num_layers, top_k_index.shape[1])
            elif layer != 0 and (not fits or self._history_len != layer):
                self._history_len = -1  # another caller's pass interleaved, or the batch changed: no history
                return []
            assert hist is not None
            hist[:, layer] = top_k_index
            self._history_len = layer + 1
            ctx = PredictionContext(layer=layer, history=hist[:, : layer + 1], gate_input=hidden)
            ranked: list[ExpertKey] = []
            scored: dict[ExpertKey, float] = {}
            for d in range(1, self.config.prefetch_distance + 1):
                target = layer + d
                if target >= self.num_layers:
                    break
                scores = self.predictor.scores(ctx, d)  # [T, E]
                probs = scores_to_probs(scores.detach().float().cpu().numpy(), self.layers[target].top_k)
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
        act_fn,
        num_experts: int,
    ) -> torch.Tensor:
        """Same contract as transformers' fused ``*Experts.forward``: ``hidden_states [T, H]``,
        ``top_k_index [T, K]``, ``top_k_weights [T, K]`` -> ``[T, H]``."""
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=num_experts + 1)  # [T, K, E+1]
            expert_mask = expert_mask.permute(2, 1, 0)  # [E+1, K, T]
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        experts = [e for e in hit if e != num_experts]
        # Prefetches for the next layers are issued once this layer's demand loads are queued.
        after_submit = None
        if self.predictor is not None and layer + 1 < self.num_layers:  # nothing to predict after the last layer
            after_submit = functools.partial(self._prefetch, layer, hidden_states, top_k_index)

        outputs: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for e, gate_up, down in self.cache.iter_experts(layer, experts, after_submit):
            top_k_pos, token_idx = torch.where(expert_mask[e])
            current_state = hidden_states[token_idx]
            gate, up = nn.functional.linear(current_state, gate_up).chunk(2, dim=-1)
            current = act_fn(gate) * up
            current = nn.functional.linear(current, down)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            outputs.append((e, token_idx, current))
        # Sum in expert order, as the stock module does, so the result does not depend on load order.
        final = torch.zeros_like(hidden_states)
        for _, token_idx, current in sorted(outputs, key=lambda o: o[0]):
            final.index_add_(0, token_idx, current.to(final.dtype))
        return final


class OffloadedExperts(nn.Module):
    """Drop-in replacement for a transformers fused experts module whose weights live in the engine."""

    def __init__(self, moe_index: int, num_experts: int, intermediate: int, hidden: int, act_fn) -> None:
        super().__init__()
        self.moe_index = moe_index
        self.num_experts = num_experts
        self.intermediate_dim = intermediate
        self.hidden_dim = hidden
        self.act_fn = act_fn
        self._engine: Engine | None = None  # plain attribute: the engine is not a submodule

    def attach(self, engine: Engine) -> None:
        object.__setattr__(self, "_engine", engine)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self._engine is None:
            raise RuntimeError("OffloadedExperts used before an engine was attached")
        return self._engine.experts_forward(
            self.moe_index, hidden_states, top_k_index, top_k_weights, self.act_fn, self.num_experts
        )

    def extra_repr(self) -> str:
        return f"moe_index={self.moe_index}, num_experts={self.num_experts}, offloaded"
