"""Record the routing of a Hugging Face MoE model into a :class:`moe_engine.offline.traces.RoutingTrace`.

A forward hook on every MoE block's router (``block.gate`` of :func:`moe_engine.runtime.adapters.moe_blocks`)
captures, per token and MoE layer, the experts the router chose (highest weight first) and their router
probability (softmax over all experts, not renormalised over the top-k; the sigmoid score for sigmoid
routers), and optionally the router input (``gate_inputs [T, L, H]``, float16). The model runs
unchanged; only whole sequences are batched together (all of one length, so no padding is mixed in).

Example::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    seqs = split_into_sequences(tok(text)["input_ids"], seq_len=256)
    trace = record_trace(model, seqs, gate_inputs=True)
    trace.save("trace.npz")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_engine.offline.traces import RoutingTrace


def _moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    try:
        from moe_engine.runtime.adapters import moe_blocks
    except ImportError:  # pragma: no cover - adapters not present
        base = getattr(model, "model", model)
        return [
            (i, layer.mlp)
            for i, layer in enumerate(getattr(base, "layers", []))
            if hasattr(getattr(layer, "mlp", None), "experts") and hasattr(layer.mlp, "gate")
        ]
    return moe_blocks(model)


def _gate(block: nn.Module) -> nn.Module:
    gate = block.gate
    if not isinstance(gate, nn.Module):
        raise ValueError(f"{type(block).__name__}.gate is not a router module")
    return gate


def router_score_kind(config) -> str:
    """Router scoring, "softmax" or "sigmoid": how this model's router turns logits into expert scores."""
    try:
        from moe_engine.runtime.adapters import get_adapter

        return get_adapter(config).router_score
    except (ImportError, ValueError):
        fn = str(getattr(config, "scoring_func", "softmax"))
        return "sigmoid" if fn == "sigmoid" else "softmax"


def _num_experts(config) -> int:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        n = getattr(config, attr, None)
        if n:
            return int(n)
    raise ValueError(f"{type(config).__name__} declares no routed experts")


def _top_k(config) -> int:
    k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_top_k", None)
    if not k:
        raise ValueError(f"{type(config).__name__} declares no num_experts_per_tok")
    return int(k)


def split_into_sequences(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Consecutive chunks of ``seq_len`` tokens (the last one may be shorter; empty input gives [])."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    ids = list(ids)
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


class RouterHooks:
    """Forward hooks on each MoE block's router; per call, one [N, K] ids/weights (+ [N, H] input) per layer.
    ``take()`` after each forward pass; ``remove()`` when done (``record_trace``, ``benchmarks/quality_speed.py``)."""

    def __init__(self, model: nn.Module, gate_inputs: bool) -> None:
        self.blocks = _moe_blocks(model)
        if not self.blocks:
            raise ValueError(
                f"{type(model).__name__} has no MoE blocks (decoder layers with mlp.gate and mlp.experts)"
            )
        cfg = model.config
        self.kind = router_score_kind(cfg)
        self.num_experts = _num_experts(cfg)
        self.top_k = _top_k(cfg)
        self.want_inputs = gate_inputs
        self.ids: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.weights: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.handles = [
            _gate(blk).register_forward_hook(self._hook(j)) for j, (_, blk) in enumerate(self.blocks)
        ]

    def _hook(self, j: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args else None
            logits = output[0] if isinstance(output, tuple) else output
            logits = logits.reshape(-1, logits.shape[-1]).float()
            scores = torch.sigmoid(logits) if self.kind == "sigmoid" else torch.softmax(logits, dim=-1)
            if isinstance(output, tuple) and len(output) >= 3 and output[2] is not None:
                idx = output[2].reshape(logits.shape[0], -1).long()  # the router's own choice
            else:
                idx = scores.topk(self.top_k, dim=-1).indices
            w = scores.gather(1, idx)
            order = w.argsort(dim=1, descending=True, stable=True)
            self.ids[j] = idx.gather(1, order).cpu()
            self.weights[j] = w.gather(1, order).cpu()
            if self.want_inputs and x is not None:
                self.inputs[j] = x.reshape(logits.shape[0], -1).detach().to(torch.float16).cpu()

        return hook

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """[N, L, K] ids and weights (and [N, L, H] inputs) of the last forward pass."""
        if any(t is None for t in self.ids):
            raise RuntimeError("a router hook did not fire during the forward pass")
        ids = torch.stack(self.ids, dim=1)  # type: ignore[arg-type]
        w = torch.stack(self.weights, dim=1)  # type: ignore[arg-type]
        gi = torch.stack(self.inputs, dim=1) if self.want_inputs else None  # type: ignore[arg-type]
        self.ids = [None] * len(self.blocks)
        self.weights = [None] * len(self.blocks)
        self.inputs = [None] * len(self.blocks)
        return ids, w, gi

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def record_trace(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    gate_inputs: bool = False,
    batch_size: int = 8,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> RoutingTrace:
    """Run ``model`` over token ``sequences`` (each its own causal context) and record its routing.

    Sequences of equal length are batched ``batch_size`` at a time; no padding is ever added.
    Returns a trace with one row per token, sequences in the given order.
    """
    seqs = [list(s) for s in sequences if len(s) > 0]
    if not seqs:
        raise ValueError("no tokens to trace (empty text?)")
    hooks = RouterHooks(model, gate_inputs)
    device = next(model.parameters()).device
    # Group by length, keep original order inside groups; write results back by index.
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    batches = [g[b : b + batch_size] for g in by_len.values() for b in range(0, len(g), batch_size)]
    per_seq: list[tuple[np.ndarray, np.ndarray, np.ndarray | None] | None] = [None] * len(seqs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(s) for s in seqs), unit="tok", desc="trace", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                n = len(seqs[batch[0]])
                x = torch.tensor([seqs[i] for i in batch], dtype=torch.long, device=device)
                model(input_ids=x, use_cache=False)
                ids, w, gi = hooks.take()
                ids = ids.reshape(len(batch), n, *ids.shape[1:])
                w = w.reshape(len(batch), n, *w.shape[1:])
                if gi is not None:
                    gi = gi.reshape(len(batch), n, *gi.shape[1:])
                for b, i in enumerate(batch):
                    per_seq[i] = (ids[b].numpy(), w[b].numpy(), None if gi is None else gi[b].numpy())
                if bar is not None:
                    bar.update(n * len(batch))
    finally:
        hooks.remove()
        model.train(was_training)
        if bar is not None:
            bar.close()
    parts = [p for p in per_seq if p is not None]
    id_dtype = np.uint8 if hooks.num_experts <= 256 else np.int16
    lens = [len(s) for s in seqs]
    full_meta: dict[str, Any] = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "num_experts": hooks.num_experts,
        "top_k": hooks.top_k,
        "moe_layers": [i for i, _ in hooks.blocks],
        "router_score": hooks.kind,
    }
    eb = _expert_bytes(model, hooks.blocks)
    if eb:
        full_meta["expert_bytes"] = eb
    full_meta.update(meta or {})
    return RoutingTrace(
        expert_ids=np.concatenate([p[0] for p in parts]).astype(id_dtype),
        expert_weights=np.concatenate([p[1] for p in parts]).astype(np.float16),
        sequence_starts=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        meta=full_meta,
        gate_inputs=np.concatenate([p[2] for p in parts]).astype(np.float16) if gate_inputs else None,  # type: ignore[misc]
    )


def _expert_bytes(model, blocks) -> int | None:
    """Bytes of one routed expert as the model computes with it (the simulator's transfer unit)."""
    engine = getattr(model, "engine", None)
    if engine is not None:
        return int(engine.expert_bytes)
    experts = getattr(blocks[0][1], "experts", None) if blocks else None
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if gate_up is None or down is None:
        return None
    return int((gate_up[0].numel() + down[0].numel()) * gate_up.element_size())
