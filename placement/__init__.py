"""Expert placement across devices: where each MoE layer's experts should live so tokens cross less.

Pure functions over trace arrays (``expert_ids [T, L, K]``, router weights, sequence starts); no import
of ``moe_engine``. Entry points:

* ``compute_affinity``: consecutive-layer co-activation counts and loads.
* ``plan_placement`` with a ``PlannerConfig``: the full planner (starts, local search, ILP, replicas).
* ``solve_ilp``: the exact integer program (pulp; HiGHS or CBC).
* ``PlacementPlan``, ``save_plan``, ``load_plan``, ``evaluate_plan``: the ``moe-placement/1`` format.
* ``token_devices`` / ``split_by_load``: the one route rule, which copy serves each (token, layer, slot),
  hot experts' tokens split across their replicas by load (``placement.balance``).
* ``placement.projection``: expert-parallel wire bytes, messages, all-to-alls and time from a trace.

Example::

    from moe_engine.placement import PlannerConfig, plan_placement, evaluate_plan
    result = plan_placement(expert_ids, PlannerConfig(num_devices=8, time_limit=30))
    evaluate_plan(result.plan, held_out_ids).cross_device_share
"""

from moe_engine.placement.affinity import Affinity, compute_affinity
from moe_engine.placement.ilp import IlpResult, available_solver, solve_ilp
from moe_engine.placement.plan import (
    FORMAT,
    PlacementPlan,
    PlanMetrics,
    Replica,
    evaluate_plan,
    load_plan,
    round_robin_plan,
    save_plan,
    split_by_load,
    token_devices,
)
from moe_engine.placement.planner import (
    PlannerConfig,
    PlanResult,
    capacity_for,
    plan_placement,
    relaxation_bound,
)
from moe_engine.placement.topology import Topology

__all__ = [
    "FORMAT",
    "Affinity",
    "IlpResult",
    "PlacementPlan",
    "PlanMetrics",
    "PlanResult",
    "PlannerConfig",
    "Replica",
    "Topology",
    "available_solver",
    "capacity_for",
    "compute_affinity",
    "evaluate_plan",
    "load_plan",
    "plan_placement",
    "relaxation_bound",
    "round_robin_plan",
    "save_plan",
    "solve_ilp",
    "split_by_load",
    "token_devices",
]
