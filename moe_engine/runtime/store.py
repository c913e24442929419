"""Slow tier: the checkpoint's safetensors files, read one expert (or one tensor) at a time.

Owns: parsing safetensors headers (single file or sharded with ``model.safetensors.index.json``),
validating them (a truncated or corrupt file is reported by name before anything is built), locating
each routed expert's bytes, and reading them into a caller's buffer with ``os.preadv``. By default
the pages just read are dropped from the OS page cache (``posix_fadvise(DONTNEED)``) so the
fast-tier budget is the real memory bound, not a page cache silently holding every expert.

Glossary: an expert's *parts* are its tensors in slot order: ``gate [I, H]``, ``up [I, H]``,
``down [H, I]`` (per-expert checkpoints) or ``gate_up [2I, H]``, ``down [H, I]`` (fused ones);
concatenated they form one slot: ``gate_up = slot[:2IH].view(2I, H)``, ``down = slot[2IH:].view(H, I)``.

Example::

    store = CheckpointStore.open(path)
    loc = store.expert(layer=3, expert=5)        # ExpertLocation (after index_experts)
    store.read_into(loc, slot_uint8_view)
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip

_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor (or one contiguous row range of it) lies: absolute byte offset in ``file``."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExpertLocation:
    """One routed expert's parts, in slot order (their concatenation is the slot's contents)."""

    parts: tuple[TensorLocation, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt (the message names the file and the fix)."""


def _read_header(file: Path) -> tuple[int, dict]:
    size = file.stat().st_size
    hint = "re-download or re-save the checkpoint (e.g. with save_pretrained)"
    if size < 8:
        raise CheckpointError(f"safetensors file {file} is truncated ({size} bytes); {hint}")
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"safetensors file {file} has a corrupt or truncated header; {hint}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"safetensors file {file} has a corrupt header (not JSON); {hint}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors file {file} has a corrupt header; {hint}")
    data_start = 8 + n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = (int(x) for x in info["data_offsets"])
            dtype = _DTYPES[info["dtype"]]
            numel = math.prod(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"safetensors file {file}: entry {name!r} is corrupt or has an unknown dtype; {hint}") from None
        if not 0 <= b <= e or e - b != numel * dtype.itemsize:
            raise CheckpointError(
                f"safetensors file {file} is corrupt: entry {name!r} spans {e - b} bytes but its shape "
                f"{info['shape']} and dtype {info['dtype']} need {numel * dtype.itemsize}; {hint}"
            )
        end = max(end, e)
    if data_start + end > size:
        raise CheckpointError(
            f"safetensors file {file} is truncated: its header describes {data_start + end} bytes but the "
            f"file has {size}; {hint}"
        )
    return data_start, header


class CheckpointStore:
    """All tensors of a checkpoint directory, by name, with their byte locations."""

    def __init__(self, root: Path, tensors: dict[str, TensorLocation], *, page_cache: bool = False) -> None:
        self.root = root
        self.tensors = tensors
        self.page_cache = page_cache
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root: str | os.PathLike, *, page_cache: bool = False) -> CheckpointStore:
        root = Path(root)
        index = root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is corrupt ({exc}); re-save the checkpoint") from None
            files = sorted({root / f for f in weight_map.values()})
        else:
            files = sorted(root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"no safetensors weights in {root}; moe-engine reads .safetensors checkpoints "
                "(convert with `model.save_pretrained(dir)`)"
            )
        tensors: dict[str, TensorLocation] = {}
        for file in files:
            if not file.exists():
                raise CheckpointError(f"checkpoint shard {file} listed in {index.name} is missing")
            data_start, header = _read_header(file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                b, e = info["data_offsets"]
                tensors[name] = TensorLocation(file, data_start + b, e - b, _DTYPES[info["dtype"]], tuple(info["shape"]))
        return cls(root, tensors, page_cache=page_cache)

    # ------------------------------------------------------------------ reading
    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = os.open(file, os.O_RDONLY)
                if not self.page_cache and hasattr(os, "posix_fadvise"):
                    # Expert reads are random: readahead would only pull pages nobody asked for.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[file] = fd
            return fd

    def _pread_full(self, file: Path, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` (in order) from ``offset`` with as few ``preadv`` calls as the OS allows."""
        fd = self._fd(file)
        start, total = offset, sum(v.nbytes for v in views)
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
        if not self.page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, total, os.POSIX_FADV_DONTNEED)
        self.bytes_read += total

    def read_bytes_into(self, loc: TensorLocation, out: np.ndarray) -> None:
        """Read ``loc`` into the uint8 array ``out`` (len == loc.nbytes); drops the pages unless page_cache."""
        assert out.dtype == np.uint8 and out.nbytes == loc.nbytes, (out.dtype, out.nbytes, loc.nbytes)
        self._pread_full(loc.file, [memoryview(out)], loc.offset)  # type: ignore[arg-type]

    def read_tensor(self, name: str) -> torch.Tensor:
        """A new CPU tensor holding the named tensor."""
        loc = self.tensors[name]
        buf = torch.empty(loc.nbytes, dtype=torch.uint8)
        self.read_bytes_into(loc, buf.numpy())
        return buf.view(loc.dtype).reshape(loc.shape)

    def read_expert_into(self, loc: ExpertLocation, slot: torch.Tensor) -> None:
        """Fill the flat CPU tensor ``slot`` (numel = expert's elements) with the expert's parts.

        Parts adjacent in the file (per-expert tensors usually are, e.g. ``w1, w2, w3``) are read with
        one scatter ``preadv`` straight into their places in the slot. When the checkpoint's dtype
        differs from the slot's, parts go through a staging buffer and are converted.
        """
        dests: list[tuple[TensorLocation, torch.Tensor]] = []
        offset = 0
        for part in loc.parts:
            numel = part.nbytes // part.dtype.itemsize
            dests.append((part, slot[offset : offset + numel]))
            offset += numel
        assert offset == slot.numel(), (offset, slot.numel())
        direct = [(p, d) for p, d in dests if p.dtype == slot.dtype and d.is_contiguous()]
        direct.sort(key=lambda pd: (str(pd[0].file), pd[0].offset))
        runs: list[list[tuple[TensorLocation, torch.Tensor]]] = []
        for p, d in direct:  # group byte-adjacent parts into runs, one preadv each
            last = runs[-1][-1][0] if runs else None
            if last is not None and p.file == last.file and p.offset == last.offset + last.nbytes:
                runs[-1].append((p, d))
            else:
                runs.append([(p, d)])
        for run in runs:
            views = [memoryview(d.view(torch.uint8).numpy()) for _, d in run]  # type: ignore[arg-type]
            self._pread_full(run[0][0].file, views, run[0][0].offset)
        for p, d in dests:
            if p.dtype != slot.dtype or not d.is_contiguous():
                staging = torch.empty(p.nbytes, dtype=torch.uint8)
                self.read_bytes_into(p, staging.numpy())
                d.copy_(staging.view(p.dtype))

    def drop_page_cache(self) -> None:
        """Ask the OS to drop every checkpoint file's cached pages (benchmarks: a cold start)."""
        for file in {t.file for t in self.tensors.values()}:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:  # best effort; close() is the API
        try:
            self.close()
        except Exception:
            pass


def expert_location(
    store: CheckpointStore, parts: Mapping[str, str | tuple[str, int]], shapes: Mapping[str, tuple[int, ...]]
) -> ExpertLocation:
    """Build an ExpertLocation from part names.

    ``parts`` maps part -> tensor name (per-expert) or (tensor name, expert row) for fused tensors;
    per-expert parts are ordered gate, up, down; fused ones gate_up, down. ``shapes`` gives each part's
    expected shape, checked against the file so a checkpoint that does not match its config fails early.
    """
    order = ("gate", "up", "down") if "gate" in parts else ("gate_up", "down")
    locs = []
    for part in order:
        ref = parts.get(part)
        if ref is None:
            raise CheckpointError(f"checkpoint lacks the {part} tensor of an expert ({parts}); it is incomplete")
        if isinstance(ref, tuple):
            name, row = ref
            t = store.tensors[name]
            row_bytes = t.nbytes // t.shape[0]
            loc = TensorLocation(t.file, t.offset + row * row_bytes, row_bytes, t.dtype, t.shape[1:])
        else:
            loc = store.tensors[ref]
        if tuple(loc.shape) != tuple(shapes[part]):
            raise CheckpointError(
                f"expert tensor {ref} in {loc.file.name} has shape {tuple(loc.shape)}, but the config implies "
                f"{tuple(shapes[part])}: the checkpoint does not match its config.json"
            )
        locs.append(loc)
    return ExpertLocation(tuple(locs))
