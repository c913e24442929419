"""Slow tier: the checkpoint's safetensors files, read one expert (or one tensor) at a time.

Owns: parsing and validating safetensors headers (single file or sharded with
``model.safetensors.index.json``), the index's ``weight_map``, the checkpoint's quantization format
(``config.json``'s ``quantization_config``: none, or FP8 block-scaled), locating each routed expert's
bytes, and reading them into a caller's buffer with ``os.preadv``. By default the pages just read are
dropped from the OS page cache (``posix_fadvise(DONTNEED)``) so the fast-tier budget is the real
memory bound, not a page cache silently holding every expert.

Descriptors per shard (page cache off): reads are random by default. Where the filesystem supports
``O_DIRECT`` they go through an ``O_DIRECT`` descriptor (the device copies straight into a page-aligned
bounce buffer, the page cache is not touched: about half the CPU of a buffered read and its
``DONTNEED``); elsewhere (tmpfs, macOS), or once the filesystem refuses an aligned read, through a
buffered descriptor with ``POSIX_FADV_RANDOM`` (the kernel reads exactly the requested bytes, nothing
past them) whose pages are dropped after each read. While ``sequential`` is set (the engine
sets it during a prefill, whose reads walk each layer's experts in file order) reads go through a
second descriptor with the kernel's normal readahead, which keeps the disk busy between one read and
the next (measured on this project's VMs: 0.6-0.7 GB/s random vs 1.0-1.2 GB/s with readahead for the
same expert-sized reads). Its pages are dropped after each read as well, and so are the bytes a
stream skipped (experts already resident, into which readahead may have run); what readahead fetched
past the last read is dropped by ``drop_page_cache()`` (the engine calls it when the prefill ends), so
at most a readahead window per shard outlives a prefill (pages still being read when it is dropped).

Hostile or damaged files fail at ``open()`` with a ``CheckpointError`` naming the file, the tensor
and the problem: header entries must have known dtypes, non-negative integer dims and
``data_offsets`` whose byte spans match shape x dtype, lie inside the file and overlap no other
tensor; the index's ``weight_map`` must map tensor names to relative file names inside the
checkpoint folder.

Changed files: every shard is opened at ``open()`` and its identity (device, inode, size, mtime,
ctime) recorded. Each read checks the path (``stat``) and the open descriptor (``fstat``) after
reading; a difference (file replaced, truncated or rewritten in place) raises
``CheckpointChangedError`` and makes the store *stale*: every later read, and
``check_unchanged()``, raises it too, so bytes of a changed file are never handed out and old and
new weights never mix. (Detection is by metadata: a rewrite that keeps size and inode within one
tick of the filesystem clock of the previous write is not seen.) Changing a file's metadata
(``chmod``, a new hard link) also counts as a change.

FP8 block-scaled checkpoints (DeepSeek-V3/R1 format, ``quant_method: "fp8"`` with
``weight_block_size [bm, bn]``): a tensor stored as ``F8_E4M3`` has a companion
``<name>_scale_inv`` (``...weight`` -> ``...weight_scale_inv``, fused ``gate_up_proj`` ->
``gate_up_proj_scale_inv``) holding one fp32 scale per ``bm x bn`` block (edge blocks partial). The
store pairs them at ``open()`` (``TensorLocation.scale``; scale tensors are not listed in
``tensors`` themselves) and dequantizes on read exactly as transformers' ``Fp8Dequantize``:
``(weight.to(float32) * scale_per_block).to(dtype)``.

Glossary: an expert's *parts* are its tensors in slot order: ``gate [I, H]``, ``up [I, H]``,
``down [H, I]`` (per-expert checkpoints) or ``gate_up [2I, H]``, ``down [H, I]`` (fused ones);
concatenated they form one slot: ``gate_up = slot[:2IH].view(2I, H)``, ``down = slot[2IH:].view(H, I)``.

Example::

    store = CheckpointStore.open(path)
    loc = expert_location(store, {"gate": g, "up": u, "down": d}, shapes)   # ExpertLocation
    store.read_expert_into(loc, slot)            # slot: flat tensor of the compute dtype
    store.check_unchanged()                      # CheckpointChangedError if a file changed since open
    store.close()
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import mmap
import os
import stat
import struct
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from moe_engine.runtime.interrupts import deferred_interrupts

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip

_MAX_HEADER = 100 * 2**20
INDEX_NAME = "model.safetensors.index.json"
#: suffix of the per-block scale tensor of an FP8 tensor ``<name>`` (transformers' naming)
SCALE_SUFFIX = "_scale_inv"
_FP8_DTYPES = (torch.float8_e4m3fn,)
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HINT = "re-download or re-save the checkpoint (e.g. with save_pretrained)"

#: What ``fp8_block_size`` accepts, for error messages.
ACCEPTED_QUANTIZATION = (
    "moe-engine accepts unquantized checkpoints (fp32/bf16/fp16) and FP8 block-scaled ones in the "
    'DeepSeek-V3/R1 format (quantization_config {"quant_method": "fp8", "weight_block_size": [128, 128], '
    '"activation_scheme": "dynamic"} with a float32 <name>_scale_inv tensor per F8_E4M3 weight), which it '
    "dequantizes to the compute dtype, and checkpoints written by `moe-engine quantize`"
)


@dataclass(frozen=True)
class BlockScale:
    """Per-block scales of an FP8 tensor ``[..., R, C]``: ``loc`` is ``[..., ceil(R/bm), ceil(C/bn)]``,
    ``block`` is ``(bm, bn)``; element ``[i, j]`` is multiplied by ``scale[i // bm, j // bn]``."""

    loc: TensorLocation
    block: tuple[int, int]


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor (or one contiguous row range of it) lies: absolute byte offset in ``file``.
    ``scale`` is set for FP8 block-scaled tensors (their values are ``stored * scale``)."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    scale: BlockScale | None = None

    def row(self, index: int) -> TensorLocation:
        """Row ``index`` of a tensor ``[N, ...]`` (a fused expert tensor's expert), scales included."""
        row_bytes = self.nbytes // self.shape[0]
        scale = None
        if self.scale is not None:
            scale = BlockScale(self.scale.loc.row(index), self.scale.block)
        return TensorLocation(
            self.file, self.offset + index * row_bytes, row_bytes, self.dtype, self.shape[1:], scale
        )


@dataclass(frozen=True)
class ExpertLocation:
    """One routed expert's parts, in slot order (their concatenation is the slot's contents).

    ``offsets``: for a quantized expert (``moe_engine.quant``), the byte offset of each part inside a
    uint8 slot; the parts' stored bytes are copied there as they are (no dtype conversion), giving the
    packed form ``moe_engine.quant.unpack`` reads. None for a plain expert (parts back to back, converted
    to the slot's dtype)."""

    parts: tuple[TensorLocation, ...]
    offsets: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the parts as stored (FP8 parts: one byte per element; their scales not counted)."""
        return sum(p.nbytes for p in self.parts)


_ALIGN = 64  # bytes: tensors read whole keep their file offset's alignment modulo this
_DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers are multiples of this (a page; >= any block size)
_DIRECT_CHUNK = 4 << 20  # bytes per O_DIRECT read: the largest bounce buffer a reading thread keeps
_bounce = threading.local()  # each reading thread's page-aligned bounce buffer for O_DIRECT reads


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt (the message names the file and the fix)."""


class CheckpointChangedError(CheckpointError):
    """A checkpoint file changed (replaced, truncated, rewritten) after the model was loaded."""


# ----------------------------------------------------------------------------------------------------
# quantization format


def fp8_block_size(quantization_config: Any) -> tuple[int, int] | None:
    """Validate a config's ``quantization_config``; the FP8 block ``(bm, bn)``, or None when there is none.

    Raises ValueError naming the quant_method (or the offending field) for anything moe-engine cannot
    run: other methods (gptq, awq, bitsandbytes, compressed-tensors, ...), FP8 without block scales,
    static activation scales, e5m2 or ue8m0 scales.
    """
    if quantization_config is None:
        return None
    qc = quantization_config
    if not isinstance(qc, Mapping):
        to_dict = getattr(qc, "to_dict", None)
        qc = to_dict() if callable(to_dict) else None
        if not isinstance(qc, Mapping):
            raise ValueError(
                f"quantization_config must be a JSON object, found {type(quantization_config).__name__}; "
                f"{ACCEPTED_QUANTIZATION}"
            )
    method = qc.get("quant_method")
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    if method == "moe-engine":  # written by `moe-engine quantize`: the loader reads its formats
        return None
    if method != "fp8":
        raise ValueError(
            f"the checkpoint is quantized with quant_method {method!r}, which moe-engine does not support; "
            f"{ACCEPTED_QUANTIZATION}. Use a dequantized checkpoint instead."
        )
    block = qc.get("weight_block_size")
    if block is None:
        raise ValueError(
            "the checkpoint is fp8 without block scales (quantization_config has no weight_block_size: "
            f"per-tensor scales), which moe-engine does not support; {ACCEPTED_QUANTIZATION}"
        )
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(
            f"quantization_config.weight_block_size must be two positive integers such as [128, 128], "
            f"found {block!r}; {ACCEPTED_QUANTIZATION}"
        )
    checks = {
        "activation_scheme": ("dynamic",),  # static activation scales would be ignored: refuse
        "fmt": ("e4m3",),
        "scale_fmt": ("float",),
        "expert_dtype": ("fp8",),
    }
    for key, allowed in checks.items():
        value = qc.get(key)
        if value is not None and value not in allowed:
            raise ValueError(
                f"quant_method 'fp8' with {key}={value!r} is not supported (only {allowed[0]!r}); "
                f"{ACCEPTED_QUANTIZATION}"
            )
    return int(block[0]), int(block[1])


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """``(weight.to(float32) * scale_inv per block).to(dtype)``, as transformers' ``Fp8Dequantize``.

    weight: ``[..., R, C]`` FP8; scale_inv: ``[..., ceil(R/bm), ceil(C/bn)]``; edge blocks are partial.
    Every element is one fp32 product, so the result equals transformers' bit for bit.
    """
    bm, bn = block
    rows, cols = weight.shape[-2:]
    scale = scale_inv.to(torch.float32)
    scale = scale.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]
    return (weight.to(torch.float32) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------------
# headers and the index


def _pread_exact(fd: int, n: int, offset: int, file: Path) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            raise CheckpointError(f"safetensors file {file} is truncated (its header ends early); {_HINT}")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"duplicate key {k!r}")
        out[k] = v
    return out


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def _read_header(fd: int, file: Path, size: int) -> dict[str, _Entry]:
    """Parse and validate one safetensors header; every entry's bytes inside the file, none overlapping."""
    if size < 8:
        raise CheckpointError(f"safetensors file {file} is truncated ({size} bytes); {_HINT}")
    (n,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, file))
    if n <= 0 or n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"safetensors file {file} has a corrupt or truncated header; {_HINT}")
    raw = _pread_exact(fd, n, 8, file)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"safetensors file {file} has a corrupt header (not JSON); {_HINT}") from None
    except CheckpointError as exc:
        raise CheckpointError(f"safetensors file {file} has a corrupt header ({exc}); {_HINT}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors file {file} has a corrupt header (not a JSON object); {_HINT}")
    data_start = 8 + n
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(
                    f"safetensors file {file}: __metadata__ must map strings to strings; {_HINT}"
                )
            continue

        def bad(problem: str, name: str = name) -> CheckpointError:
            return CheckpointError(f"safetensors file {file}: tensor {name!r} {problem}; {_HINT}")

        if not isinstance(info, dict):
            raise bad("is not a JSON object with dtype, shape and data_offsets")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise bad(f"has dtype {dtype_name!r}, which moe-engine cannot read (known: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
            raise bad(f"has shape {shape!r}; dims must be non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
            raise bad(f"has data_offsets {offsets!r}; they must be two non-negative integers [begin, end]")
        b, e = offsets
        dtype = _DTYPES[dtype_name]
        need = math.prod(shape) * dtype.itemsize
        if b > e or e - b != need:
            raise bad(
                f"is corrupt: its data_offsets {offsets} span {e - b} bytes but its shape {shape} and dtype "
                f"{dtype_name} need {need}"
            )
        if data_start + e > size:
            raise bad(
                f"has data_offsets {offsets} reaching byte {data_start + e}, beyond the end of the file "
                f"({size} bytes): the file is truncated or its header is corrupt"
            )
        entries[name] = _Entry(dtype, tuple(shape), data_start + b, data_start + e)
    # Byte ranges must not overlap (as stock safetensors requires): sort by begin, compare neighbours.
    spans = sorted((en.begin, en.end, nm) for nm, en in entries.items() if en.end > en.begin)
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(
                f"safetensors file {file} is corrupt: the bytes of tensors {n0!r} and {n1!r} overlap; {_HINT}"
            )
    return entries


def _read_index(index: Path, root: Path) -> dict[str, Path]:
    """The index's ``weight_map``: tensor name -> shard path, each a relative path inside ``root``."""
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index} is corrupt ({exc}); re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{index} is corrupt: expected a JSON object with a 'weight_map', found a JSON "
            f"{type(data).__name__}; re-save the checkpoint"
        )
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        found = "no 'weight_map'" if weight_map is None else f"a {type(weight_map).__name__}"
        raise CheckpointError(
            f"{index} is corrupt: 'weight_map' must be a JSON object mapping tensor names to shard file "
            f"names, found {found}; re-save the checkpoint"
        )
    root_real = root.resolve()
    checked: dict[str, Path] = {}
    out: dict[str, Path] = {}
    for name, fname in weight_map.items():
        if fname not in checked:
            if not isinstance(fname, str) or not fname or "\x00" in fname:
                raise CheckpointError(
                    f"{index}: weight_map maps tensor {name!r} to {fname!r}; each value must be the file "
                    "name of a shard in the checkpoint folder"
                )
            parts = PurePosixPath(fname).parts
            if os.path.isabs(fname) or fname.startswith("\\"):
                raise CheckpointError(
                    f"{index}: weight_map maps tensor {name!r} to the absolute path {fname!r}; shard names must "
                    f"be relative to the checkpoint folder {root}"
                )
            if ".." in parts:
                raise CheckpointError(
                    f"{index}: weight_map maps tensor {name!r} to {fname!r}, which leaves the checkpoint "
                    f"folder {root} through '..'; shard names must stay inside it"
                )
            path = root / fname
            # Directories are resolved (a symlinked folder must not lead outside); the file itself may
            # be a symlink: the Hugging Face cache stores every file of a snapshot as a link to its blobs.
            if not path.parent.resolve().is_relative_to(root_real):
                raise CheckpointError(
                    f"{index}: weight_map maps tensor {name!r} to {fname!r}, which resolves outside the "
                    f"checkpoint folder {root} (through a symlinked folder); shard names must stay inside it"
                )
            checked[fname] = path
        out[name] = checked[fname]
    return out


def _config_block_size(root: Path) -> tuple[int, int] | None:
    """The FP8 block of ``root/config.json``'s quantization_config (None: not quantized or no config)."""
    config = root / "config.json"
    if not config.exists():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config} is corrupt ({exc}); re-save the checkpoint") from None
    return fp8_block_size(data.get("quantization_config") if isinstance(data, dict) else None)


# ----------------------------------------------------------------------------------------------------
# the store

_Identity = tuple[int, int, int, int, int]


def _open_direct(file: Path) -> int | None:
    """An ``O_DIRECT`` descriptor of ``file``, or None where the OS or filesystem has none (tmpfs, macOS)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(file, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None


def _bounce_buffer(nbytes: int) -> tuple[memoryview, torch.Tensor]:
    """This thread's page-aligned scratch buffer of at least ``nbytes`` (anonymous mmaps are page-aligned),
    as a memoryview (what ``preadv`` fills) and a uint8 tensor over the same bytes (what copies read)."""
    held = getattr(_bounce, "held", None)
    if held is None or held[0].nbytes < nbytes:
        buf = mmap.mmap(-1, nbytes)
        held = (memoryview(buf), torch.frombuffer(buf, dtype=torch.uint8))
        _bounce.held = held
    return held


def _runs(
    dests: list[tuple[TensorLocation, torch.Tensor]], *, same_dtype: bool = False
) -> list[list[tuple[TensorLocation, torch.Tensor]]]:
    """``dests`` grouped into runs of parts byte-adjacent in one file (in file order), each run one read;
    with ``same_dtype`` a run also holds one stored dtype (so every part's bytes view as that dtype)."""
    runs: list[list[tuple[TensorLocation, torch.Tensor]]] = []
    for p, d in sorted(dests, key=lambda pd: (str(pd[0].file), pd[0].offset)):
        last = runs[-1][-1][0] if runs else None
        if (
            last is not None
            and p.file == last.file
            and p.offset == last.offset + last.nbytes
            and (not same_dtype or p.dtype == last.dtype)
        ):
            runs[-1].append((p, d))
        else:
            runs.append([(p, d)])
    return runs


#: One copy out of a run of file bytes: ``(start, end)`` bytes from the run's first byte, the stored dtype
#: of those bytes, and the destination (1-D, contiguous, ``(end - start) / itemsize`` elements).
_Copy = tuple[int, int, torch.dtype, torch.Tensor]


def _copies(
    run: list[tuple[TensorLocation, torch.Tensor]], slot: torch.Tensor | None = None, raw: bool = False
) -> list[_Copy]:
    """A run's parts (byte-adjacent in file order) as copies, converting to each destination's dtype
    (``raw``: bytes as they are into uint8 destinations); parts of one stored dtype next to each other
    both in the file and in a contiguous ``slot`` merge into one copy (an expert's ``gate, up`` usually
    are). Every copy releases and retakes the GIL, which the compute thread then waits for: fewer
    copies, fewer waits."""
    merge = slot is not None and slot.is_contiguous()
    base = slot.data_ptr() if merge else 0
    out: list[_Copy] = []
    at = 0
    for p, d in run:
        n, stored = p.nbytes, torch.uint8 if raw else p.dtype
        if merge and out and out[-1][1] == at and out[-1][2] == stored:
            a, b, dtype, last = out[-1]
            size = last.element_size()
            if last.data_ptr() + last.numel() * size == d.data_ptr():
                start = (last.data_ptr() - base) // size
                out[-1] = (a, at + n, dtype, slot[start : start + last.numel() + d.numel()])
                at += n
                continue
        out.append((at, at + n, stored, d))
        at += n
    return out


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class _OpenFile:
    fd: int
    identity: _Identity
    seq_fd: int | None = None  # the readahead descriptor for ``sequential`` reads (page cache off)
    direct_fd: int | None = None  # an ``O_DIRECT`` descriptor for random reads (page cache off, where supported)

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.fd, self.seq_fd, self.direct_fd) if fd is not None)


class CheckpointStore:
    """All tensors of a checkpoint directory, by name, with their byte locations; every shard held open.

    Thread-safe: reads may run on several threads at once. ``close()`` is idempotent; reads after it
    raise RuntimeError. Descriptors of reads still running at ``close()`` are closed when they end.
    """

    def __init__(
        self,
        root: Path,
        tensors: dict[str, TensorLocation],
        *,
        page_cache: bool = False,
        files: Mapping[Path, _OpenFile] | None = None,
    ) -> None:
        self.root = root
        self.tensors = tensors
        self.page_cache = page_cache
        self._files: dict[Path, _OpenFile] = dict(files or {})
        self._lock = threading.Lock()
        self._active = 0  # reads in progress (their descriptors must stay open)
        self._closed = False
        self._changed: str | None = None  # set once a change is seen: the store is stale
        self.bytes_read = 0
        self.sequential = False  # reads go through the readahead descriptors (module docstring)
        self._stream_end: dict[Path, int] = {}  # file -> end of the furthest sequential read
        self._no_direct: set[Path] = set()  # files whose O_DIRECT reads the filesystem refused (EINVAL)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root: str | os.PathLike, *, page_cache: bool = False, direct: bool = True) -> CheckpointStore:
        """Open every shard of the checkpoint at ``root``, validate the headers (and index), pair FP8
        tensors with their scales. CheckpointError names the file and the problem. ``direct`` False:
        random reads stay buffered even where ``O_DIRECT`` works (the read-path benchmark's baseline)."""
        root = Path(root)
        block = _config_block_size(root)
        index = root / INDEX_NAME
        weight_map: dict[str, Path] | None = None
        if index.exists():
            weight_map = _read_index(index, root)
            files = sorted(set(weight_map.values()))
            if not files:
                raise CheckpointError(
                    f"{index} has an empty weight_map (it lists no tensors); re-save the checkpoint"
                )
        else:
            files = sorted(root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"no safetensors weights in {root}; moe-engine reads .safetensors checkpoints "
                "(convert with `model.save_pretrained(dir)`)"
            )
        opened: dict[Path, _OpenFile] = {}
        try:
            headers = {
                file: cls._open_file(file, opened, page_cache, index if weight_map else None, direct)
                for file in files
            }
            raw: dict[str, TensorLocation] = {}
            if weight_map is not None:
                for name, file in weight_map.items():
                    entry = headers[file].get(name)
                    if entry is None:
                        raise CheckpointError(
                            f"{index}: weight_map puts tensor {name!r} in {file.name}, but that file has no such "
                            "tensor; the checkpoint is incomplete or its index is stale"
                        )
                    raw[name] = TensorLocation(
                        file, entry.begin, entry.end - entry.begin, entry.dtype, entry.shape
                    )
            else:
                for file, entries in headers.items():
                    for name, entry in entries.items():
                        if name in raw:
                            raise CheckpointError(
                                f"tensor {name!r} is stored twice, in {raw[name].file.name} and {file.name}; "
                                "remove the stray file or re-save the checkpoint"
                            )
                        raw[name] = TensorLocation(
                            file, entry.begin, entry.end - entry.begin, entry.dtype, entry.shape
                        )
            tensors = _pair_scales(raw, block, root)
            for file, f in opened.items():  # nothing was swapped under us while we read the headers
                if _identity(os.stat(file)) != f.identity:
                    raise CheckpointChangedError(
                        f"checkpoint file {file} changed while it was being opened; retry"
                    )
        except BaseException:
            for f in opened.values():
                for fd in f.fds:
                    os.close(fd)
            raise
        return cls(root, tensors, page_cache=page_cache, files=opened)

    @staticmethod
    def _open_file(
        file: Path, opened: dict[Path, _OpenFile], page_cache: bool, index: Path | None, direct: bool = True
    ) -> dict[str, _Entry]:
        listed = f" listed in {index.name}" if index is not None else ""
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint shard {file}{listed} is missing; {_HINT}") from None
        except OSError as exc:
            raise CheckpointError(f"checkpoint shard {file}{listed} cannot be opened ({exc})") from None
        st = os.fstat(fd)
        opened[file] = _OpenFile(fd, _identity(st))
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"checkpoint shard {file}{listed} is not a regular file")
        if not page_cache and hasattr(os, "posix_fadvise"):
            # Expert reads are random: readahead would only pull pages nobody asked for.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            try:  # a second descriptor with normal readahead, for sequential streams (a prefill)
                seq = os.open(file, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"checkpoint shard {file}{listed} cannot be opened ({exc})") from None
            opened[file] = dataclasses.replace(opened[file], seq_fd=seq)
            if _identity(os.fstat(seq)) != opened[file].identity:
                raise CheckpointError(f"checkpoint shard {file}{listed} changed while it was being opened; try again")
            dfd = _open_direct(file) if direct else None
            if dfd is not None:
                opened[file] = dataclasses.replace(opened[file], direct_fd=dfd)
                if _identity(os.fstat(dfd)) != opened[file].identity:
                    raise CheckpointError(
                        f"checkpoint shard {file}{listed} changed while it was being opened; try again"
                    )
        return _read_header(fd, file, st.st_size)

    # ------------------------------------------------------------------ guarding reads
    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """``self._lock`` with Ctrl-C held back: an interrupt landing between a ``with`` block's last line
        and its lock's release (Python 3.11 reports a line event there) would leave the lock held and
        every later read of the main thread waiting for it forever."""
        with deferred_interrupts(), self._lock:
            yield

    def _changed_error(self) -> CheckpointChangedError:
        return CheckpointChangedError(self._changed or "the checkpoint changed")

    def _begin(self) -> bool:
        """Register a read (its descriptors stay open until ``_end``); True once registered."""
        with self._guarded():
            if self._closed:
                raise RuntimeError(
                    f"the checkpoint store of {self.root} is closed; reload the model (moe_engine.from_pretrained)"
                )
            if self._changed is not None:
                raise self._changed_error()
            self._active += 1
            return True

    def _end(self) -> None:
        with self._guarded():
            self._active -= 1
            if self._closed and self._active == 0:
                self._close_fds()

    def _verify(self, files: set[Path] | dict[Path, _OpenFile]) -> None:
        """Raise CheckpointChangedError (and make the store stale) if any of ``files`` changed since open."""
        for file in files:
            f = self._files[file]
            try:
                now = _identity(os.stat(file))
            except OSError:
                now = None
            what = None
            if now is None:
                what = "was deleted or moved"
            elif now != f.identity:
                what = "was replaced or modified"
            elif _identity(os.fstat(f.fd)) != f.identity:
                what = "was modified"
            if what is not None:
                with self._guarded():
                    if self._changed is None:
                        self._changed = (
                            f"checkpoint file {file} {what} after the model was loaded: the checkpoint changed "
                            "since loading and the model must be reloaded (moe_engine.from_pretrained); "
                            "nothing read from the changed file was used"
                        )
                raise self._changed_error()

    @contextmanager
    def _reading(self, files: set[Path]) -> Iterator[None]:
        """Guard one read: the store is open and not stale, and ``files`` are unchanged after it. (A check
        before the read adds nothing: identities are compared with those recorded at ``open()``, so a
        change before the read is seen after it; each check costs syscalls, i.e. GIL handovers.)"""
        registered = False
        try:
            registered = self._begin()
            try:
                yield
            except (CheckpointError, OSError):
                self._verify(files)  # a read that failed because the file changed reports the change
                raise
            self._verify(files)
        finally:
            if registered:
                self._end()

    def check_unchanged(self) -> None:
        """Raise CheckpointChangedError if any checkpoint file changed since ``open()`` (or did before).
        A few ``stat`` calls per file: cheap enough for every forward pass."""
        with self._reading(set()):
            self._verify(self._files)

    # ------------------------------------------------------------------ reading
    def _direct_fd(self, file: Path) -> int | None:
        """The ``O_DIRECT`` descriptor random reads of ``file`` go through, or None (buffered reads: page
        cache on, a sequential stream, no O_DIRECT here, or the filesystem refused it)."""
        f = self._files[file]
        if self.sequential or f.direct_fd is None or file in self._no_direct:
            return None
        return f.direct_fd

    def _refused_direct(self, file: Path) -> None:
        with self._guarded():
            self._no_direct.add(file)  # the filesystem refuses these reads: buffered from now on

    def _pread_full(self, file: Path, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` (in order) from ``offset`` with as few ``preadv`` calls as the OS allows."""
        f = self._files[file]
        start, total = offset, sum(v.nbytes for v in views)
        fd, skipped = f.fd, None
        dfd = self._direct_fd(file)
        if self.sequential and f.seq_fd is not None:
            fd = f.seq_fd
            with self._guarded():  # bytes a stream skipped (experts already resident) may hold readahead pages
                last = self._stream_end.get(file)
                self._stream_end[file] = max(last or 0, start + total)
            if last is not None and start > last:
                skipped = (last, start - last)
        elif dfd is not None:
            copies: list[_Copy] = []
            at = 0
            for v in views:
                if v.nbytes:
                    copies.append((at, at + v.nbytes, torch.uint8, torch.frombuffer(v, dtype=torch.uint8)))
                at += v.nbytes
            if self._pread_direct(dfd, file, offset, total, copies):
                return
            self._refused_direct(file)
        buffered = bool(views)
        while views:
            n = os.preadv(fd, views, offset)
            if n <= 0:
                raise CheckpointError(f"unexpected end of file while reading {file}; the file is truncated")
            offset += n
            while views and n >= views[0].nbytes:  # drop the buffers filled completely
                n -= views[0].nbytes
                views = views[1:]
            if views and n:
                views[0] = views[0][n:]
        if buffered and not self.page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, total, os.POSIX_FADV_DONTNEED)
            if skipped is not None:
                os.posix_fadvise(fd, skipped[0], skipped[1], os.POSIX_FADV_DONTNEED)
        self._count(total)

    def _count(self, nbytes: int) -> None:
        with self._guarded():
            self.bytes_read += nbytes

    def _pread_direct(self, fd: int, file: Path, offset: int, total: int, copies: list[_Copy]) -> bool:
        """Read the ``total`` bytes at ``offset`` through the ``O_DIRECT`` descriptor ``fd`` and hand them
        out by ``copies``: page-aligned reads of the aligned span around the bytes, at most
        ``_DIRECT_CHUNK`` at a time, into this thread's bounce buffer, then one torch copy per copy and
        chunk, converting the dtype on the way. No page cache is touched, so nothing needs dropping; the
        copies run without the GIL, so a compute thread is not held up by them (``python -m
        moe_engine.benchmarks.read_path`` compares this with buffered reads).

        A copy's bytes must start at a multiple of its dtype's size in the file (chunks then split between
        elements). Returns False, having filled nothing for sure, when the filesystem refuses the alignment
        (``EINVAL``); the caller then reads buffered. Destinations filled partly before that are rewritten.
        """
        pos, end = offset, offset + total
        while pos < end:
            base = pos - pos % _DIRECT_ALIGN
            span = -(-min(end - base, _DIRECT_CHUNK) // _DIRECT_ALIGN) * _DIRECT_ALIGN
            window, data = _bounce_buffer(span)
            try:
                n = os.preadv(fd, [window[:span]], base)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    return False
                raise
            got = min(n - (pos - base), end - pos)
            if got <= 0:
                raise CheckpointError(f"unexpected end of file while reading {file}; the file is truncated")
            lo, hi = pos - offset, pos - offset + got  # this chunk's bytes, from the run's first byte
            for a, b, dtype, dest in copies:
                s0, s1 = max(a, lo), min(b, hi)
                if s0 >= s1:
                    continue
                size = dtype.itemsize
                src = data[pos - base + s0 - lo : pos - base + s1 - lo].view(dtype)
                dest[(s0 - a) // size : (s1 - a) // size].copy_(src)
            pos += got
        self._count(total)
        return True

    def _read_raw(self, loc: TensorLocation) -> torch.Tensor:
        """The stored tensor at ``loc`` (no scaling); the caller holds ``_reading``.

        The tensor sits at the same address modulo 64 bytes as its bytes in the file, i.e. where stock
        transformers (which keeps mmap'd views of the file) has it: CPU kernels round some products
        (e.g. an fp32 matrix-vector product) differently by address alignment, and the engine must
        reproduce stock's bits.
        """
        raw = torch.empty(loc.nbytes + _ALIGN, dtype=torch.uint8)
        shift = (loc.offset - raw.data_ptr()) % _ALIGN
        if shift % loc.dtype.itemsize:
            shift = 0  # an offset not aligned to its dtype (never in files save_pretrained writes)
        buf = raw[shift : shift + loc.nbytes]
        if loc.nbytes:
            self._pread_full(loc.file, [memoryview(buf.numpy())], loc.offset)  # type: ignore[arg-type]
        return buf.view(loc.dtype).reshape(loc.shape)

    def _read_value(self, loc: TensorLocation, dtype: torch.dtype) -> torch.Tensor:
        """``loc``'s values: FP8 block-scaled tensors dequantized to ``dtype``, others as stored."""
        value = self._read_raw(loc)
        if loc.scale is None:
            return value
        return dequantize_fp8_blocks(value, self._read_raw(loc.scale.loc), loc.scale.block, dtype)

    @staticmethod
    def _files_of(locs: list[TensorLocation]) -> set[Path]:
        return {p.file for p in locs} | {p.scale.loc.file for p in locs if p.scale is not None}

    def read_bytes_into(self, loc: TensorLocation, out: np.ndarray) -> None:
        """Read ``loc``'s stored bytes into the uint8 array ``out`` (len == loc.nbytes); drops the pages
        unless page_cache."""
        assert out.dtype == np.uint8 and out.nbytes == loc.nbytes, (out.dtype, out.nbytes, loc.nbytes)
        with self._reading({loc.file}):
            self._pread_full(loc.file, [memoryview(out)], loc.offset)  # type: ignore[arg-type]

    def read_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A new CPU tensor holding the named tensor: FP8 block-scaled tensors dequantized to ``dtype``
        (as transformers does), every other tensor exactly as stored."""
        loc = self.tensors[name]
        with self._reading(self._files_of([loc])):
            return self._read_value(loc, dtype)

    def read_expert_into(self, loc: ExpertLocation, slot: torch.Tensor) -> None:
        """Fill the flat CPU tensor ``slot`` (numel = expert's elements) with the expert's parts.

        Parts adjacent in the file (per-expert tensors usually are, e.g. ``w1, w2, w3``) are read with
        one scatter ``preadv`` straight into their places in the slot. When the checkpoint's dtype
        differs from the slot's, parts go through a staging buffer and are converted; FP8 parts are
        dequantized with their block scales.
        """
        if loc.offsets is not None:
            self._read_packed_into(loc, slot)
            return
        dests: list[tuple[TensorLocation, torch.Tensor]] = []
        offset = 0
        for part in loc.parts:
            numel = math.prod(part.shape)
            dests.append((part, slot[offset : offset + numel]))
            offset += numel
        assert offset == slot.numel(), (offset, slot.numel())
        plain = [(p, d) for p, d in dests if p.scale is None]
        with self._reading(self._files_of(list(loc.parts))):
            if not self._read_direct(plain, slot):
                direct = [(p, d) for p, d in plain if p.dtype == slot.dtype and d.is_contiguous()]
                converted = [(p, d) for p, d in plain if p.dtype != slot.dtype or not d.is_contiguous()]
                self._read_runs(direct)
                for run in _runs(converted, same_dtype=True):  # one read per run, then as few conversions as can be
                    staging = torch.empty(sum(p.nbytes for p, _ in run), dtype=torch.uint8)
                    self._pread_full(run[0][0].file, [memoryview(staging.numpy())], run[0][0].offset)  # type: ignore[arg-type]
                    for a, b, dtype, d in _copies(run, slot):
                        d.copy_(staging[a:b].view(dtype))
            for p, d in dests:
                if p.scale is not None:
                    d.copy_(self._read_value(p, slot.dtype).reshape(-1))

    def _read_packed_into(self, loc: ExpertLocation, slot: torch.Tensor) -> None:
        """A quantized expert: each part's stored bytes at its offset in the uint8 ``slot``."""
        assert loc.offsets is not None
        if slot.dtype != torch.uint8 or slot.dim() != 1 or not slot.is_contiguous():
            raise ValueError(f"a quantized expert is read into a flat uint8 slot, got {slot.dtype} {tuple(slot.shape)}")
        dests = []
        for p, off in zip(loc.parts, loc.offsets):
            if off + p.nbytes > slot.numel():
                raise ValueError(f"quantized part of {p.nbytes} bytes at {off} overflows a {slot.numel()}-byte slot")
            dests.append((p, slot[off : off + p.nbytes]))
        with self._reading(self._files_of(list(loc.parts))):
            self._read_runs(dests)

    def _read_direct(
        self, dests: list[tuple[TensorLocation, torch.Tensor]], slot: torch.Tensor | None = None, raw: bool = False
    ) -> bool:
        """Read ``dests`` (unscaled parts, each into its contiguous destination, converting the dtype;
        ``raw``: stored bytes into uint8 destinations) through the ``O_DIRECT`` descriptors: one read per
        run of byte-adjacent parts, copied out of the bounce buffer. False (nothing to rely on written)
        where a file has no such descriptor, a converted part sits at an offset that is not a multiple of
        its dtype's size, or the filesystem refuses."""
        if not dests or any((not raw and p.offset % p.dtype.itemsize) or not d.is_contiguous() for p, d in dests):
            return False
        runs = _runs(dests)
        fds = [self._direct_fd(run[0][0].file) for run in runs]
        if any(fd is None for fd in fds):
            return False
        for run, fd in zip(runs, fds, strict=True):
            first = run[0][0]
            if not self._pread_direct(fd, first.file, first.offset, sum(p.nbytes for p, _ in run), _copies(run, slot, raw)):
                self._refused_direct(first.file)
                return False
        return True

    def _read_runs(self, dests: list[tuple[TensorLocation, torch.Tensor]]) -> None:
        """Read each part's stored bytes into its destination view; parts byte-adjacent in one file are
        read with one read (the caller holds ``_reading``)."""
        if self._read_direct([(p, d.view(torch.uint8)) for p, d in dests], raw=True):
            return
        for run in _runs(dests):
            views = [memoryview(d.view(torch.uint8).numpy()) for _, d in run]  # type: ignore[arg-type]
            self._pread_full(run[0][0].file, views, run[0][0].offset)

    def drop_page_cache(self) -> None:
        """Ask the OS to drop every checkpoint file's cached pages (a cold start; the end of a sequential
        stream, whose readahead went past its last read)."""
        with self._reading(set()):
            with self._guarded():
                self._stream_end.clear()
            for f in self._files.values():
                os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    # ------------------------------------------------------------------ closing
    @property
    def closed(self) -> bool:
        return self._closed

    def _close_fds(self) -> None:
        for f in self._files.values():
            for fd in f.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def close(self) -> None:
        """Close every file. Idempotent; reads afterwards raise RuntimeError (reads still running finish)."""
        with self._guarded():
            if self._closed:
                return
            self._closed = True
            if self._active == 0:
                self._close_fds()

    def __del__(self) -> None:  # best effort; close() is the API
        try:
            self.close()
        except Exception:
            pass


def _pair_scales(
    raw: dict[str, TensorLocation], block: tuple[int, int] | None, root: Path
) -> dict[str, TensorLocation]:
    """Attach each FP8 tensor's ``<name>_scale_inv`` (checked) and drop the scales from the listing."""
    fp8 = [n for n, t in raw.items() if t.dtype in _FP8_DTYPES]
    scales = {n for n in raw if n.endswith(SCALE_SUFFIX)}
    if block is None:
        paired = [n for n in fp8 if n + SCALE_SUFFIX in raw]
        if paired:
            raise CheckpointError(
                f"checkpoint {root} stores {paired[0]} as FP8 with a scale tensor {paired[0]}{SCALE_SUFFIX}, but "
                "its config.json has no quantization_config saying how to apply it; "
                f"{ACCEPTED_QUANTIZATION}"
            )
        return raw
    out = {n: t for n, t in raw.items() if n not in scales}
    for name in fp8:
        t = raw[name]
        sname = name + SCALE_SUFFIX
        s = raw.get(sname)
        if s is None:
            raise CheckpointError(
                f"FP8 tensor {name} in {t.file.name} has no scale tensor {sname}: the checkpoint is incomplete "
                f"(its quantization_config says fp8 with block scales)"
            )
        if len(t.shape) < 2:
            raise CheckpointError(
                f"FP8 tensor {name} in {t.file.name} has shape {t.shape}; block scales need 2 dims"
            )
        want = (*t.shape[:-2], -(-t.shape[-2] // block[0]), -(-t.shape[-1] // block[1]))
        if s.dtype not in _SCALE_DTYPES or tuple(s.shape) != want:
            raise CheckpointError(
                f"scale tensor {sname} in {s.file.name} has shape {tuple(s.shape)} and dtype {s.dtype}; FP8 tensor "
                f"{name} {tuple(t.shape)} with weight_block_size {list(block)} needs a float32 tensor of shape {want}"
            )
        out[name] = replace(t, scale=BlockScale(s, block))
    orphans = sorted(scales - {n + SCALE_SUFFIX for n in fp8})
    if orphans:
        weight = orphans[0][: -len(SCALE_SUFFIX)]
        found = f"is stored as {raw[weight].dtype}" if weight in raw else "is missing"
        raise CheckpointError(
            f"scale tensor {orphans[0]} belongs to no FP8 tensor ({weight} {found}); the checkpoint is "
            "inconsistent: re-save it"
        )
    return out


def expert_location(
    store: CheckpointStore, parts: Mapping[str, str | tuple[str, int]], shapes: Mapping[str, tuple[int, ...]]
) -> ExpertLocation:
    """Build an ExpertLocation from part names.

    ``parts`` maps part -> tensor name (per-expert) or (tensor name, expert row) for fused tensors;
    per-expert parts are ordered gate, up, down; fused ones gate_up, down. ``shapes`` gives each part's
    expected shape, checked against the file so a checkpoint that does not match its config fails early.
    FP8 parts carry their block scales (the scale tensor's matching row for fused tensors).
    """
    order = ("gate", "up", "down") if "gate" in parts else ("gate_up", "down")
    locs = []
    for part in order:
        ref = parts.get(part)
        if ref is None:
            raise CheckpointError(
                f"checkpoint lacks the {part} tensor of an expert ({parts}); it is incomplete"
            )
        if isinstance(ref, tuple):
            name, row = ref
            loc = store.tensors[name].row(row)
        else:
            loc = store.tensors[ref]
        if tuple(loc.shape) != tuple(shapes[part]):
            raise CheckpointError(
                f"expert tensor {ref} in {loc.file.name} has shape {tuple(loc.shape)}, but the config implies "
                f"{tuple(shapes[part])}: the checkpoint does not match its config.json"
            )
        locs.append(loc)
    return ExpertLocation(tuple(locs))
