"""Routing traces in the ``moe-routing-trace/1`` format (see ../shared/traces/README.md).

A trace holds, per token t and MoE layer l, the K experts the router chose (``expert_ids [T, L, K]``,
highest weight first) and their router probabilities (``expert_weights [T, L, K]``), with
``sequence_starts [S + 1]`` marking sequences and a JSON ``meta`` string. Optionally
``gate_inputs [T, L, H]`` (float16) holds each MoE layer's router input.

Example::

    trace = load_trace("../shared/traces/dsv2lite-esft-law.npz")
    trace.expert_ids.shape      # (8327, 26, 6)
    train, test = trace.split_sequences(0.7)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "moe-routing-trace/1"


@dataclass
class RoutingTrace:
    expert_ids: np.ndarray  # [T, L, K] uint8/int
    expert_weights: np.ndarray  # [T, L, K] float16
    sequence_starts: np.ndarray  # [S + 1] int64
    meta: dict[str, Any] = field(default_factory=dict)
    gate_inputs: np.ndarray | None = None  # [T, L, H] float16

    def __post_init__(self) -> None:
        """The one validator of routing traces (every command reads traces through it)."""
        from moe_engine.placement.affinity import validate_expert_ids

        ids, w, s = self.expert_ids, self.expert_weights, self.sequence_starts
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a JSON object, got {type(self.meta).__name__}")
        if ids.ndim != 3:
            raise ValueError(f"expert_ids must be [T, L, K], got shape {ids.shape}")
        if ids.shape[0] == 0 or ids.shape[1] == 0 or ids.shape[2] == 0:
            raise ValueError(f"the trace is empty: expert_ids has shape {ids.shape} (tokens, layers, top-k)")
        n = self.meta.get("num_experts")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"meta num_experts must be a positive integer, got {n!r}")
        validate_expert_ids(ids, n)  # integers, none negative, none >= num_experts
        for name in ("expert_bytes",):
            v = self.meta.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"meta {name} must be a positive integer, got {v!r}")
        if w.shape != ids.shape:
            raise ValueError(f"expert_weights shape {w.shape} differs from expert_ids shape {ids.shape}")
        if s.ndim != 1 or len(s) < 2 or s[0] != 0 or s[-1] != ids.shape[0] or np.any(np.diff(s) < 0):
            raise ValueError("sequence_starts must rise from 0 to the number of tokens")
        if self.gate_inputs is not None and self.gate_inputs.shape[:2] != ids.shape[:2]:
            raise ValueError(f"gate_inputs shape {self.gate_inputs.shape} does not match [T, L] {ids.shape[:2]}")

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def num_experts(self) -> int:
        n = self.meta.get("num_experts")
        return int(n) if n else int(self.expert_ids.max()) + 1

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_starts) - 1

    def sequences(self, indices) -> RoutingTrace:
        """A new trace holding the given sequences (in the given order)."""
        starts = self.sequence_starts
        rows = [np.arange(starts[i], starts[i + 1]) for i in indices]
        idx = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        lens = [len(r) for r in rows]
        new_starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        return RoutingTrace(
            expert_ids=self.expert_ids[idx],
            expert_weights=self.expert_weights[idx],
            sequence_starts=new_starts,
            meta=dict(self.meta),
            gate_inputs=None if self.gate_inputs is None else self.gate_inputs[idx],
        )

    def split_sequences(self, fraction: float) -> tuple[RoutingTrace, RoutingTrace]:
        """First ``fraction`` of the sequences (at least one) and the rest, in order."""
        n = self.num_sequences
        cut = min(max(1, int(round(n * fraction))), n - 1) if n > 1 else n
        return self.sequences(range(cut)), self.sequences(range(cut, n))

    def save(self, path: str | os.PathLike) -> None:
        """Write the trace atomically (a temp file renamed into place; nothing half-written is left)."""
        path = Path(path)
        arrays: dict[str, Any] = {
            "expert_ids": self.expert_ids,
            "expert_weights": self.expert_weights.astype(np.float16),
            "sequence_starts": self.sequence_starts.astype(np.int64),
            "meta": np.array(json.dumps({"format": FORMAT, **self.meta})),
        }
        if self.gate_inputs is not None:
            arrays["gate_inputs"] = self.gate_inputs.astype(np.float16)
        tmp = path.with_name(path.name + ".tmp.npz")
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def concat_traces(traces: list[RoutingTrace]) -> RoutingTrace:
    """Sequences of several traces, one after another (same L and K required)."""
    if not traces:
        raise ValueError("no traces given")
    shapes = {t.expert_ids.shape[1:] for t in traces}
    if len(shapes) != 1:
        raise ValueError(f"traces have different [L, K] shapes: {sorted(shapes)}")
    offsets = np.cumsum([0] + [t.num_tokens for t in traces])
    starts = np.concatenate([traces[0].sequence_starts[:1]] + [t.sequence_starts[1:] + o for t, o in zip(traces, offsets)])
    gi = None
    if all(t.gate_inputs is not None for t in traces):
        gi = np.concatenate([t.gate_inputs for t in traces])  # type: ignore[misc]
    return RoutingTrace(
        expert_ids=np.concatenate([t.expert_ids for t in traces]),
        expert_weights=np.concatenate([t.expert_weights for t in traces]),
        sequence_starts=starts.astype(np.int64),
        meta=dict(traces[0].meta),
        gate_inputs=gi,
    )


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Read a ``moe-routing-trace/1`` file; raise ValueError naming what is wrong with a bad one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist; record one with `moe-engine trace`")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # zip or npy errors: not a trace at all
        raise ValueError(f"{path} is not a readable .npz routing trace ({exc})") from None
    with data:
        missing = [k for k in ("expert_ids", "expert_weights", "sequence_starts") if k not in data.files]
        if missing:
            raise ValueError(
                f"{path} is not in the {FORMAT} format: missing array(s) {', '.join(missing)} "
                "(see the trace format in the README)"
            )
        meta: dict[str, Any] = {}
        if "meta" in data.files:
            try:
                meta = json.loads(str(data["meta"]))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: meta is not valid JSON ({exc})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{path}: meta must be a JSON object, got {type(meta).__name__}")
        fmt = meta.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"{path} has format {fmt!r}; this version reads {FORMAT!r}")
        try:
            return RoutingTrace(
                expert_ids=data["expert_ids"],
                expert_weights=data["expert_weights"],
                sequence_starts=data["sequence_starts"].astype(np.int64),
                meta=meta,
                gate_inputs=data["gate_inputs"] if "gate_inputs" in data.files else None,
            )
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
