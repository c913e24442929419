"""Reference predictors: static popularity (a floor) and an oracle reading the true future (a ceiling).

Example::

    pop = Popularity.fit([train_trace])                    # per-layer expert frequencies
    oracle = make_predictor("oracle", expert_ids=test_trace.expert_ids)
    oracle.trace_scores(test_trace, distance=1)            # 1 on the true experts, 0 elsewhere
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from moe_engine.predictors.base import PredictionContext, Predictor, TraceLike, register_predictor


def expert_counts(traces: Sequence[TraceLike], num_experts: int | None = None) -> np.ndarray:
    """``[L, E]`` float64: how often each expert of each layer is chosen across ``traces``."""
    assert traces, "no traces given"
    E = num_experts or max(int(t.num_experts) for t in traces)
    L = traces[0].expert_ids.shape[1]
    counts = np.zeros((L, E), dtype=np.float64)
    for tr in traces:
        ids = np.asarray(tr.expert_ids, dtype=np.int64)  # [T, L, K]
        assert ids.shape[1] == L, "traces have different numbers of MoE layers"
        flat = (np.arange(L)[None, :, None] * E + ids).reshape(-1)
        counts += np.bincount(flat, minlength=L * E).reshape(L, E)
    return counts


@register_predictor("popularity")
class Popularity(Predictor):
    """Scores every token alike with its target layer's expert frequency in the training traces.

    ``counts``: ``[L, E]`` (any non-negative scale).
    """

    inputs = "history"

    def __init__(self, counts: np.ndarray | torch.Tensor) -> None:
        c = torch.as_tensor(np.asarray(counts, dtype=np.float32))
        assert c.dim() == 2 and bool((c >= 0).all()), "counts must be a non-negative [L, E] array"
        self.probs = c / c.sum(1, keepdim=True).clamp_min(1e-12)  # [L, E]
        self.num_experts = int(c.shape[1])

    @classmethod
    def fit(cls, traces: Sequence[TraceLike], **options: Any) -> Popularity:
        return cls(expert_counts(traces))

    def scores(self, ctx: PredictionContext, distance: int) -> torch.Tensor:
        target = ctx.layer + distance
        return self.probs[target].expand(ctx.history.shape[0], -1).clone()

    def trace_scores(self, trace: TraceLike, distance: int) -> np.ndarray:
        T, L, _ = trace.expert_ids.shape
        p = self.probs[distance:L].numpy()  # [L - d, E]
        return np.broadcast_to(p, (T, *p.shape)).copy()


@register_predictor("oracle")
class Oracle(Predictor):
    """Reads the true experts from the trace being replayed: recall 1 by construction (upper bound).

    ``expert_ids``: ``[T, L, K]`` of that trace; contexts must carry ``token_index`` (the rows).
    """

    inputs = "oracle"

    def __init__(self, expert_ids: np.ndarray | torch.Tensor, num_experts: int | None = None) -> None:
        self.expert_ids = torch.as_tensor(np.asarray(expert_ids, dtype=np.int64))
        assert self.expert_ids.dim() == 3, "expert_ids must be [T, L, K]"
        self.num_experts = int(num_experts or int(self.expert_ids.max()) + 1)

    @classmethod
    def fit(cls, traces: Sequence[TraceLike], **options: Any) -> Oracle:
        raise ValueError("the oracle is not fitted: build it on the test trace with expert_ids=...")

    def scores(self, ctx: PredictionContext, distance: int) -> torch.Tensor:
        if ctx.token_index is None:
            raise ValueError("the oracle needs PredictionContext.token_index (rows of its trace)")
        true = self.expert_ids[ctx.token_index, ctx.layer + distance]  # [T, K]
        out = torch.zeros(true.shape[0], self.num_experts)
        # Slot order (highest router weight first) becomes a descending score.
        K = true.shape[1]
        out.scatter_(1, true, torch.linspace(1.0, 0.5, K).expand_as(true).contiguous())
        return out

    def trace_scores(self, trace: TraceLike, distance: int) -> np.ndarray:
        ids = np.asarray(trace.expert_ids, dtype=np.int64)
        if ids.shape != tuple(self.expert_ids.shape) or not np.array_equal(ids, self.expert_ids.numpy()):
            raise ValueError("the oracle replays only the trace it was built on")
        T, L, K = ids.shape
        out = np.zeros((T, L - distance, self.num_experts), dtype=np.float32)
        np.put_along_axis(out, ids[:, distance:], np.linspace(1.0, 0.5, K, dtype=np.float32)[None, None], axis=2)
        return out
