"""Exact integer program for expert placement (pulp; HiGHS when ``highspy`` is installed, else CBC).

The size depends on experts, layers and devices, never on tokens: routing enters only through the
affinity weights ``pairs[l, a, b]``.

Variables:
    x[l, e, g] in {0, 1}   expert e of layer l sits on device g (one device per expert).
    s[l, a, b] in [0, 1]   a (layer l) and b (layer l + 1) share a device, for pairs with affinity > 0.
    t[l, a, b] in [0, 1]   they share a node (only with a node hierarchy).
Constraints:
    sum_g x[l, e, g] = 1;  sum_e x[l, e, g] <= capacity[l, g];
    optional balance: sum_e load[l, e] x[l, e, g] <= limit[l];
    s[l, a, b] <= 1 + x[l + 1, b, g] - x[l, a, g] for every g (s can be 1 only on a common device);
    the same for t with node indicators; s <= t;
    valid cuts: sum_b s[l, a, b] <= max_g capacity[l + 1, g] and sum_a s[l, a, b] <= max_g capacity[l, g]
        (a device holds at most that many partners); the same for t with node capacities.
Objective (minimise): sum w_ab * (intra_node_cost * (1 - s_ab) + (inter_node_cost - intra_node_cost) * (1 - t_ab)),
    i.e. the expected transition cost of ``placement.search.placement_cost``. Pairs with a fixed end
    (layers outside a refinement window) are linear in x and need no s/t variables.
Symmetry: devices are interchangeable, so (flat topology, equal capacities) expert i of the first free
layer is restricted to devices 0..i; with nodes, expert 0 is pinned to device 0.

Example::

    result = solve_ilp(aff.pairs, Topology(4), capacity, time_limit=30)
    result.assign, result.objective, result.bound, result.gap
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from moe_engine.placement.search import one_hot, placement_cost
from moe_engine.placement.topology import Topology

SOLVERS = ("auto", "highs", "cbc")


@dataclass(frozen=True)
class IlpResult:
    assign: np.ndarray  # [L, E] device per expert (the window's layers changed, the rest as given)
    objective: float  # placement_cost of assign (whole instance)
    bound: float  # proven lower bound on the objective (whole instance; -inf if unknown)
    gap: float  # (objective - bound) / objective, 0 when proven optimal
    status: str  # "optimal", "time_limit" or "no_solution"
    solver: str
    seconds: float
    num_variables: int
    num_constraints: int


def available_solver(name: str = "auto") -> str:
    """'highs' or 'cbc': the solver ``name`` resolves to here; ValueError if it is not installed."""
    import pulp

    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    have = set(pulp.listSolvers(onlyAvailable=True))
    if name in ("auto", "highs") and "HiGHS" in have:
        return "highs"
    if name == "highs":
        raise ValueError("solver 'highs' needs the highspy package (pip install highspy); or use --solver cbc")
    if "PULP_CBC_CMD" in have:
        return "cbc"
    raise ValueError("no MILP solver available: pulp's bundled CBC is missing and highspy is not installed")


def solve_ilp(
    pairs: np.ndarray,
    topology: Topology,
    capacity: np.ndarray,
    load: np.ndarray | None = None,
    load_limit: np.ndarray | None = None,
    time_limit: float = 60.0,
    solver: str = "auto",
    start: np.ndarray | None = None,
    free_layers: list[int] | None = None,
    threads: int | None = None,
) -> IlpResult:
    """Solve the placement ILP over ``free_layers`` (all layers when None), the others fixed to ``start``.

    pairs: [L-1, E, E] affinity; capacity: [L, G]; load: [L, E] and load_limit: [L] for balance;
    start: [L, E] a feasible placement used as warm start (required when some layers are fixed).
    The bound and gap refer to the whole instance only when every layer is free.
    """
    import pulp

    t0 = time.monotonic()
    num_layers, num_devices = capacity.shape
    start_arr = np.zeros((num_layers, 0), dtype=np.int64) if start is None else np.asarray(start)
    num_experts = pairs.shape[1] if pairs.ndim == 3 and len(pairs) else int(capacity[0].sum())
    free = list(range(num_layers)) if free_layers is None else sorted(set(free_layers))
    if start is None and len(free) < num_layers:
        raise ValueError("fixed layers need a start placement")
    name = available_solver(solver)
    cost = topology.cost_matrix()
    hier = topology.hierarchical
    c_dev = topology.intra_node_cost if hier else topology.device_cost
    c_node = topology.inter_node_cost - topology.intra_node_cost
    dpn = topology.devices_per_node
    node_devices = [range(n * dpn, (n + 1) * dpn) for n in range(topology.num_nodes)]
    is_free = np.zeros(num_layers, dtype=bool)
    is_free[free] = True

    prob = pulp.LpProblem("expert_placement", pulp.LpMinimize)
    x = {
        (layer, e, g): pulp.LpVariable(f"x_{layer}_{e}_{g}", cat=pulp.LpBinary)
        for layer in free
        for e in range(num_experts)
        for g in range(num_devices)
    }
    objective = []
    constant = 0.0
    for layer in free:
        for e in range(num_experts):
            prob += pulp.lpSum(x[layer, e, g] for g in range(num_devices)) == 1, f"one_{layer}_{e}"
        for g in range(num_devices):
            prob += pulp.lpSum(x[layer, e, g] for e in range(num_experts)) <= int(capacity[layer, g]), f"cap_{layer}_{g}"
            if load is not None and load_limit is not None:
                prob += (
                    pulp.lpSum(float(load[layer, e]) * x[layer, e, g] for e in range(num_experts) if load[layer, e] > 0)
                    <= float(load_limit[layer])
                ), f"bal_{layer}_{g}"
    for layer in range(num_layers - 1):
        nxt = layer + 1
        w = pairs[layer]
        if not is_free[layer] and not is_free[nxt]:
            continue
        if is_free[layer] != is_free[nxt]:
            # one end fixed: cost of the free end on each device is linear in x
            if is_free[layer]:
                mass = w @ one_hot(start_arr[nxt], num_devices)  # [E, G] mass to device h
                lin = mass @ cost.T
                fl = layer
            else:
                mass = w.T @ one_hot(start_arr[layer], num_devices)
                lin = mass @ cost
                fl = nxt
            objective += [float(lin[e, g]) * x[fl, e, g] for e in range(num_experts) for g in range(num_devices) if lin[e, g]]
            continue
        a_idx, b_idx = np.nonzero(w)
        s_vars = {}
        t_vars = {}
        for a, b in zip(a_idx.tolist(), b_idx.tolist()):
            wt = float(w[a, b])
            s = pulp.LpVariable(f"s_{layer}_{a}_{b}", lowBound=0, upBound=1)
            s_vars[a, b] = s
            constant += wt * (c_dev + (c_node if hier else 0.0))
            objective.append(-wt * c_dev * s)
            for g in range(num_devices):
                prob += s <= 1 + x[nxt, b, g] - x[layer, a, g], f"co_{layer}_{a}_{b}_{g}"
            if hier:
                t = pulp.LpVariable(f"t_{layer}_{a}_{b}", lowBound=0, upBound=1)
                t_vars[a, b] = t
                objective.append(-wt * c_node * t)
                prob += s <= t, f"st_{layer}_{a}_{b}"
                for n, devs in enumerate(node_devices):
                    prob += (
                        t <= 1 + pulp.lpSum(x[nxt, b, g] for g in devs) - pulp.lpSum(x[layer, a, g] for g in devs)
                    ), f"cn_{layer}_{a}_{b}_{n}"
        _partner_cuts(prob, s_vars, f"sd_{layer}", int(capacity[nxt].max()), int(capacity[layer].max()))
        if hier:
            node_cap_next = int(max(capacity[nxt, list(d)].sum() for d in node_devices))
            node_cap = int(max(capacity[layer, list(d)].sum() for d in node_devices))
            _partner_cuts(prob, t_vars, f"sn_{layer}", node_cap_next, node_cap)
    prob += pulp.lpSum(objective) + constant
    # Symmetry breaking (only when every layer is free, so device labels are arbitrary).
    if len(free) == num_layers and num_devices > 1:
        first = free[0]
        equal_caps = bool(np.all(capacity == capacity[:, :1]))
        if not hier and equal_caps:
            for e in range(min(num_experts, num_devices - 1)):
                for g in range(e + 1, num_devices):
                    x[first, e, g].upBound = 0
        elif equal_caps:
            x[first, 0, 0].lowBound = 1
    if start is not None:
        if len(free) == num_layers:
            start = canonical_labels(start, topology, free[0])
        for (layer, e, g), var in x.items():
            var.setInitialValue(1 if start[layer, e] == g else 0)
    num_vars = len(prob.variables())
    num_cons = len(prob.constraints)
    remaining = max(1.0, time_limit - (time.monotonic() - t0))
    raw_obj, raw_bound, optimal = _run(prob, name, remaining, start is not None, threads)
    assign = np.array(start, dtype=np.int64, copy=True) if start is not None else np.zeros((num_layers, num_experts), dtype=np.int64)
    found = True
    for layer in free:
        for e in range(num_experts):
            vals = [x[layer, e, g].varValue for g in range(num_devices)]
            if any(v is None for v in vals):
                found = False
                break
            assign[layer, e] = int(np.argmax(vals))
    if found and not _feasible(assign, capacity, load, load_limit):
        found = False
    if not found:
        if start is None:
            raise RuntimeError(f"the ILP found no placement within {time_limit:.0f} s; give more time or a start")
        assign = np.array(start, dtype=np.int64, copy=True)
    objective_value = placement_cost(pairs, assign, cost)
    if start is not None:
        objective_value = min(objective_value, placement_cost(pairs, start, cost))
        if objective_value < placement_cost(pairs, assign, cost) - 1e-9:
            assign = np.array(start, dtype=np.int64, copy=True)
    bound = -np.inf
    if raw_bound is not None and len(free) == num_layers:
        # solver objectives may leave out the constant term: shift by the difference the solver reported
        offset = objective_value - raw_obj if (raw_obj is not None and found and np.isfinite(raw_obj)) else constant
        bound = min(objective_value, raw_bound + offset)
        if optimal:
            bound = objective_value
    gap = 0.0 if objective_value <= 0 else max(0.0, (objective_value - max(bound, 0.0)) / objective_value)
    status = "optimal" if optimal and found else ("time_limit" if found else "no_solution")
    return IlpResult(
        assign=assign,
        objective=float(objective_value),
        bound=float(bound),
        gap=float(gap) if np.isfinite(bound) else 1.0,
        status=status,
        solver=name,
        seconds=time.monotonic() - t0,
        num_variables=num_vars,
        num_constraints=num_cons,
    )


def canonical_labels(assign: np.ndarray, topology: Topology, layer: int = 0) -> np.ndarray:
    """The same placement with device labels permuted to satisfy the ILP's symmetry breaking.

    Flat: devices numbered by first appearance among the experts of ``layer``. With nodes: the node and
    the device of expert 0 swapped with node 0 and its first device (a label change that keeps costs).
    """
    num_devices = topology.num_devices
    if not topology.hierarchical:
        order = list(dict.fromkeys(int(d) for d in assign[layer]))
        order += [g for g in range(num_devices) if g not in order]
        perm = np.empty(num_devices, dtype=np.int64)
        perm[order] = np.arange(num_devices)
        return perm[assign]
    dpn = topology.devices_per_node
    dev0 = int(assign[layer, 0])
    node0, slot0 = divmod(dev0, dpn)
    perm = np.arange(num_devices)
    nodes = np.arange(topology.num_nodes)
    nodes[[0, node0]] = nodes[[node0, 0]]
    slots = np.arange(dpn)
    slots[[0, slot0]] = slots[[slot0, 0]]
    # device (n, s) -> (nodes[n], slots[s]) when n is node0's block; node swap keeps slot order otherwise
    for g in range(num_devices):
        n, s = divmod(g, dpn)
        perm[g] = nodes[n] * dpn + (slots[s] if n == node0 else s)
    return perm[assign]


def _partner_cuts(prob, variables: dict, tag: str, row_cap: int, col_cap: int) -> None:
    import pulp

    rows: dict[int, list] = {}
    cols: dict[int, list] = {}
    for (a, b), v in variables.items():
        rows.setdefault(a, []).append(v)
        cols.setdefault(b, []).append(v)
    for a, vs in rows.items():
        if len(vs) > row_cap:
            prob += pulp.lpSum(vs) <= row_cap, f"{tag}_r{a}"
    for b, vs in cols.items():
        if len(vs) > col_cap:
            prob += pulp.lpSum(vs) <= col_cap, f"{tag}_c{b}"


def _feasible(assign, capacity, load, load_limit) -> bool:
    num_devices = capacity.shape[1]
    for layer in range(assign.shape[0]):
        if np.any(np.bincount(assign[layer], minlength=num_devices) > capacity[layer]):
            return False
        if load is not None and load_limit is not None:
            dev = np.bincount(assign[layer], weights=load[layer], minlength=num_devices)
            if dev.max() > load_limit[layer] * (1 + 1e-6) + 1e-6:
                return False
    return True


def _run(prob, name: str, time_limit: float, warm: bool, threads: int | None) -> tuple[float | None, float | None, bool]:
    """Solve; return (solver objective, solver best bound, proven optimal)."""
    import pulp

    if name == "highs":
        import highspy

        class _WarmHiGHS(pulp.HiGHS):
            def callSolver(self, lp):
                if warm:
                    values = [float(v.varValue) if v.varValue is not None else 0.0 for v in lp.variables()]
                    lp.solverModel.setSolution(_solution(highspy, values))
                super().callSolver(lp)

        solver = _WarmHiGHS(msg=False, timeLimit=time_limit, threads=threads)
        prob.solve(solver)
        info = prob.solverModel.getInfo()
        status = prob.solverModel.getModelStatus()
        optimal = status == highspy.HighsModelStatus.kOptimal
        dual = float(info.mip_dual_bound)
        return float(info.objective_function_value), (dual if np.isfinite(dual) else None), optimal
    fd, log_path = tempfile.mkstemp(suffix=".log", prefix="placement-cbc-")
    os.close(fd)
    try:
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, warmStart=warm, logPath=log_path, threads=threads)
        prob.solve(solver)
        with open(log_path) as fh:
            log = fh.read()
    finally:
        os.unlink(log_path)
    optimal = "Optimal solution found" in log
    obj_m = re.findall(r"Objective value:\s*([-+0-9.eE]+)", log)
    bound_m = re.findall(r"Lower bound:\s*([-+0-9.eE]+)", log)
    obj = float(obj_m[-1]) if obj_m else None
    lower = float(bound_m[-1]) if bound_m else (obj if optimal else None)
    return obj, lower, optimal


def _solution(highspy, values: list[float]):
    sol = highspy.HighsSolution()
    sol.col_value = values
    sol.value_valid = True
    return sol
