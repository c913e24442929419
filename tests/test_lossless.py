"""Lossless: the offloaded model computes what stock transformers computes.

For each architecture, budget and policy, fp32 logits of prefill plus 16 greedy decode steps (batch 2,
row 0 left-padded, through the KV cache) equal the stock model's within 1e-5, and greedy ``generate()``
is token-identical. The smallest budget holds exactly one expert, so every MoE layer (top-2, batch 2)
needs more experts than there are slots and must run in waves.

Matrix: every architecture x every policy (plus "none") x every budget; sharded checkpoints, a
decoder_sparse_step variant, and prefetch on vs off.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DecodeTrace, assert_same_trace, decode_trace
from tiny_models import ARCHITECTURES, expert_bytes, tiny_config

from moe_engine.runtime.policies import available_policies

BUDGETS = ("one_expert", 0.5, 1.0)
POLICIES = [*available_policies(), "none"]


def budget_value(variant: str, budget: str | float) -> int | float:
    """``"one_expert"``: exactly one routed expert's bytes (an int); floats are fractions of all experts."""
    if budget == "one_expert":
        return expert_bytes(tiny_config(variant), torch.float32)
    return float(budget)


def engine_trace(path, variant: str, budget, policy: str, want: DecodeTrace, **kwargs) -> DecodeTrace:
    import moe_engine

    kwargs.setdefault("preload", False)  # a cold cache (no preload): the calls under test read the experts they use (tests/test_preload.py: preload)
    model = moe_engine.from_pretrained(
        path, budget=budget_value(variant, budget), policy=policy, device="cpu", **kwargs
    )
    model.eval()
    got = decode_trace(model, forced_tokens=want.tokens)
    stats = model.engine.stats()
    assert stats.bytes_moved > 0, "no expert was read through the engine"
    assert stats.peak_resident_bytes <= model.engine.budget_bytes, (
        f"peak resident expert bytes {stats.peak_resident_bytes} > budget {model.engine.budget_bytes}"
    )
    return got


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_every_architecture_policy_and_budget(tiny_checkpoint, reference, variant, policy, budget):
    want = reference(variant)
    got = engine_trace(tiny_checkpoint(variant), variant, budget, policy, want)
    assert_same_trace(got, want, what=f"{variant} budget={budget} policy={policy}")


@pytest.mark.parametrize("budget", ["one_expert", 0.5], ids=str)
@pytest.mark.parametrize("variant", ["mixtral", "deepseek_v3"])
def test_sharded_checkpoint(tiny_checkpoint, reference, variant, budget):
    """Weights split over several safetensors files with model.safetensors.index.json."""
    path = tiny_checkpoint(variant, sharded=True)
    assert (path / "model.safetensors.index.json").exists()
    want = reference(variant, sharded=True)
    got = engine_trace(path, variant, budget, "lru", want)
    assert_same_trace(got, want, what=f"sharded {variant} budget={budget}")


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_decoder_sparse_step(tiny_checkpoint, reference, budget):
    """Qwen3-MoE with decoder_sparse_step=2: MoE and dense layers alternate."""
    want = reference("qwen3_moe_step2")
    got = engine_trace(tiny_checkpoint("qwen3_moe_step2"), "qwen3_moe_step2", budget, "lru", want)
    assert_same_trace(got, want, what=f"qwen3_moe_step2 budget={budget}")


@pytest.mark.parametrize("budget", ["one_expert", 0.5], ids=str)
@pytest.mark.parametrize("variant", ["mixtral", "deepseek_v3", "qwen3_moe"])
def test_prefetch_changes_nothing(tiny_checkpoint, reference, variant, budget):
    """Cross-layer-gate prefetch on vs off: same logits, same tokens, both equal to stock."""
    from moe_engine.predictors import available_predictors

    if "cross_layer_gate" not in available_predictors():
        pytest.skip("predictor 'cross_layer_gate' is not registered yet")
    want = reference(variant)
    path = tiny_checkpoint(variant)
    off = engine_trace(path, variant, budget, "lru", want, predictor=None)
    on = engine_trace(path, variant, budget, "lru", want, predictor="cross_layer_gate")
    assert_same_trace(off, want, what=f"{variant} budget={budget} predictor=None")
    assert_same_trace(on, want, what=f"{variant} budget={budget} predictor=cross_layer_gate")
    assert_same_trace(on, off, what=f"{variant} budget={budget} prefetch on vs off")
