"""Inter-layer expert affinity from routing-trace arrays.

Owns the statistics every planner in this package optimises: for each pair of consecutive MoE layers
(l, l + 1), how often a token that chose expert ``a`` at layer ``l`` chose expert ``b`` at layer ``l + 1``,
counted over all top-k x top-k slot pairs, plus how many tokens each expert served (its load).

Glossary:
    T = tokens, L = MoE layers, K = experts per token (top-k), E = experts per layer.
    pair counts ``pairs [L - 1, E, E]``: ``pairs[l, a, b]`` = number of (token, slot at l, slot at l + 1)
        triples routed a -> b; optionally weighted by the product of the two router weights.
    load ``[L, E]``: tokens routed to each expert (or the sum of their router weights).

Example::

    aff = compute_affinity(expert_ids, num_experts=64)
    aff.pairs.shape           # (25, 64, 64)
    aff.total_pairs           # T * (L - 1) * K * K for unweighted counts
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Affinity:
    """Consecutive-layer co-activation counts and per-expert load (see module docstring)."""

    pairs: np.ndarray  # [L - 1, E, E] float64
    load: np.ndarray  # [L, E] float64

    def __post_init__(self) -> None:
        if self.load.ndim != 2 or self.pairs.ndim != 3:
            raise ValueError(f"pairs must be [L-1, E, E] and load [L, E], got {self.pairs.shape} and {self.load.shape}")
        num_layers, num_experts = self.load.shape
        if self.pairs.shape != (max(num_layers - 1, 0), num_experts, num_experts):
            raise ValueError(f"pairs shape {self.pairs.shape} does not match load shape {self.load.shape}")

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def total_pairs(self) -> float:
        return float(self.pairs.sum())

    def __add__(self, other: Affinity) -> Affinity:
        return Affinity(self.pairs + other.pairs, self.load + other.load)

    def scaled(self, factor: float) -> Affinity:
        return Affinity(self.pairs * factor, self.load * factor)


def validate_expert_ids(expert_ids: np.ndarray, num_experts: int | None = None) -> int:
    """Check ``expert_ids [T, L, K]`` and return the number of experts per layer."""
    if not isinstance(expert_ids, np.ndarray) or expert_ids.ndim != 3:
        shape = getattr(expert_ids, "shape", None)
        raise ValueError(f"expert_ids must be a [T, L, K] integer array, got shape {shape}")
    if not np.issubdtype(expert_ids.dtype, np.integer):
        raise ValueError(f"expert_ids must hold integers, got dtype {expert_ids.dtype}")
    if expert_ids.size and expert_ids.min() < 0:
        raise ValueError("expert_ids holds negative expert ids")
    seen = int(expert_ids.max()) + 1 if expert_ids.size else 0
    if num_experts is None:
        return max(seen, 1)
    if seen > num_experts:
        raise ValueError(f"expert_ids holds expert {seen - 1} but num_experts is {num_experts}")
    return int(num_experts)


def compute_affinity(
    expert_ids: np.ndarray,
    num_experts: int | None = None,
    weights: np.ndarray | None = None,
    sequence_starts: np.ndarray | None = None,
    sequences: np.ndarray | list[int] | None = None,
) -> Affinity:
    """Pair counts and loads from a trace.

    Args:
        expert_ids: ``[T, L, K]`` expert chosen by each token at each MoE layer and slot.
        num_experts: E; inferred from the largest id when omitted.
        weights: optional ``[T, L, K]`` router weights; pairs are then weighted by ``w_l * w_{l+1}`` and
            loads by ``w``. Without them every pair and every routed token counts 1.
        sequence_starts: ``[S + 1]`` row offsets of sequences; only needed with ``sequences``.
        sequences: indices of the sequences to count (e.g. the training split); all rows when omitted.
    """
    num_experts = validate_expert_ids(expert_ids, num_experts)
    if weights is not None and weights.shape != expert_ids.shape:
        raise ValueError(f"weights shape {weights.shape} differs from expert_ids shape {expert_ids.shape}")
    if sequences is not None:
        if sequence_starts is None:
            raise ValueError("selecting sequences needs sequence_starts")
        rows = select_rows(sequence_starts, sequences)
        expert_ids = expert_ids[rows]
        weights = None if weights is None else weights[rows]
    _, num_layers, _ = expert_ids.shape
    ids = expert_ids.astype(np.int64)
    w = None if weights is None else weights.astype(np.float64)
    E = num_experts
    pairs = np.zeros((max(num_layers - 1, 0), E, E), dtype=np.float64)
    load = np.zeros((num_layers, E), dtype=np.float64)
    for layer in range(num_layers):
        load[layer] = np.bincount(
            ids[:, layer].ravel(), weights=None if w is None else w[:, layer].ravel(), minlength=E
        )
        if layer + 1 == num_layers:
            break
        # [T, K, K] flat index a * E + b of every slot pair of the token
        flat = (ids[:, layer, :, None] * E + ids[:, layer + 1, None, :]).ravel()
        pw = None if w is None else (w[:, layer, :, None] * w[:, layer + 1, None, :]).ravel()
        pairs[layer] = np.bincount(flat, weights=pw, minlength=E * E).reshape(E, E)
    return Affinity(pairs=pairs, load=load)


def select_rows(sequence_starts: np.ndarray, sequences) -> np.ndarray:
    """Token rows of the given sequences, in the given order."""
    starts = np.asarray(sequence_starts, dtype=np.int64)
    if starts.ndim != 1 or len(starts) < 2 or starts[0] != 0 or np.any(np.diff(starts) < 0):
        raise ValueError("sequence_starts must be a rising [S + 1] array starting at 0")
    idx = [np.arange(starts[s], starts[s + 1]) for s in sequences]
    return np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
