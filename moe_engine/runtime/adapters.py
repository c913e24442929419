"""Architecture adapters: what differs between MoE families, chosen by ``config.model_type``.

The engine lets each model's own router run and owns only the routed experts, so an adapter is small:
how routed experts are named on disk, and how the router scores experts (for the cross-layer-gate
predictor). Everything else (where MoE blocks are, expert shapes) is read from the built model, whose
MoE blocks all expose ``block.gate`` (router) and ``block.experts`` (fused ``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) in transformers 5.

Example::

    adapter = get_adapter(config)            # ValueError for non-MoE or unsupported models
    blocks = moe_blocks(model)               # [(decoder_layer_index, block), ...]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Adapter:
    model_type: str
    #: on-disk per-expert tensor names (gate, up, down) under ``...experts.{e}.``
    expert_names: tuple[str, str, str]
    #: router scoring: "softmax" or "sigmoid" (with ``e_score_correction_bias`` when present)
    router_score: str


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> None:
    _ADAPTERS[adapter.model_type] = adapter


for _mt in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2"):
    register_adapter(Adapter(_mt, ("gate_proj", "up_proj", "down_proj"), "softmax"))
register_adapter(Adapter("deepseek_v3", ("gate_proj", "up_proj", "down_proj"), "sigmoid"))
register_adapter(Adapter("mixtral", ("w1", "w3", "w2"), "softmax"))

# Config attributes that signal a Mixture-of-Experts model (to tell "not MoE" from "MoE we do not support").
_MOE_CONFIG_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(config) -> Adapter:
    """The adapter for ``config.model_type``; ValueError naming the problem and the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type]
    supported = ", ".join(supported_model_types())
    is_moe = any((getattr(config, a, None) or 0) > 0 for a in _MOE_CONFIG_ATTRS)
    if not is_moe:
        raise ValueError(
            f"model_type {model_type!r} is not a Mixture-of-Experts model (its config declares no routed "
            f"experts); moe-engine offloads MoE experts only. Supported model types: {supported}"
        )
    raise ValueError(
        f"unsupported Mixture-of-Experts architecture {model_type!r}; supported model types: {supported}"
    )


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``[(decoder_layer_index, moe_block)]`` for every decoder layer whose MLP is a routed MoE block."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers")
    out = []
    for i, layer in enumerate(layers):
        block = getattr(layer, "mlp", None)
        if block is not None and hasattr(block, "experts") and hasattr(block, "gate"):
            out.append((i, block))
    return out


# Per-expert checkpoint keys: "<prefix>.layers.<L>.<mlp|block_sparse_moe>.experts.<E>.<name>.weight"
_PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<block>[A-Za-z_]+)\.experts\.(?P<expert>\d+)\.(?P<name>\w+)\.weight$")
# Already-fused checkpoint keys: "<prefix>.layers.<L>.mlp.experts.<gate_up_proj|down_proj>"
_FUSED_KEY = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<block>[A-Za-z_]+)\.experts\.(?P<name>gate_up_proj|down_proj)$")


def parse_expert_key(key: str, adapter: Adapter) -> tuple[int, int | None, str] | None:
    """``(decoder_layer, expert or None for fused, part)`` for a routed-expert checkpoint key, else None.

    ``part`` is "gate", "up", "down" (per-expert keys) or "gate_up", "down" (fused keys).
    """
    m = _PER_EXPERT_KEY.match(key)
    if m and m.group("name") in adapter.expert_names:
        part = ("gate", "up", "down")[adapter.expert_names.index(m.group("name"))]
        return int(m.group("layer")), int(m.group("expert")), part
    m = _FUSED_KEY.match(key)
    if m:
        return int(m.group("layer")), None, "gate_up" if m.group("name") == "gate_up_proj" else "down"
    return None
