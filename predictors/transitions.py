"""Transition statistics over expert paths, fitted from routing traces (history only, training-free at run time).

First order (``transition``): how often expert ``j`` is chosen at layer ``l + d`` by a token that chose
expert ``i`` at layer ``l``; a token's score for ``j`` sums ``P(j at l+d | i at l)`` over its K experts
``i`` at layer ``l``.

Higher order (``transition_ho``): the same statistics from each of the ``order`` latest layers
``l, l-1, ..., l-order+1`` to layer ``l + d``, combined naive-Bayes style: the score of ``j`` is
``log P(j) + (1/K) * sum over earlier layers m and their experts i of log(P(j at l+d | i at m) / P(j))``.
Counts get additive smoothing toward the target layer's popularity.

Shapes: L = MoE layers, E = experts, D = distances fitted, O = order.
``counts [O, L, D, E, E]``: ``counts[o, l, d-1, i, j]`` = tokens with ``i`` at layer ``l - o`` and ``j``
at layer ``l + d``; ``popularity [L, E]``.

Example::

    pred = TransitionPredictor.fit([law, summary], order=1)
    pred.trace_scores(intent, distance=1)   # [T, L - 1, E]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from moe_engine.predictors.base import PredictionContext, Predictor, TraceLike, register_predictor
from moe_engine.predictors.simple import expert_counts


def _multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[..., K]`` expert ids -> ``[..., E]`` float32 multi-hot."""
    out = np.zeros((*ids.shape[:-1], num_experts), dtype=np.float32)
    np.put_along_axis(out, ids.astype(np.int64), 1.0, axis=-1)
    return out


def transition_counts(traces: Sequence[TraceLike], order: int, max_distance: int, num_experts: int) -> np.ndarray:
    """``[O, L, D, E, E]`` float32 co-occurrence counts (see the module docstring)."""
    L = traces[0].expert_ids.shape[1]
    E = num_experts
    counts = np.zeros((order, L, max_distance, E, E), dtype=np.float32)
    for tr in traces:
        mh = _multi_hot(np.asarray(tr.expert_ids), E)  # [T, L, E]
        for layer in range(L):
            for d in range(1, max_distance + 1):
                if layer + d >= L:
                    break
                dst = mh[:, layer + d]
                for o in range(order):
                    if layer - o < 0:
                        break
                    counts[o, layer, d - 1] += mh[:, layer - o].T @ dst
    return counts


class _TransitionBase(Predictor):
    inputs = "history"

    def __init__(self, counts: np.ndarray, popularity: np.ndarray, top_k: int, smoothing: float = 1.0) -> None:
        c = np.asarray(counts, dtype=np.float32)
        assert c.ndim == 5 and c.shape[3] == c.shape[4], "counts must be [O, L, D, E, E]"
        pop = np.asarray(popularity, dtype=np.float64)
        assert pop.shape == (c.shape[1], c.shape[3]), "popularity must be [L, E]"
        self.order, self.num_layers, self.max_distance, self.num_experts = c.shape[0], c.shape[1], c.shape[2], c.shape[3]
        self.counts = c
        self.popularity = pop
        self.smoothing = float(smoothing)
        self.top_k = int(top_k)
        self._tables: dict[tuple[int, int, int], torch.Tensor] = {}

    @classmethod
    def _fit_counts(cls, traces: Sequence[TraceLike], order: int, max_distance: int) -> dict[str, Any]:
        assert traces, "no traces given"
        E = max(int(t.num_experts) for t in traces)
        return {
            "counts": transition_counts(traces, order, max_distance, E),
            "popularity": expert_counts(traces, E),
            "top_k": int(traces[0].expert_ids.shape[2]),
        }

    def _prior(self, target: int) -> np.ndarray:
        p = self.popularity[target]
        return p / max(p.sum(), 1e-12)  # [E], sums to 1

    def _cond(self, o: int, layer: int, distance: int) -> torch.Tensor:
        """``[E, E]`` smoothed ``P(j at layer + distance | i at layer - o) / K`` (rows sum to 1)."""
        key = (o, layer, distance)
        if key not in self._tables:
            if not 1 <= distance <= self.max_distance:
                raise ValueError(
                    f"{self.name} was fitted for distances 1..{self.max_distance}, asked for {distance}; "
                    "fit with max_distance >= the prefetch distance"
                )
            c = self.counts[o, layer, distance - 1].astype(np.float64)
            prior = self._prior(layer + distance)
            a = self.smoothing * self.top_k
            cond = (c + a * prior[None]) / (c.sum(1, keepdims=True) + a)
            self._tables[key] = torch.from_numpy(cond.astype(np.float32))
        return self._tables[key]

    def _multi_hot(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape[:-1], self.num_experts).scatter_(-1, ids.long(), 1.0)

    def trace_scores(self, trace: TraceLike, distance: int) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(trace.expert_ids, dtype=np.int64))
        T, L, _ = ids.shape
        out = np.zeros((T, L - distance, self.num_experts), dtype=np.float32)
        for layer in range(L - distance):
            out[:, layer] = self.scores(PredictionContext(layer=layer, history=ids[:, : layer + 1]), distance).numpy()
        return out


@register_predictor("transition")
class TransitionPredictor(_TransitionBase):
    """First-order transition counts (``order=1``): sum over the current layer's experts of P(j | i)."""

    @classmethod
    def fit(cls, traces: Sequence[TraceLike], max_distance: int = 3, smoothing: float = 1.0, **options: Any):
        return cls(smoothing=smoothing, **cls._fit_counts(traces, 1, max_distance))

    def scores(self, ctx: PredictionContext, distance: int) -> torch.Tensor:
        cond = self._cond(0, ctx.layer, distance)  # [E, E]
        return self._multi_hot(ctx.history[:, ctx.layer]) @ cond  # [T, E]


@register_predictor("transition_ho")
class HigherOrderTransitionPredictor(_TransitionBase):
    """Transition counts from the ``order`` latest layers, combined naive-Bayes style (module docstring)."""

    @classmethod
    def fit(
        cls, traces: Sequence[TraceLike], order: int = 4, max_distance: int = 3, smoothing: float = 1.0, **options: Any
    ):
        assert order >= 1
        return cls(smoothing=smoothing, **cls._fit_counts(traces, order, max_distance))

    def scores(self, ctx: PredictionContext, distance: int) -> torch.Tensor:
        target = ctx.layer + distance
        log_prior = torch.from_numpy(np.log(self._prior(target) + 1e-9).astype(np.float32))  # [E]
        total = log_prior.expand(ctx.history.shape[0], -1).clone()
        for o in range(self.order):
            src = ctx.layer - o
            if src < 0:
                break
            pmi = torch.log(self._cond(o, ctx.layer, distance) + 1e-9) - log_prior[None]  # [E, E]
            total += (self._multi_hot(ctx.history[:, src]) @ pmi) / self.top_k
        return total
