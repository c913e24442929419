"""Host tier sizing (``plan_host_tier``) and the arena's layout (``PinnedArena`` with pin=False), on CPU.

The sizing is a pure function of bytes: every expert fits the budget -> "none"; the arena fits in
available RAM with the safety margin -> "pinned" with exactly the experts' bytes; otherwise "disk"
with a reason naming the numbers. The arena is checked on a real tiny checkpoint's store: expert
``i``'s bytes land in view ``i`` and views do not overlap.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from moe_engine.runtime.host_tier import (
    MARGIN_MIN_BYTES,
    HostTierPlan,
    PinnedArena,
    plan_host_tier,
    safety_margin,
)
from moe_engine.runtime.store import CheckpointStore, expert_location

GiB = 2**30
# Mixtral-8x7B in bf16: one expert is 3 x 14336 x 4096 x 2 bytes = 336 MiB, 32 layers x 8 experts.
MIXTRAL_EXPERT = 3 * 14336 * 4096 * 2
MIXTRAL_EXPERTS = 32 * 8
MIXTRAL_TOTAL = MIXTRAL_EXPERT * MIXTRAL_EXPERTS  # 84 GiB; power-of-two rounding would pin 128 GiB


def plan(**kw):
    args = dict(
        expert_bytes=MIXTRAL_EXPERT,
        num_experts_total=MIXTRAL_EXPERTS,
        budget_bytes=40 * GiB,
        available_ram=200 * GiB,
        total_ram=256 * GiB,
    )
    args.update(kw)
    return plan_host_tier(**args)


# ----------------------------------------------------------------------------------------------------
# sizing


@pytest.mark.parametrize("requested", ["auto", "pinned", "disk"])
def test_all_experts_fit_the_budget_pins_nothing(requested):
    for budget in (MIXTRAL_TOTAL, MIXTRAL_TOTAL + 1, 2 * MIXTRAL_TOTAL):
        p = plan(budget_bytes=budget, requested=requested, available_ram=1 * GiB)
        assert p.mode == "none" and p.arena_bytes == 0 and not p.fallback
        assert "fit in the GPU budget" in p.reason
    # One expert short of all of them: a host tier is needed again.
    assert plan(budget_bytes=MIXTRAL_TOTAL - 1).mode == "pinned"


def test_pinned_arena_is_exactly_the_expert_bytes():
    p = plan()
    assert p.mode == "pinned" and not p.fallback
    assert p.arena_bytes == MIXTRAL_EXPERT * MIXTRAL_EXPERTS == 90_194_313_216
    assert p.arena_bytes < 128 * GiB  # what per-expert power-of-two blocks would take (512 MiB x 256)
    assert (p.expert_bytes, p.num_experts) == (MIXTRAL_EXPERT, MIXTRAL_EXPERTS)


def test_too_big_for_ram_falls_back_to_disk_with_the_numbers():
    available = 64 * GiB
    p = plan(available_ram=available)
    assert p.mode == "disk" and p.arena_bytes == 0 and p.fallback
    assert str(MIXTRAL_TOTAL) in p.reason and str(available) in p.reason  # bytes needed and available
    assert "84.0 GiB" in p.reason and "64.0 GiB" in p.reason
    assert "host_tier='pinned'" in p.reason  # how to force it
    assert "host_tier='disk'" in p.reason  # how to silence it


def test_safety_margin_is_ten_percent_or_two_gib():
    assert safety_margin(8 * GiB) == MARGIN_MIN_BYTES == 2 * GiB  # small host: the 2 GiB floor
    assert safety_margin(20 * GiB) == 2 * GiB
    assert safety_margin(512 * GiB) == int(51.2 * GiB)  # big host: 10 %
    for total_ram in (64 * GiB, 100 * GiB, 512 * GiB):
        margin = safety_margin(total_ram)
        edge = MIXTRAL_TOTAL + margin
        assert plan(available_ram=edge, total_ram=total_ram).mode == "pinned"
        below = plan(available_ram=edge - 1, total_ram=total_ram)
        assert below.mode == "disk" and below.fallback
        assert "safety margin" in below.reason


def test_requested_modes():
    # "disk": never pinned, even with RAM to spare; not a fallback, so no warning.
    p = plan(requested="disk")
    assert p.mode == "disk" and not p.fallback
    # "pinned" forces pinning inside the margin ...
    inside = plan(requested="pinned", available_ram=MIXTRAL_TOTAL + 1, total_ram=256 * GiB)
    assert (
        inside.mode == "pinned"
        and inside.arena_bytes == MIXTRAL_TOTAL
        and "inside the safety margin" in inside.reason
    )
    # ... but not beyond what the OS can give at all.
    with pytest.raises(
        ValueError, match=r"host_tier='pinned' cannot be honoured: the pinned arena needs 84\.0 GiB"
    ):
        plan(requested="pinned", available_ram=MIXTRAL_TOTAL - 1)
    with pytest.raises(ValueError, match="host_tier must be one of 'auto', 'pinned', 'disk', got 'gpu'"):
        plan(requested="gpu")
    with pytest.raises(ValueError, match="holds no expert"):
        plan(budget_bytes=MIXTRAL_EXPERT - 1)


def test_ram_defaults_come_from_psutil():
    import psutil

    p = plan_host_tier(expert_bytes=1024, num_experts_total=8, budget_bytes=2048)
    want = (
        "pinned"
        if 8 * 1024 + safety_margin(psutil.virtual_memory().total) <= psutil.virtual_memory().available
        else "disk"
    )
    assert p.mode == want
    assert p.arena_bytes == (8 * 1024 if want == "pinned" else 0)


def test_plan_checks_itself():
    with pytest.raises(ValueError, match="pins 8 bytes"):
        HostTierPlan("pinned", 16, 4, 2, "x")
    with pytest.raises(ValueError, match="mode must be one of"):
        HostTierPlan("ram", 0, 4, 2, "x")


# ----------------------------------------------------------------------------------------------------
# the arena's layout (pageable on CPU; the same code pins it on CUDA)


def test_arena_views_tile_one_buffer():
    n, e = 1000, 7
    arena = PinnedArena(e, n, torch.bfloat16, pin=False)
    assert arena.buffer is not None and arena.registered_bytes == 0
    assert arena.nbytes == e * n * 2 == arena.buffer.untyped_storage().nbytes()  # one buffer, no rounding
    base = arena.buffer.data_ptr()
    for i in range(e):
        v = arena.expert(i)
        assert v.numel() == n and v.is_contiguous() and v.dtype == torch.bfloat16
        assert v.data_ptr() == base + i * n * 2  # back to back: no overlap, no gap
        v.fill_(i)
    for i in range(e):
        assert torch.equal(
            arena.expert(i), torch.full((n,), i, dtype=torch.bfloat16)
        )  # no view clobbered another
    with pytest.raises(IndexError, match="outside the arena's 7 experts"):
        arena.expert(7)
    arena.close()
    arena.close()  # idempotent
    assert arena.closed
    with pytest.raises(RuntimeError, match="arena is closed"):
        arena.expert(0)


def _mixtral_experts(path):
    """(locations, expected flat weights) of every routed expert of a tiny Mixtral checkpoint."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    i_, h = config.intermediate_size, config.hidden_size
    shapes = {"gate": (i_, h), "up": (i_, h), "down": (h, i_)}
    weights = load_file(str(path / "model.safetensors"))
    store = CheckpointStore.open(path)
    locs, want = [], []
    for layer in range(config.num_hidden_layers):
        for e in range(config.num_local_experts):
            pre = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            names = {"gate": pre + "w1.weight", "up": pre + "w3.weight", "down": pre + "w2.weight"}
            locs.append(expert_location(store, names, shapes))
            want.append(torch.cat([weights[names[p]].reshape(-1) for p in ("gate", "up", "down")]))
    return store, locs, want, 3 * i_ * h


def test_arena_from_a_real_store(tiny_checkpoint):
    store, locs, want, numel = _mixtral_experts(tiny_checkpoint("mixtral"))
    order = list(range(len(locs)))
    random.Random(0).shuffle(order)  # arena index i holds locations[i], whatever the checkpoint order
    try:
        arena = PinnedArena.from_store(
            store, [locs[j] for j in order], numel, torch.float32, pin=False, threads=2
        )
        assert arena.num_experts == len(locs) == 16
        assert arena.nbytes == len(locs) * numel * 4 == arena.buffer.untyped_storage().nbytes()
        for i, j in enumerate(order):
            assert torch.equal(arena.expert(i), want[j]), f"arena view {i} does not hold expert {j}'s bytes"
        arena.close()
    finally:
        store.close()


def test_arena_fill_error_is_raised(tiny_checkpoint):
    store, locs, _, numel = _mixtral_experts(tiny_checkpoint("mixtral"))
    arena = PinnedArena(len(locs), numel, torch.float32, pin=False)
    store.close()
    with pytest.raises(RuntimeError, match="store .* is closed"):
        arena.fill(store, locs)
    with pytest.raises(ValueError, match="3 locations for an arena of 16 experts"):
        arena.fill(store, locs[:3])
    arena.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_pinning_and_the_cuda_mover_need_cuda(tiny_checkpoint):
    from moe_engine.runtime.cuda_mover import CudaMover

    with pytest.raises(RuntimeError, match="pinned arena needs CUDA"):
        PinnedArena(2, 10, torch.float32)
    p = plan_host_tier(1, 2, 1, available_ram=GiB, total_ram=GiB)
    with pytest.raises(RuntimeError, match="CudaMover needs CUDA"):
        CudaMover(None, [], 10, torch.float32, torch.device("cuda"), 1, p)  # type: ignore[arg-type]
