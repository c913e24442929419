"""The placement planner: affinity -> start -> local search -> ILP (exact or windows) -> replicas -> plan.

One public entry, ``plan_placement``, over trace arrays. Steps:
    1. Affinity from the trace (pair counts, loads); the fitted weights are ``pairs ** affinity_power``.
       1.0 fits the training trace exactly; lower powers compress the heaviest pairs, which generalises
       better to routing the plan has not seen (another domain). By default the power is chosen among
       1, 0.75, 0.5 by validation on held-out parts of the trace (leave one source trace out when
       several are pooled), with a share of the time limit.
    2. Starts: each layer chained to its neighbour by an exact capacitated assignment, from random first
       layers, alternately forwards and backwards.
    3. Local search: exact whole-layer block moves (or load-feasible swaps with balance on) until none
       improves, then iterated perturbation of random layer windows, within the time limit.
    4. ILP: small instances are solved exactly (warm-started, so never worse); on request (ilp="windows")
       windows of consecutive layers are re-solved exactly with the rest fixed. A lower bound (the solver's, or the
       LP relaxation's per layer pair) gives the optimality gap.
    5. Replicas of hot experts in spare slots, with per-source-device routes.

Example::

    result = plan_placement(expert_ids, num_devices=8, time_limit=30)
    save_plan(result.plan, "plan.json")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from moe_engine.placement.affinity import Affinity, compute_affinity, select_rows, validate_expert_ids
from moe_engine.placement.ilp import available_solver, solve_ilp
from moe_engine.placement.plan import PlacementPlan
from moe_engine.placement.replication import add_replicas
from moe_engine.placement.search import (
    chain_start,
    descend,
    improve_layer_swaps,
    layer_cost_matrix,
    placement_cost,
    round_robin,
)
from moe_engine.placement.topology import Topology

# Candidate affinity powers for validation (affinity_power=None) and the share of time it may use.
POWER_CANDIDATES = (1.0, 0.75, 0.5)
VALIDATION_SHARE = 0.4

# Full-instance ILP only while it stays small (binary variables, co-location pairs).
EXACT_MAX_BINARIES = 1200
EXACT_MAX_PAIRS = 6000


@dataclass(frozen=True)
class PlannerConfig:
    num_devices: int
    num_nodes: int = 1
    replicas: int = 0  # redundant expert copies per layer (EPLB's num_redundant_experts)
    balance: float | None = None  # eps: max device load <= (1 + eps) x mean; None: no balance constraint
    time_limit: float = 60.0
    solver: str = "auto"  # "auto" | "highs" | "cbc"
    ilp: str = "auto"  # "auto" | "exact" | "windows" | "off"
    affinity_power: float | None = None  # None: chosen by validation among POWER_CANDIDATES
    weighted: bool = False  # weight pairs by router weights instead of counting them
    intra_node_cost: float = 1.0
    inter_node_cost: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        Topology(self.num_devices, self.num_nodes, self.intra_node_cost, self.inter_node_cost)
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {self.replicas}")
        if self.balance is not None and self.balance < 0:
            raise ValueError(f"balance eps must be >= 0, got {self.balance}")
        if not math.isfinite(self.time_limit) or self.time_limit <= 0:
            raise ValueError(f"time_limit must be a positive number of seconds, got {self.time_limit}")
        if self.ilp not in ("auto", "exact", "windows", "off"):
            raise ValueError(f"ilp must be auto, exact, windows or off, got {self.ilp!r}")
        if self.affinity_power is not None and not 0 < self.affinity_power <= 1:
            raise ValueError(f"affinity_power must be in (0, 1], got {self.affinity_power}")
        available_solver(self.solver)

    @property
    def topology(self) -> Topology:
        return Topology(self.num_devices, self.num_nodes, self.intra_node_cost, self.inter_node_cost)


@dataclass
class PlanResult:
    plan: PlacementPlan
    objective: float  # fitted objective (transition cost under the fitted weights) of the primaries
    bound: float  # lower bound on that objective (-inf if none)
    gap: float  # (objective - bound) / objective
    train_share: float  # cross-device share on the training affinity (counts), primaries only
    round_robin_share: float
    seconds: float
    log: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def capacity_for(num_experts: int, num_layers: int, num_devices: int, replicas: int) -> np.ndarray:
    """[L, G] slots per device per layer: (E + R) / G each; ValueError when G does not divide E + R."""
    slots = num_experts + replicas
    if slots % num_devices:
        if replicas == 0:
            raise ValueError(
                f"{num_devices} devices do not divide {num_experts} experts; use a device count that divides it, "
                f"or add replicas so that devices divide experts + replicas (e.g. --replicas {-num_experts % num_devices})"
            )
        raise ValueError(f"{num_devices} devices do not divide experts + replicas = {num_experts} + {replicas} = {slots}")
    if replicas > num_experts * (num_devices - 1):
        raise ValueError(f"{replicas} replicas exceed what {num_devices} devices can hold")
    return np.full((num_layers, num_devices), slots // num_devices, dtype=np.int64)


def plan_placement(
    expert_ids: np.ndarray,
    config: PlannerConfig,
    weights: np.ndarray | None = None,
    num_experts: int | None = None,
    moe_layers: list[int] | None = None,
    trace_info: dict[str, Any] | None = None,
    affinity: Affinity | None = None,
    progress: Callable[[str], None] | None = None,
    sequence_starts: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> PlanResult:
    """Plan expert placement from a trace ``expert_ids [T, L, K]`` (optionally ``weights [T, L, K]``).

    ``affinity`` may be given instead of computing it from ``expert_ids`` (e.g. summed over traces).
    With ``config.affinity_power=None`` the power is chosen by validation: leave one group out when
    ``groups [S]`` (e.g. the source trace of each sequence of ``sequence_starts [S + 1]``) has several
    values, so the choice reflects a shift between sources; otherwise three contiguous folds of sequences.
    """
    t0 = time.monotonic()
    deadline = t0 + config.time_limit
    log: list[str] = []

    def say(msg: str) -> None:
        log.append(f"[{time.monotonic() - t0:6.1f}s] {msg}")
        if progress:
            progress(log[-1])

    if affinity is None:
        num_experts = validate_expert_ids(expert_ids, num_experts)
        if config.weighted and weights is None:
            raise ValueError("weighted affinity needs router weights")
        affinity = compute_affinity(expert_ids, num_experts, weights=weights if config.weighted else None)
    counts = affinity
    num_layers, num_experts = counts.num_layers, counts.num_experts
    topo = config.topology
    cost = topo.cost_matrix()
    capacity = capacity_for(num_experts, num_layers, config.num_devices, config.replicas)
    rng = np.random.default_rng(config.seed)
    power = config.affinity_power
    validation: dict[str, Any] = {}
    if power is None:
        if expert_ids is None or expert_ids.shape[0] < 3:
            power = 0.5
        else:
            power, validation = _choose_power(
                expert_ids, weights if config.weighted else None, num_experts, sequence_starts, groups, config,
                capacity, cost, rng, t0 + VALIDATION_SHARE * config.time_limit, say,
            )
    fit = counts.pairs**power
    load = counts.load
    load_limit = _load_limit(load, config)
    say(f"affinity: {num_layers} layers x {num_experts} experts, {counts.total_pairs:.0f} pairs; "
        f"{config.num_devices} devices in {config.num_nodes} node(s), {int(capacity[0, 0])} slots each")

    # Steps 2 and 3: starts and local search, most of the time budget.
    n_bin = num_layers * num_experts * config.num_devices
    n_pairs = int((counts.pairs > 0).sum())
    exact = config.ilp == "exact" or (config.ilp == "auto" and n_bin <= EXACT_MAX_BINARIES and n_pairs <= EXACT_MAX_PAIRS)
    # Window refinement is opt-in: on the real traces it never improved a local-search optimum within
    # its time (a two-layer window of 64 experts is already a hard ILP), so auto leaves it off.
    windows = config.ilp == "windows"
    search_share = 0.5 if exact else (0.8 if windows else 1.0)
    search_seconds = (deadline - time.monotonic()) * search_share + (time.monotonic() - t0)
    if exact:  # a small instance: the search only warm-starts the ILP, which gets the rest
        search_seconds = min(search_seconds, 5.0)
    if num_experts <= 128:  # keep time for the LP bound after the search (about 0.05 s per layer pair)
        search_seconds -= min(0.1 * config.time_limit, 0.08 * num_layers)
    search_deadline = t0 + search_seconds
    best, best_cost, starts, perturbs = _search(fit, cost, capacity, load, load_limit, rng, search_deadline, say)
    say(f"local search: cost {best_cost:.4g} after {starts} starts and {perturbs} perturbations")

    # Step 4: ILP.
    bound = -np.inf
    ilp_stats: dict[str, Any] = {"mode": "off"}
    remaining = deadline - time.monotonic()
    if exact and remaining > 1:
        res = solve_ilp(fit, topo, capacity, load, load_limit, time_limit=remaining * 0.95, solver=config.solver, start=best)
        ilp_stats = {"mode": "exact", "status": res.status, "solver": res.solver, "seconds": round(res.seconds, 2),
                     "variables": res.num_variables, "constraints": res.num_constraints}
        if res.objective < best_cost - 1e-9:
            best, best_cost = res.assign, res.objective
        bound = res.bound
        say(f"exact ILP ({res.solver}): {res.status}, cost {res.objective:.4g}, bound {res.bound:.4g}")
    elif windows and remaining > 2:
        best, best_cost, ilp_stats = _refine_windows(fit, topo, capacity, load, load_limit, best, best_cost, rng, deadline, config.solver)
        say(f"ILP windows: {ilp_stats['improved']} of {ilp_stats['windows']} improved, cost {best_cost:.4g}")
    lp = relaxation_bound(fit, topo, capacity)
    bound = max(bound, lp)
    gap = 0.0 if best_cost <= 0 else max(0.0, (best_cost - max(bound, 0.0)) / best_cost)
    say(f"bound {bound:.4g} (LP relaxation {lp:.4g}), gap {100 * gap:.1f}%")

    # Step 5: replicas.
    replicas: dict = {}
    if config.replicas:
        replicas = add_replicas(best, counts.pairs, counts.load, capacity, topo, balance=config.balance)
        copies = sum(len(rep.devices) - 1 for reps in replicas.values() for rep in reps.values())
        say(f"replicas: {copies} copies placed in {num_layers * config.replicas} spare slots")

    flat = Topology(config.num_devices)
    total = max(counts.total_pairs, 1e-12)
    train_share = placement_cost(counts.pairs, best, flat.cost_matrix()) / total
    rr = round_robin(num_layers, num_experts, config.num_devices)
    rr_share = placement_cost(counts.pairs, rr, flat.cost_matrix()) / total
    seconds = time.monotonic() - t0
    objective = {
        "method": "chain starts + block-coordinate local search"
        + (" + exact ILP" if exact else " + ILP windows" if windows else ""),
        "fitted_cost": best_cost,
        "bound": bound if np.isfinite(bound) else None,
        "gap": gap,
        "train_cross_device_share": train_share,
        "round_robin_train_share": rr_share,
        "affinity_power": power,
        "power_validation": validation or None,
        "balance": config.balance,
        "replicas": config.replicas,
        "intra_node_cost": config.intra_node_cost,
        "inter_node_cost": config.inter_node_cost,
        "seconds": round(seconds, 2),
    }
    plan = PlacementPlan(
        experts=best.astype(np.int64),
        num_devices=config.num_devices,
        num_nodes=config.num_nodes,
        moe_layers=tuple(moe_layers) if moe_layers else tuple(range(num_layers)),
        replicas=replicas,
        objective=objective,
        trace=dict(trace_info or {}),
    )
    say(f"done: train cross-device share {train_share:.4f} (round-robin {rr_share:.4f})")
    return PlanResult(
        plan=plan, objective=best_cost, bound=bound, gap=gap, train_share=train_share, round_robin_share=rr_share,
        seconds=seconds, log=log,
        stats={"starts": starts, "perturbations": perturbs, "ilp": ilp_stats, "lp_bound": lp, "power": power,
               "validation": validation},
    )


def _load_limit(load: np.ndarray, config: PlannerConfig) -> np.ndarray | None:
    """[L] max tokens per device of the primaries, or None without balance. Kept with replicas too: the
    load split across copies (placement.balance) evens out what the primaries leave, not a skewed layout."""
    if config.balance is None:
        return None
    return (1.0 + config.balance) * load.sum(axis=1) / config.num_devices


def _choose_power(expert_ids, weights, num_experts, sequence_starts, groups, config, capacity, cost, rng, deadline, say):
    """Affinity power with the lowest held-out transition cost over validation folds (see plan_placement)."""
    num_tokens = expert_ids.shape[0]
    if sequence_starts is None:
        sequence_starts = np.array([0, num_tokens])
    sequence_starts = np.asarray(sequence_starts, dtype=np.int64)
    num_seq = len(sequence_starts) - 1
    if groups is not None and len(np.unique(groups)) > 1:
        groups = np.asarray(groups)
        if len(groups) != num_seq:
            raise ValueError(f"groups has {len(groups)} entries for {num_seq} sequences")
        folds = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
        kind = "leave one group out"
        rows = [select_rows(sequence_starts, f) for f in folds]
    elif num_seq >= 3:
        folds = [f for f in np.array_split(np.arange(num_seq), 3) if len(f)]
        kind = "3 folds of sequences"
        rows = [select_rows(sequence_starts, f) for f in folds]
    else:
        kind = "3 blocks of tokens"
        rows = list(np.array_split(np.arange(num_tokens), 3))
    all_rows = np.arange(num_tokens)
    per_fit = max(0.5, (deadline - time.monotonic()) / (len(rows) * len(POWER_CANDIDATES)))
    scores = dict.fromkeys(POWER_CANDIDATES, 0.0)
    done = 0
    for held in rows:
        if time.monotonic() > deadline:
            break  # compare the powers on the folds all of them finished
        train_rows = np.setdiff1d(all_rows, held, assume_unique=True)
        tr = compute_affinity(expert_ids[train_rows], num_experts, None if weights is None else weights[train_rows])
        va = compute_affinity(expert_ids[held], num_experts)
        limit = _load_limit(tr.load, config)
        for power in POWER_CANDIDATES:
            assign, _, _, _ = _search(tr.pairs**power, cost, capacity, tr.load, limit, rng,
                                      time.monotonic() + per_fit, lambda msg: None, min_starts=1)
            scores[power] += placement_cost(va.pairs, assign, cost) / max(va.total_pairs, 1e-12)
        done += 1
    if done == 0:
        say("no time for validating the affinity power: using 0.5")
        return 0.5, {"kind": kind, "folds": 0}
    best = min(POWER_CANDIDATES, key=lambda p: (scores[p], -p))
    say(f"affinity power {best} chosen by validation ({kind}, {done} of {len(rows)} folds): "
        + ", ".join(f"{p}: {scores[p] / done:.4f}" for p in POWER_CANDIDATES))
    return best, {"kind": kind, "folds": done, "mean_held_out_cost": {str(p): scores[p] / done for p in scores}}


def _search(fit, cost, capacity, load, load_limit, rng, deadline, say, min_starts: int = 4):
    """Multi-start chained starts + descent, then iterated window perturbation of the best."""
    num_layers = capacity.shape[0]
    best, best_cost, best_ok = None, np.inf, False
    starts = perturbs = 0
    while starts < min_starts and (starts == 0 or time.monotonic() < deadline):
        assign = chain_start(fit, capacity, cost, rng, reverse=bool(starts % 2), deadline=deadline)
        assign, c, _ = descend(fit, assign, cost, capacity, load, load_limit, deadline=deadline)
        starts += 1
        ok = _within(assign, capacity, load, load_limit)
        if (ok and not best_ok) or (ok == best_ok and c < best_cost - 1e-12):  # within the load limit first
            best, best_cost, best_ok = assign, c, ok
    if not best_ok:  # the descent ran out of time before the load limit held: repair layer by layer
        assert best is not None
        best = _repair_load(fit, best, cost, capacity, load, load_limit)
        best_cost = placement_cost(fit, best, cost)
    say(f"{starts} chained starts, best cost {best_cost:.4g}")
    while time.monotonic() < deadline and num_layers > 1:
        width = int(rng.integers(1, min(8, num_layers) + 1))
        first = int(rng.integers(0, num_layers - width + 1))
        assert best is not None
        cand = best.copy()
        for layer in range(first, first + width):
            cand[layer] = rng.permutation(cand[layer])
        cand, c, _ = descend(fit, cand, cost, capacity, load, load_limit, deadline=deadline)
        perturbs += 1
        if c < best_cost - 1e-9 * max(1.0, best_cost) and _within(cand, capacity, load, load_limit):
            best, best_cost = cand, c
    return best, best_cost, starts, perturbs


def _repair_load(fit, assign, cost, capacity, load, load_limit):
    """Swaps that bring every layer's device loads within ``load_limit``, cheapest per unit of excess first."""
    assign = assign.copy()
    num_experts, num_devices = assign.shape[1], capacity.shape[1]
    idx = np.arange(num_experts)
    for layer in range(assign.shape[0]):
        lc = layer_cost_matrix(fit, assign, cost, layer)
        devices, w, limit = assign[layer].copy(), load[layer], float(load_limit[layer]) + 1e-6
        for _ in range(num_experts):  # moves into free slots first: swaps cannot change a device's expert count
            dev_load = np.bincount(devices, weights=w, minlength=num_devices)
            if dev_load.max() <= limit:
                break
            free = np.bincount(devices, minlength=num_devices) < capacity[layer]
            ok = (dev_load[devices] > limit)[:, None] & free[None, :] & (dev_load[None, :] + w[:, None] <= limit)
            if not ok.any():
                break
            removed = np.maximum(np.minimum(w, dev_load[devices] - limit), 1e-9)
            score = np.where(ok, (lc - lc[idx, devices][:, None]) / removed[:, None], np.inf)
            e, g = np.unravel_index(int(np.argmin(score)), score.shape)
            devices[e] = g
        assign[layer] = improve_layer_swaps(lc, devices, capacity[layer], w, float(load_limit[layer]))
    return assign


def _within(assign, capacity, load, load_limit) -> bool:
    if load_limit is None:
        return True
    num_devices = capacity.shape[1]
    return all(
        np.bincount(assign[layer], weights=load[layer], minlength=num_devices).max() <= load_limit[layer] + 1e-6
        for layer in range(assign.shape[0])
    )


def _refine_windows(fit, topo, capacity, load, load_limit, best, best_cost, rng, deadline, solver):
    """Re-solve windows of two consecutive layers exactly (the rest fixed), best first by cost share."""
    num_layers = capacity.shape[0]
    cost = topo.cost_matrix()
    stats = {"mode": "windows", "windows": 0, "improved": 0}
    while time.monotonic() < deadline - 1 and num_layers > 1:
        first = int(rng.integers(0, num_layers - 1))
        free = [first, first + 1]
        remaining = deadline - time.monotonic()
        res = solve_ilp(fit, topo, capacity, load, load_limit, time_limit=min(10.0, remaining - 0.5), solver=solver,
                        start=best, free_layers=free)
        stats["windows"] += 1
        if res.objective < best_cost - 1e-9 * max(1.0, best_cost):
            cand, c, _ = descend(fit, res.assign, cost, capacity, load, load_limit, deadline=deadline)
            best, best_cost = cand, c
            stats["improved"] += 1
    return best, best_cost, stats


def relaxation_bound(fit: np.ndarray, topology: Topology, capacity: np.ndarray) -> float:
    """Lower bound on the placement cost: the ILP's LP relaxation, layer pair by layer pair.

    With fractional x the co-location variables are limited only by the partner cuts, so each layer pair
    contributes ``W - B`` where B is a maximum-weight b-matching (each expert co-located with at most a
    device's capacity of partners). Solved exactly with HiGHS when available; otherwise each expert's top
    partners bound B (weaker, still valid); so do they above 128 experts per layer.
    """
    total = 0.0
    exact = fit.shape[1] <= 128  # larger: the LPs take minutes on this machine; the greedy bound is instant
    dpn = topology.devices_per_node
    hier = topology.hierarchical
    c_dev = topology.intra_node_cost if hier else topology.device_cost
    c_node = topology.inter_node_cost - topology.intra_node_cost
    for layer in range(fit.shape[0]):
        w = fit[layer]
        W = float(w.sum())
        cap_r, cap_c = int(capacity[layer + 1].max()), int(capacity[layer].max())
        b_dev = _b_matching(w, cap_r, cap_c, exact)
        total += c_dev * (W - b_dev)
        if hier:
            node_r = int(capacity[layer + 1].reshape(-1, dpn).sum(1).max())
            node_c = int(capacity[layer].reshape(-1, dpn).sum(1).max())
            total += c_node * (W - _b_matching(w, node_r, node_c, exact))
    return total


def _b_matching(w: np.ndarray, row_cap: int, col_cap: int, exact: bool = True) -> float:
    """Max sum of w over a 0/1 selection with at most row_cap per row and col_cap per column (LP value)."""
    top_rows = float(-np.sort(-w, axis=1)[:, :row_cap].sum())
    top_cols = float(-np.sort(-w, axis=0)[:col_cap].sum())
    greedy_bound = min(top_rows, top_cols)
    if not exact:
        return greedy_bound
    try:
        import highspy
    except ImportError:
        return greedy_bound
    rows, cols = np.nonzero(w)
    n = len(rows)
    if n == 0:
        return 0.0
    num_r, num_c = w.shape
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", 30.0)
    h.addVars(n, np.zeros(n), np.ones(n))
    h.changeColsCost(n, np.arange(n, dtype=np.int32), -w[rows, cols].astype(np.float64))
    # constraint matrix: one row per expert of layer l (its partners) and per expert of layer l + 1
    index = np.concatenate([rows, num_r + cols]).astype(np.int32)
    var = np.concatenate([np.arange(n), np.arange(n)])
    order = np.argsort(index, kind="stable")
    index, var = index[order], var[order]
    m = num_r + num_c
    starts = np.searchsorted(index, np.arange(m)).astype(np.int32)
    upper = np.concatenate([np.full(num_r, row_cap), np.full(num_c, col_cap)]).astype(np.float64)
    h.addRows(m, np.full(m, -highspy.kHighsInf), upper, len(var), starts, var.astype(np.int32), np.ones(len(var)))
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return greedy_bound
    # the dual bound of an optimal LP equals its value; keep the valid greedy bound if it is tighter
    return min(greedy_bound, -float(h.getInfo().objective_function_value))
