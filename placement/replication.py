"""Replicas of hot experts in spare slots, chosen for affinity and load, with per-source routes.

With E + R slots per layer on G devices, R slots are left after the primaries. Each spare slot on device
g takes the copy that helps most: pairs arriving at expert e from device g (previous layer's affinity
mass) become local, corrected for where the switching tokens go next; with balance on, relieving an
overloaded expert's device counts too, and so does giving every device room to pass load on (the first
copy of a hot expert whose device has little replicated load). A slot stays empty when no copy helps.
A token prefers the copy where most of its previous-layer experts are, and a replicated expert's tokens
are split across its copies by load (see placement.plan, placement.balance); the route table names the
preferred copy for each source device: local, else the nearest (same node first), else the least-loaded.

Example::

    replicas = add_replicas(assign, aff.pairs, aff.load, capacity, Topology(8))
    replicas[3][17].route[5]   # device whose copy of expert 17 (layer 3) serves tokens from device 5
"""

from __future__ import annotations

import numpy as np
from moe_engine.placement.plan import Replica
from moe_engine.placement.search import group_rows
from moe_engine.placement.topology import Topology

# With balance on, the share of a mean device load that each device should be able to pass on to other
# copies (load of its primaries that have a replica). 0.5 kept held-out max/mean device load <= 1.13 on the
# shared traces with two spare slots per device (benchmarks/ep_projection.py); affinity alone left 1.3-2.4.
SHED_SHARE = 0.5


def add_replicas(
    assign: np.ndarray,
    pairs: np.ndarray,
    load: np.ndarray,
    capacity: np.ndarray,
    topology: Topology,
    balance: float | None = None,
) -> dict[int, dict[int, Replica]]:
    """Fill spare slots with replicas. assign: [L, E]; pairs: [L-1, E, E]; load: [L, E]; capacity: [L, G]."""
    num_layers, num_experts = assign.shape
    num_devices = topology.num_devices
    cost = topology.cost_matrix()
    out: dict[int, dict[int, Replica]] = {}
    for layer in range(num_layers):
        spare = capacity[layer] - np.bincount(assign[layer], minlength=num_devices)
        if spare.sum() <= 0:
            continue
        # tokens of expert e arriving from device g: previous layer's affinity mass, scaled to tokens
        if layer > 0:
            inflow = group_rows(pairs[layer - 1], assign[layer - 1], num_devices).T  # [E, G]
        else:
            inflow = np.repeat(load[layer][:, None] / num_devices, num_devices, axis=1)
        row = inflow.sum(axis=1, keepdims=True)
        from_share = np.divide(inflow, row, out=np.full_like(inflow, 1.0 / num_devices), where=row > 0)
        tokens_from = from_share * load[layer][:, None]  # [E, G]
        # affinity gain of a copy of e on g: the pairs arriving from g become local, and the tokens that
        # switch (a share from_share[e, g] of e's tokens) leave for the next layer from g instead of e's
        # primary device
        pair_gain = inflow.copy()
        if layer + 1 < num_layers:
            outflow = group_rows(pairs[layer].T, assign[layer + 1], num_devices).T  # [E, G] mass to device h
            primary_out = outflow[np.arange(num_experts), assign[layer]]
            pair_gain += from_share * (outflow - primary_out[:, None])
        copies = {e: [int(assign[layer, e])] for e in range(num_experts)}
        served = tokens_from.copy()  # tokens of e served per source device: routed below
        dev_load = np.bincount(assign[layer], weights=load[layer], minlength=num_devices)
        mean_load = dev_load.mean()
        pairs_per_token = float(inflow.sum() / max(load[layer].sum(), 1e-12)) if layer > 0 else 1.0
        while spare.sum() > 0:
            # affinity gain: tokens from g that currently leave g to reach e
            has_copy = np.zeros((num_experts, num_devices), dtype=bool)
            for e, devs in copies.items():
                has_copy[e, devs] = True
            gain = np.where(has_copy, -np.inf, pair_gain)
            gain[:, spare <= 0] = -np.inf
            if balance is not None:
                # load term, in pair units: relieve the busiest serving device of expert e
                overload = np.array([max(dev_load[devs].max() - mean_load, 0.0) for devs in (copies[e] for e in range(num_experts))])
                # and shedding room: a device whose primaries have no copy elsewhere cannot pass on load when
                # held-out routing overloads it; the first copy of an expert gives its primary's device room
                shed = np.zeros(num_devices)
                for e, devs in copies.items():
                    if len(devs) > 1:
                        shed[devs[0]] += load[layer][e]
                single = np.array([len(copies[e]) == 1 for e in range(num_experts)])
                wanted = np.maximum(SHED_SHARE * mean_load - shed[assign[layer]], 0.0)
                relief = np.minimum(load[layer] / 2, overload) + np.where(single, np.minimum(load[layer], wanted), 0.0)
                gain = np.where(np.isfinite(gain), gain + pairs_per_token * relief[:, None], gain)
            if not np.isfinite(gain).any() or gain.max() <= 0:
                break  # no copy helps: leave the slots empty
            e_pick, g_pick = np.unravel_index(int(np.argmax(gain)), gain.shape)
            e, g = int(e_pick), int(g_pick)
            copies[e].append(g)
            spare[g] -= 1
            dev_load = _serve(copies, served, load[layer], assign[layer], cost, num_devices)
        reps = {}
        for e, devs in copies.items():
            if len(devs) > 1:
                route = _routes(devs, cost, dev_load)
                reps[e] = Replica(tuple(devs), tuple(route))
        if reps:
            out[layer] = reps
    return out


def _routes(devs: list[int], cost: np.ndarray, dev_load: np.ndarray) -> list[int]:
    """Copy used by tokens from each device: local, else cheapest transition, else least-loaded device."""
    devs_arr = np.asarray(devs)
    route = []
    for g in range(cost.shape[0]):
        c = cost[g, devs_arr]
        cands = devs_arr[c == c.min()]
        route.append(int(cands[np.argmin(dev_load[cands])]))
    return route


def _serve(copies, tokens_from, load, primary, cost, num_devices):
    """Device loads when each expert's tokens follow the routes of its copies."""
    dev_load = np.bincount(primary, weights=load, minlength=num_devices).astype(np.float64)
    for e, devs in copies.items():
        if len(devs) == 1:
            continue
        dev_load[devs[0]] -= load[e]
        route = _routes(devs, cost, dev_load)
        np.add.at(dev_load, route, tokens_from[e])
    return dev_load
