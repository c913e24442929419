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
        return moe_engine.from_pretrained(path, budget=budget, device="cpu", dtype=torch.float32)


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


def test_mixed_formats_slots_and_budget(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2_moe")
    out = tmp_path / "q"
    choices = ("int8", "int4-g32", "int2-g32", "fp32")
    formats = _quantize(src, out, lambda layer, e: choices[(layer + e) % len(choices)])
    ref = _reference(src, out)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
    with _load(out, 0.25) as model:
        cache = model.engine.cache
        # One slot holds the largest expert (fp32 here); budget counts slots of that size.
        assert cache.slots.dtype == torch.uint8
        assert cache.num_slots * cache.expert_bytes <= model.engine.budget_bytes
        with torch.no_grad():
            got = model(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # Repeated: residency reuses slots across experts of different formats.
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert formats[0][0] == "int8"


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
