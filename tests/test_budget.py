"""The budget is a hard bound: resident expert bytes never exceed it, and loading never materialises
the full expert set.

In-process tests check the engine's own accounting after every module forward of prefill, decode and
``generate()``; the parameters the model holds (no expert weights); and budget resolution. The RSS test
loads, in a fresh subprocess, a checkpoint whose experts are 8x the budget and measures the rise of the
process's peak resident set (VmHWM, reset right before loading).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import decode_trace, fixed_batch
from tiny_models import ARCHITECTURES, expert_bytes, make_tiny_moe, tiny_config, total_expert_bytes

import moe_engine


def load(path, budget, policy="lru", **kwargs):
    kwargs.setdefault("preload", False)  # a cold cache (no preload): the calls under test read the experts they use (tests/test_preload.py: preload)
    return moe_engine.from_pretrained(path, budget=budget, policy=policy, device="cpu", **kwargs)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("policy", ["lru", "none"])
@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_resident_bytes_never_exceed_budget(tiny_checkpoint, variant, policy):
    """After every module forward (all layers, prefill, 16 decode steps, generate): resident <= budget."""
    config = tiny_config(variant)
    one = expert_bytes(config)
    budget = 2 * one + one // 2  # room for 2 experts, not 3: every MoE layer (top-2, batch 2) runs in waves
    model = load(tiny_checkpoint(variant), budget, policy)
    engine = model.engine
    assert engine.budget_bytes <= budget
    violations: list[str] = []
    checks = [0]

    def check(module, args, output):
        checks[0] += 1
        s = engine.stats()
        if s.resident_bytes > engine.budget_bytes or s.peak_resident_bytes > engine.budget_bytes:
            violations.append(
                f"after {type(module).__name__}: resident {s.resident_bytes}, peak {s.peak_resident_bytes}, "
                f"budget {engine.budget_bytes}"
            )

    handles = [m.register_forward_hook(check) for m in model.modules()]
    try:
        decode_trace(model)
    finally:
        for h in handles:
            h.remove()
    assert checks[0] > 100
    assert not violations, violations[:5]
    s = engine.stats()
    assert s.expert_bytes == one, f"engine counts {s.expert_bytes} bytes per expert, the checkpoint has {one}"
    assert s.num_slots * s.expert_bytes <= engine.budget_bytes
    assert 0 < s.peak_resident_bytes <= engine.budget_bytes
    assert s.misses > 0 and s.bytes_moved >= s.misses * one, s


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (0.5, lambda total, one: int(0.5 * total)),
        (1.0, lambda total, one: total),
        ("0.25", lambda total, one: int(0.25 * total)),
        ("48KiB", lambda total, one: 48 * 1024),
        ("100kB", lambda total, one: 100_000),
        (3 * 24576 + 5, lambda total, one: 3 * 24576 + 5),
    ],
    ids=str,
)
def test_budget_resolution(tiny_checkpoint, spec, expected):
    config = tiny_config("mixtral")
    total, one = total_expert_bytes(config), expert_bytes(config)
    assert one == 24576  # the ids above assume the mixtral variant's sizes
    model = load(tiny_checkpoint("mixtral"), spec, predictor=None)
    want = expected(total, one)
    assert model.engine.budget_bytes == want, (spec, model.engine.budget_bytes, want)
    s = model.engine.stats()
    assert s.num_slots == min(want // one, total // one)


def test_full_budget_keeps_every_expert(tiny_checkpoint):
    """At 100 % with lru, a second identical forward moves no bytes and misses nothing."""
    model = load(tiny_checkpoint("qwen3_moe"), 1.0, "lru", predictor=None)
    ids, mask = fixed_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        first = model.engine.stats()
        model(input_ids=ids, attention_mask=mask)
        second = model.engine.stats()
    assert first.misses > 0
    assert second.misses == first.misses and second.bytes_moved == first.bytes_moved, (first, second)
    assert second.hits > first.hits


def test_model_holds_no_expert_weights(tiny_checkpoint):
    """The returned model's parameters and buffers are the non-expert weights (plus at most the slots)."""
    from transformers import AutoModelForCausalLM

    variant = "deepseek_v3"
    path = tiny_checkpoint(variant)
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stock_bytes = tensor_bytes([*stock.parameters(), *stock.buffers()])
    non_expert = stock_bytes - total_expert_bytes(tiny_config(variant))
    model = load(path, expert_bytes(tiny_config(variant)), predictor=None)
    held = tensor_bytes([*model.parameters(), *model.buffers()])
    assert held <= non_expert + model.engine.budget_bytes, (held, non_expert, model.engine.budget_bytes)
    assert not any(p.device.type == "meta" for p in [*model.parameters(), *model.buffers()])


# ----------------------------------------------------------------------------------------------------
# peak RSS, measured in a subprocess

_PROBE = textwrap.dedent(
    r"""
    import json, resource, sys
    mode, path, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
    import torch
    torch.set_num_threads(1)
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral import modeling_mixtral  # noqa: F401  (import cost is not loading cost)
    import moe_engine
    from moe_engine.runtime import loader  # noqa: F401
    torch.ones(64, 64) @ torch.ones(64, 64)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    try:  # reset the high-water mark so imports' peak does not hide the loading peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = hwm()
    if mode == "engine":
        model = moe_engine.from_pretrained(path, budget=budget, policy="lru", device="cpu", predictor=None)
        budget_bytes = model.engine.budget_bytes
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        budget_bytes = None
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    print(json.dumps({"before": before, "after": hwm(), "budget_bytes": budget_bytes}))
    """
)

RSS_SLACK = 300 * 2**20


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """Mixtral layout, 8 layers x 8 experts of 7.5 MiB (fp32): 480 MiB of experts, ~21 MiB of the rest."""
    overrides = dict(
        hidden_size=512,
        intermediate_size=1280,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
    )
    path = make_tiny_moe("mixtral", tmp_path_factory.mktemp("big"), max_shard_size="200MB", **overrides)
    config = tiny_config("mixtral", **overrides)
    total = total_expert_bytes(config)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return path, total, weights - total


def _probe(mode: str, path, budget: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(path), str(budget)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_stays_within_budget(big_checkpoint):
    path, total_experts, non_expert = big_checkpoint
    budget = 0.125  # experts are 8x the budget
    r = _probe("engine", path, budget)
    rise = r["after"] - r["before"]
    assert r["budget_bytes"] * 4 <= total_experts
    allowed = non_expert + r["budget_bytes"] + RSS_SLACK
    mib = 2**20
    assert rise < allowed, (
        f"peak RSS rose {rise / mib:.0f} MiB loading + one forward; allowed {allowed / mib:.0f} MiB "
        f"(non-expert {non_expert / mib:.0f} + budget {r['budget_bytes'] / mib:.0f} + 300); "
        f"all experts are {total_experts / mib:.0f} MiB"
    )


@pytest.mark.slow
def test_rss_probe_sees_a_full_load(big_checkpoint):
    """The probe is sharp enough: stock transformers (all experts in RAM) exceeds the engine's allowance."""
    path, total_experts, non_expert = big_checkpoint
    r = _probe("stock", path, 0.125)
    rise = r["after"] - r["before"]
    assert rise > total_experts * 0.9, (rise, total_experts)
    assert rise > non_expert + 0.125 * total_experts + RSS_SLACK
