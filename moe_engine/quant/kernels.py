"""Bit layouts and weight-only matmul kernels behind ``moe_engine.quant.formats``.

Owns: the *nibble layout* every group-wise format stores its codes in, the bit-plane packing of 3- and
2-bit codes inside it, and the calls into torch's CPU weight-only kernels.

Glossary:
- *codes*: ``uint8 [Np, Kp]``, one integer per weight (0..2^bits-1), ``Np`` = out rows padded to a
  multiple of 32, ``Kp`` = in columns padded to a multiple of the group size.
- *nibble layout* (``nib``): ``uint8 [Np, Kp / 2]`` in the byte order of
  ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` on an AVX2 build (``BLOCK_N = 32``): rows go
  in blocks of 32; block ``b`` is ``[Kp, 16]`` bytes and byte ``(k, d)`` holds row ``32b + d`` in its
  low nibble and row ``32b + 16 + d`` in its high nibble. Storing that order means the int4 kernel
  reads a slot as it lies, with no per-call repack (measured: the repack of a 5632 x 1024 matrix costs
  3x the matmul itself). ``int4pack_layout_matches()`` checks once per process that this torch build
  packs the same way. AVX512 builds pack 64-row blocks: there a cache slot's int4 weights are turned
  into that layout in place by byte shuffles, once per copy into the slot (``repack_for_cpu``,
  ``unrepack_for_cpu``; ``formats.QTensor.in_slot``); other weights, and builds packing yet another
  way, are converted per call (correct, slower).
- *scale_zero*: ``[Kp / G, Np, 2]`` (scale, zero) per group and row, the kernel's ``qScaleAndZeros``;
  a weight is ``(code - 8) * scale + zero`` (torch's int4 convention, for every bit width here).

Example::

    nib = codes_to_nib(codes)              # codes uint8 [64, 128] -> nib uint8 [64, 64]
    assert torch.equal(nib_to_codes(nib), codes)
"""

from __future__ import annotations

import functools

import torch

BLOCK_N = 32  # rows per block of the nibble layout (torch's AVX2 int4pack block)
HALF = BLOCK_N // 2
CODE_OFFSET = 8  # torch's int4 kernels dequantize as (code - 8) * scale + zero


def codes_to_nib(codes: torch.Tensor) -> torch.Tensor:
    """codes ``uint8 [Np, Kp]`` (values < 16, Np % 32 == 0, Kp even) -> nibble layout ``uint8 [Np, Kp/2]``."""
    n, k = codes.shape
    c = codes.view(n // BLOCK_N, 2, HALF, k)  # [NB, lo/hi, 16, Kp]
    nib = (c[:, 1] << 4) | c[:, 0]  # [NB, 16, Kp]
    return nib.transpose(1, 2).contiguous().view(n, k // 2)


def _words(t: torch.Tensor) -> torch.Tensor:
    """``t`` (uint8, contiguous, numel % 4 == 0) viewed as int32 words: uint8 shifts and masks with a
    scalar run unvectorized in torch (10-20x slower), so bit work here is done 4 bytes at a time."""
    t = t.contiguous()
    if t.storage_offset() % 4:
        t = t.clone()
    return t.view(torch.int32)


_LOW_NIBBLES = 0x0F0F0F0F


def split_nibbles(nib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low nibbles, high nibbles)`` of every byte of ``nib`` (uint8, same shape as ``nib``)."""
    w = _words(nib)
    lo = (w & _LOW_NIBBLES).view(torch.uint8).view(nib.shape)
    hi = ((w >> 4) & _LOW_NIBBLES).view(torch.uint8).view(nib.shape)
    return lo, hi


def split_nibbles_signed(nib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` nibbles of every byte of ``nib`` minus 8, as int8 (the kernel's ``code - 8``):
    ``c ^ 8`` is ``c - 8`` in 4-bit two's complement; copying its bit 3 into bits 4-7 sign-extends it."""
    w = _words(nib)
    out = []
    for part in (w & _LOW_NIBBLES, (w >> 4) & _LOW_NIBBLES):
        t = part ^ 0x08080808
        sign = t & 0x08080808
        t |= (sign << 1) | (sign << 2) | (sign << 3) | (sign << 4)
        out.append(t.view(torch.int8).view(nib.shape))
    return out[0], out[1]


def nib_to_codes_t(blocks: torch.Tensor) -> torch.Tensor:
    """Nibble-layout row blocks ``uint8 [B, Kp, 16]`` -> the codes of ``W.T``: ``uint8 [Kp, 32 B]``
    (column ``32 b + j`` is row ``32 b + j`` of the block range). The layout is W.T-major inside a
    block, so this needs no transpose of the codes."""
    nb, k, _ = blocks.shape
    lo, hi = split_nibbles(blocks)
    both = torch.stack((lo, hi), dim=2)  # [B, Kp, 2, 16]: rows d, then rows 16 + d
    return both.permute(1, 0, 2, 3).reshape(k, nb * BLOCK_N)


def nib_to_codes(nib: torch.Tensor) -> torch.Tensor:
    """Inverse of ``codes_to_nib``: nibble layout ``uint8 [Np, Kp/2]`` -> codes ``uint8 [Np, Kp]``."""
    n, half_k = nib.shape
    return nib_to_codes_t(nib.reshape(n // BLOCK_N, 2 * half_k, HALF)).t().contiguous()


# ------------------------------------------------------------------------------ 2- and 3-bit bit planes
# A 2-bit code sits in a nibble as 0b00cc; 3-bit as 0b0ccc. Both are stored without the unused bits:
# "lo2" keeps the two low bits of both nibbles of every nib byte (4 bits of it), two nib bytes to a
# stored byte (first half of the flat array in the low nibble, second half in the high); "hi1" keeps
# bit 2 of both nibbles (2 bits), four nib bytes to a stored byte (quarters of the flat array).


def pack_lo2(nib: torch.Tensor) -> torch.Tensor:
    """Nibble layout -> ``uint8 [numel / 2]``: bits 0-1 of each nibble."""
    flat = nib.reshape(-1)
    v = (flat & 0x03) | ((flat >> 2) & 0x0C)  # lo nibble bits 0-1 -> 0-1, hi nibble bits 4-5 -> 2-3
    h = v.numel() // 2
    return v[:h] | (v[h:] << 4)


def unpack_lo2(lo2: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_lo2`` (flat): nibble bytes with bits 0-1 of each nibble set."""
    w = _words(lo2)
    v = torch.cat((w & _LOW_NIBBLES, (w >> 4) & _LOW_NIBBLES))
    # each byte 0b(0000 h1 h0 l1 l0) -> nibble byte 0b(00 h1 h0 00 l1 l0)
    return ((v & 0x03030303) | ((v & 0x0C0C0C0C) << 2)).view(torch.uint8)


def pack_hi1(nib: torch.Tensor) -> torch.Tensor:
    """Nibble layout -> ``uint8 [numel / 4]``: bit 2 of each nibble (3-bit codes)."""
    flat = nib.reshape(-1)
    v = ((flat >> 2) & 0x01) | ((flat >> 5) & 0x02)  # 2 bits per nib byte
    q = v.numel() // 4
    return v[:q] | (v[q : 2 * q] << 2) | (v[2 * q : 3 * q] << 4) | (v[3 * q :] << 6)


def unpack_hi1(hi1: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_hi1`` (flat): nibble bytes with only bit 2 of each nibble set."""
    w = _words(hi1)
    v = torch.cat([(w >> s) & 0x03030303 for s in (0, 2, 4, 6)])
    return (((v & 0x01010101) << 2) | ((v & 0x02020202) << 5)).view(torch.uint8)


# ------------------------------------------------------------------------------------------- kernels


@functools.cache
def has_int4_cpu_kernel() -> bool:
    """Whether this torch has the CPU int4 weight-only kernel and its packer."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


@functools.cache
def has_int8_cpu_kernel() -> bool:
    """Whether this torch has the int8 weight-only kernel (``_weight_int8pack_mm``)."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


@functools.cache
def int4pack_layout_matches() -> bool:
    """Whether this torch build's CPU int4 packer writes exactly the nibble layout (checked once, on a
    random 64 x 64 matrix). True on AVX2 builds; AVX512 builds pack 64-row blocks."""
    if not has_int4_cpu_kernel():
        return False
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (2 * BLOCK_N, 64), generator=gen, dtype=torch.int32)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    return theirs.dtype == torch.uint8 and torch.equal(theirs.reshape(-1), codes_to_nib(codes.to(torch.uint8)).reshape(-1))


def int4_linear_cpu(
    x2d: torch.Tensor, nib: torch.Tensor, group: int, scale_zero: torch.Tensor, native: bool = False
) -> torch.Tensor:
    """``x2d [M, Kp] bf16 @ W.T`` with W given as nibble layout + scale_zero (bf16): torch's CPU kernel.

    Returns ``[M, Np]`` bf16. ``native``: ``nib`` already holds this build's layout (``repack_for_cpu``);
    otherwise, where this build packs differently, the nibble layout is converted for this call.
    """
    if not native and not int4pack_layout_matches():
        nib = repack_for_cpu(nib)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, nib, group, scale_zero)


def can_repack_in_place() -> bool:
    """Whether a nibble-layout weight may be turned into this build's layout and back (``repack_for_cpu``
    / ``unrepack_for_cpu`` by byte shuffles): builds that pack 64-row blocks."""
    return has_int4_cpu_kernel() and not int4pack_layout_matches() and _packs_64_row_blocks()


REPACK_CHUNK = 1 << 20  # bytes of int32 codes converted at a time by ``repack_for_cpu``


def repack_for_cpu(nib: torch.Tensor) -> torch.Tensor:
    """The nibble layout ``uint8 [Np, Kp/2]`` in this torch build's own int4pack layout: by byte
    shuffles where the build packs 64-row blocks (``_to_64_row_blocks``, AVX512 builds), else through
    the build's packer by row chunks."""
    if _packs_64_row_blocks():
        return _to_64_row_blocks(nib)
    return _repack_with_packer(nib)


def _to_64_row_blocks(nib: torch.Tensor) -> torch.Tensor:
    """The nibble layout (32-row blocks, rows ``d`` and ``16 + d`` share a byte) as AVX512 torch packs
    it: 64-row blocks ``[Kp, 32]`` whose byte ``(k, d)`` holds rows ``64 b + d`` (low nibble) and
    ``64 b + 32 + d`` (high); a last block of 32 rows pairs rows ``2 d`` and ``2 d + 1``. Nibble moves on
    0.5 byte a weight, 4 bytes at a time (``_words``): the packer's path goes through int32 codes,
    8 times the bytes, and cost 3x the matmul it served."""
    n, half_k = nib.shape
    k = 2 * half_k
    full = n // 64
    parts = []
    if full:  # pairs of 32-row blocks A, B: bytes d < 16 take A.lo | B.lo << 4, bytes 16 + d A.hi | B.hi << 4
        w = _words(nib[: 64 * full]).view(2 * full, k, 4)  # [block, k, 16 bytes as 4 words]
        a, b = w[0::2], w[1::2]
        low = (a & _LOW_NIBBLES) | ((b & _LOW_NIBBLES) << 4)
        high = ((a >> 4) & _LOW_NIBBLES) | (b & ~_LOW_NIBBLES)
        parts.append(torch.stack((low, high), dim=2).view(torch.uint8).reshape(-1))
    if n % 64:  # a last 32-row block: rows 2 d and 2 d + 1 share byte d
        lo, hi = split_nibbles(nib[64 * full :].reshape(k, HALF))
        rows = torch.cat((lo, hi), dim=1)  # [Kp, 32]: [k, d] = code of row d
        parts.append((_words(rows[:, 0::2]) | (_words(rows[:, 1::2]) << 4)).view(torch.uint8).reshape(-1))
    return torch.cat(parts).view(n, half_k) if len(parts) > 1 else parts[0].view(n, half_k)


def unrepack_for_cpu(native: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_to_64_row_blocks``: this build's 64-row int4pack layout back to the nibble layout
    (a new tensor). The same nibble moves: each 64-row block's bytes ``d < 16`` and ``16 + d`` give the
    two 32-row blocks."""
    n, half_k = native.shape
    k = 2 * half_k
    full = n // 64
    parts = []
    if full:
        w = _words(native[: 64 * full]).view(full, k, 2, 4)  # [block, k, bytes 0-15 / 16-31 as words]
        p, q = w[:, :, 0], w[:, :, 1]
        first = (p & _LOW_NIBBLES) | ((q & _LOW_NIBBLES) << 4)  # rows 64 b + d, 64 b + 16 + d
        second = ((p >> 4) & _LOW_NIBBLES) | (q & ~_LOW_NIBBLES)  # rows 64 b + 32 + d, 64 b + 48 + d
        parts.append(torch.stack((first, second), dim=1).view(torch.uint8).reshape(-1))
    if n % 64:  # the last 32 rows: byte d holds rows 2 d, 2 d + 1
        lo, hi = split_nibbles(native[64 * full :].reshape(k, HALF))
        rows = torch.stack((lo, hi), dim=2).reshape(k, BLOCK_N)  # [k, 32]: code of row r
        parts.append((_words(rows[:, :HALF]) | (_words(rows[:, HALF:]) << 4)).view(torch.uint8).reshape(-1))
    return torch.cat(parts).view(n, half_k) if len(parts) > 1 else parts[0].view(n, half_k)


@functools.cache
def _packs_64_row_blocks() -> bool:
    """Whether this build's int4 packer writes ``_to_64_row_blocks``'s layout (checked once, on a random
    96 x 64 matrix: one 64-row block and a 32-row tail)."""
    if not has_int4_cpu_kernel():
        return False
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3 * BLOCK_N, 64), generator=gen, dtype=torch.int32)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    ours = _to_64_row_blocks(codes_to_nib(codes.to(torch.uint8)))
    return theirs.dtype == torch.uint8 and torch.equal(theirs.reshape(-1), ours.reshape(-1))


def _repack_with_packer(nib: torch.Tensor) -> torch.Tensor:
    """``repack_for_cpu`` through torch's packer, by row chunks (multiples of 64 rows: whole blocks for
    32- and 64-row packers) so the int32 codes the packer takes never exist for the whole matrix at
    once: 4 bytes a weight (23 MB for one 5632 x 1024 matrix, allocated and freed per call) grew a 2 GB
    checkpoint's int4 prefill by ~110 MiB of RSS."""
    n, half_k = nib.shape
    step = max(64, REPACK_CHUNK // (8 * half_k) // 64 * 64)
    if n <= step:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib_to_codes(nib).to(torch.int32), 2)
    out = torch.empty_like(nib)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        codes = nib_to_codes(nib[r0:r1]).to(torch.int32)
        out[r0:r1] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2).view(r1 - r0, half_k)
    return out


def int8_linear_cpu(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x2d [M, K] @ (qweight [N, K] int8 * scale [N]).T``: torch's weight-only int8 kernel."""
    return torch.ops.aten._weight_int8pack_mm(x2d, qweight, scale)
