"""How one quantized expert lies in a runtime cache slot (a flat uint8 buffer).

``gate_up [2I, H]``'s packed form (``moe_engine.quant.pack``) starts at byte 0 and ``down [H, I]``'s at
the next multiple of 64 bytes; a slot is as large as the largest expert it may hold. The store copies a
quantized checkpoint's stored parts straight to their offsets (``part_offsets``), so what a slot holds
after a read is exactly ``pack(gate_up) ++ pad ++ pack(down)``: the form ``unpack`` views without a copy.

Example::

    (gu_off, gu_bytes), (dn_off, dn_bytes) = expert_packing("int4-g64", I, H)
    slot_bytes = expert_slot_bytes("int4-g64", I, H)
"""

from __future__ import annotations

import functools

ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@functools.cache
def expert_packing(fmt: str, intermediate: int, hidden: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((offset, nbytes) of gate_up, (offset, nbytes) of down)`` inside a slot, for format ``fmt``."""
    from moe_engine.quant.formats import get_format

    f = get_format(fmt)
    gu = f.nbytes((2 * intermediate, hidden))
    dn = f.nbytes((hidden, intermediate))
    return (0, gu), (_align(gu), dn)


def expert_slot_bytes(fmt: str, intermediate: int, hidden: int) -> int:
    """Bytes of a slot holding one expert in format ``fmt`` (gate_up, padding, down)."""
    _, (off, n) = expert_packing(fmt, intermediate, hidden)
    return off + n


@functools.cache
def part_offsets(fmt: str, shape: tuple[int, int]) -> tuple[tuple[str, int, int], ...]:
    """``(part name, byte offset, nbytes)`` of each part of one matrix's packed form, in packing order
    (``pack``'s layout: every part starts at a multiple of 64 bytes)."""
    from moe_engine.quant.formats import get_format

    out = []
    off = 0
    for name, dtype, part_shape in get_format(fmt).layout(shape):
        n = dtype.itemsize
        for d in part_shape:
            n *= d
        out.append((name, off, n))
        off = _align(off + n)
    return tuple(out)
