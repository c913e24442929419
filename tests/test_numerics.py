"""Numerics: the engine follows the model's ``experts_implementation`` and is BITWISE equal to stock.

Model level: for each architecture, dtype (fp32, bf16, fp16) and implementation (``grouped_mm``, the
transformers 5.x default, and ``eager``), prefill + decode logits of a padded batch of 2 (row 0
left-padded), the greedy tokens and ``generate()`` equal the stock model's with ``torch.equal``, at a
one-expert budget (every MoE layer runs in waves) and at the full budget, with prefetch on and off.

Kernel level: ``moe_engine.runtime.kernels`` against transformers' own functions on a stock experts
module, with the experts' weights arriving in a shuffled order through one reused buffer (a slot), also
with two intra-op threads on a size where stock's activation is cut mid-row, and on CUDA where present.

Also: the engine refuses to run under autograd (inference-only) with a message saying what to do.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import DecodeTrace, decode_trace
from tiny_models import expert_bytes, tiny_config
from transformers import AutoModelForCausalLM

import moe_engine
from moe_engine.runtime.engine import OffloadedExperts
from moe_engine.runtime.kernels import available_kernels, make_kernel

NUMERICS_ARCHITECTURES = ("mixtral", "qwen2_moe", "deepseek_v3", "olmoe")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLEMENTATIONS = ("grouped_mm", "eager")
STEPS = 3  # decode steps (and generate() tokens) per trace: enough for decode through the KV cache


# ----------------------------------------------------------------------------------------------------
# model level


@pytest.fixture(scope="module")
def stock_trace(tiny_checkpoint):
    """``get(variant, dtype, implementation) -> DecodeTrace`` of stock transformers, computed once."""
    done: dict[tuple[str, torch.dtype, str], DecodeTrace] = {}

    def get(variant: str, dtype: torch.dtype, implementation: str) -> DecodeTrace:
        key = (variant, dtype, implementation)
        if key not in done:
            model = AutoModelForCausalLM.from_pretrained(
                tiny_checkpoint(variant), dtype=dtype, experts_implementation=implementation
            ).eval()
            assert model.config._experts_implementation == implementation
            done[key] = decode_trace(model, steps=STEPS)
        return done[key]

    return get


def load_engine(path, dtype: torch.dtype, implementation: str | None, **kwargs):
    """``moe_engine.from_pretrained`` computing with ``implementation`` (None: the model's default)."""
    kwargs.setdefault("preload", False)  # a cold cache (no preload): the calls under test read the experts they use (tests/test_preload.py: preload)
    model = moe_engine.from_pretrained(path, dtype=dtype, device="cpu", experts_implementation=implementation, **kwargs)
    if implementation is not None:
        assert {m.implementation for m in offloaded_modules(model)} == {implementation}
    return model


def offloaded_modules(model) -> list[OffloadedExperts]:
    found = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    assert found, "no OffloadedExperts in the loaded model"
    return found


def assert_bitwise(got: DecodeTrace, want: DecodeTrace, what: str) -> None:
    """Every logit bit-identical (max abs diff exactly 0), tokens and generate() output identical."""
    pairs = [("prefill", got.prefill_logits, want.prefill_logits)]
    pairs += [(f"decode step {s}", a, b) for s, (a, b) in enumerate(zip(got.step_logits, want.step_logits, strict=True))]
    for where, a, b in pairs:
        assert a.shape == b.shape, f"{what} {where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert not b.isnan().any(), f"{what} {where}: stock logits have NaNs, the comparison would be vacuous"
        if not torch.equal(a, b):
            diff = (a.float() - b.float()).abs().max().item()
            raise AssertionError(f"{what} {where}: not bitwise equal to stock, max abs logit diff {diff:.3g}")
    assert torch.equal(got.tokens, want.tokens), f"{what}: greedy tokens differ"
    assert torch.equal(got.generated, want.generated), f"{what}: generate() output differs"


# (budget, predictor): one-expert budget (waves) and the full budget, prefetch on and off.
ENGINE_RUNS = (("one_expert", "cross_layer_gate"), ("one_expert", None), (1.0, "cross_layer_gate"), (1.0, None))


# Dense fp32 weights must sit at stock's address alignment (stock keeps mmap'd views of the file): CPU
# fp32 matrix-vector products round by address mod 16 bytes. The store reads them to the same alignment.
MODEL_CASES = [
    pytest.param(v, d, i)
    for v in NUMERICS_ARCHITECTURES
    for d in DTYPES
    for i in IMPLEMENTATIONS
]


@pytest.mark.filterwarnings("ignore:the expert budget holds 1 experts")  # the one-expert budget is the point
@pytest.mark.parametrize(("variant", "dtype_name", "implementation"), MODEL_CASES)
def test_engine_is_bitwise_equal_to_stock(tiny_checkpoint, stock_trace, variant, dtype_name, implementation):
    dtype = DTYPES[dtype_name]
    want = stock_trace(variant, dtype, implementation)
    one_expert = expert_bytes(tiny_config(variant), dtype)
    for budget, predictor in ENGINE_RUNS:
        what = f"{variant} {dtype_name} {implementation} budget={budget} predictor={predictor}"
        model = load_engine(
            tiny_checkpoint(variant),
            dtype,
            implementation,
            budget=one_expert if budget == "one_expert" else budget,
            predictor=predictor,
        )
        assert {m.implementation for m in offloaded_modules(model)} == {implementation}
        if budget == "one_expert":
            assert model.engine.cache.slots.shape[0] == 1, "the budget should hold exactly one expert"
        got = decode_trace(model, forced_tokens=want.tokens, steps=STEPS)
        stats = model.engine.stats()
        assert stats.bytes_moved > 0 and stats.peak_resident_bytes <= model.engine.budget_bytes, what
        assert_bitwise(got, want, what)
        model.close()


def test_engine_follows_the_default_implementation(tiny_checkpoint, stock_trace):
    """No implementation given: the engine runs what stock transformers resolves by default (grouped_mm)."""
    path = tiny_checkpoint("qwen2_moe")
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert stock.config._experts_implementation == "grouped_mm"
    model = load_engine(path, torch.bfloat16, None, budget=0.5)
    assert {m.implementation for m in offloaded_modules(model)} == {"grouped_mm"}
    got = decode_trace(model, forced_tokens=stock_trace("qwen2_moe", torch.bfloat16, "grouped_mm").tokens, steps=STEPS)
    assert_bitwise(got, decode_trace(stock.eval(), steps=STEPS), "qwen2_moe bf16 default implementation")


def test_the_implementation_matters_in_bf16(stock_trace):
    """Stock's eager and grouped_mm differ in bf16 on these models, so matching the model's choice is
    what the bitwise tests above check (they would fail with the other kernel)."""
    differs = [
        v
        for v in NUMERICS_ARCHITECTURES
        if not torch.equal(
            stock_trace(v, torch.bfloat16, "eager").prefill_logits,
            stock_trace(v, torch.bfloat16, "grouped_mm").prefill_logits,
        )
    ]
    assert differs, "stock eager and grouped_mm gave the same bf16 logits on every architecture"


def test_unsupported_implementation_is_refused():
    assert available_kernels() == ["eager", "grouped_mm"]
    with pytest.raises(ValueError, match=r"experts_implementation='batched_mm' is not supported by moe-engine.*'grouped_mm'"):
        make_kernel("batched_mm", torch.nn.functional.silu)
    with pytest.raises(ValueError, match="experts_implementation='sonicmoe' is not supported"):
        OffloadedExperts(0, 4, 8, 8, torch.nn.SiLU(), implementation="sonicmoe")


# ----------------------------------------------------------------------------------------------------
# kernel level: against transformers' functions on a stock experts module


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def stock_experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: str, implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts)
    config._experts_implementation = implementation
    experts = MixtralExperts(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.2)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.2)
    return experts.to(device=device, dtype=dtype)


def routing(tokens: int, top_k: int, num_experts: int, hidden: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(5)
    hidden_states = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
    scores = torch.randn(tokens, num_experts, generator=g)
    scores[:, 0] -= 10  # expert 0 is never chosen: an empty group
    weights, index = torch.topk(scores.softmax(-1), top_k, dim=-1)
    return hidden_states, index.to(device), weights.to(device=device, dtype=dtype)


def engine_like(kernel_name: str, experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The kernel fed as the engine feeds it: experts in a shuffled order, each copied into one reused
    slot that is overwritten with garbage as soon as the expert was computed."""
    kernel = make_kernel(kernel_name, experts.act_fn)
    plan = kernel.plan(hidden_states, top_k_index, top_k_weights, experts.num_experts)
    two_i, hidden = experts.gate_up_proj.shape[1:]
    slot = torch.empty(3 * two_i // 2 * hidden + 8, dtype=experts.gate_up_proj.dtype, device=hidden_states.device)
    gate_up = slot[8 : 8 + two_i * hidden].view(two_i, hidden)  # not where stock's weights are
    down = slot[8 + two_i * hidden :].view(hidden, two_i // 2)
    order = list(plan.experts)
    random.Random(11).shuffle(order)
    for e in order:
        gate_up.copy_(experts.gate_up_proj[e])
        down.copy_(experts.down_proj[e])
        plan.compute(e, gate_up, down)
        slot.fill_(float("nan"))
    return plan.result()


def stock_forward(kernel_name: str, experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    from transformers.integrations.moe import grouped_mm_experts_forward

    if kernel_name == "grouped_mm":
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    assert experts.config._experts_implementation == "eager"
    return experts(hidden_states, top_k_index, top_k_weights)


# (tokens, top_k, inter, intra-op threads): a decode-like size, and sizes where stock's one activation
# over S = T*K rows (S * I elements, above ATen's GRAIN_SIZE) is cut between threads mid-row (with 8
# threads: 7 cuts, at 375.4-row steps). I * 2 bytes is a multiple of 16: the CPU grouped GEMM needs
# 16-byte strides in bf16/fp16.
KERNEL_CASES = {
    "small": (5, 2, 24, 1),
    "large_1_thread": (1001, 3, 104, 1),
    "large_cut_2_threads": (1001, 3, 104, 2),
    "large_cut_8_threads": (1001, 3, 104, 8),
}


# grouped_mm in every case; eager (per expert in stock too, so threads cannot cut differently) in fewer.
KERNEL_RUNS = [("grouped_mm", d, c) for d in DTYPES for c in KERNEL_CASES]
KERNEL_RUNS += [("eager", d, c) for d in DTYPES for c in ("small", "large_1_thread")]
KERNEL_RUNS += [("eager", "fp32", "large_cut_2_threads")]


@pytest.mark.parametrize(("kernel_name", "dtype_name", "case"), KERNEL_RUNS)
def test_kernel_is_bitwise_equal_to_transformers(kernel_name, dtype_name, case):
    tokens, top_k, inter, threads = KERNEL_CASES[case]
    dtype, hidden, num_experts = DTYPES[dtype_name], 32, 8
    if threads > 1:
        numel = tokens * top_k * inter
        chunk = -(-numel // min(threads, -(-numel // 32768)))
        assert numel > 32768 and chunk % inter != 0, "the case must cut stock's activation mid-row"
    experts = stock_experts(num_experts, hidden, inter, dtype, "cpu", kernel_name)
    args = routing(tokens, top_k, num_experts, hidden, dtype, "cpu")
    with torch.no_grad(), intra_op_threads(threads):
        want = stock_forward(kernel_name, experts, *args)
        got = engine_like(kernel_name, experts, *args)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"max abs diff {(got.float() - want.float()).abs().max().item():.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_cuda_grouped_mm_difference_is_bounded(dtype_name):
    """On CUDA, eager is bitwise; grouped_mm calls the same op per group, which a CUTLASS grouped GEMM may
    round differently from the whole problem (see kernels.py): the difference is bounded by a few units in
    the last place of the output's scale."""
    dtype, hidden, num_experts = DTYPES[dtype_name], 256, 16
    for tokens in (1, 7, 300):
        args = routing(tokens, 2, num_experts, hidden, dtype, "cuda")
        for kernel_name in IMPLEMENTATIONS:
            experts = stock_experts(num_experts, hidden, 384, dtype, "cuda", kernel_name)
            with torch.no_grad():
                try:
                    want = stock_forward(kernel_name, experts, *args)
                except (RuntimeError, NotImplementedError) as exc:  # e.g. no fp32 grouped GEMM on this GPU
                    pytest.skip(f"stock {kernel_name} does not run in {dtype_name} here: {exc}")
                got = engine_like(kernel_name, experts, *args)
            if kernel_name == "eager":
                assert torch.equal(got, want), f"CUDA eager, {tokens} tokens: not bitwise"
                continue
            diff = (got.float() - want.float()).abs().max().item()
            bound = 4 * torch.finfo(dtype).eps * want.float().abs().max().item()
            assert diff <= bound, f"CUDA grouped_mm, {tokens} tokens: max abs diff {diff:.3g} > {bound:.3g}"


# ----------------------------------------------------------------------------------------------------
# inference only


def test_autograd_through_offloaded_experts_is_refused(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    model = load_engine(path, torch.float32, None, budget=0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not any(p.requires_grad for p in model.parameters()), "from_pretrained freezes the parameters"

    # Plain forward outside no_grad: nothing requires grad, nothing is recorded; backward cannot run.
    out = model(ids).logits
    assert out.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()

    # Gradients asked for (trainable parameters, or an input that requires grad): a clear refusal.
    expected = r"moe-engine is inference-only.*torch\.no_grad\(\).*torch\.inference_mode\(\)"
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with pytest.raises(RuntimeError, match=expected):
        model(inputs_embeds=embeds)
    model.requires_grad_(True)
    with pytest.raises(RuntimeError, match=expected):
        model(ids).logits.sum().backward()

    # The same model under no_grad / inference_mode computes stock's logits.
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = stock(ids).logits
        assert torch.equal(model(ids).logits, want)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, want)
