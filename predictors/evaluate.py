"""Scoring predictors on a routing trace: recall@k and precision@k per layer pair and on average.

For token t, source layer l and distance d, the predictor's top-k experts of layer ``l + d`` are compared
with the K experts the router really chose there: recall@k = hits / K, precision@k = hits / k (equal
when k = K). Averages are over tokens first (per layer pair), then over layer pairs.

Example::

    res = evaluate_predictor(pred, test_trace, distances=(1, 2, 3))
    res[0].recall, res[0].per_layer[0].recall
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from moe_engine.predictors.base import Predictor, TraceLike


@dataclass
class LayerScore:
    layer: int  # source MoE layer l
    target: int  # l + d
    recall: float
    precision: float


@dataclass
class EvalResult:
    predictor: str
    inputs: str
    distance: int
    k: int
    recall: float
    precision: float
    per_layer: list[LayerScore] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def topk_hits(scores: np.ndarray, true_ids: np.ndarray, k: int) -> np.ndarray:
    """``scores [..., E]``, ``true_ids [..., K]`` -> ``[...]`` number of true experts among the top-k."""
    assert scores.shape[:-1] == true_ids.shape[:-1], (scores.shape, true_ids.shape)
    k = min(k, scores.shape[-1])
    top = np.argpartition(-scores, k - 1, axis=-1)[..., :k]  # [..., k], unordered
    return (top[..., :, None] == true_ids[..., None, :]).any(-1).sum(-1)


def score_layers(scores: np.ndarray, true_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``scores [T, M, E]`` for M layer pairs, ``true_ids [T, M, K]`` -> per-pair (recall [M], precision [M])."""
    hits = topk_hits(scores, true_ids, k).astype(np.float64)  # [T, M]
    return hits.mean(0) / true_ids.shape[-1], hits.mean(0) / min(k, scores.shape[-1])


def evaluate_predictor(
    pred: Predictor, trace: TraceLike, distances: tuple[int, ...] = (1, 2, 3), k: int | None = None, name: str | None = None
) -> list[EvalResult]:
    """One ``EvalResult`` per distance (distances reaching past the last layer are skipped)."""
    import time

    ids = np.asarray(trace.expert_ids, dtype=np.int64)
    T, L, K = ids.shape
    k = K if k is None else k
    out = []
    for d in distances:
        if not 1 <= d < L:
            continue
        t0 = time.perf_counter()
        s = pred.trace_scores(trace, d)  # [T, L - d, E]
        rec, prec = score_layers(s, ids[:, d:], k)
        out.append(
            EvalResult(
                predictor=name or pred.name,
                inputs=pred.inputs,
                distance=d,
                k=k,
                recall=float(rec.mean()),
                precision=float(prec.mean()),
                per_layer=[LayerScore(i, i + d, float(r), float(p)) for i, (r, p) in enumerate(zip(rec, prec))],
                seconds=time.perf_counter() - t0,
            )
        )
    return out
