"""Build predictors by name for offline work on traces (``eval-predictors``, ``simulate``, benchmarks).

Fitted predictors are fitted on the training traces; the oracle reads the test trace; the cross-layer
gate reads router weights from a checkpoint (``model_dir``); learned predictors train, or load a saved
model when ``learned_path`` names one.

Example::

    pred = build_predictor("transition_ho", train=[law, summary], test=intent)
    pred = build_predictor("cross_layer_gate", train=[], test=val, model_dir="ckpt/")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moe_engine.offline.traces import RoutingTrace

#: Predictors built from traces alone, cheapest first.
HISTORY_PREDICTORS = ("popularity", "transition", "transition_ho", "mlp_history")
GATE_PREDICTORS = ("cross_layer_gate", "mlp_gate")


def router_predictor(model_dir: str | Path):
    """``cross_layer_gate`` with the router weights (and correction biases) of a checkpoint on disk."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_engine.predictors import make_predictor
    from moe_engine.runtime.adapters import get_adapter, moe_blocks

    config = AutoConfig.from_pretrained(model_dir)
    adapter = get_adapter(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    routers: list[Any] = [block.gate for _, block in moe_blocks(model)]
    biases = [getattr(r, "e_score_correction_bias", None) for r in routers]
    return make_predictor(
        "cross_layer_gate",
        router_weights=[r.weight.detach().clone() for r in routers],
        score=adapter.router_score,
        biases=[None if b is None else b.detach().clone() for b in biases] if any(b is not None for b in biases) else None,
    )


def build_predictor(
    name: str,
    train: Sequence[RoutingTrace],
    test: RoutingTrace | None = None,
    *,
    model_dir: str | Path | None = None,
    learned_path: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    **fit_options: Any,
):
    """The predictor ``name`` ready to score ``test`` (see the module docstring)."""
    from moe_engine.predictors import make_predictor, predictor_class

    cls = predictor_class(name)
    if name == "oracle":
        if test is None:
            raise ValueError("the oracle needs the test trace")
        return make_predictor("oracle", expert_ids=test.expert_ids, num_experts=test.num_experts)
    if name == "cross_layer_gate":
        if model_dir is None:
            raise ValueError("cross_layer_gate needs the model's router weights: pass the checkpoint (--model)")
        return router_predictor(model_dir)
    if learned_path is not None and Path(learned_path).exists() and hasattr(cls, "load"):
        return cls.load(learned_path)  # type: ignore[attr-defined]
    if not train:
        raise ValueError(f"predictor {name!r} is fitted from traces: give training traces (--train)")
    learned = hasattr(cls, "save")
    options = dict(fit_options) if learned else {}  # training options only concern learned predictors
    if log is not None and learned:
        options["log"] = log
    pred = cls.fit(train, **options)
    if learned_path is not None and hasattr(pred, "save"):
        pred.save(learned_path)
    return pred
