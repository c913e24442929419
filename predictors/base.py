"""The predictor interface and registry.

A predictor scores the routed experts of MoE layer ``layer + distance`` from what is known when MoE
layer ``layer`` has just been routed. Layers are indices among the model's MoE layers (0-based).

Shapes: T = tokens, L = MoE layers, K = experts per token (top-k), E = routed experts per layer,
H = hidden size.

* ``gate_input``: ``[T, H]`` the router input of layer ``layer`` (None when unknown, e.g. in traces
  recorded without ``--gate-inputs``).
* ``history``: ``[T, layer + 1, K]`` int64 expert ids chosen by these tokens at MoE layers
  ``0..layer`` (the last entry is the current layer).
* ``prev_tokens``: optional ``[P, L, K]`` expert ids of earlier tokens of the same sequence
  (decode history, oldest first), for predictors that use temporal locality.
* ``token_index``: optional ``[T]`` row of each token in the trace an oracle reads the future from.

``Predictor.scores(ctx, distance)`` returns ``[T, E]`` float scores (higher = more likely); the
runtime sums them over tokens to rank experts for prefetch, and evaluation takes the per-token top-k.
``Predictor.trace_scores(trace, distance)`` does the same for every token and layer of a recorded
trace at once (teacher-forced: the true experts of earlier layers and tokens are known), which is what
evaluation and the cache simulator need; subclasses override it with a batched version.

Fitted predictors build from traces with ``cls.fit(traces, **options)``, where a trace is any object
with ``expert_ids [T, L, K]``, ``sequence_starts [S + 1]``, ``num_experts`` and optionally
``gate_inputs [T, L, H]`` (``moe_engine.offline.traces.RoutingTrace`` fits; this package does not import it).

Example::

    pred = make_predictor("cross_layer_gate", router_weights=[w0, w1, w2])  # each [E, H]
    s = pred.scores(PredictionContext(layer=0, gate_input=x, history=ids), distance=1)  # [T, E]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

_REGISTRY: dict[str, type[Predictor]] = {}


def register_predictor(name: str) -> Callable[[type[Predictor]], type[Predictor]]:
    def deco(cls: type[Predictor]) -> type[Predictor]:
        if name in _REGISTRY:
            raise ValueError(f"predictor {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_predictors() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_predictor(name: str, **kwargs) -> Predictor:
    """Build the predictor registered under ``name``; unknown names raise ValueError listing the known ones."""
    _load_builtin()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}") from None
    return cls(**kwargs)


def predictor_class(name: str) -> type[Predictor]:
    """The class registered under ``name`` (for ``fit`` / ``load``); ValueError listing the known names."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def _load_builtin() -> None:
    # Importing the implementation modules registers them; done lazily to avoid import cycles.
    import importlib

    for mod in ("moe_engine.predictors.gate", "moe_engine.predictors.transitions", "moe_engine.predictors.learned", "moe_engine.predictors.simple"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


@dataclass(frozen=True)
class PredictionContext:
    layer: int
    history: torch.Tensor  # [T, layer + 1, K] int64
    gate_input: torch.Tensor | None = None  # [T, H]
    prev_tokens: torch.Tensor | None = None  # [P, L, K] int64
    token_index: torch.Tensor | None = None  # [T] int64, rows in the trace an oracle reads

    def __post_init__(self) -> None:
        assert self.layer >= 0
        assert self.history.dim() == 3 and self.history.shape[1] == self.layer + 1, self.history.shape
        if self.gate_input is not None:
            assert self.gate_input.dim() == 2 and self.gate_input.shape[0] == self.history.shape[0]
        if self.prev_tokens is not None:
            assert self.prev_tokens.dim() == 3, self.prev_tokens.shape
        if self.token_index is not None:
            assert self.token_index.shape == (self.history.shape[0],), self.token_index.shape


class TraceLike(Protocol):
    """What fitting and ``trace_scores`` read from a routing trace (``RoutingTrace`` has all of it)."""

    expert_ids: np.ndarray  # [T, L, K]
    sequence_starts: np.ndarray  # [S + 1]
    gate_inputs: np.ndarray | None  # [T, L, H]

    @property
    def num_experts(self) -> int: ...


class Predictor(ABC):
    name: str = "abstract"
    #: what it reads: "history" (expert ids only), "gate_input" (router inputs), or "oracle".
    inputs: str = "history"
    #: whether ``scores`` reads ``ctx.prev_tokens`` (then ``trace_scores`` must go token by token).
    uses_prev_tokens: bool = False
    #: how many earlier tokens of the sequence ``scores`` looks at (for callers building ``prev_tokens``).
    prev_window: int = 0
    num_experts: int

    @abstractmethod
    def scores(self, ctx: PredictionContext, distance: int) -> torch.Tensor:
        """``[T, E]`` scores for MoE layer ``ctx.layer + distance`` (distance >= 1)."""

    @classmethod
    def fit(cls, traces: Sequence[TraceLike], **options: Any) -> Predictor:
        """Build the predictor from routing traces (training-free predictors refuse)."""
        raise ValueError(f"predictor {cls.name!r} is not fitted from traces; build it with make_predictor")

    def trace_scores(self, trace: TraceLike, distance: int) -> np.ndarray:
        """``[T, L - distance, E]`` float32: entry ``[t, l]`` scores layer ``l + distance`` for token t,
        knowing token t's experts at layers ``0..l``, its gate input at layer l and the earlier tokens of
        its sequence. Generic version: one ``scores`` call per layer (per token with ``uses_prev_tokens``).
        """
        ids = torch.as_tensor(np.asarray(trace.expert_ids, dtype=np.int64))
        T, L, _ = ids.shape
        assert 1 <= distance < L, distance
        gi = None if trace.gate_inputs is None else torch.as_tensor(np.asarray(trace.gate_inputs, dtype=np.float32))
        out = np.zeros((T, L - distance, self.num_experts), dtype=np.float32)
        rows = torch.arange(T)
        if not self.uses_prev_tokens:
            for layer in range(L - distance):
                ctx = PredictionContext(
                    layer=layer,
                    history=ids[:, : layer + 1],
                    gate_input=None if gi is None else gi[:, layer],
                    token_index=rows,
                )
                out[:, layer] = self.scores(ctx, distance).float().numpy()
            return out
        starts = np.asarray(trace.sequence_starts)
        for s in range(len(starts) - 1):
            for t in range(int(starts[s]), int(starts[s + 1])):
                lo = max(int(starts[s]), t - self.prev_window) if self.prev_window else int(starts[s])
                for layer in range(L - distance):
                    ctx = PredictionContext(
                        layer=layer,
                        history=ids[t : t + 1, : layer + 1],
                        gate_input=None if gi is None else gi[t : t + 1, layer],
                        prev_tokens=ids[lo:t],
                        token_index=rows[t : t + 1],
                    )
                    out[t, layer] = self.scores(ctx, distance)[0].float().numpy()
        return out
