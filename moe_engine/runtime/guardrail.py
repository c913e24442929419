"""The quality guardrail: on sampled decode steps, compare the logits with full-precision experts and
turn offending layers back to their own format.

Lower-precision copies (``quality="balanced"`` or ``"fast"``, ``moe_engine.runtime.quality``) trade
accuracy for bytes. The guardrail measures that trade where it matters, on the model's output: every
``every``-th decode step (one new token per sequence, with a KV cache), after the normal forward, it
removes that step's entries from the KV cache (``Cache.crop``) and runs the step again with every
routed expert read at its own format straight from the store (a *reference pass*: the residency core
and its counters are left alone). It compares the two next-token distributions,
``KL(p_reference || p_served)`` (mean over the batch), and keeps the reference pass's output and KV
entries for this step. Above ``kl_bound`` it ranks the MoE layers by the relative error of their
reduced copies' output on the reference pass's inputs, and sends the worst (every layer within half of
the largest error) back to their own format for good: ``ExpertSizing.force_full``, and their resident
reduced copies are dropped. ``engine.stats()`` reports ``guardrail_checks``, ``guardrail_fallbacks``
(layers sent back) and ``guardrail_max_kl``; each fallback is also logged as a warning.

Example::

    model = moe_engine.from_pretrained(path, quality="fast", guardrail=0.05, guardrail_every=16)
    model.generate(ids, max_new_tokens=64)
    model.engine.stats().guardrail_fallbacks
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def kl_divergence(reference_logits: torch.Tensor, served_logits: torch.Tensor) -> float:
    """``KL(softmax(reference) || softmax(served))`` of the last position, mean over the batch (nats)."""
    p = torch.log_softmax(reference_logits[:, -1].float(), dim=-1)
    q = torch.log_softmax(served_logits[:, -1].float(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _cache_of(kwargs: dict) -> Any:
    """The forward call's KV cache (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class Guardrail:
    """Installed on a model by ``install``; state and counters live here, the engine reports them."""

    def __init__(self, kl_bound: float, every: int = 16) -> None:
        if not kl_bound > 0:
            raise ValueError(f"guardrail KL bound must be > 0 (nats), got {kl_bound}")
        if every < 1:
            raise ValueError(f"guardrail_every must be >= 1 decode steps, got {every}")
        self.kl_bound = float(kl_bound)
        self.every = int(every)
        self.steps = 0
        self.checks = 0
        self.fallbacks = 0
        self.max_kl = 0.0
        self.last_errors: dict[int, float] = {}
        self.fallback_layers: list[int] = []

    def install(self, model: Any) -> None:
        engine = model.engine
        if engine.sizing is None:
            raise ValueError("the guardrail needs quality 'balanced' or 'fast' (lossless outputs have nothing to check)")
        engine.guardrail = self
        model.register_forward_hook(self._after_forward, with_kwargs=True)

    def _after_forward(self, model: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        cache = _cache_of(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        new = (ids if ids is not None else embeds)
        if cache is None or new is None or new.shape[1] != 1 or not hasattr(cache, "crop"):
            return None  # not a decode step with a KV cache
        if cache.get_seq_length() <= 1:
            return None
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.check(model, args, kwargs, output)

    def check(self, model: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        """Run this step again with full-precision experts; compare; fall back if needed."""
        engine = model.engine
        with engine.lock, torch.no_grad():
            _cache_of(kwargs).crop(-1)  # forget this step's KV entries, then recompute them
            engine.reference = {}
            try:
                reference = model.forward(*args, **kwargs)  # hooks are not run again
                errors = dict(engine.reference)
            finally:
                engine.reference = None
            kl = kl_divergence(reference.logits, output.logits)
            self.checks += 1
            self.max_kl = max(self.max_kl, kl)
            self.last_errors = errors
            if kl > self.kl_bound:
                self._fall_back(engine, kl, errors)
        return reference

    def _fall_back(self, engine: Any, kl: float, errors: dict[int, float]) -> None:
        candidates = {layer: err for layer, err in errors.items() if layer not in engine.sizing.force_full and err > 0}
        if not candidates:
            return
        worst = max(candidates.values())
        layers = sorted(layer for layer, err in candidates.items() if err >= 0.5 * worst)
        engine.sizing.force_full.update(layers)
        engine.core.drop_reduced(set(layers))
        self.fallbacks += len(layers)
        self.fallback_layers.extend(layers)
        logger.warning(
            "moe-engine guardrail: KL %.4g nats above the bound %.4g; MoE layer(s) %s back to full precision "
            "(relative output error of their reduced copies: %s)",
            kl, self.kl_bound, layers, ", ".join(f"{candidates[x]:.3g}" for x in layers),
        )
