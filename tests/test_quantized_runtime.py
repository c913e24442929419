"""The runtime on checkpoints written by ``moe-engine quantize``: every expert computed in its own format
(uniform and mixed), equal to stock transformers running the dequantized experts; the slot layout, the
budget and ``save_pretrained`` (dequantized) of a quantized model."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import ARCHITECTURES, VOCAB_SIZE
from transformers import AutoModelForCausalLM

import moe_engine
from moe_engine.quant.checkpoint import (
    open_source,
    read_quantization_config,
    read_quantized_expert,
    write_quantized_checkpoint,
)
from moe_engine.quant.formats import get_format
from moe_engine.runtime.export import offloaded_experts
from moe_engine.runtime.store import CheckpointStore


def _ids() -> torch.Tensor:
    return torch.randint(4, VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(5))


def _quantize(src, out, pick):
    with open_source(src) as s:
        formats = [[pick(layer, e) for e in range(s.num_experts)] for layer in range(s.num_layers)]
        write_quantized_checkpoint(s, out, formats)
    return formats


def _reference(src, out) -> torch.nn.Module:
    """Stock transformers with every expert replaced by its dequantized weights (fp32)."""
    stock = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    qc = read_quantization_config(out)
    store = CheckpointStore.open(out)
    try:
        blocks = [m for n, m in stock.named_modules() if n.endswith(".experts") and hasattr(m, "gate_up_proj")]
        assert len(blocks) == len(qc.moe_layers)
        with torch.no_grad():
            for layer, block in enumerate(blocks):
                for e in range(block.gate_up_proj.shape[0]):
                    gu, dn = read_quantized_expert(store, qc, layer, e)
                    block.gate_up_proj[e].copy_(get_format(gu.format).dequantize(gu, torch.float32))
                    block.down_proj[e].copy_(get_format(dn.format).dequantize(dn, torch.float32))
    finally:
        store.close()
    stock.set_experts_implementation("eager")
    return stock


def _load(path, budget):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return moe_engine.from_pretrained(path, budget=budget, device="cpu", dtype=torch.float32, preload=False)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_uniform_int4_equals_stock_on_dequantized_experts(arch, tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(arch)
    out = tmp_path / "q"
    _quantize(src, out, lambda layer, e: "int4-g32")
    ref = _reference(src, out)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
    assert not torch.allclose(want, plain, atol=1e-6)  # quantization does change the experts
    for budget in (0.1, 1.0):
        with _load(out, budget) as model:
            assert all(m.implementation == "quantized" for _, m in offloaded_experts(model))
            with torch.no_grad():
                got = model(ids).logits
            stats = model.engine.stats()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert stats.misses > 0


def test_mixed_formats_entries_of_several_sizes_under_one_budget(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2_moe")
    out = tmp_path / "q"
    choices = ("int8", "int4-g32", "int2-g32", "fp32", "int3-row", "int4-row")
    _quantize(src, out, lambda layer, e: choices[(layer + e) % len(choices)])
    ref = _reference(src, out)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
    with _load(out, 0.25) as model:
        engine = model.engine
        assert engine.cache.sized  # entries of several sizes: one byte budget, not a slot count
        for _ in range(3):  # repeated: slot ids and buffers are reused across experts of other sizes
            with torch.no_grad():
                torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
            st = engine.stats()
            assert 0 < st.peak_resident_bytes <= engine.budget_bytes
            assert engine.core.used_bytes == sum(e.nbytes for e in engine.core.entries.values())
            held = sum(b.numel() for b in engine.cache.buffers if b is not None)
            assert held == engine.core.used_bytes  # buffers of freed ids are dropped
        # More entries fit than slots of the largest size would allow.
        assert len(engine.core.entries) > engine.budget_bytes // engine.cache.expert_bytes


def test_int4_slots_repacked_in_place_decode_the_same_tokens(tiny_checkpoint, tmp_path, monkeypatch):
    """bf16 decode runs torch's int4 kernel on the slots; where this build packs 64-row blocks a slot's
    weights are repacked in place once per copy into it. Under a small budget (slots reused by other
    experts, views of reloaded experts repacked again) the logits equal those of the per-call repack."""
    from moe_engine.quant import kernels

    if not kernels.has_int4_cpu_kernel():
        pytest.skip("no CPU int4 kernel in this torch")
    src = tiny_checkpoint("qwen2_moe")
    out = tmp_path / "q"
    _quantize(src, out, lambda layer, e: "int4-g32")
    ids = _ids()

    def decode():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = moe_engine.from_pretrained(out, budget=0.2, device="cpu", dtype=torch.bfloat16, preload=False)
        with model, torch.no_grad():
            got = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
            native = sum(q.native for _, views in model.engine.cache._views.values() for q in views)
            return got.sequences, torch.stack(got.logits), native, model.engine.stats().evictions

    seqs, logits, native, evictions = decode()
    assert evictions > 0  # slots were reused by other experts
    assert (native > 0) == kernels.can_repack_in_place()
    monkeypatch.setattr(kernels, "can_repack_in_place", lambda: False)
    seqs_per_call, logits_per_call, native_per_call, _ = decode()
    assert native_per_call == 0
    assert torch.equal(seqs, seqs_per_call) and torch.equal(logits, logits_per_call)


def _with_copies(src, out, own="fp32", copy="int4-g32"):
    with open_source(src) as s:
        formats = [[own] * s.num_experts for _ in range(s.num_layers)]
        copies = [[[copy] for _ in range(s.num_experts)] for _ in range(s.num_layers)]
        write_quantized_checkpoint(s, out, formats, copies=copies)


@pytest.mark.parametrize("quality", ["lossless", "balanced", "fast"])
def test_quality_chooses_the_copy_per_load(quality, tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    out = tmp_path / "q"
    _with_copies(src, out)
    ids = _ids()
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
    fast_ref = _reference_copy(src, out, "int4-g32")
    with torch.no_grad():
        fast_want = fast_ref(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = moe_engine.from_pretrained(out, budget=0.3, device="cpu", dtype=torch.float32, quality=quality,
                                           preload=False)
    with model, torch.no_grad():
        got = model(ids).logits
        st = model.engine.stats()
    assert st.peak_resident_bytes <= model.engine.budget_bytes
    if quality == "lossless":
        torch.testing.assert_close(got, stock, rtol=1e-5, atol=1e-5)
        assert st.reduced_loads == 0
    elif quality == "fast":
        torch.testing.assert_close(got, fast_want, rtol=1e-5, atol=1e-5)
        assert st.reduced_loads == st.misses + st.prefetches > 0
    else:
        assert 0 < st.reduced_loads <= st.misses  # demand misses only; prefetches bring the own format


def _reference_copy(src, out, fmt):
    """Stock with every expert replaced by its dequantized ``fmt`` copy."""
    stock = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    qc = read_quantization_config(out)
    store = CheckpointStore.open(out)
    try:
        blocks = [m for n, m in stock.named_modules() if n.endswith(".experts") and hasattr(m, "gate_up_proj")]
        with torch.no_grad():
            for layer, block in enumerate(blocks):
                for e in range(block.gate_up_proj.shape[0]):
                    gu, dn = read_quantized_expert(store, qc, layer, e, fmt)
                    block.gate_up_proj[e].copy_(get_format(fmt).dequantize(gu, torch.float32))
                    block.down_proj[e].copy_(get_format(fmt).dequantize(dn, torch.float32))
    finally:
        store.close()
    stock.set_experts_implementation("eager")
    return stock


def test_quality_needs_copies(tiny_checkpoint):
    with pytest.raises(ValueError, match="lower-precision copies"):
        moe_engine.from_pretrained(tiny_checkpoint("mixtral"), budget=0.5, device="cpu", quality="fast")
    with pytest.raises(ValueError, match="quality must be one of"):
        moe_engine.from_pretrained(tiny_checkpoint("mixtral"), budget=0.5, device="cpu", quality="turbo")


def test_quantized_model_saves_its_dequantized_experts(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    out = tmp_path / "q"
    _quantize(src, out, lambda layer, e: "int8")
    ref = _reference(src, out)
    with _load(out, 0.5) as model:
        model.save_pretrained(tmp_path / "saved")
        sd = model.state_dict()
        key = next(k for k in sd if k.endswith("experts.gate_up_proj"))
        assert torch.equal(sd[key], ref.state_dict()[key])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    reloaded.set_experts_implementation("eager")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ref(ids).logits, rtol=0, atol=0)


def _mixed_copies(src, out):
    """fp32 experts with an int8 copy, except MoE layer 1 whose copy is int2 (a large error)."""
    with open_source(src) as s:
        formats = [["fp32"] * s.num_experts for _ in range(s.num_layers)]
        copies = [[["int2-g32" if layer == 1 else "int8"] for _ in range(s.num_experts)] for layer in range(s.num_layers)]
        write_quantized_checkpoint(s, out, formats, copies=copies)


def test_guardrail_falls_back_for_the_layer_forced_above_the_bound(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    out = tmp_path / "q"
    _mixed_copies(src, out)
    ids = _ids()[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # An unreachable bound first: the checks run and report, nothing falls back.
        with moe_engine.from_pretrained(out, budget=0.3, device="cpu", dtype=torch.float32, quality="fast",
                                        guardrail=1e6, guardrail_every=2, preload=False) as model:
            model.generate(ids, max_new_tokens=7, do_sample=False)
            st = model.engine.stats()
            assert st.guardrail_checks == 3 and st.guardrail_fallbacks == 0 and st.guardrail_max_kl > 0
            errors = model.engine.guardrail.last_errors
            assert max(errors, key=errors.get) == 1  # the int2 layer has the largest error
        # A bound below the int2 layer's effect: layer 1 (and only layers as bad) goes back to full precision.
        with moe_engine.from_pretrained(out, budget=0.3, device="cpu", dtype=torch.float32, quality="fast",
                                        guardrail=1e-9, guardrail_every=2, preload=False) as model:
            out_ids = model.generate(ids, max_new_tokens=7, do_sample=False)
            st = model.engine.stats()
            guard = model.engine.guardrail
            assert st.guardrail_fallbacks >= 1 and guard.fallback_layers[0] == 1
            assert 1 in model.engine.sizing.force_full
            assert all(e.variant == 0 for k, e in model.engine.core.entries.items() if k[0] == 1)
            # After the fallback, layer 1 loads its own format: its next loads are not reduced.
            before = st.per_layer[1].reduced_loads
            model.engine.reset_stats()
            with torch.no_grad():
                model(out_ids)
            assert model.engine.stats().per_layer[1].reduced_loads == 0 and before > 0


def test_guardrail_arguments_are_checked(tiny_checkpoint):
    with pytest.raises(ValueError, match="balanced' or 'fast"):
        moe_engine.from_pretrained(tiny_checkpoint("mixtral"), budget=0.5, device="cpu", guardrail=0.1)
    with pytest.raises(ValueError, match="KL bound"):
        moe_engine.from_pretrained(tiny_checkpoint("mixtral"), budget=0.5, device="cpu", quality="fast", guardrail=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quality", ["lossless", "fast"])
def test_cuda_quantized_experts_match_cpu(quality, tiny_checkpoint, tmp_path):
    """On CUDA: packed slots on the device, copies of several sizes streamed through pinned staging."""
    src = tiny_checkpoint("qwen2_moe")
    out = tmp_path / "q"
    _with_copies(src, out, own="int8", copy="int4-g32")
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with moe_engine.from_pretrained(out, budget=0.3, device="cpu", dtype=torch.float32, quality=quality) as cpu:
            with torch.no_grad():
                want = cpu(ids).logits
        with moe_engine.from_pretrained(out, budget=0.3, device="cuda", dtype=torch.float32, quality=quality) as gpu:
            with torch.no_grad():
                got = gpu(ids.cuda()).logits.cpu()
            assert gpu.engine.stats().peak_resident_bytes <= gpu.engine.budget_bytes
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
