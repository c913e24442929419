"""Expert parallelism on torch.distributed: experts split across ranks by a placement plan.

What this package owns: attaching expert parallelism to a loaded model (``attach``), the per-layer
dispatch/combine and its counters (``moe_engine.distributed.ep``), process-group set-up and local
spawning (``moe_engine.distributed.launch``), and the ``torchrun -m moe_engine.distributed`` entry point.

Launch (every rank runs the same command; the plan is optional, round-robin ``e % G`` without one)::

    torchrun --nproc-per-node 4 -m moe_engine.distributed --plan plan.json --ep-mode coherent
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr HOST --master-port 29500 \
        -m moe_engine.distributed --max-new-tokens 32      # and --node-rank 1 on the second machine
    moe-engine generate --ep 4 --plan plan.json           # spawns 4 local ranks itself

From Python, inside an initialised process group (world size > 1, or a plan given)::

    model = moe_engine.from_pretrained(path, plan="plan.json", ep_mode="standard")
    model.generate(ids, max_new_tokens=8)
    model.expert_parallel.gather_stats().to_json()
"""

from __future__ import annotations

import os
from typing import Any

from moe_engine.distributed.ep import (
    MODES,
    EPStats,
    ExpertParallel,
    GroupStats,
    PlanMismatchError,
    RankFailedError,
    check_plan,
)

__all__ = [
    "MODES", "EPStats", "ExpertParallel", "GroupStats", "PlanMismatchError", "RankFailedError", "attach",
    "check_plan", "group_world_size",
]  # fmt: skip


def group_world_size() -> int:
    """World size of the default process group, 1 when none is initialised."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def attach(model, plan: Any = None, mode: str = "standard", group=None, regroup: bool = False) -> ExpertParallel:
    """Split ``model``'s experts across the ranks of ``group`` (default: the default process group).

    ``plan``: None (round-robin), a ``PlacementPlan``, or the path of a ``moe-placement/1`` file.
    ``regroup`` (standard mode): each layer's combine sends a token to the rank the cross-layer gate
    predicts for its next layer, so the next dispatch stays local where the prediction holds."""
    if isinstance(plan, (str, os.PathLike)):
        from moe_engine.placement.plan import load_plan

        plan = load_plan(plan)
    return ExpertParallel.attach(model, plan=plan, mode=mode, group=group, regroup=regroup)
