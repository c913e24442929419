"""Quantized checkpoints written by ``moe-engine quantize``: the on-disk format, the writer and the reader.

Owns: the tensor names and ``quantization_config`` schema of a quantized checkpoint, writing one from a
source checkpoint (every routed expert quantized in the format an allocation gives it), and locating or
reading a quantized expert back (for tests and for the runtime's store).

Format (``format_version`` 1)
-----------------------------
A Hugging Face checkpoint directory: ``config.json``, safetensors shards (``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above ``max_shard_size``), and the
source's other files (tokenizer, generation config) copied.

* Non-expert tensors: copied byte for byte under their source names and dtypes.
* Routed experts: each expert's two matrices, ``gate_up_proj [2I, H]`` (gate rows then up rows; for
  per-expert source checkpoints ``cat(gate, up)``) and ``down_proj [H, I]``, are quantized with the
  expert's format (``moe_engine.quant.formats``) and stored as the format's *parts*
  (``get_format(fmt).layout(shape)``: names, dtypes, shapes), one safetensors tensor per part::

      model.layers.{decoder_layer}.mlp.experts.{expert}.{matrix}.{part}                   # the expert's format
      model.layers.{decoder_layer}.mlp.experts.{expert}.copies.{format}.{matrix}.{part}   # extra copies

  with ``matrix`` in ``gate_up_proj``, ``down_proj`` (``expert_tensor_name`` builds them). The names
  are the same for every architecture (Mixtral's ``block_sparse_moe``, ``w1/w2/w3`` included). In the
  files, one expert's parts lie back to back in slot order (gate_up's parts in layout order, then
  down's), so one ``preadv`` reads an expert into a slot; a shard never splits an expert. (A
  ``__pad__.{n}`` uint8 tensor is inserted in the rare case a part would otherwise start at an offset
  not a multiple of its dtype's size; readers ignore it.)
* ``config.json`` keeps the source config and adds::

      "quantization_config": {
        "quant_method": "moe-engine",
        "format_version": 1,
        "experts": {"0": ["int4-g64", "int8", ...], ...},   # MoE layer index -> the format of each expert
        "copies": {"0": [["int2-g64"], [], ...], ...},       # optional: extra formats stored per expert
        "moe_layers": [0, 1, ...],                           # decoder layer of each MoE layer
        "expert_shapes": {"gate_up_proj": [2I, H], "down_proj": [H, I]},
        "source_dtype": "bfloat16",                          # dtype of the source's experts
        "allocation": {"method": "uniform" | "ilp", ...}     # provenance only (bits, budget, objective)
      }

  MoE layer indices count MoE layers only (0 = the first decoder layer with routed experts), as
  everywhere in moe-engine. A format is any name ``moe_engine.quant.formats.available_formats()``
  lists, including the stored precisions ``bf16``, ``fp16``, ``fp32``.

Writing goes to a temporary folder beside ``out`` that is renamed to ``out`` at the end: an error or
Ctrl-C leaves nothing half-written.

Example::

    with open_source(src_dir) as src:                      # the runtime's store + adapters find the experts
        write_quantized_checkpoint(src, out, uniform_formats(src, "int4-g64"))
    qc = read_quantization_config(out)
    store = CheckpointStore.open(out)
    gate_up, down = read_quantized_expert(store, qc, moe_layer=0, expert=3)   # QTensors
    loc = quantized_expert_location(store, qc, 0, 3)       # ExpertLocation with slot offsets
    store.read_expert_into(loc, slot)                      # slot: uint8, pack(gate_up) ++ pad ++ pack(down)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_engine.runtime.store import INDEX_NAME, CheckpointStore, ExpertLocation

QUANT_METHOD = "moe-engine"
FORMAT_VERSION = 1
MATRICES = ("gate_up_proj", "down_proj")
PAD_PREFIX = "__pad__."
#: the stored-precision format of each unquantized dtype
STORED_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
_SKIP_FILES = {"config.json", INDEX_NAME}
_SKIP_SUFFIXES = (".safetensors", ".py", ".pyc")  # weights are rewritten; code is not model data


def expert_tensor_name(decoder_layer: int, expert: int, matrix: str, part: str, copy: str | None = None) -> str:
    """The tensor name of one part of a quantized expert matrix; ``copy``: the format of an extra copy."""
    assert matrix in MATRICES, matrix
    mid = f"copies.{copy}." if copy is not None else ""
    return f"model.layers.{decoder_layer}.mlp.experts.{expert}.{mid}{matrix}.{part}"


# ----------------------------------------------------------------------------------------------------
# the schema


@dataclass(frozen=True)
class QuantizationConfig:
    """A validated ``quantization_config`` of a moe-engine quantized checkpoint.

    ``experts[l][e]``: the format of expert ``e`` of MoE layer ``l``; ``copies[l][e]``: extra formats
    stored for it (empty tuple: none); ``moe_layers[l]``: its decoder layer; shapes ``[out, in]``."""

    experts: tuple[tuple[str, ...], ...]
    moe_layers: tuple[int, ...]
    gate_up_shape: tuple[int, int]
    down_shape: tuple[int, int]
    source_dtype: str
    copies: tuple[tuple[tuple[str, ...], ...], ...] = ()
    allocation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.experts) != len(self.moe_layers):
            raise ValueError(f"quantization_config: {len(self.experts)} MoE layers of experts but {len(self.moe_layers)} moe_layers")
        if self.copies and [len(c) for c in self.copies] != [len(e) for e in self.experts]:
            raise ValueError("quantization_config: copies must list one entry per expert of every MoE layer")

    def formats_of(self, moe_layer: int, expert: int) -> tuple[str, ...]:
        """Every format stored for the expert: its own first, then its extra copies."""
        extra = self.copies[moe_layer][expert] if self.copies else ()
        return (self.experts[moe_layer][expert], *extra)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "experts": {str(i): list(fmts) for i, fmts in enumerate(self.experts)},
        }
        if self.copies and any(c for layer in self.copies for c in layer):
            out["copies"] = {str(i): [list(c) for c in layer] for i, layer in enumerate(self.copies)}
        out["moe_layers"] = list(self.moe_layers)
        out["expert_shapes"] = {"gate_up_proj": list(self.gate_up_shape), "down_proj": list(self.down_shape)}
        out["source_dtype"] = self.source_dtype
        out["allocation"] = dict(self.allocation)
        return out

    @classmethod
    def from_json(cls, qc: Any, where: str = "quantization_config") -> QuantizationConfig:
        from moe_engine.quant.formats import get_format

        def bad(problem: str) -> ValueError:
            return ValueError(f"{where}: {problem}; re-run moe-engine quantize to rewrite the checkpoint")

        if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
            raise bad(f"quant_method is not {QUANT_METHOD!r}")
        if qc.get("format_version") != FORMAT_VERSION:
            raise bad(f"format_version {qc.get('format_version')!r} is not {FORMAT_VERSION} (written by another version)")
        experts_json, layers = qc.get("experts"), qc.get("moe_layers")
        if not isinstance(experts_json, dict) or not isinstance(layers, list):
            raise bad("experts (an object) and moe_layers (a list) are required")
        if sorted(experts_json) != [str(i) for i in range(len(layers))]:
            raise bad(f"experts must have the keys '0'..'{len(layers) - 1}' (one per MoE layer)")
        experts = tuple(tuple(experts_json[str(i)]) for i in range(len(layers)))
        copies_json = qc.get("copies") or {}
        copies = tuple(tuple(tuple(c) for c in copies_json.get(str(i), [[]] * len(experts[i]))) for i in range(len(layers)))
        for name in {f for layer in experts for f in layer} | {f for layer in copies for c in layer for f in c}:
            get_format(name)  # ValueError naming the available formats
        shapes = qc.get("expert_shapes") or {}
        try:
            gu = tuple(int(x) for x in shapes["gate_up_proj"])
            dn = tuple(int(x) for x in shapes["down_proj"])
        except (KeyError, TypeError, ValueError):
            raise bad("expert_shapes must give gate_up_proj and down_proj as [out, in]") from None
        return cls(
            experts, tuple(int(x) for x in layers), (gu[0], gu[1]), (dn[0], dn[1]), str(qc.get("source_dtype")),
            copies, dict(qc.get("allocation") or {}),
        )  # fmt: skip


def read_quantization_config(root: str | os.PathLike) -> QuantizationConfig:
    """The validated quantization_config of the moe-engine quantized checkpoint at ``root``."""
    path = Path(root) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json in {root}; point at a checkpoint written by moe-engine quantize") from None
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    if qc is None:
        raise ValueError(f"{path} has no quantization_config: {root} is not a quantized checkpoint")
    return QuantizationConfig.from_json(qc, where=str(path))


def is_quantized(config_json: dict[str, Any]) -> str | None:
    """The quant_method of a config.json's quantization_config (None when it has none)."""
    qc = config_json.get("quantization_config")
    if qc is None:
        return None
    return str(qc.get("quant_method")) if isinstance(qc, dict) else "unknown"


# ----------------------------------------------------------------------------------------------------
# the source checkpoint


@dataclass
class SourceCheckpoint:
    """A source checkpoint opened for quantization: its store, MoE layers and each expert's location.

    ``locations[(moe_layer, expert)]``; ``decoder_layers[moe_layer]``; shapes ``I`` (intermediate) and
    ``H`` (hidden); ``dtype``: the experts' stored dtype (fp32, bf16 or fp16)."""

    root: Path
    config: dict[str, Any]
    store: CheckpointStore
    decoder_layers: list[int]
    num_experts: int
    intermediate: int
    hidden: int
    dtype: torch.dtype
    locations: dict[tuple[int, int], ExpertLocation]

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def gate_up_shape(self) -> tuple[int, int]:
        return (2 * self.intermediate, self.hidden)

    @property
    def down_shape(self) -> tuple[int, int]:
        return (self.hidden, self.intermediate)

    def read_expert(self, moe_layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [2I, H], down [H, I])`` of one expert, as stored (``dtype``)."""
        i, h = self.intermediate, self.hidden
        slot = torch.empty(3 * i * h, dtype=self.dtype)
        self.store.read_expert_into(self.locations[(moe_layer, expert)], slot)
        return slot[: 2 * i * h].view(2 * i, h), slot[2 * i * h :].view(h, i)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> SourceCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(root: str | os.PathLike) -> SourceCheckpoint:
    """Open an unquantized checkpoint for quantization (the runtime's store and adapters find its experts).

    ValueError when the checkpoint is already quantized (by moe-engine or any other method), is not a
    supported MoE model, or does not match its config; FileNotFoundError when it is missing."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_engine.runtime.adapters import get_adapter, moe_blocks
    from moe_engine.runtime.loader import _expert_locations

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"model path {root} does not exist (give a local checkpoint directory)")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {root}; point --model at a Hugging Face checkpoint directory")
    config_json = json.loads(cfg_path.read_text())
    method = is_quantized(config_json)
    if method == QUANT_METHOD:
        raise ValueError(
            f"{root} is already quantized by moe-engine (config.json has a quantization_config); quantize the "
            "original bf16/fp32 checkpoint instead"
        )
    if method is not None:
        raise ValueError(
            f"{root} is already quantized with quant_method {method!r}; moe-engine quantize needs an unquantized "
            "(fp32/bf16/fp16) checkpoint: dequantize it first"
        )
    config = AutoConfig.from_pretrained(root)
    adapter = get_adapter(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{root}: the model has no MoE layers")
    experts: list[Any] = [block.experts for _, block in blocks]
    shapes = {tuple(ex.gate_up_proj.shape) for ex in experts}
    if len(shapes) != 1:
        raise ValueError(f"{root}: experts of different shapes across layers are not supported: {sorted(shapes)}")
    num_experts, two_i, hidden = shapes.pop()
    decoder_layers = [dec for dec, _ in blocks]
    store = CheckpointStore.open(root)
    try:
        locations = _expert_locations(
            store, adapter, {dec: i for i, dec in enumerate(decoder_layers)}, num_experts, two_i // 2, hidden,
            num_decoder_layers=getattr(config, "num_hidden_layers", None),
        )  # fmt: skip
        dtype = next(iter(locations.values())).parts[0].dtype
        if dtype not in STORED_FORMATS:
            raise ValueError(f"{root}: experts stored as {dtype}; moe-engine quantize reads fp32, bf16 or fp16 experts")
    except BaseException:
        store.close()
        raise
    return SourceCheckpoint(root, config_json, store, decoder_layers, num_experts, two_i // 2, hidden, dtype, locations)


def uniform_formats(src: SourceCheckpoint, fmt: str) -> list[list[str]]:
    """Every expert of every MoE layer in format ``fmt``."""
    return [[fmt] * src.num_experts for _ in range(src.num_layers)]


def check_format_fits(
    fmt: str, gate_up_shape: tuple[int, int], down_shape: tuple[int, int], *, divisible: bool = False
) -> None:
    """ValueError when ``fmt`` cannot store the expert shapes; with ``divisible``, also when its group size
    does not divide an input width (the format would pad the groups: allowed, but wasted bytes)."""
    from moe_engine.quant.formats import get_format

    f = get_format(fmt)
    for name, shape in (("gate_up_proj", gate_up_shape), ("down_proj", down_shape)):
        group = getattr(f, "group", None)
        if divisible and group and shape[1] % group:
            raise ValueError(
                f"group size {group} does not divide the {name} input width {shape[1]} (expert matrix "
                f"[out, in] = {list(shape)}); choose a --group-size that divides {shape[1]}"
            )
        try:
            f.nbytes(shape)
        except (ValueError, AssertionError) as exc:
            raise ValueError(f"format {fmt} cannot store {name} {list(shape)}: {exc}") from None


# ----------------------------------------------------------------------------------------------------
# writing


def _parse_size(size: int | str) -> int:
    from moe_engine.runtime.config import parse_budget

    value = parse_budget(size) if isinstance(size, str) else size
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"max_shard_size {size!r} must be a size such as '2GB' or a positive number of bytes")
    return value


class _ShardWriter:
    """Writes safetensors shards into ``folder``: tensors in the order given, a new shard when the next
    unit (one expert, or one dense tensor) would pass ``limit`` bytes."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0
        self._pads = 0

    def add_unit(self, tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        size = sum(t.numel() * t.element_size() for _, t in tensors)
        if self.pending and self.pending_bytes + size > self.limit:
            self.flush()
        for name, t in tensors:
            align = t.element_size()
            if self.pending_bytes % align:
                pad = align - self.pending_bytes % align
                self.pending.append((f"{PAD_PREFIX}{self._pads}", torch.zeros(pad, dtype=torch.uint8)))
                self._pads += 1
                self.pending_bytes += pad
            self.pending.append((name, t))
            self.pending_bytes += t.numel() * t.element_size()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.shards):05d}.tmp"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, t in self.pending:
            n = t.numel() * t.element_size()
            header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for _, t in self.pending:
                if t.numel():
                    fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        self.shards.append((path, [n for n, _ in self.pending]))
        self.total += offset
        self.pending, self.pending_bytes = [], 0

    def finish(self) -> None:
        """Name the shards as transformers does and write the index when there are several."""
        self.flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not empty; choose a new folder or remove it")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: its folder {out.parent} does not exist")


def quantize_expert(
    src: SourceCheckpoint, moe_layer: int, expert: int, formats: Sequence[str]
) -> list[tuple[str, torch.Tensor]]:
    """The named part tensors of one expert in each of ``formats`` (its own format first), in file order."""
    from moe_engine.quant.formats import get_format

    gate_up, down = src.read_expert(moe_layer, expert)
    dec = src.decoder_layers[moe_layer]
    out: list[tuple[str, torch.Tensor]] = []
    for k, fmt in enumerate(formats):
        f = get_format(fmt)
        for matrix, w in zip(MATRICES, (gate_up, down)):
            q = f.quantize(w)
            for part, _, _ in f.layout((w.shape[0], w.shape[1])):
                out.append((expert_tensor_name(dec, expert, matrix, part, None if k == 0 else fmt), q.parts[part]))
    return out


def write_quantized_checkpoint(
    src: SourceCheckpoint,
    out: str | os.PathLike,
    formats: Sequence[Sequence[str]],
    *,
    copies: Sequence[Sequence[Sequence[str]]] | None = None,
    allocation: dict[str, Any] | None = None,
    max_shard_size: int | str = "2GB",
    progress: bool = False,
) -> QuantizationConfig:
    """Write the quantized checkpoint of ``src`` to ``out`` (a new or empty folder) and return its config.

    ``formats[l][e]``: the format of expert ``e`` of MoE layer ``l``; ``copies[l][e]``: extra formats to
    store for it. Written to ``.{out.name}.partial-<pid>`` beside ``out`` and renamed at the end."""
    from tqdm.auto import tqdm

    out = Path(out)
    _check_out(out)
    limit = _parse_size(max_shard_size)
    if len(formats) != src.num_layers or any(len(f) != src.num_experts for f in formats):
        raise ValueError(f"formats must give {src.num_experts} formats for each of {src.num_layers} MoE layers")
    copy_lists = [[tuple(c) for c in layer] for layer in copies] if copies else [[()] * src.num_experts for _ in formats]
    for fmt in {f for layer in formats for f in layer} | {f for layer in copy_lists for c in layer for f in c}:
        check_format_fits(fmt, src.gate_up_shape, src.down_shape)
    qconfig = QuantizationConfig(
        tuple(tuple(layer) for layer in formats), tuple(src.decoder_layers), src.gate_up_shape, src.down_shape,
        str(src.dtype).removeprefix("torch."), tuple(tuple(layer) for layer in copy_lists), dict(allocation or {}),
    )  # fmt: skip
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, limit)
        from transformers import AutoConfig

        from moe_engine.runtime.adapters import get_adapter, parse_expert_key

        adapter = get_adapter(AutoConfig.from_pretrained(src.root))
        dense = sorted(n for n in src.store.tensors if parse_expert_key(n, adapter) is None)
        for name in dense:  # as stored (open_source refuses quantized sources, FP8 ones included)
            writer.add_unit([(name, src.store.read_tensor(name))])
        keys = [(layer, e) for layer in range(src.num_layers) for e in range(src.num_experts)]
        for layer, e in tqdm(keys, desc="quantizing experts", unit="expert", disable=not progress):
            writer.add_unit(quantize_expert(src, layer, e, (formats[layer][e], *copy_lists[layer][e])))
        writer.finish()
        config = dict(src.config)
        config["quantization_config"] = qconfig.to_json()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in sorted(src.root.iterdir()):
            if f.is_file() and f.name not in _SKIP_FILES and not f.name.endswith(_SKIP_SUFFIXES) and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return qconfig


# ----------------------------------------------------------------------------------------------------
# reading back


def _part_names(qconfig: QuantizationConfig, moe_layer: int, expert: int, fmt: str | None) -> Iterator[tuple[str, str, str, tuple[int, int]]]:
    """``(matrix, part, tensor name, matrix shape)`` of one stored copy, in file (slot) order."""
    from moe_engine.quant.formats import get_format

    formats = qconfig.formats_of(moe_layer, expert)
    fmt = formats[0] if fmt is None else fmt
    if fmt not in formats:
        raise ValueError(f"expert {expert} of MoE layer {moe_layer} is stored as {', '.join(formats)}, not {fmt}")
    copy = None if fmt == formats[0] else fmt
    dec = qconfig.moe_layers[moe_layer]
    for matrix, shape in zip(MATRICES, (qconfig.gate_up_shape, qconfig.down_shape)):
        for part, _, _ in get_format(fmt).layout(shape):
            yield matrix, part, expert_tensor_name(dec, expert, matrix, part, copy), shape


def read_quantized_expert(
    tensors: Callable[[str], torch.Tensor] | CheckpointStore, qconfig: QuantizationConfig, moe_layer: int, expert: int,
    fmt: str | None = None,
) -> tuple[Any, Any]:
    """``(gate_up, down)`` QTensors of one expert in ``fmt`` (default: its own format).

    ``tensors``: the checkpoint's CheckpointStore, or any function name -> stored tensor."""
    from moe_engine.quant.formats import QTensor

    get = tensors.read_tensor if isinstance(tensors, CheckpointStore) else tensors
    parts: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MATRICES}
    fmt_name = fmt or qconfig.experts[moe_layer][expert]
    for matrix, part, name, _ in _part_names(qconfig, moe_layer, expert, fmt):
        parts[matrix][part] = get(name)
    return (
        QTensor(fmt_name, qconfig.gate_up_shape, parts["gate_up_proj"]),
        QTensor(fmt_name, qconfig.down_shape, parts["down_proj"]),
    )


def quantized_expert_location(
    store: CheckpointStore, qconfig: QuantizationConfig, moe_layer: int, expert: int, fmt: str | None = None
) -> ExpertLocation:
    """Where one expert's copy in ``fmt`` (default: its own format) lies, with each part's byte offset in a
    uint8 slot (``moe_engine.quant.slots`` layout); ``store.read_expert_into(loc, slot)`` then leaves
    ``pack(gate_up) ++ pad ++ pack(down)`` in the slot."""
    from moe_engine.quant.slots import expert_packing, part_offsets

    fmt_name = fmt or qconfig.experts[moe_layer][expert]
    (gu_off, _), (dn_off, _) = expert_packing(fmt_name, qconfig.down_shape[1], qconfig.down_shape[0])
    base = {"gate_up_proj": gu_off, "down_proj": dn_off}
    locs, offsets = [], []
    for matrix, part, name, shape in _part_names(qconfig, moe_layer, expert, fmt):
        within = {p: off for p, off, _ in part_offsets(fmt_name, shape)}
        loc = store.tensors.get(name)
        if loc is None:
            raise ValueError(f"quantized checkpoint {store.root} lacks tensor {name}; it is incomplete: re-run moe-engine quantize")
        locs.append(loc)
        offsets.append(base[matrix] + within[part])
    return ExpertLocation(tuple(locs), offsets=tuple(offsets))


def safetensors_reader(root: str | os.PathLike) -> Callable[[str], torch.Tensor]:
    """name -> tensor for the checkpoint at ``root``, read with the ``safetensors`` library (an independent
    reader for tests and tools; the runtime reads through its CheckpointStore)."""
    from safetensors import safe_open

    root = Path(root)
    index = root / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(root / "model.safetensors", framework="pt") as fh:
            weight_map = dict.fromkeys(fh.keys(), "model.safetensors")

    def get(name: str) -> torch.Tensor:
        with safe_open(root / weight_map[name], framework="pt") as fh:
            return fh.get_tensor(name)

    return get
