"""Expert formats (``moe_engine.quant``): linear == dequantize-then-matmul, error bounds per format,
pack/unpack bit-exact, sizes, bad input.

Shapes: every routed-expert matrix of the tiny test architectures (H = 32, their I), the default
model's (gate_up [256, 192], down [192, 128]), and an odd one (40 x 100: rows not a multiple of 32,
columns not a multiple of any group size) that the group formats pad.

Tolerance of ``linear`` (stated once, used everywhere): against the fp64 product of x and the
dequantized weight, ``|y - ref| <= TOL_EPS[dtype] * eps(dtype) * max(|x| @ |W|.T)`` elementwise, with
``TOL_EPS`` = 2 for bf16/fp16 (one output rounding plus fp32 accumulation) and 16 for fp32.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import VARIANTS, expert_intermediate_size, tiny_config

import moe_engine
from moe_engine.quant import (
    QTensor,
    available_formats,
    get_format,
    hqq,
    kernels,
    pack,
    register_format,
    unpack,
)
from moe_engine.quant.formats import Fp8Format, GroupFormat, StoredFormat

CONTRACT_FORMATS = [
    "bf16", "fp16", "fp32", "int8",
    "int4-g32", "int4-g64", "int4-g128", "int3-g32", "int3-g64", "int3-g128",
    "int2-g32", "int2-g64", "int2-g128", "int4-row", "int3-row", "int2-row", "fp8-e4m3",
]
TOL_EPS = {torch.float32: 16.0, torch.bfloat16: 2.0, torch.float16: 2.0}


def _expert_shapes(hidden: int, inter: int) -> list[tuple[int, int]]:
    return [(2 * inter, hidden), (hidden, inter)]


def _tiny_shapes() -> list[tuple[int, int]]:
    shapes: set[tuple[int, int]] = set()
    for variant in VARIANTS:
        config = tiny_config(variant)
        shapes.update(_expert_shapes(int(config.hidden_size), expert_intermediate_size(config)))
    return sorted(shapes)


@functools.cache
def _default_config() -> dict:
    return json.loads((moe_engine.default_model_path() / "config.json").read_text())


def _default_shapes() -> list[tuple[int, int]]:
    cfg = _default_config()
    return _expert_shapes(cfg["hidden_size"], cfg["moe_intermediate_size"])


ODD_SHAPE = (40, 100)
SHAPES = _tiny_shapes() + _default_shapes() + [ODD_SHAPE]


@functools.cache
def _weight(shape: tuple[int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    return torch.randn(shape, generator=gen) * 0.05


@functools.cache
def _quantized(name: str, shape: tuple[int, int]) -> QTensor:
    return get_format(name).quantize(_weight(shape))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


# ------------------------------------------------------------------------------------------ registry


def test_module_docstring_examples_run():
    w, x = _weight((256, 192)), torch.randn(3, 192)
    fmt = get_format("int4-g64")
    q = fmt.quantize(w)
    buf = pack(q)
    assert buf.numel() == fmt.nbytes(w.shape)
    y = fmt.linear(x, unpack(buf, "int4-g64", w.shape))
    assert torch.allclose(y, x @ fmt.dequantize(q, x.dtype).T, rtol=1e-4, atol=1e-5)
    nib = kernels.codes_to_nib(codes := torch.randint(0, 16, (64, 128), dtype=torch.uint8))
    assert nib.shape == (64, 64) and torch.equal(kernels.nib_to_codes(nib), codes)
    gq, s, z = hqq.fit_affine(w.reshape(-1, 64), bits=3)
    w_hat = ((gq.float() - 8) * s[:, None] + z[:, None]).view_as(w)
    assert (w_hat - w).abs().max() < 0.5 * float(w.abs().max())


def test_registry_names_and_unknown_format():
    assert set(CONTRACT_FORMATS) <= set(available_formats())
    with pytest.raises(ValueError, match=r"unknown expert format 'int5-g64'; available: .*int4-g64"):
        get_format("int5-g64")
    with pytest.raises(ValueError, match="available: bf16"):
        get_format(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        register_format(StoredFormat("bf16", torch.bfloat16))
    assert get_format("int4-g64").bits == 4 and get_format("int8").bits == 8


# ------------------------------------------------------------------------------------ linear == deq


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", CONTRACT_FORMATS)
def test_linear_equals_dequantize_then_matmul(name, shape):
    fmt = get_format(name)
    q = _quantized(name, shape)
    buf = pack(q)
    qv = unpack(buf, name, shape)  # what the runtime holds: views of a slot
    w64 = fmt.dequantize(qv, torch.float64)
    assert w64.shape == shape
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for lead in ((5,), (1,), (2, 3)):
            x = torch.randn(*lead, shape[1], generator=gen).to(dtype)
            y = fmt.linear(x, qv)
            assert y.shape == (*lead, shape[0]) and y.dtype == dtype
            ref = x.double() @ w64.T
            bound = TOL_EPS[dtype] * torch.finfo(dtype).eps * (x.double().abs() @ w64.abs().T).max()
            err = (y.double() - ref).abs().max()
            assert err <= bound, f"{name} {shape} {dtype} {lead}: |linear - x@deq.T| {err:.3g} > {bound:.3g}"
            # the contract's own phrasing: x @ dequantize(q, x.dtype).T (its rounding counted once more)
            alt = (x.double() @ fmt.dequantize(qv, dtype).double().T)
            assert (y.double() - alt).abs().max() <= 2 * bound + 2 * (alt - ref).abs().max()
            # the fallback every format keeps agrees too
            assert (fmt.linear_dequant(x, qv).double() - ref).abs().max() <= bound


def test_fast_kernels_are_the_ones_used_on_cpu_bf16():
    """linear on CPU bf16 runs torch's weight-only kernels (not the fallback) where they exist."""
    if kernels.has_int8_cpu_kernel():
        assert get_format("int8").kernel("cpu", torch.bfloat16, 192) == "aten._weight_int8pack_mm"
        assert "dequantize" in get_format("int8").kernel("cpu", torch.bfloat16, 100)  # kernel needs in % 8 == 0
    if kernels.has_int4_cpu_kernel():
        for name in ("int4-g64", "int3-g64", "int2-g64"):
            assert "_weight_int4pack_mm_for_cpu" in get_format(name).kernel("cpu", torch.bfloat16)
    assert "dequantize(fp32)" in get_format("int4-g64").kernel("cpu", torch.float32)
    if kernels.has_int4_cpu_kernel():  # -row: one group of the whole width, a size the kernel may not take
        assert "_weight_int4pack_mm_for_cpu" in get_format("int4-row").kernel("cpu", torch.bfloat16, 128)
    assert "dequantize(fp32)" in get_format("int4-row").kernel("cpu", torch.bfloat16, 192)
    assert get_format("int4-g64").kernel("cuda", torch.bfloat16) == "dequantize(bfloat16) + F.linear"
    # long prefills: one dequantize + fp32 GEMM beats the kernels, which re-dequantize per 4 rows
    assert "dequantize(fp32)" in get_format("int8").kernel("cpu", torch.bfloat16, 192, tokens=65)
    assert "dequantize(fp32)" in get_format("int4-g64").kernel("cpu", torch.bfloat16, 192, tokens=257)


@pytest.mark.parametrize("name", ["int8", "int4-g64", "int3-g32", "int2-g128"])
def test_linear_above_the_kernel_token_limit(name):
    """Both sides of KERNEL_MAX_TOKENS give x @ W.T within the bf16 tolerance."""
    fmt = get_format(name)
    shape = _default_shapes()[0]
    q = _quantized(name, shape)
    w64 = fmt.dequantize(q, torch.float64)
    limit = type(fmt).KERNEL_MAX_TOKENS  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(11)
    for m in (limit, limit + 1):
        x = torch.randn(m, shape[1], generator=gen).to(torch.bfloat16)
        ref = x.double() @ w64.T
        bound = TOL_EPS[torch.bfloat16] * torch.finfo(torch.bfloat16).eps * (x.double().abs() @ w64.abs().T).max()
        assert (fmt.linear(x, q).double() - ref).abs().max() <= bound


def test_nibble_layout_is_torch_int4pack_layout():
    gen = torch.Generator().manual_seed(3)
    for n, k in ((32, 64), (64, 32), (256, 192)):
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        nib = kernels.codes_to_nib(codes)
        assert nib.shape == (n, k // 2)
        assert torch.equal(kernels.nib_to_codes(nib), codes)
        if kernels.int4pack_layout_matches():
            theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
            assert torch.equal(theirs.reshape(-1), nib.reshape(-1))
        low = codes & 0x07  # 3-bit codes survive the lo2 + hi1 planes, 2-bit codes the lo2 plane
        nib3 = kernels.codes_to_nib(low)
        assert torch.equal(kernels.unpack_lo2(kernels.pack_lo2(nib3)) | kernels.unpack_hi1(kernels.pack_hi1(nib3)), nib3.reshape(-1))
        nib2 = kernels.codes_to_nib(codes & 0x03)
        assert torch.equal(kernels.unpack_lo2(kernels.pack_lo2(nib2)), nib2.reshape(-1))


def test_int4_linear_when_this_build_packs_another_layout(monkeypatch):
    """Where torch's packer differs (AVX512 builds), linear repacks per call and stays correct."""
    if not kernels.has_int4_cpu_kernel():
        pytest.skip("no CPU int4 kernel in this torch")
    shape = _default_shapes()[0]
    q = _quantized("int4-g64", shape)
    x = torch.randn(3, shape[1]).to(torch.bfloat16)
    expected = get_format("int4-g64").linear(x, q)
    monkeypatch.setattr(kernels, "int4pack_layout_matches", lambda: False)
    assert torch.equal(get_format("int4-g64").linear(x, q), expected)


def test_repack_equals_this_builds_packer(monkeypatch):
    """Both repack paths give this build's packer's bytes on the whole matrix (32-row tails included):
    the packer by 64-row chunks (bounded int32 scratch) and, on builds that pack 64-row blocks, the
    byte shuffle ``repack_for_cpu`` then uses."""
    if not kernels.has_int4_cpu_kernel():
        pytest.skip("no CPU int4 kernel in this torch")
    gen = torch.Generator().manual_seed(3)
    for n, k in [(64 * 5 + 32, 128), (256, 64), (32, 64), (96, 192)]:
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        nib = kernels.codes_to_nib(codes)
        with monkeypatch.context() as m:
            m.setattr(kernels, "REPACK_CHUNK", 64 * k * 4)  # one 64-row block per chunk
            assert torch.equal(kernels._repack_with_packer(nib).reshape(-1), whole.reshape(-1))
        assert torch.equal(kernels.repack_for_cpu(nib).reshape(-1), whole.reshape(-1))
        if kernels._packs_64_row_blocks():
            assert torch.equal(kernels._to_64_row_blocks(nib).reshape(-1), whole.reshape(-1))


def test_64_row_shuffle_round_trips():
    """``unrepack_for_cpu`` inverts the 64-row shuffle (pure byte moves: checked on every build)."""
    gen = torch.Generator().manual_seed(4)
    for n, k in [(64 * 3 + 32, 128), (64, 64), (32, 192)]:
        nib = kernels.codes_to_nib(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
        assert torch.equal(kernels.unrepack_for_cpu(kernels._to_64_row_blocks(nib)), nib)


def test_int4_slot_view_is_repacked_once_in_place():
    """A cache slot's int4 views (``in_slot``) are rewritten into this build's layout at the first kernel
    call where it packs 64-row blocks: the same outputs, call after call; dequantize still reads the
    codes right; packing such a view is refused. Plain QTensors are never changed."""
    from moe_engine.quant.formats import pack, unpack

    if not kernels.has_int4_cpu_kernel():
        pytest.skip("no CPU int4 kernel in this torch")
    fmt = get_format("int4-g64")
    for shape in _default_shapes():
        q = _quantized("int4-g64", shape)
        before = q.parts["qweight"].clone()
        x = torch.randn(3, shape[1]).to(torch.bfloat16)
        expected, weight = fmt.linear(x, q), fmt.dequantize(q)
        assert torch.equal(q.parts["qweight"], before) and not q.native  # not a slot view: left alone
        view = unpack(pack(q).clone(), "int4-g64", shape)
        view.in_slot = True
        for _ in range(2):
            assert torch.equal(fmt.linear(x, view), expected)
        assert view.native == kernels.can_repack_in_place()
        assert torch.equal(fmt.dequantize(view), weight)
        if view.native:
            assert not torch.equal(view.parts["qweight"], before)
            with pytest.raises(ValueError, match="repacked in place"):
                pack(view)


def test_linear_of_no_tokens_and_bad_input():
    fmt = get_format("int4-g64")
    q = _quantized("int4-g64", (256, 192))
    assert fmt.linear(torch.zeros(0, 192, dtype=torch.bfloat16), q).shape == (0, 256)
    with pytest.raises(ValueError, match=r"x \[\.\.\., 192\] expected"):
        fmt.linear(torch.zeros(2, 191), q)
    with pytest.raises(ValueError, match="float activations"):
        fmt.linear(torch.zeros(2, 192, dtype=torch.int64), q)


# ------------------------------------------------------------------------------------- error bounds


@functools.cache
def _default_model_experts() -> tuple[torch.Tensor, ...]:
    """A few real expert matrices of the default model (its trained weights, not Gaussian noise)."""
    path = next(moe_engine.default_model_path().glob("*.safetensors"))
    with safe_open(str(path), "pt") as f:
        names = sorted(n for n in f.keys() if ".experts.0." in n or ".experts.5." in n)[:6]
        return tuple(f.get_tensor(n).to(torch.float32) for n in names)


def _rel_rms(name: str, w: torch.Tensor) -> float:
    fmt = get_format(name)
    d = fmt.dequantize(fmt.quantize(w))
    return float((d - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())


# relative RMS error bounds on the default model's weights (measured: bf16 0.0016, int8 0.0065,
# fp8 0.026, int4-g64 0.082, int3-g64 0.166, int2-g64 0.32)
ERROR_BOUNDS = {
    "fp32": 0.0, "fp16": 0.001, "bf16": 0.004, "int8": 0.01, "fp8-e4m3": 0.04,
    "int4-g32": 0.09, "int4-g64": 0.095, "int4-g128": 0.105,
    "int3-g32": 0.18, "int3-g64": 0.19, "int3-g128": 0.2,
    "int2-g32": 0.34, "int2-g64": 0.35, "int2-g128": 0.36,
}


def test_dequantize_error_bounded_and_ordered():
    ws = _default_model_experts()
    err = {name: max(_rel_rms(name, w) for w in ws) for name in CONTRACT_FORMATS}
    for name, bound in ERROR_BOUNDS.items():
        assert err[name] <= bound, f"{name}: relative RMS error {err[name]:.4f} > {bound}"
    assert err["int8"] * 5 < err["int4-g64"] < err["int3-g64"] < err["int2-g64"]
    assert err["int4-g64"] * 1.5 < err["int3-g64"] and err["int3-g64"] * 1.5 < err["int2-g64"]
    for bits in (4, 3, 2):  # smaller groups, smaller error
        assert err[f"int{bits}-g32"] <= err[f"int{bits}-g64"] <= err[f"int{bits}-g128"]


def test_group_fit_never_worse_than_min_max():
    """The optimiser keeps per group the best of min-max and its refinements."""
    w = torch.cat([m.reshape(-1, 64) for m in _default_model_experts()])
    for bits in (4, 3, 2):
        q, s, z = hqq.fit_affine(w, bits)
        assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1 and bool((s > 0).all())
        err = (w - ((q.float() - 8) * s[:, None] + z[:, None])).pow(2).sum(1)
        q0, s0, z0 = hqq.fit_affine(w, bits, iters=0)
        base = (w - ((q0.float() - 8) * s0[:, None] + z0[:, None])).pow(2).sum(1)
        wmin, wmax = w.amin(1), w.amax(1)  # plain min-max, its scale and zero rounded to bf16 as stored
        s_mm = ((wmax - wmin) / (2**bits - 1)).to(torch.bfloat16).float()
        z_mm = (wmin + 8 * s_mm).to(torch.bfloat16).float()
        q_mm = torch.clamp(torch.round((w - z_mm[:, None]) / s_mm[:, None] + 8), 0, 2**bits - 1)
        minmax = (w - ((q_mm - 8) * s_mm[:, None] + z_mm[:, None])).pow(2).sum(1)
        assert bool((err <= base * (1 + 1e-6)).all()) and bool((base <= minmax * (1 + 1e-6)).all())
        assert float(err.sum()) < 0.97 * float(minmax.sum())  # and the refinement does help overall


def test_constant_and_zero_rows_are_exact_enough():
    w = torch.zeros(64, 128)
    w[1] = 0.25
    w[2, :64] = -3.0
    rows = [0, 1] + list(range(3, 64))  # zero and constant rows (row 2 mixes two values)
    for name in CONTRACT_FORMATS:
        fmt = get_format(name)
        d = fmt.dequantize(fmt.quantize(w))
        assert torch.equal(d[3:], w[3:]) and torch.equal(d[0], w[0]), name  # zero rows stay exactly zero
        # fp8 shares one scale per 128 x 128 block (set by the -3.0): e4m3 keeps 3 mantissa bits
        rtol = 2**-4 if name == "fp8-e4m3" else 2**-8
        assert torch.allclose(d[rows], w[rows], rtol=rtol, atol=0), name


# ---------------------------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", CONTRACT_FORMATS)
def test_pack_unpack_round_trip_bit_exact(name, shape):
    from moe_engine.quant.slots import part_offsets

    fmt = get_format(name)
    q = _quantized(name, shape)
    assert [p for p, _, _ in fmt.layout(shape)] == list(q.parts)
    for part, dtype, pshape in fmt.layout(shape):
        assert q.parts[part].dtype == dtype and tuple(q.parts[part].shape) == tuple(pshape)
    buf = pack(q)
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.numel() == fmt.nbytes(shape) == q.nbytes
    q2 = unpack(buf, name, shape)
    assert q2.format == name and q2.shape == shape
    for part, t in q.parts.items():
        assert _bits_equal(q2.parts[part], t), f"{name} {shape}: part {part} differs after unpack(pack())"
    # views, not copies: each part lies inside buf at a 64-byte aligned offset (as slots.part_offsets says)
    base = buf.data_ptr()
    for (part, off, n), t in zip(part_offsets(name, shape), q2.parts.values()):
        assert t.data_ptr() - base == off and off % 64 == 0 and t.numel() * t.element_size() == n, part
    assert torch.equal(pack(q2), buf)
    assert torch.equal(fmt.dequantize(q2), fmt.dequantize(q))


def test_unpack_is_a_view_and_checks_length():
    q = _quantized("int4-g64", (256, 192))
    buf = pack(q)
    q2 = unpack(buf, "int4-g64", (256, 192))
    buf.zero_()
    assert int(q2.parts["qweight"].count_nonzero()) == 0
    with pytest.raises(ValueError, match="1-D uint8 buffer of 27648 bytes"):
        unpack(buf[:-1], "int4-g64", (256, 192))
    with pytest.raises(ValueError, match="1-D uint8 buffer"):
        unpack(buf.view(torch.int8), "int4-g64", (256, 192))
    with pytest.raises(ValueError, match="has parts"):
        pack(QTensor("int4-g64", (256, 192), {"qweight": q.parts["qweight"]}))
    with pytest.raises(ValueError, match="must be torch.bfloat16"):
        pack(QTensor("int4-g64", (256, 192), {**q.parts, "scale_zero": q.parts["scale_zero"].float()}))


# -------------------------------------------------------------------------------------------- sizes


def test_int4_g64_expert_is_at_least_3_5x_smaller_than_bf16():
    shapes = _default_shapes()
    bf16 = sum(get_format("bf16").nbytes(s) for s in shapes)
    int4 = sum(get_format("int4-g64").nbytes(s) for s in shapes)
    assert bf16 == 2 * sum(a * b for a, b in shapes)
    assert bf16 / int4 >= 3.5, f"bf16 {bf16} B / int4-g64 {int4} B = {bf16 / int4:.3f} < 3.5"


def test_bits_per_weight_on_bench_shapes():
    """Sizes alone (no quantizing): the 2 GB bench expert's [5632, 1024] and [1024, 2816]."""
    shapes = [(5632, 1024), (1024, 2816)]
    weights = sum(a * b for a, b in shapes)
    expected = {"bf16": 16, "int8": 8, "int4-g64": 4.5, "int4-g128": 4.25, "int3-g64": 3.5, "int2-g64": 2.5,
                "int4-g32": 5, "fp8-e4m3": 8}
    for name, bits in expected.items():
        got = 8 * sum(get_format(name).nbytes(s) for s in shapes) / weights
        assert bits <= got <= bits * 1.01, f"{name}: {got:.3f} bits per weight, expected ~{bits}"


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["int8", "int4-g64", "int2-g32", "fp8-e4m3", "bf16"])
def test_quantize_rejects_bad_weights(name):
    fmt = get_format(name)
    with pytest.raises(ValueError, match="one 2-D expert matrix"):
        fmt.quantize(torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="one 2-D expert matrix"):
        fmt.quantize(torch.zeros(32))
    with pytest.raises(ValueError, match="expects a float weight"):
        fmt.quantize(torch.zeros(32, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="expects a float weight"):
        fmt.quantize(torch.zeros(32, 32).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="inf or NaN"):
        fmt.quantize(torch.full((32, 32), float("nan")))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fmt.quantize([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive ints"):
        fmt.nbytes((0, 32))


def test_group_format_rejects_unsupported_parameters():
    with pytest.raises(ValueError, match="group in"):
        GroupFormat(4, 48)
    with pytest.raises(ValueError, match="bits in"):
        GroupFormat(5, 64)


def test_fp8_matches_the_store_dequantization_of_a_deepseek_block():
    """fp8-e4m3 is the checkpoint format the store already reads: same parts, same dequantization."""
    from tiny_models import fp8_reference_dequantize

    w = _weight((256, 192))
    q = Fp8Format().quantize(w)
    assert q.parts["scale_inv"].shape == (2, 2)
    ref = fp8_reference_dequantize(q.parts["weight"], q.parts["scale_inv"], (128, 128))
    assert torch.equal(get_format("fp8-e4m3").dequantize(q, ref.dtype), ref)


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CONTRACT_FORMATS)
def test_cuda_linear_from_a_packed_buffer(name):
    fmt = get_format(name)
    shape = _default_shapes()[0]
    buf = pack(_quantized(name, shape)).cuda()
    qv = unpack(buf, name, shape)
    w64 = fmt.dequantize(qv, torch.float64)
    assert torch.equal(w64.cpu(), fmt.dequantize(_quantized(name, shape), torch.float64))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(4, shape[1], device="cuda").to(dtype)
        y = fmt.linear(x, qv)
        assert y.device.type == "cuda" and y.dtype == dtype
        ref = x.double() @ w64.T
        # CUDA GEMMs may use reduced-precision accumulation (TF32 off by default; bf16/fp16 split-K)
        bound = 4 * TOL_EPS[dtype] * torch.finfo(dtype).eps * (x.double().abs() @ w64.abs().T).max()
        assert (y.double() - ref).abs().max() <= bound
    q_gpu = fmt.quantize(_weight(shape).cuda())  # quantizing on the GPU gives a packable QTensor there
    assert pack(q_gpu).device.type == "cuda" and pack(q_gpu).numel() == fmt.nbytes(shape)


def test_row_formats_hold_one_scale_and_zero_per_row():
    """``int{b}-row``: one group per output row whatever the width (192 here, which no fixed group size of
    32/64/128 both divides and fills), so fewer bytes than any fixed group of the same bits; a constant
    row is exact."""
    from moe_engine.quant.formats import ROW, GroupFormat

    for bits in (4, 3, 2):
        row, g64 = get_format(f"int{bits}-row"), get_format(f"int{bits}-g64")
        for shape in _default_shapes():
            q = _quantized(f"int{bits}-row", shape)
            assert tuple(q.parts["scale_zero"].shape) == (1, -(-shape[0] // 32) * 32, 2)
            assert row.nbytes(shape) < g64.nbytes(shape)
    w = torch.full((32, 192), 0.25)
    fmt = get_format("int3-row")
    assert torch.equal(fmt.dequantize(fmt.quantize(w)), w)
    with pytest.raises(ValueError, match="one group per row"):
        GroupFormat(3, 96)
    assert GroupFormat(3, ROW).name == "int3-row"
