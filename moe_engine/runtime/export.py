"""Saving an offloaded model as a complete Hugging Face checkpoint, and guarding its dtype and device.

An offloaded model's routed experts live in the engine's store, not in the module tree, so
transformers' own ``save_pretrained`` would write a checkpoint without them (stock transformers then
loads it with random experts). ``save_checkpoint`` writes everything:

* the non-expert state dict (tied weights removed, as transformers does);
* every routed expert, read from the store one MoE layer at a time into the model's fused layout
  (``...mlp.experts.gate_up_proj [E, 2I, H]``, ``...mlp.experts.down_proj [E, H, I]``) at the model's
  dtype, then reverted to the checkpoint key layout with transformers' own
  ``revert_weight_conversion`` (e.g. Mixtral's ``block_sparse_moe.experts.{e}.w1/w2/w3``);
* safetensors shards of at most ``max_shard_size`` bytes (a tensor bigger than that gets a shard of its
  own, as in transformers), with ``model.safetensors.index.json`` when there is more than one;
* ``config.json`` and ``generation_config.json``.

Memory: at most one MoE layer's experts plus the shard being filled (``max_shard_size``) are held at once.
Everything is written into a temporary folder beside ``save_directory`` and renamed into place at the
end, so an error leaves no half-written checkpoint.

Glossary: *fused layout* -- the model's parameter names and shapes; *checkpoint layout* -- the names
and shapes transformers writes and reads back (after ``revert_weight_conversion``).

Example::

    with moe_engine.from_pretrained(path, budget=0.25) as model:
        model.save_pretrained("out/")          # AutoModelForCausalLM.from_pretrained("out/") gives the same logits
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_engine.runtime.engine import Engine, ModelClosedError, OffloadedExperts
from moe_engine.runtime.interrupts import deferred_interrupts, interruptible

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip

RELOAD_HINT = "load it again with moe_engine.from_pretrained(path, dtype=..., device=...)"


def parse_shard_size(size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or a string like ``"2GB"`` (10**9) / ``"500MiB"`` (2**20), as
    transformers reads it."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if m is None or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size; give bytes (int) or e.g. '2GB', '500MiB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def offloaded_experts(model: nn.Module) -> list[tuple[str, OffloadedExperts]]:
    """``[(module_name, module)]`` of every ``OffloadedExperts`` in the model, in MoE-layer order."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, OffloadedExperts)]
    return sorted(found, key=lambda nm: nm[1].moe_index)


def expert_parameter_count(model: nn.Module) -> int:
    """Elements of every routed expert the engine holds (what the stock model's expert parameters count)."""
    return sum(m.num_experts * 3 * m.intermediate_dim * m.hidden_dim for _, m in offloaded_experts(model))


def read_layer_experts(engine: Engine, module: OffloadedExperts, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One MoE layer's experts in the fused layout, read from the store on CPU at ``dtype``:
    ``{"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]}`` (keys relative to the experts module)."""
    n, i, h = module.num_experts, module.intermediate_dim, module.hidden_dim
    gate_up = torch.empty(n, 2 * i, h, dtype=dtype)
    down = torch.empty(n, h, i, dtype=dtype)
    flat = torch.empty(3 * i * h, dtype=dtype)
    packed = None
    for e in range(n):
        key = (module.moe_index, e)
        loc = engine.cache.locate(key)
        if loc.offsets is not None:  # a quantized checkpoint: its experts dequantized (moe_engine.quant)
            from moe_engine.quant.formats import get_format

            if packed is None:
                packed = torch.empty(engine.cache.slot_numel, dtype=torch.uint8)
            engine.store.read_expert_into(loc, packed)
            for out, q in zip((gate_up[e], down[e]), engine.cache.layout.views(packed, key)):
                out.copy_(get_format(q.format).dequantize(q, dtype))
            continue
        # Slot order: gate_up [2I, H] then down [H, I] (ExpertCache.views).
        engine.store.read_expert_into(loc, flat)
        gate_up[e].copy_(flat[: 2 * i * h].view(2 * i, h))
        down[e].copy_(flat[2 * i * h :].view(h, i))
    return {"gate_up_proj": gate_up, "down_proj": down}


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers' own state dict of the model: the non-expert tensors only (experts are not parameters)."""
    return nn.Module.state_dict(model)


class OffloadedStateDict(Mapping):
    """``state_dict()`` of an offloaded model: every key of the stock model's state dict, in its order.

    Non-expert tensors are the model's own (as ``nn.Module.state_dict`` gives them); each MoE layer's
    ``...experts.gate_up_proj [E, 2I, H]`` and ``...experts.down_proj [E, H, I]`` are read from the store
    when their key is looked up (CPU tensors at the model's dtype, fresh copies the engine never writes
    to), so holding the mapping costs nothing and iterating it holds one MoE layer at a time.
    ``dict(model.state_dict())`` materialises everything; stock ``load_state_dict`` accepts either.
    """

    def __init__(self, model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
        self._engine: Engine = model.engine  # type: ignore[assignment]
        self._dtype: torch.dtype = model.dtype  # type: ignore[assignment]
        self._experts: dict[str, tuple[OffloadedExperts, str]] = {}
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        keyed: list[tuple[int, int, str]] = []
        for n, key in enumerate(dense):
            keyed.append((order.get(key.rpartition(".")[0], len(order)), n, key))
        for name, module in offloaded_experts(model):
            for j, part in enumerate(("gate_up_proj", "down_proj")):
                key = f"{name}.{part}"
                self._experts[key] = (module, part)
                keyed.append((order[name], j, key))
        self._dense = dense
        self._keys = [k for _, _, k in sorted(keyed)]
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None  # the last MoE layer read

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._dense:
            return self._dense[key]
        module, part = self._experts[key]  # KeyError for an unknown key, as a dict
        if self._engine.closed:
            raise ModelClosedError(
                f"cannot read {key}: the model was closed (close() or the end of its `with` block); "
                "load it again with moe_engine.from_pretrained to read its experts"
            )
        last = self._last
        if last is None or last[0] != module.moe_index:
            with deferred_interrupts(), self._engine.lock, interruptible():  # see Engine's _serialized
                layer = read_layer_experts(self._engine, module, self._dtype)
            last = self._last = (module.moe_index, layer)
        return last[1][part]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._dense or key in self._experts


def _checkpoint_tensors(model: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The model's tensors in the checkpoint layout, in groups: the non-expert ones first, then one
    group per MoE layer (read from the store only when the group is asked for)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    engine: Engine = model.engine
    dense = remove_tied_weights_from_state_dict(dense_state_dict(model), model)
    yield revert_weight_conversion(model, {k: v.detach().cpu() for k, v in dense.items()})
    for name, module in offloaded_experts(model):
        layer = read_layer_experts(engine, module, model.dtype)
        yield revert_weight_conversion(model, {f"{name}.{k}": v for k, v in layer.items()})


class _ShardWriter:
    """Writes tensors into numbered safetensors shards of at most ``max_bytes`` (a bigger tensor gets a
    shard of its own); names them ``model-0000k-of-0000N.safetensors`` (or ``model.safetensors``) at the end."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []  # temporary file, tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        tmp = self.folder / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(tmp), metadata={"format": "pt"})
        self.shards.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, total_parameters: int) -> None:
        self.flush()
        count = len(self.shards)
        if count == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map: dict[str, str] = {}
        for k, (tmp, names) in enumerate(self.shards, start=1):
            final = f"model-{k:05d}-of-{count:05d}.safetensors"
            tmp.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_checkpoint(model: Any, save_directory: str | os.PathLike, max_shard_size: int | str = "2GB") -> None:
    """Write ``model`` (an offloaded model) as a complete checkpoint at ``save_directory`` (see the module
    docstring). An existing ``save_directory`` is replaced only once the new checkpoint is complete."""
    max_bytes = parse_shard_size(max_shard_size)
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory {target} exists and is a file; give a directory path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        # no forward pass reads the store meanwhile; raises nothing if closed (locking: Engine's _serialized)
        with deferred_interrupts(), model.engine.lock, interruptible():
            if model.engine.closed:
                from moe_engine.runtime.engine import ModelClosedError

                raise ModelClosedError(
                    "this moe-engine model was closed; load it again with moe_engine.from_pretrained to save it"
                )
            writer = _ShardWriter(tmp, max_bytes)
            for group in _checkpoint_tensors(model):
                for name, tensor in group.items():
                    writer.add(name, tensor)
            writer.finish(model.num_parameters())
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``: a rename when ``target`` does not exist; else the
    old folder is renamed aside first and removed once ``new`` is in place."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_to_arguments(model: Any, args: tuple, kwargs: dict) -> None:
    """Raise ValueError if ``model.to(*args, **kwargs)`` would change the dtype or device of an offloaded
    model (its experts live in the engine at the load dtype and device); return for a no-op call."""
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    check_dtype_device(model, dtype, device)


def check_dtype_device(model: Any, dtype: torch.dtype | None, device: torch.device | str | int | None) -> None:
    """Raise ValueError naming the fix when ``dtype``/``device`` (None: unchanged) differ from the model's."""
    engine: Engine = model.engine
    if dtype is not None and dtype != model.dtype:
        raise ValueError(
            f"cannot convert an offloaded moe-engine model from {model.dtype} to {dtype}: its experts live in "
            f"the engine's cache at {model.dtype}. Instead, {RELOAD_HINT} (here dtype={dtype})"
        )
    if device is not None:
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        have = engine.device
        if dev.type != have.type or (dev.index is not None and have.index is not None and dev.index != have.index):
            raise ValueError(
                f"cannot move an offloaded moe-engine model from {have} to {dev}: its experts and cache slots "
                f"live on {have}. Instead, {RELOAD_HINT} (here device={str(dev)!r})"
            )


__all__ = [
    "check_dtype_device",
    "check_to_arguments",
    "dense_state_dict",
    "OffloadedStateDict",
    "expert_parameter_count",
    "offloaded_experts",
    "parse_shard_size",
    "read_layer_experts",
    "save_checkpoint",
]
