"""Heuristic placement search: chained starts, exact per-layer block moves, swaps and label alignment.

The objective couples only consecutive layers, so with the placement of layers l - 1 and l + 1 fixed, the
best placement of layer l is a transportation problem (experts -> devices with capacities), solved
exactly by ``capacitated_assignment``. The search alternates such block moves over the layers until none
improves (a local optimum over whole layers), escapes by perturbing windows of layers, and keeps the best.
With load balance on, a layer is improved by expert swaps that keep every device under its load limit.

Glossary (shapes):
    assign ``[L, E]``: device of expert e at layer l.
    pairs ``[L - 1, E, E]``: affinity (see ``placement.affinity``). cost ``[G, G]``: see ``Topology``.
    capacity ``[L, G]``: experts device g may hold at layer l. load limit ``[L]``: max tokens per device.

Example::

    assign = chain_start(aff.pairs, capacity, cost, rng)
    result = local_search(aff.pairs, cost, capacity, assign, time_limit=10)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from moe_engine.placement.assignment import capacitated_assignment, improve_assignment, linear_assignment

TOL = 1e-9


def one_hot(devices: np.ndarray, num_devices: int) -> np.ndarray:
    """[E] device ids -> [E, G] indicator matrix."""
    out = np.zeros((len(devices), num_devices))
    out[np.arange(len(devices)), devices] = 1.0
    return out


def group_rows(matrix: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """[n, C]: sums of the rows of ``matrix [R, C]`` by their group ``groups [R]`` (faster than a one-hot
    product on small machines, where BLAS threading dominates such matmuls)."""
    counts = np.bincount(groups, minlength=num_groups)
    out = np.zeros((num_groups, matrix.shape[1]))
    filled = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[filled]
    out[filled] = np.add.reduceat(matrix[np.argsort(groups, kind="stable")], starts, axis=0)
    return out


def times_cost(mass: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """``mass [E, G] @ cost [G, G]`` for a topology cost matrix, without BLAS.

    A cost matrix is c1 between devices of one node and c2 across nodes (zero diagonal), so the product
    is row sums minus per-device and per-node sums; O(E G) and free of BLAS threading overhead.
    """
    num_devices = cost.shape[0]
    if num_devices == 1:
        return np.zeros_like(mass)
    off = cost[~np.eye(num_devices, dtype=bool)]
    c1, c2 = float(off.min()), float(off.max())
    total = mass.sum(axis=1, keepdims=True)
    out = c1 * (total - mass)
    if c2 > c1:
        same = (cost <= c1) & (cost > 0) | np.eye(num_devices, dtype=bool)
        node = np.argmax(same, axis=1)  # first device of each device's node
        if not np.array_equal(same, node[:, None] == node[None, :]) or not np.allclose(cost, np.where(same, c1, c2) * ~np.eye(num_devices, dtype=bool)):
            return np.einsum("eg,gh->eh", mass, cost)
        _, node_ids = np.unique(node, return_inverse=True)
        node_mass = group_rows(mass.T, node_ids, int(node_ids.max()) + 1).T  # [E, N]
        out += (c2 - c1) * (total - node_mass[:, node_ids])
    return out


def device_flows(pairs: np.ndarray, assign: np.ndarray, num_devices: int) -> np.ndarray:
    """[L - 1, G, G] affinity mass moving from device g at layer l to device h at layer l + 1."""
    num_layers = assign.shape[0]
    flows = np.zeros((num_layers - 1, num_devices, num_devices))
    for layer in range(num_layers - 1):
        by_src = group_rows(pairs[layer], assign[layer], num_devices)  # [G, E]
        flows[layer] = group_rows(by_src.T, assign[layer + 1], num_devices).T
    return flows


def placement_cost(pairs: np.ndarray, assign: np.ndarray, cost: np.ndarray) -> float:
    """Sum over layers and expert pairs of affinity x transition cost between their devices."""
    return float((device_flows(pairs, assign, cost.shape[0]) * cost).sum())


def layer_cost_matrix(pairs: np.ndarray, assign: np.ndarray, cost: np.ndarray, layer: int) -> np.ndarray:
    """[E, G]: cost that expert e of ``layer`` contributes when placed on device g, neighbours fixed."""
    num_devices = cost.shape[0]
    num_layers, num_experts = assign.shape
    out = np.zeros((num_experts, num_devices))
    if layer > 0:
        inflow = group_rows(pairs[layer - 1], assign[layer - 1], num_devices).T  # [E, G] mass from device h
        out += times_cost(inflow, cost)
    if layer + 1 < num_layers:
        outflow = group_rows(pairs[layer].T, assign[layer + 1], num_devices).T  # [E, G] mass to device h
        out += times_cost(outflow, cost.T)
    return out


def round_robin(num_layers: int, num_experts: int, num_devices: int) -> np.ndarray:
    """[L, E] expert e on device e % G at every layer."""
    return np.tile(np.arange(num_experts) % num_devices, (num_layers, 1))


# ----------------------------------------------------------------------------------------------------
# Per-layer moves


def _load_excess(dev_load: np.ndarray, limit: float) -> float:
    return float(np.maximum(dev_load - limit, 0.0).sum())


def improve_layer_swaps(
    layer_cost: np.ndarray,
    devices: np.ndarray,
    capacity: np.ndarray,
    expert_load: np.ndarray | None = None,
    load_limit: float | None = None,
    max_moves: int = 10_000,
) -> np.ndarray:
    """Best-improvement swaps (and moves into free slots) of one layer; repairs load first when over limit.

    layer_cost: [E, G]; devices: [E]; capacity: [G]; expert_load: [E]. Returns new [E] devices.
    """
    devices = devices.copy()
    num_experts, num_devices = layer_cost.shape
    balanced = expert_load is not None and load_limit is not None
    limit = float(load_limit) if load_limit is not None else np.inf
    w = expert_load if expert_load is not None else np.zeros(num_experts)
    idx = np.arange(num_experts)
    for _ in range(max_moves):
        current = layer_cost[idx, devices]  # [E]
        cross = layer_cost[:, devices]  # [E, E]: cost of i on j's device
        delta = cross + cross.T - current[:, None] - current[None, :]
        same = devices[:, None] == devices[None, :]
        delta[same] = np.inf
        if balanced:
            dev_load = np.bincount(devices, weights=w, minlength=num_devices)
            # load of i's device after swapping i for j, and of j's device
            gi = dev_load[devices][:, None] - w[:, None] + w[None, :]
            gj = dev_load[devices][None, :] - w[None, :] + w[:, None]
            excess = _load_excess(dev_load, limit)
            if excess > TOL:
                old_pair = np.maximum(dev_load[devices] - limit, 0.0)
                new_excess = (
                    excess
                    - old_pair[:, None]
                    - old_pair[None, :]
                    + np.maximum(gi - limit, 0.0)
                    + np.maximum(gj - limit, 0.0)
                )
                gain = excess - new_excess
                ok = (gain > TOL) & ~same
                if not ok.any():
                    break
                # cheapest cost per unit of excess removed
                score = np.where(ok, delta / np.maximum(gain, TOL) - 1e-6 * gain, np.inf)
                i, j = np.unravel_index(int(np.argmin(score)), score.shape)
                devices[i], devices[j] = devices[j], devices[i]
                continue
            delta = np.where((gi <= limit + TOL) & (gj <= limit + TOL), delta, np.inf)
        i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
        best = delta[i, j]
        # single moves into free slots
        counts = np.bincount(devices, minlength=num_devices)
        free = counts < capacity
        move_best = np.inf
        if free.any():
            move = layer_cost - current[:, None]
            move[:, ~free] = np.inf
            move[idx, devices] = np.inf
            if balanced:
                dev_load = np.bincount(devices, weights=w, minlength=num_devices)
                move[dev_load[None, :] + w[:, None] > limit + TOL] = np.inf
            mi, mg = np.unravel_index(int(np.argmin(move)), move.shape)
            move_best = move[mi, mg]
        if min(best, move_best) >= -TOL:
            break
        if move_best < best:
            devices[mi] = mg
        else:
            devices[i], devices[j] = devices[j], devices[i]
    return devices


def optimise_layer(
    pairs: np.ndarray,
    assign: np.ndarray,
    cost: np.ndarray,
    capacity: np.ndarray,
    layer: int,
    load: np.ndarray | None = None,
    load_limit: np.ndarray | None = None,
) -> np.ndarray:
    """Best devices for one layer with the others fixed: exact without balance; with it, load-feasible swaps
    from the current devices and from the unconstrained optimum (repaired), whichever ends better."""
    lc = layer_cost_matrix(pairs, assign, cost, layer)
    devices = improve_assignment(lc, assign[layer], capacity[layer])
    if load is None or load_limit is None:
        return devices
    limit = float(load_limit[layer])
    idx = np.arange(len(devices))

    def rank(d: np.ndarray) -> tuple[float, float]:
        excess = _load_excess(np.bincount(d, weights=load[layer], minlength=cost.shape[0]), limit)
        return (excess, float(lc[idx, d].sum()))

    candidates = [
        improve_layer_swaps(lc, assign[layer], capacity[layer], load[layer], limit),
        improve_layer_swaps(lc, devices, capacity[layer], load[layer], limit),
    ]
    return min(candidates, key=rank)


# ----------------------------------------------------------------------------------------------------
# Starts


def chain_start(
    pairs: np.ndarray,
    capacity: np.ndarray,
    cost: np.ndarray,
    rng: np.random.Generator,
    first: np.ndarray | None = None,
    reverse: bool = False,
    deadline: float = np.inf,
) -> np.ndarray:
    """[L, E]: a random (or given) first layer, then each next layer placed exactly against the previous one.

    With ``reverse`` the chain runs from the last layer down. Past ``deadline`` the remaining layers copy
    the previous layer's devices (expert by expert), so a plan always comes back in time.
    """
    num_layers = capacity.shape[0]
    num_experts = pairs.shape[1] if len(pairs) else int(capacity[0].sum())
    num_devices = cost.shape[0]
    order = list(range(num_layers))[::-1] if reverse else list(range(num_layers))
    assign = np.zeros((num_layers, num_experts), dtype=np.int64)
    start = order[0]
    if first is None:
        slots = np.repeat(np.arange(num_devices), capacity[start])
        first = rng.permutation(slots)[:num_experts]
    assign[start] = first
    for prev, layer in zip(order[:-1], order[1:]):
        if time.monotonic() > deadline:
            assign[layer] = assign[prev] if np.all(capacity[layer] == capacity[prev]) else assign[start]
            continue
        if layer > prev:
            lc = times_cost(group_rows(pairs[prev], assign[prev], num_devices).T, cost)  # [E, G]
        else:
            lc = times_cost(group_rows(pairs[layer].T, assign[prev], num_devices).T, cost.T)
        if num_devices > 16:  # many bins: one assignment beats many cycle cancellations from scratch
            assign[layer] = capacitated_assignment(lc, capacity[layer])
        else:
            slots = np.repeat(np.arange(num_devices), capacity[layer])[:num_experts]
            assign[layer] = improve_assignment(lc, rng.permutation(slots), capacity[layer])
    return assign


def align_labels(pairs: np.ndarray, assign: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Relabel the devices of each suffix of layers so consecutive layers agree as much as possible.

    A relabeling that keeps the node structure (nodes permuted, devices permuted inside nodes) leaves the
    suffix's own cost unchanged, so each boundary l-1 -> l is solved on its own: nodes matched by a
    node-level assignment on the transition mass, then devices inside each matched pair of nodes.
    """
    assign = assign.copy()
    num_devices = cost.shape[0]
    node = _node_ids(cost)
    num_nodes = int(node.max()) + 1
    members = [np.nonzero(node == n)[0] for n in range(num_nodes)]
    for layer in range(1, assign.shape[0]):
        flow = device_flows(pairs[layer - 1 : layer], assign[layer - 1 : layer + 1], num_devices)[0]  # [G, G]
        perm = np.arange(num_devices)  # device h at ``layer`` -> label perm[h]
        if num_nodes > 1:
            node_flow = group_rows(group_rows(flow, node, num_nodes).T, node, num_nodes)  # [N(to), N(from)]
            node_perm = linear_assignment(-node_flow)  # node m at ``layer`` -> node node_perm[m]
        else:
            node_perm = np.zeros(1, dtype=np.int64)
        for m in range(num_nodes):
            src, dst = members[node_perm[m]], members[m]
            inner = linear_assignment(-flow[np.ix_(src, dst)].T)  # device dst[i] -> src[inner[i]]
            perm[dst] = src[inner]
        if np.any(perm != np.arange(num_devices)):
            assign[layer:] = perm[assign[layer:]]
    return assign


def _node_ids(cost: np.ndarray) -> np.ndarray:
    """[G] node of each device, read off a topology cost matrix (cheapest off-diagonal cost = same node)."""
    num_devices = cost.shape[0]
    if num_devices == 1:
        return np.zeros(1, dtype=np.int64)
    off = cost[~np.eye(num_devices, dtype=bool)]
    if off.max() == off.min():
        return np.zeros(num_devices, dtype=np.int64)
    same = (cost <= off.min()) | np.eye(num_devices, dtype=bool)
    _, ids = np.unique(np.argmax(same, axis=1), return_inverse=True)
    return ids.astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Local search


@dataclass
class SearchResult:
    assign: np.ndarray  # [L, E]
    cost: float
    sweeps: int
    restarts: int
    seconds: float


def descend(
    pairs: np.ndarray,
    assign: np.ndarray,
    cost: np.ndarray,
    capacity: np.ndarray,
    load: np.ndarray | None = None,
    load_limit: np.ndarray | None = None,
    deadline: float = np.inf,
    layers: list[int] | None = None,
    max_sweeps: int = 100,
) -> tuple[np.ndarray, float, int]:
    """Block-coordinate descent: re-place whole layers until no layer improves (or the deadline)."""
    assign = assign.copy()
    num_layers = assign.shape[0]
    layers = list(range(num_layers)) if layers is None else layers
    current = placement_cost(pairs, assign, cost)
    best, best_cost = assign.copy(), current
    balanced = load is not None and load_limit is not None
    best_excess = _total_excess(assign, load, load_limit, cost.shape[0]) if balanced else 0.0
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        before = current
        order = layers if sweeps % 2 else layers[::-1]
        for layer in order:
            if time.monotonic() > deadline:
                break
            assign[layer] = optimise_layer(pairs, assign, cost, capacity, layer, load, load_limit)
        assign = align_labels(pairs, assign, cost)
        current = placement_cost(pairs, assign, cost)
        excess = _total_excess(assign, load, load_limit, cost.shape[0]) if balanced else 0.0
        if (excess, current) < (best_excess - TOL, best_cost) or (abs(excess - best_excess) <= TOL and current < best_cost):
            best, best_cost, best_excess = assign.copy(), current, excess
        if current > before - TOL * max(1.0, abs(before)) or time.monotonic() > deadline:
            break
    return best, best_cost, sweeps


def _total_excess(assign, load, load_limit, num_devices) -> float:
    """Load above the per-layer limits, summed over layers and devices (0 when balanced)."""
    return sum(
        _load_excess(np.bincount(assign[layer], weights=load[layer], minlength=num_devices), float(load_limit[layer]))
        for layer in range(assign.shape[0])
    )
