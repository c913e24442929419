"""Expert weight formats: the registry, ``QTensor``, ``pack`` / ``unpack``, and every format's
quantize / dequantize / linear.

Owns the contract in ``/work/notes/tasks/quant_api.md``: what a format name means, the exact bytes of
its packed form, and ``linear`` (the matmul the runtime runs on an expert in that format).

Glossary:
- *format*: an ``ExpertFormat`` registered under its name (``available_formats()``): the stored dtypes
  ``bf16 fp16 fp32``; ``int8`` (symmetric, one scale per output row); ``int4-gG``, ``int3-gG``,
  ``int2-gG`` for G in 32, 64, 128 (asymmetric groups of G input columns, scale + zero per group,
  fitted by ``moe_engine.quant.hqq``), and ``int4-row``, ``int3-row``, ``int2-row`` (one group per
  output row, whatever the width: the fewest scale bytes, for experts the router rarely picks);
  ``fp8-e4m3`` (128 x 128 block scales, DeepSeek-V3's layout).
- *matrix*: one expert weight ``[out, in]`` (transformers layout, ``y = x @ W.T``).
- *part*: one tensor of a quantized matrix (``QTensor.parts``); ``layout(shape)`` lists them in
  packing order with dtype and shape.
- *packed form*: ``pack(q)``, one flat uint8 buffer holding every part, each starting at a multiple of
  64 bytes; ``nbytes(shape)`` is its exact length (the end of the last part, no tail padding).
  ``unpack`` returns views into such a buffer (no copy); ``linear`` consumes those views as they lie.
- *padding*: group formats pad ``out`` to a multiple of 32 (the int4 kernel's row block) and ``in`` to
  a multiple of G (``-row``: of 2; the last column repeated, so padding never widens a group's range); ``dequantize``
  and ``linear`` return the unpadded ``[out, in]`` / ``[..., out]``.

Kernels (what ``linear`` runs; ``fmt.kernel(device, dtype)`` names it):
- CPU, bf16 activations, up to ``KERNEL_MAX_TOKENS`` rows (64 for int8, 256 for the group formats;
  above that the fallback's one dequantize + fp32 GEMM is faster): int8 -> ``aten._weight_int8pack_mm``
  (when ``in % 8 == 0``; otherwise the kernel returns garbage in torch 2.13, so the fallback runs);
  int4/int3/int2 -> ``aten.
  _weight_int4pack_mm_for_cpu`` (int3/int2 codes are expanded to the int4 nibble layout per call with
  a few int32-word bit operations). Stored formats -> ``F.linear``.
- CPU, fp32/fp16 activations (torch's int kernels have only scalar paths there, 5-40x slower than
  dequantize-then-matmul): dequantize to fp32 and multiply in fp32 (group formats by cache-sized
  chunks of rows), cast to the input dtype.
- CUDA (and any other device): dequantize to the input dtype, then ``F.linear``. bitsandbytes is not
  used: its 4-bit kernels compute NF4/FP4 codebooks, not these affine formats, and its int8 matmul
  quantizes the activations too; on CPU its nf4 matmul is 10x slower than a bf16 matmul here.

Example::

    fmt = get_format("int4-g64")
    q = fmt.quantize(w)                        # w [out, in] float
    buf = pack(q)                              # uint8 [fmt.nbytes(w.shape)]
    y = fmt.linear(x, unpack(buf, "int4-g64", w.shape))   # ~= x @ fmt.dequantize(q, x.dtype).T
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_engine.quant import kernels
from moe_engine.quant.hqq import fit_affine

ALIGN = 64
GROUP_SIZES = (32, 64, 128)
ROW = 0  # GroupFormat's group for "one group per output row": the ``int{b}-row`` formats
KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 CPU kernel takes
FP8_BLOCK = (128, 128)
FP8_MAX = 448.0
DEQUANT_CHUNK = 1 << 18  # weights dequantized at once by the CPU fallback (1 MiB of fp32)

Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]


@dataclass
class QTensor:
    """One matrix in a format: ``format`` (registry name), logical ``shape`` ``(out, in)``, and its
    ``parts`` (name -> tensor, as ``get_format(format).layout(shape)`` lists them)."""

    format: str
    shape: tuple[int, int]
    parts: dict[str, torch.Tensor]
    # A cache slot's views (``PackedLayout.views``), read by nothing else until the next copy into the
    # slot makes new views: the int4 kernel may then rewrite ``qweight`` in place, once, into this torch
    # build's int4pack layout (``native``) instead of converting it at every call.
    in_slot: bool = False
    native: bool = False

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts.values())).device

    @property
    def nbytes(self) -> int:
        """Bytes of the packed form (``pack(self)``)."""
        return get_format(self.format).nbytes(self.shape)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _ceil_to(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2 or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(f"an expert matrix shape is (out, in) with positive ints, got {tuple(shape)!r}")
    return int(shape[0]), int(shape[1])


def _check_weight(w: object, fmt: str) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{fmt}.quantize expects a torch.Tensor [out, in], got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(
            f"{fmt}.quantize expects one 2-D expert matrix [out, in], got shape {tuple(w.shape)}; "
            "quantize fused [E, out, in] tensors one expert at a time"
        )
    if not w.is_floating_point() or w.dtype.itemsize == 1:
        raise ValueError(
            f"{fmt}.quantize expects a float weight (fp32, bf16 or fp16), got {w.dtype}; "
            "dequantize an already-quantized tensor first"
        )
    if w.numel() == 0:
        raise ValueError(f"{fmt}.quantize got an empty matrix {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{fmt}.quantize got a weight with inf or NaN values")
    return w.detach()


def _check_input(x: torch.Tensor, q: QTensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"linear expects float activations, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"linear: x [..., {q.shape[1]}] expected for a {q.format} matrix {q.shape}, got {tuple(x.shape)}")


def _cpu_fp32_linear(x: torch.Tensor, w32: torch.Tensor) -> torch.Tensor:
    """``x @ w32.T`` computed in fp32 (CPU: half-precision GEMMs are slow here), cast back to x.dtype."""
    if x.dtype == torch.float32:
        return F.linear(x, w32)
    return F.linear(x.to(torch.float32), w32).to(x.dtype)


class ExpertFormat(ABC):
    """One expert weight format. Subclasses define ``layout``, ``quantize``, ``dequantize`` and may
    override ``linear`` with a faster kernel (it must equal ``linear_dequant`` within tolerance)."""

    name: str
    bits: int

    @abstractmethod
    def layout(self, shape: tuple[int, int]) -> Layout:
        """The parts of a matrix of ``shape``, in packing order: ``(name, dtype, part shape)``."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> QTensor:
        """``w [out, in]`` float -> QTensor (on w's device)."""

    @abstractmethod
    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """QTensor -> ``[out, in]`` in ``dtype``."""

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Exact bytes of the packed form of a ``shape`` matrix: all parts, each 64-byte aligned."""
        return _offsets(self.name, _check_shape(tuple(shape)))[-1][3]

    def linear(self, x: torch.Tensor, q: QTensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``, ``x @ W.T``, with the fastest kernel for x's device and dtype."""
        return self.linear_dequant(x, q)

    def linear_dequant(self, x: torch.Tensor, q: QTensor) -> torch.Tensor:
        """The fallback every format keeps: dequantize, then one matmul (in fp32 on CPU)."""
        _check_input(x, q)
        if x.device.type == "cpu":
            return _cpu_fp32_linear(x, self.dequantize(q, torch.float32))
        return F.linear(x, self.dequantize(q, x.dtype))

    def kernel(self, device: torch.device | str, dtype: torch.dtype, in_features: int = 8, tokens: int = 1) -> str:
        """Name of what ``linear`` runs for ``tokens`` rows of ``dtype`` activations on ``device``."""
        if torch.device(device).type == "cpu":
            return "dequantize(fp32) + F.linear(fp32)"
        return f"dequantize({_dtype_name(dtype)}) + F.linear"

    def _new(self, shape: tuple[int, int], parts: dict[str, torch.Tensor]) -> QTensor:
        return QTensor(self.name, shape, parts)

    def __repr__(self) -> str:
        return f"<ExpertFormat {self.name} ({self.bits} bits)>"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------ stored


class StoredFormat(ExpertFormat):
    """The weight as it is, in ``dtype`` (no quantization). ``linear`` is ``F.linear`` in x's dtype,
    exactly what the engine's eager path computes."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype, self.bits = name, dtype, dtype.itemsize * 8

    def layout(self, shape: tuple[int, int]) -> Layout:
        return [("weight", self.dtype, _check_shape(tuple(shape)))]

    def quantize(self, w: torch.Tensor) -> QTensor:
        w = _check_weight(w, self.name)
        return self._new(tuple(w.shape), {"weight": w.to(self.dtype).contiguous()})  # type: ignore[arg-type]

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return q.parts["weight"].to(dtype)

    def linear(self, x: torch.Tensor, q: QTensor) -> torch.Tensor:
        _check_input(x, q)
        w = q.parts["weight"]
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))

    def linear_dequant(self, x: torch.Tensor, q: QTensor) -> torch.Tensor:
        return self.linear(x, q)

    def kernel(self, device: torch.device | str, dtype: torch.dtype, in_features: int = 8, tokens: int = 1) -> str:
        return f"F.linear({_dtype_name(dtype)})"


# -------------------------------------------------------------------------------------------- int8


class Int8Format(ExpertFormat):
    """Symmetric int8, one scale per output row: ``W = q * scale``, q in [-127, 127], scale stored
    bf16 (rounded up, so no code clips) and chosen before rounding q, so the error is <= scale / 2."""

    name, bits = "int8", 8

    def layout(self, shape: tuple[int, int]) -> Layout:
        n, k = _check_shape(tuple(shape))
        return [("qweight", torch.int8, (n, k)), ("scale", torch.bfloat16, (n,))]

    def quantize(self, w: torch.Tensor) -> QTensor:
        w32 = _check_weight(w, self.name).to(torch.float32)
        amax = w32.abs().amax(dim=1)
        scale = (amax / 127).to(torch.bfloat16)
        low = scale.to(torch.float32) * 127 < amax  # rounded down: bump to the next bf16 up
        scale = torch.where(low, (scale.view(torch.int16) + 1).view(torch.bfloat16), scale)
        scale = torch.where(amax > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(w32 / scale.to(torch.float32)[:, None]), -127, 127).to(torch.int8)
        return self._new(tuple(w.shape), {"qweight": q.contiguous(), "scale": scale.contiguous()})  # type: ignore[arg-type]

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        p = q.parts
        return (p["qweight"].to(torch.float32) * p["scale"].to(torch.float32)[:, None]).to(dtype)

    # above this many tokens one dequantize + BLAS fp32 GEMM beats the kernel, which re-dequantizes the
    # weight for every 4 rows of x (5632 x 1024, 1 thread: 156 vs 103 ms at 128 tokens, 62 vs 60 at 64)
    KERNEL_MAX_TOKENS = 64

    def _fast(self, device: torch.device, dtype: torch.dtype, in_features: int, tokens: int) -> bool:
        # the kernel reads 8 columns at a time with no tail: other widths give garbage or crash (torch 2.13)
        return (
            device.type == "cpu" and dtype == torch.bfloat16 and in_features % 8 == 0
            and 0 < tokens <= self.KERNEL_MAX_TOKENS and kernels.has_int8_cpu_kernel()
        )

    def linear(self, x: torch.Tensor, q: QTensor) -> torch.Tensor:
        _check_input(x, q)
        if not self._fast(x.device, x.dtype, q.shape[1], x.numel() // q.shape[1]):
            return self.linear_dequant(x, q)
        x2 = x.reshape(-1, q.shape[1]).contiguous()
        y = kernels.int8_linear_cpu(x2, q.parts["qweight"], q.parts["scale"])
        return y.reshape(*x.shape[:-1], q.shape[0])

    def kernel(self, device: torch.device | str, dtype: torch.dtype, in_features: int = 8, tokens: int = 1) -> str:
        if self._fast(torch.device(device), dtype, in_features, tokens):
            return "aten._weight_int8pack_mm"
        return super().kernel(device, dtype, in_features, tokens)


# ------------------------------------------------------------------------------------- int4/3/2 groups


class GroupFormat(ExpertFormat):
    """Asymmetric group-wise ``bits``-bit codes: ``W = (code - 8) * scale + zero`` per group of
    ``group`` input columns; codes in the nibble layout (``moe_engine.quant.kernels``), 3- and 2-bit
    codes as bit planes of it; scale and zero bf16, ``[in_pad / group, out_pad, 2]``."""

    def __init__(self, bits: int, group: int) -> None:
        if bits not in (2, 3, 4) or group not in (*GROUP_SIZES, ROW):
            raise ValueError(
                f"group formats take bits in (2, 3, 4) and group in {GROUP_SIZES} or {ROW} (one group per row), "
                f"got {bits}, {group}"
            )
        self.bits, self.group = bits, group
        self.name = f"int{bits}-row" if group == ROW else f"int{bits}-g{group}"
        self._k_multiple = group or 2  # input widths are padded to this (``-row``: bytes hold 2 codes)

    def padded(self, shape: tuple[int, int]) -> tuple[int, int]:
        n, k = _check_shape(tuple(shape))
        return _ceil_to(n, kernels.BLOCK_N), _ceil_to(k, self._k_multiple)

    def group_of(self, kp: int) -> int:
        """Columns per group of a matrix whose padded input width is ``kp`` (``kp`` itself for ``-row``)."""
        return self.group or kp

    def divides(self, in_features: int) -> bool:
        """Whether a matrix of ``in_features`` columns needs no padded columns (``-row`` formats: always,
        up to one column for an odd width)."""
        return in_features % self._k_multiple == 0

    def layout(self, shape: tuple[int, int]) -> Layout:
        np_, kp = self.padded(shape)
        nib_bytes = np_ * kp // 2
        sz = ("scale_zero", torch.bfloat16, (kp // self.group_of(kp), np_, 2))
        if self.bits == 4:
            return [("qweight", torch.uint8, (np_, kp // 2)), sz]
        if self.bits == 2:
            return [("qweight", torch.uint8, (nib_bytes // 2,)), sz]
        return [("qweight", torch.uint8, (nib_bytes // 2,)), ("qweight_hi", torch.uint8, (nib_bytes // 4,)), sz]

    def quantize(self, w: torch.Tensor, *, iters: int | None = None) -> QTensor:
        """As ``ExpertFormat.quantize``; ``iters``: optimiser iterations (``hqq.DEFAULT_ITERS[bits]``;
        0 = the best clipped min-max, about 5x faster to fit)."""
        w32 = _check_weight(w, self.name).to(torch.float32)
        n, k = w32.shape
        np_, kp = self.padded((n, k))
        if kp > k:  # repeat the last column: the padded group keeps its real range
            w32 = torch.cat([w32, w32[:, -1:].expand(n, kp - k)], dim=1)
        if np_ > n:
            w32 = torch.cat([w32, w32.new_zeros(np_ - n, kp)], dim=0)
        g = self.group_of(kp)
        codes, scale, zero = fit_affine(w32.reshape(-1, g), self.bits, iters)
        nib = kernels.codes_to_nib(codes.view(np_, kp))
        sz = torch.stack((scale, zero), dim=-1).view(np_, kp // g, 2).transpose(0, 1)
        parts = {"scale_zero": sz.to(torch.bfloat16).contiguous()}
        if self.bits == 4:
            parts["qweight"] = nib
        else:
            parts["qweight"] = kernels.pack_lo2(nib)
            if self.bits == 3:
                parts["qweight_hi"] = kernels.pack_hi1(nib)
        order = [name for name, _, _ in self.layout((n, k))]
        return self._new((n, k), {name: parts[name] for name in order})

    def nib(self, q: QTensor) -> torch.Tensor:
        """The codes of ``q`` in the nibble layout ``uint8 [out_pad, in_pad / 2]`` (a view for int4)."""
        np_, kp = self.padded(q.shape)
        p = q.parts
        if self.bits == 4:
            if q.native:  # repacked in place for the kernel: the nibble layout back, in a new tensor
                return kernels.unrepack_for_cpu(p["qweight"].view(np_, kp // 2))
            return p["qweight"].view(np_, kp // 2)
        nib = kernels.unpack_lo2(p["qweight"])
        if self.bits == 3:
            nib |= kernels.unpack_hi1(p["qweight_hi"])
        return nib.view(np_, kp // 2)

    def _block_scales(self, scale_zero: torch.Tensor) -> torch.Tensor:
        """scale_zero ``[Kp/G, Np, 2]`` -> fp32 ``[2 (scale, zero), 2 (low, high half), Np/32, Kp/G, 1, 16]``:
        the scale and zero of row ``32 b + 16 h + d``, group g at ``[:, h, b, g, 0, d]``."""
        kg, np_, _ = scale_zero.shape
        sz = scale_zero.to(torch.float32).view(kg, np_ // kernels.BLOCK_N, 2, kernels.HALF, 2)
        return sz.permute(4, 2, 1, 0, 3).contiguous().unsqueeze(4)

    def _dequant_blocks(self, nib: torch.Tensor, sz: torch.Tensor, b0: int, b1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row blocks ``[b0, b1)`` of the padded W, transposed, as two halves: fp32 ``[B, Kp, 16]`` each
        (low: rows ``32 b + d``, high: rows ``32 b + 16 + d``). A weight is ``(code - 8) * scale + zero``:
        the product is exact in fp32 and the sum rounds once, as in torch's int4 kernel."""
        kp = nib.shape[1] * 2
        nb, g = b1 - b0, self.group_of(kp)
        halves = kernels.split_nibbles(nib.view(-1, kp, kernels.HALF)[b0:b1])
        out = []
        for h, codes in enumerate(halves):
            c = torch.add(codes, -float(kernels.CODE_OFFSET)).view(nb, kp // g, g, kernels.HALF)  # uint8 -> fp32
            out.append(torch.addcmul(sz[1, h, b0:b1], c, sz[0, h, b0:b1]).view(nb, kp, kernels.HALF))
        return out[0], out[1]

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = q.shape
        np_, kp = self.padded(q.shape)
        lo, hi = self._dequant_blocks(self.nib(q), self._block_scales(q.parts["scale_zero"]), 0, np_ // kernels.BLOCK_N)
        w = torch.stack((lo, hi), dim=1).permute(0, 1, 3, 2).reshape(np_, kp)  # [NB, 2, 16, Kp] -> [Np, Kp]
        return w[:n, :k].to(dtype).contiguous()

    def linear_dequant(self, x: torch.Tensor, q: QTensor) -> torch.Tensor:
        """Dequantize-then-matmul; on CPU by chunks of row blocks (about ``DEQUANT_CHUNK`` weights, so a
        chunk stays in cache), each dequantized to fp32 and multiplied at once (batched over blocks)."""
        _check_input(x, q)
        if x.device.type != "cpu":
            return F.linear(x, self.dequantize(q, x.dtype))
        n, k = q.shape
        np_, kp = self.padded(q.shape)
        nib, sz = self.nib(q), self._block_scales(q.parts["scale_zero"])
        x32 = x.reshape(-1, k).to(torch.float32)
        if kp > k:
            x32 = F.pad(x32, (0, kp - k))
        m, nblocks = x32.shape[0], np_ // kernels.BLOCK_N
        step = max(1, DEQUANT_CHUNK // (kp * kernels.BLOCK_N))
        y = x32.new_empty(m, nblocks, 2, kernels.HALF)
        for b0 in range(0, nblocks, step):
            b1 = min(b0 + step, nblocks)
            for h, wt in enumerate(self._dequant_blocks(nib, sz, b0, b1)):
                y[:, b0:b1, h] = torch.matmul(x32, wt).transpose(0, 1)  # [B, M, 16] -> [M, B, 16]
        return y.view(m, np_)[:, :n].to(x.dtype).reshape(*x.shape[:-1], n)

    # above this many tokens the chunked dequantize + fp32 GEMM beats the kernel, which re-dequantizes
    # the weight for every 4 rows of x (int4-g64, 5632 x 1024, 1 thread: 137 vs 145 ms at 128 tokens,
    # 462 vs 393 at 512)
    KERNEL_MAX_TOKENS = 256

    def _fast(self, device: torch.device, dtype: torch.dtype, in_features: int, tokens: int) -> bool:
        kp = _ceil_to(in_features, self._k_multiple)
        return (
            device.type == "cpu" and dtype == torch.bfloat16 and 0 < tokens <= self.KERNEL_MAX_TOKENS
            and self.group_of(kp) in KERNEL_GROUPS and kernels.has_int4_cpu_kernel()
        )

    def linear(self, x: torch.Tensor, q: QTensor) -> torch.Tensor:
        _check_input(x, q)
        if not self._fast(x.device, x.dtype, q.shape[1], x.numel() // q.shape[1]):
            return self.linear_dequant(x, q)
        n, k = q.shape
        np_, kp = self.padded(q.shape)
        x2 = x.reshape(-1, k)
        if kp > k:
            x2 = F.pad(x2, (0, kp - k))
        if self.bits == 4 and q.in_slot and not q.native and kernels.can_repack_in_place():
            weight = q.parts["qweight"].view(np_, kp // 2)
            weight.copy_(kernels.repack_for_cpu(weight))  # once per copy into the slot, not per call
            q.native = True
        g = self.group_of(kp)
        if q.native:
            y = kernels.int4_linear_cpu(x2.contiguous(), q.parts["qweight"].view(np_, kp // 2), g,
                                        q.parts["scale_zero"], native=True)  # fmt: skip
        else:
            y = kernels.int4_linear_cpu(x2.contiguous(), self.nib(q), g, q.parts["scale_zero"])
        if np_ > n:
            y = y[:, :n]
        return y.reshape(*x.shape[:-1], n)

    def kernel(self, device: torch.device | str, dtype: torch.dtype, in_features: int = 8, tokens: int = 1) -> str:
        if self._fast(torch.device(device), dtype, in_features, tokens):
            name = "aten._weight_int4pack_mm_for_cpu"
            if self.bits < 4:
                name = f"int{self.bits}->int4 nibble expand + " + name
            if not kernels.int4pack_layout_matches():
                if self.bits == 4 and kernels.can_repack_in_place():
                    name += " (this build packs 64-row blocks: a cache slot is repacked once per copy)"
                else:
                    name += " (per-call repack: this build's int4pack layout differs)"
            return name
        return super().kernel(device, dtype, in_features, tokens)


# --------------------------------------------------------------------------------------------- fp8


class Fp8Format(ExpertFormat):
    """float8 e4m3 with one fp32 ``scale_inv`` per 128 x 128 block (edge blocks partial), as in
    DeepSeek-V3 checkpoints: ``W = weight * scale_inv``; dequantized by the store's FP8 routine."""

    name, bits = "fp8-e4m3", 8

    def layout(self, shape: tuple[int, int]) -> Layout:
        n, k = _check_shape(tuple(shape))
        bm, bn = FP8_BLOCK
        return [("weight", torch.float8_e4m3fn, (n, k)), ("scale_inv", torch.float32, (-(-n // bm), -(-k // bn)))]

    def quantize(self, w: torch.Tensor) -> QTensor:
        w32 = _check_weight(w, self.name).to(torch.float32)
        n, k = w32.shape
        bm, bn = FP8_BLOCK
        np_, kp = _ceil_to(n, bm), _ceil_to(k, bn)
        padded = F.pad(w32, (0, kp - k, 0, np_ - n))
        blocks = padded.view(np_ // bm, bm, kp // bn, bn)
        amax = blocks.abs().amax(dim=(1, 3))
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        full = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:n, :k]
        q = torch.clamp(w32 / full, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return self._new((n, k), {"weight": q.contiguous(), "scale_inv": scale.contiguous()})

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from moe_engine.runtime.store import dequantize_fp8_blocks

        return dequantize_fp8_blocks(q.parts["weight"], q.parts["scale_inv"], FP8_BLOCK, dtype)


# ---------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, ExpertFormat] = {}


def register_format(fmt: ExpertFormat) -> None:
    """Add ``fmt`` under ``fmt.name``; a name may be registered once."""
    if not isinstance(fmt, ExpertFormat):
        raise TypeError(f"register_format expects an ExpertFormat, got {type(fmt).__name__}")
    if fmt.name in _REGISTRY:
        raise ValueError(f"expert format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt


def available_formats() -> list[str]:
    """Registered format names."""
    return list(_REGISTRY)


def get_format(name: str) -> ExpertFormat:
    """The format registered as ``name``; ValueError naming the available formats otherwise."""
    fmt = _REGISTRY.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"unknown expert format {name!r}; available: {', '.join(available_formats())}")
    return fmt


for _name, _dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
    register_format(StoredFormat(_name, _dtype))
register_format(Int8Format())
for _bits in (4, 3, 2):
    for _group in (*GROUP_SIZES, ROW):
        register_format(GroupFormat(_bits, _group))
register_format(Fp8Format())


# ------------------------------------------------------------------------------------ pack / unpack


@functools.lru_cache(maxsize=4096)
def _offsets(name: str, shape: tuple[int, int]) -> tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]:
    """``(part, dtype, part shape, end offset)`` per part; the last end is ``nbytes``. Parts start at
    ``_align(previous end)``."""
    out = []
    end = 0
    for part, dtype, pshape in get_format(name).layout(shape):
        start = _align(end)
        end = start + _numel(pshape) * dtype.itemsize
        out.append((part, dtype, tuple(pshape), end))
    return tuple(out)


def pack(q: QTensor) -> torch.Tensor:
    """All parts of ``q`` in one uint8 buffer (on q's device) of exactly ``nbytes(q.shape)`` bytes, each
    part at a multiple of 64 bytes, padding zero."""
    fmt = get_format(q.format)
    shape = _check_shape(tuple(q.shape))
    offs = _offsets(fmt.name, shape)
    if q.native:
        raise ValueError("pack: this QTensor's qweight was repacked in place for the int4 kernel (a cache slot's view)")
    if set(q.parts) != {p for p, _, _, _ in offs}:
        raise ValueError(f"pack: a {fmt.name} {shape} QTensor has parts {[p for p, *_ in offs]}, got {sorted(q.parts)}")
    buf = torch.zeros(offs[-1][3], dtype=torch.uint8, device=q.device)
    for part, dtype, pshape, end in offs:
        t = q.parts[part]
        if t.dtype != dtype or tuple(t.shape) != pshape:
            raise ValueError(f"pack: {fmt.name} part {part!r} must be {dtype} {pshape}, got {t.dtype} {tuple(t.shape)}")
        n = _numel(pshape) * dtype.itemsize
        buf[end - n : end] = t.contiguous().view(torch.uint8).reshape(-1)
    return buf


def unpack(buf: torch.Tensor, format: str, shape: tuple[int, int]) -> QTensor:
    """Views of ``buf`` (uint8, 1-D, ``nbytes(shape)`` long, first byte 64-byte aligned for full speed
    and at least aligned to the widest part dtype) as a ``format`` QTensor of ``shape``; no copy."""
    fmt = get_format(format)
    shape = _check_shape(tuple(shape))
    offs = _offsets(fmt.name, shape)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != offs[-1][3]:
        raise ValueError(
            f"unpack: a {fmt.name} {shape} matrix is a 1-D uint8 buffer of {offs[-1][3]} bytes, "
            f"got {buf.dtype} {tuple(buf.shape)}"
        )
    parts = {}
    for part, dtype, pshape, end in offs:
        n = _numel(pshape) * dtype.itemsize
        parts[part] = buf[end - n : end].view(dtype).view(pshape)
    return QTensor(fmt.name, shape, parts)
