"""FP8 block-scaled checkpoints (DeepSeek-V3/R1 format) and unsupported quantization configs.

A tiny DeepSeek-V3 saved as DeepSeek ships its weights (float8_e4m3fn Linear weights, one float32
``*_scale_inv`` per block, ``quantization_config.weight_block_size``) must run with logits equal to
stock transformers running the same model with each FP8 weight replaced by its reference
dequantization (``weight.float() * scale`` per block), fp32, within 1e-5, at a budget of one expert
and at 1.0; also equal to transformers loading the FP8 checkpoint itself (its CPU dequantize path).
Any other quantization_config is refused at load with a message naming its quant_method.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_same_trace, decode_trace
from tiny_models import (
    expert_bytes,
    fp8_reference_dequantize,
    make_fp8_reference,
    make_tiny_fp8_deepseek_v3,
    tiny_config,
)

import moe_engine
from moe_engine.runtime.store import CheckpointError, CheckpointStore, dequantize_fp8_blocks

STEPS = 4  # greedy decode steps after the prefill
BLOCK = (16, 16)
ONE_EXPERT = expert_bytes(tiny_config("deepseek_v3"))

# "exact": every quantized weight's dims are multiples of the block (single file);
# "partial": also the others, with partial edge blocks, dealt over 3 shards (weights and scales apart).
FP8_VARIANTS = {"exact": dict(partial_blocks=False, shards=1), "partial": dict(partial_blocks=True, shards=3)}


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """``get(variant) -> (fp8 path, reference DecodeTrace of stock transformers)``, built once."""
    from transformers import AutoModelForCausalLM

    made: dict[str, tuple[Path, object]] = {}

    def get(variant: str):
        if variant not in made:
            path = make_tiny_fp8_deepseek_v3(
                tmp_path_factory.mktemp(f"fp8-{variant}"), block=BLOCK, **FP8_VARIANTS[variant]
            )
            ref_path = make_fp8_reference(path, tmp_path_factory.mktemp(f"fp8-{variant}-reference"))
            ref = AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32).eval()
            made[variant] = (path, decode_trace(ref, steps=STEPS))
        return made[variant]

    return get


def load(path, budget, **kwargs):
    kwargs.setdefault("preload", False)  # a cold cache (no preload): the calls under test read the experts they use (tests/test_preload.py: preload)
    return moe_engine.from_pretrained(path, budget=budget, device="cpu", predictor=None, **kwargs)


@pytest.mark.parametrize("budget", [ONE_EXPERT, 1.0], ids=["one_expert", "all"])
@pytest.mark.parametrize("variant", list(FP8_VARIANTS))
def test_fp8_logits_equal_reference(fp8_checkpoint, variant, budget):
    path, want = fp8_checkpoint(variant)
    model = load(path, budget)
    got = decode_trace(model, forced_tokens=want.tokens, steps=STEPS)
    assert model.engine.stats().bytes_moved > 0
    assert_same_trace(got, want, what=f"fp8 {variant} budget={budget}")


def test_fp8_checkpoint_really_is_fp8(fp8_checkpoint):
    """The test checkpoint stores experts and attention as FP8 with scales (else the test proves nothing)."""
    for variant in FP8_VARIANTS:
        path, _ = fp8_checkpoint(variant)
        store = CheckpointStore.open(path)
        fp8 = {n for n, t in store.tensors.items() if t.dtype == torch.float8_e4m3fn}
        assert all(store.tensors[n].scale is not None for n in fp8)
        assert any(".experts." in n for n in fp8) and any("self_attn" in n for n in fp8)
        assert any("shared_experts" in n for n in fp8) and "model.layers.0.mlp.gate_proj.weight" in fp8
        assert not any(n.endswith("_scale_inv") for n in store.tensors)  # scales ride with their weights
        if variant == "partial":  # q_a_proj [24, 32]: a partial row block at 16
            assert "model.layers.0.self_attn.q_a_proj.weight" in fp8
        store.close()


def test_fp8_equals_transformers_own_fp8_loading(fp8_checkpoint):
    """Stock transformers loading the FP8 checkpoint itself (on CPU it dequantizes at load)."""
    from transformers import AutoModelForCausalLM

    path, want = fp8_checkpoint("exact")
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stock_trace = decode_trace(stock, forced_tokens=want.tokens, steps=STEPS)
    got = decode_trace(load(path, ONE_EXPERT), forced_tokens=want.tokens, steps=STEPS)
    assert_same_trace(got, stock_trace, what="engine vs transformers' FP8 loading")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expert_dequantization_bitwise_equals_transformers(fp8_checkpoint, dtype):
    """An expert read into a slot equals transformers' Fp8Dequantize of its parts, bit for bit."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    path, _ = fp8_checkpoint("exact")
    from safetensors.torch import load_file

    raw = load_file(path / "model.safetensors")
    store = CheckpointStore.open(path)
    from moe_engine.runtime.store import expert_location

    prefix = "model.layers.2.mlp.experts.5."
    parts = {p: f"{prefix}{p}_proj.weight" for p in ("gate", "up", "down")}
    shapes = {"gate": (32, 32), "up": (32, 32), "down": (32, 32)}
    loc = expert_location(store, parts, shapes)
    slot = torch.empty(3 * 32 * 32, dtype=dtype)
    store.read_expert_into(loc, slot)

    class _Quantizer:
        quantization_config = FineGrainedFP8Config(weight_block_size=BLOCK)

    deq = Fp8Dequantize(_Quantizer())
    want = torch.cat(
        [
            deq._dequantize_one(raw[n], raw[n + "_scale_inv"], output_dtype=dtype).reshape(-1)
            for n in parts.values()
        ]
    )
    assert torch.equal(slot, want)
    dense = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(
        store.read_tensor(dense, dtype=dtype),
        deq._dequantize_one(raw[dense], raw[dense + "_scale_inv"], output_dtype=dtype),
    )
    store.close()


def test_partial_blocks_dequantize_per_block():
    """Edge blocks are partial: element [i, j] uses scale[i // bm, j // bn], checked element by element."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(37, 50, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(3, 4, generator=g) + 0.5
    got = dequantize_fp8_blocks(w, s, (16, 16), torch.float32)
    want = torch.empty(37, 50)
    for i in range(37):
        for j in range(50):
            want[i, j] = w[i, j].float() * s[i // 16, j // 16]
    assert torch.equal(got, want)
    assert torch.equal(got, fp8_reference_dequantize(w, s, (16, 16)))


def test_scale_tensors_are_not_ignored(fp8_checkpoint, caplog):
    path, _ = fp8_checkpoint("partial")
    with caplog.at_level(logging.INFO, logger="moe_engine"):
        model = load(path, 1.0)
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert not ignored, ignored
    assert not hasattr(model.config, "quantization_config")  # transformers' FP8 layers were not used
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear


def test_fp8_weight_without_scale_is_refused(fp8_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _ = fp8_checkpoint("exact")
    path = tmp_path / "no-scale"
    shutil.copytree(src, path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    save_file(tensors, str(path / "model.safetensors"), {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight .*has no scale tensor"):
        load(path, 1.0)


# ----------------------------------------------------------------------------------------------------
# quantization configs moe-engine does not run

UNSUPPORTED = [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, r"quant_method 'gptq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, r"quant_method 'bitsandbytes'"),
    ({"quant_method": "awq", "bits": 4}, r"quant_method 'awq'"),
    (
        {"quant_method": "compressed-tensors", "format": "float-quantized"},
        r"quant_method 'compressed-tensors'",
    ),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, r"fp8 without block scales"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size must be two positive integers"),
    (
        {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
        r"activation_scheme='static'",
    ),
]


@pytest.mark.parametrize(
    "qc,message", UNSUPPORTED, ids=lambda x: x["quant_method"] if isinstance(x, dict) else ""
)
def test_unsupported_quantization_is_refused(tiny_checkpoint, tmp_path, qc, message):
    path = tmp_path / "quantized"
    shutil.copytree(tiny_checkpoint("deepseek_v3"), path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as info:
        load(path, 1.0)
    assert "moe-engine accepts" in str(info.value) and "fp8" in str(info.value)
