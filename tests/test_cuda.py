"""CUDA paths (pinned host tier, disk host tier, copy stream + events): run only where CUDA is present."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("host_tier", ["pinned", "disk"])
@pytest.mark.parametrize("predictor", [None, "cross_layer_gate"])
def test_cuda_offload_is_lossless(tiny_checkpoint, host_tier, predictor):
    path = tiny_checkpoint("mixtral")
    ref = AutoModelForCausalLM.from_pretrained(path).to("cuda")
    model = moe_engine.from_pretrained(path, budget=0.25, device="cuda", host_tier=host_tier, predictor=predictor)
    ids = torch.arange(4, 36, device="cuda").view(2, 16)
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids).logits
    assert (want - got).abs().max().item() <= 1e-5
    assert model.engine.cache.slots.device.type == "cuda"
    s = model.engine.stats()
    assert s.peak_resident_bytes <= s.budget_bytes
    g_ref = ref.generate(ids, max_new_tokens=8, do_sample=False)
    g = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(g_ref, g)
    model.engine.close()
