"""Quantized expert formats (issue 12): the registry, ``QTensor``, ``pack`` / ``unpack``.

See ``moe_engine.quant.formats`` for the formats and which kernel each runs where; ``hqq`` fits the
group-wise scales and zeros; ``kernels`` owns bit layouts and torch's weight-only kernels; ``slots``
places one expert's packed matrices in a runtime cache slot.

Example::

    from moe_engine.quant import get_format, pack, unpack
    q = get_format("int4-g64").quantize(w)            # w [out, in]
    y = get_format(q.format).linear(x, unpack(pack(q), q.format, q.shape))
"""

from moe_engine.quant.formats import (
    ExpertFormat,
    QTensor,
    available_formats,
    get_format,
    pack,
    register_format,
    unpack,
)

__all__ = [
    "ExpertFormat",
    "QTensor",
    "available_formats",
    "get_format",
    "pack",
    "register_format",
    "unpack",
]
