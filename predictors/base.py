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
  (decode history), for predictors that use temporal locality.

``Predictor.scores(ctx, distance)`` returns ``[T, E]`` float scores (higher = more likely); the
runtime sums them over tokens to rank experts for prefetch, and evaluation takes the per-token top-k.

Example::

    pred = make_predictor("cross_layer_gate", router_weights=[w0, w1, w2])  # each [E, H]
    s = pred.scores(PredictionContext(layer=0, gate_input=x, history=ids), distance=1)  # [T, E]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

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


def _load_builtin() -> None:
    # Importing the implementation modules registers them; done lazily to avoid import cycles.
    import importlib

    for mod in ("predictors.gate", "predictors.transitions", "predictors.learned", "predictors.simple"):
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

    def __post_init__(self) -> None:
        assert self.layer >= 0
        assert self.history.dim() == 3 and self.history.shape[1] == self.layer + 1, self.history.shape
        if self.gate_input is not None:
            assert self.gate_input.dim() == 2 and self.gate_input.shape[0] == self.history.shape[0]


class Predictor(ABC):
    name: str = "abstract"
    #: what it reads: "history" (expert ids only), "gate_input" (router inputs), or "oracle".
    inputs: str = "history"

    @abstractmethod
    def scores(self, ctx: PredictionContext, distance: int) -> torch.Tensor:
        """``[T, E]`` scores for MoE layer ``ctx.layer + distance`` (distance >= 1)."""
