"""Exact linear assignment in numpy (no scipy): the block move of the local search.

``linear_assignment(cost [n, m])`` (n <= m) returns, for each row, the column of a minimum-cost matching
(shortest augmenting paths with potentials, Jonker-Volgenant style, one vectorised Dijkstra per row).
``capacitated_assignment(cost [E, G], capacity [G])`` puts each of E items on one of G bins, at most
``capacity[g]`` items in bin g, at minimum total cost: a transportation problem, solved exactly as an
assignment onto the expanded slot list.

Example::

    linear_assignment(np.array([[4., 1.], [2., 0.]]))        # array([1, 0])
    capacitated_assignment(np.zeros((4, 2)), np.array([2, 2]))  # two items per bin
"""

from __future__ import annotations

import numpy as np


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost matching of every row to a distinct column. cost: [n, m] with n <= m -> [n] int."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    assert n <= m, f"need rows <= columns, got {cost.shape}"
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.all(np.isfinite(cost)):
        raise ValueError("assignment costs must be finite")
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    row_of_col = np.zeros(m + 1, dtype=np.int64)  # 1-based row matched to column j (0: free); column 0 is virtual
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of_col[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of_col[j0]
            free = ~used
            free[0] = False
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free[1:] & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            masked = np.where(free, minv, np.inf)
            j1 = int(np.argmin(masked))
            delta = masked[j1]
            u[row_of_col[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if row_of_col[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            row_of_col[j0] = row_of_col[j1]
            j0 = j1
    col_of_row = np.empty(n, dtype=np.int64)
    cols = np.nonzero(row_of_col[1:])[0]
    col_of_row[row_of_col[1:][cols] - 1] = cols
    return col_of_row


def capacitated_assignment(cost: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Bin of each item at minimum total cost with at most capacity[g] items in bin g.

    cost: [E, G] cost of item e in bin g; capacity: [G] ints with sum >= E. Returns [E] bin ids.
    """
    cost = np.asarray(cost, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.int64)
    num_items, num_bins = cost.shape
    assert capacity.shape == (num_bins,), f"capacity must be [{num_bins}], got {capacity.shape}"
    if capacity.sum() < num_items:
        raise ValueError(f"{num_items} items do not fit in {int(capacity.sum())} slots")
    # An item never needs more than E slots of one bin.
    slots = np.repeat(np.arange(num_bins), np.minimum(capacity, num_items))
    cols = linear_assignment(cost[:, slots])
    return slots[cols]


def improve_assignment(
    cost: np.ndarray, bins: np.ndarray, capacity: np.ndarray, max_cycles: int = 100_000
) -> np.ndarray:
    """Optimal capacitated assignment reached from a feasible one by cancelling negative cycles.

    An item moving from bin g to bin h changes the cost by ``cost[x, h] - cost[x, g]``; the cheapest such
    item per (g, h) gives a G x G move graph (plus a virtual node for free slots). A negative cycle in it is
    a cyclic exchange of items that lowers the cost and keeps every bin within capacity; none left means
    optimal (min-cost flow optimality). Fast when started near the optimum, as in local search.

    cost: [E, G]; bins: [E] feasible start; capacity: [G]. Returns [E] bins.
    """
    cost = np.asarray(cost, dtype=np.float64)
    bins = np.asarray(bins, dtype=np.int64).copy()
    capacity = np.asarray(capacity, dtype=np.int64)
    num_items, num_bins = cost.shape
    items = np.arange(num_items)
    scale = max(1.0, float(np.abs(cost).max()))
    tol = 1e-9 * scale
    nodes = num_bins + 1  # node num_bins: free slots
    for _ in range(max_cycles):
        counts = np.bincount(bins, minlength=num_bins)
        if np.any(counts > capacity):
            raise ValueError("improve_assignment needs a start within capacity")
        delta = cost - cost[items, bins][:, None]  # [E, G] change when item x moves to bin h
        order = np.argsort(bins, kind="stable")
        weights = np.full((nodes, nodes), np.inf)
        filled = counts > 0
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[filled]
        weights[:num_bins][filled, :num_bins] = np.minimum.reduceat(delta[order], starts, axis=0)
        np.fill_diagonal(weights, np.inf)
        weights[num_bins, :num_bins] = 0.0  # the free-slot node feeds any bin's leaving item
        weights[:num_bins, num_bins] = np.where(counts < capacity, 0.0, np.inf)  # arriving in a free slot
        cycle = _negative_cycle(weights, tol)
        if cycle is None:
            return bins
        moves = []
        for g, h in zip(cycle, cycle[1:] + cycle[:1]):
            if g == num_bins or h == num_bins:
                continue
            on_g = np.nonzero(bins == g)[0]
            moves.append((on_g[int(np.argmin(delta[on_g, h]))], h))
        for x, h in moves:
            bins[x] = h
    return bins


def _negative_cycle(weights: np.ndarray, tol: float) -> list[int] | None:
    """Nodes of a negative cycle of a dense [n, n] weight matrix (inf: no edge), or None (Bellman-Ford)."""
    n = weights.shape[0]
    dist = np.zeros(n)
    pred = np.full(n, -1, dtype=np.int64)
    changed_node = -1
    for _ in range(n + 1):
        cand = dist[:, None] + weights  # [from, to]
        best_from = np.argmin(cand, axis=0)
        best = cand[best_from, np.arange(n)]
        improved = best < dist - tol
        if not improved.any():
            return None
        dist = np.where(improved, best, dist)
        pred = np.where(improved, best_from, pred)
        changed_node = int(np.nonzero(improved)[0][0])
    # n + 1 rounds still relaxing: walking n predecessors from a relaxed node lands on a cycle
    node = changed_node
    for _ in range(n):
        node = int(pred[node])
    cycle = [node]
    nxt = int(pred[node])
    while nxt != node:
        cycle.append(nxt)
        nxt = int(pred[nxt])
    cycle.reverse()  # pred points backwards; return in edge direction
    if sum(weights[g, h] for g, h in zip(cycle, cycle[1:] + cycle[:1])) >= -tol:
        return None  # numerically flat
    return cycle
