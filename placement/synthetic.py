"""Synthetic routing traces with planted inter-layer affinity (for scale tests and benchmarks).

Each layer hides a random order of its experts (``positions [L, E]``, a permutation); a token carries a
latent position z that drifts a little from layer to layer and picks its K experts among those whose
positions lie near z (plus some uniform noise). Experts close in position are thus co-activated across
consecutive layers, and the planted plan, which gives device g the positions
``g * E / G .. (g + 1) * E / G - 1`` at every layer, keeps most transitions on one device for any G.

Example::

    trace = planted_trace(num_tokens=8192, num_layers=58, num_experts=256, top_k=8, seed=0)
    planted = planted_assignment(trace.positions, num_devices=32)   # [L, E]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticTrace:
    expert_ids: np.ndarray  # [T, L, K] uint8/int16
    expert_weights: np.ndarray  # [T, L, K] float16
    sequence_starts: np.ndarray  # [S + 1]
    positions: np.ndarray  # [L, E] hidden position of each expert


def planted_positions(num_layers: int, num_experts: int, seed: int = 0) -> np.ndarray:
    """[L, E] the hidden position of each expert per layer (a random permutation per layer)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(num_experts) for _ in range(num_layers)])


def planted_trace(
    num_tokens: int = 8192,
    num_layers: int = 58,
    num_experts: int = 256,
    top_k: int = 8,
    spread: float = 3.0,
    drift: float = 1.5,
    noise: float = 0.15,
    sequence_length: int = 512,
    seed: int = 0,
    structure_seed: int = 0,
) -> SyntheticTrace:
    """Tokens whose routing follows the planted positions (see module docstring).

    spread: std of chosen positions around z; drift: std of z's move per layer; noise: share of slots
    drawn uniformly. ``structure_seed`` fixes the planted positions, ``seed`` the tokens, so a training and
    a test trace can share one structure.
    """
    positions = planted_positions(num_layers, num_experts, structure_seed)
    expert_at = np.argsort(positions, axis=1)  # [L, E]: expert at each position
    rng = np.random.default_rng(seed)
    ids = np.empty((num_tokens, num_layers, top_k), dtype=np.int64)
    z = rng.uniform(0, num_experts, num_tokens)
    for layer in range(num_layers):
        if layer:
            z = (z + rng.normal(0, drift, num_tokens)) % num_experts
        cand = np.rint(z[:, None] + rng.normal(0, spread, (num_tokens, 4 * top_k))).astype(np.int64) % num_experts
        uniform = rng.integers(0, num_experts, (num_tokens, 4 * top_k))
        cand = np.where(rng.random((num_tokens, 4 * top_k)) < noise, uniform, cand)
        ids[:, layer] = _first_distinct(cand, top_k, num_experts, rng)
        ids[:, layer] = expert_at[layer][ids[:, layer]]
    weights = np.sort(rng.dirichlet(np.ones(top_k), num_tokens * num_layers), axis=1)[:, ::-1]
    weights = weights.reshape(num_tokens, num_layers, top_k).astype(np.float16)
    starts = np.append(np.arange(0, num_tokens, sequence_length), num_tokens).astype(np.int64)
    dtype = np.uint8 if num_experts <= 256 else np.int16
    return SyntheticTrace(ids.astype(dtype), weights, starts, positions)


def planted_assignment(positions: np.ndarray, num_devices: int) -> np.ndarray:
    """[L, E]: the planted plan, contiguous position ranges per device."""
    num_experts = positions.shape[1]
    assert num_experts % num_devices == 0, "devices must divide experts"
    return positions // (num_experts // num_devices)


def _first_distinct(cand: np.ndarray, k: int, num_experts: int, rng: np.random.Generator) -> np.ndarray:
    """[T, k]: the first k distinct values of each row (topped up at random if a row has fewer)."""
    num_tokens, width = cand.shape
    out = np.empty((num_tokens, k), dtype=np.int64)
    # rank of the first occurrence of each value in row order
    first = np.ones_like(cand, dtype=bool)
    order = np.argsort(cand, axis=1, kind="stable")
    sorted_vals = np.take_along_axis(cand, order, axis=1)
    dup = np.zeros_like(first)
    dup[:, 1:] = sorted_vals[:, 1:] == sorted_vals[:, :-1]
    np.put_along_axis(first, order, ~dup, axis=1)
    for t in range(num_tokens):
        vals = cand[t, first[t]][:k]
        if len(vals) < k:
            rest = np.setdiff1d(rng.permutation(num_experts), vals, assume_unique=False)[: k - len(vals)]
            vals = np.concatenate([vals, rest])
        out[t] = vals
    return out
