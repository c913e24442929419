"""Cross-layer gate predictor (training-free, Fate-style).

Apply MoE layer ``l + d``'s router to MoE layer ``l``'s router input: consecutive residual-stream states
are similar, so the next layer's router ranks its experts well before that layer runs.

Shapes: T tokens, H hidden, E experts. ``router_weights[l]``: ``[E, H]``; ``gate_input``: ``[T, H]``.
Scores are router probabilities: softmax over experts, or sigmoid (+ optional per-layer correction
bias, DeepSeek-V3) for sigmoid routers.

NOTE: ``moe_engine.runtime.loader`` builds this with the keyword arguments ``router_weights``, ``score`` and
``biases``; keep them.

Example::

    pred = CrossLayerGate(router_weights=[w0, w1], score="softmax")
    pred.scores(PredictionContext(layer=0, history=ids, gate_input=x), distance=1)   # [T, E]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from moe_engine.predictors.base import PredictionContext, Predictor, TraceLike, register_predictor


@register_predictor("cross_layer_gate")
class CrossLayerGate(Predictor):
    inputs = "gate_input"

    def __init__(
        self,
        router_weights: Sequence[torch.Tensor],
        score: str = "softmax",
        biases: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        if not router_weights:
            raise ValueError("router_weights is empty: give one [E, H] weight per MoE layer")
        self.router_weights = [w.detach().float() for w in router_weights]  # fp32 once, not per call
        shapes = {tuple(w.shape) for w in self.router_weights}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"router weights must all be [E, H] of one shape, got {sorted(shapes)}")
        self.num_experts = int(self.router_weights[0].shape[0])
        self.score = score
        self.biases = list(biases) if biases is not None else [None] * len(self.router_weights)
        if len(self.biases) != len(self.router_weights):
            raise ValueError("biases must have one entry per MoE layer")

    def scores(self, ctx: PredictionContext, distance: int) -> torch.Tensor:
        assert distance >= 1
        if ctx.gate_input is None:
            raise ValueError("cross_layer_gate needs gate inputs (record traces with --gate-inputs)")
        target = ctx.layer + distance
        if target >= len(self.router_weights):
            raise ValueError(f"layer {target} is past the last MoE layer ({len(self.router_weights) - 1})")
        w = self.router_weights[target]
        logits = torch.nn.functional.linear(ctx.gate_input.to(torch.float32), w)  # [T, E]
        if self.score == "softmax":
            return logits.softmax(dim=-1)
        probs = logits.sigmoid()
        bias = self.biases[target]
        return probs + bias.to(probs) if bias is not None else probs

    def trace_scores(self, trace: TraceLike, distance: int) -> np.ndarray:
        """Batched over all tokens of a trace recorded with gate inputs (see ``Predictor.trace_scores``)."""
        if trace.gate_inputs is None:
            raise ValueError("cross_layer_gate needs a trace with gate_inputs (record with --gate-inputs)")
        T, L, _ = trace.expert_ids.shape
        if L != len(self.router_weights):
            raise ValueError(f"the trace has {L} MoE layers, the router weights {len(self.router_weights)}")
        out = np.zeros((T, L - distance, self.num_experts), dtype=np.float32)
        hist = torch.zeros(T, L, 1, dtype=torch.long)  # the gate reads no history
        dev = self.router_weights[0].device
        for layer in range(L - distance):
            x = torch.as_tensor(np.asarray(trace.gate_inputs[:, layer], dtype=np.float32), device=dev)
            ctx = PredictionContext(layer=layer, history=hist[:, : layer + 1], gate_input=x)
            out[:, layer] = self.scores(ctx, distance).float().cpu().numpy()
        return out
