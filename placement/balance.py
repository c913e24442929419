"""EPLB-style load split: how many of a replicated expert's tokens each of its copies serves.

Pure numpy over counts; ``placement.plan.token_devices`` applies it layer by layer (the one route
rule), so the runtime, ``evaluate_plan`` and the projection all split the same way.

Glossary:
    base load: per device, the (token, slot) entries of one layer that a device must serve whatever the
        split (experts without replicas);
    quota: per copy of a replicated expert, how many of that expert's entries it serves.

Rule (deterministic): replicated experts in descending entry count (ties: lower expert id) pour their
entries into their copies' devices like water: the least-loaded device first, up to a common level;
the integer remainder goes to the least-loaded copies (ties: the order of the copy list). Then, in the
same order, each expert's entries are taken out and poured again given the others', a few rounds, so a
device whose neighbours were filled first is not stranded. A hot expert whose copies sit on equally
loaded devices is thus split evenly, the copies' counts differing by at most one.

Example::

    quotas = fill_quotas(np.array([5, 0]), {3: (np.array([0, 1]), 7)})
    quotas[3].tolist()   # [1, 6]: device 1 catches up with device 0, the rest is halved
"""

from __future__ import annotations

import numpy as np


def level_fill(loads: np.ndarray, amount: int, prefer: np.ndarray | None = None) -> np.ndarray:
    """Integer split of ``amount`` over bins with current ``loads [C]`` that evens the bins out: [C] ints.
    The remainder goes to the least-filled bins; ties to the most ``prefer [C]`` (e.g. entries preferring
    the bin), then to the lower position."""
    loads = np.asarray(loads, dtype=np.int64)
    num = len(loads)
    if num == 0:
        raise ValueError("level_fill needs at least one bin")
    quota = np.zeros(num, dtype=np.int64)
    if amount <= 0:
        return quota
    order = np.argsort(loads, kind="stable")
    sorted_loads = loads[order]
    # lowest level h (integer) such that sum(max(0, h - load)) >= amount
    level = int(sorted_loads[0])
    for i in range(num):
        needed = amount - int(np.maximum(level - sorted_loads, 0).sum())
        if i + 1 == num or needed <= (i + 1) * (int(sorted_loads[i + 1]) - level):
            level += needed // (i + 1)  # the first i + 1 bins rise together
            break
        level = int(sorted_loads[i + 1])
    quota = np.maximum(level - loads, 0)
    rest = amount - int(quota.sum())
    # remainder: one more each for the least-filled bins (ties: most preferred, then position)
    pref = np.zeros(num) if prefer is None else -np.asarray(prefer, dtype=np.float64)
    for i in np.lexsort((np.arange(num), pref, loads + quota))[:rest]:
        quota[i] += 1
    return quota


def fill_quotas(base_load: np.ndarray, experts: dict[int, tuple[np.ndarray, int]], rounds: int = 8,
                prefer: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Quotas per copy. base_load: [G] entries already on each device; experts: expert -> (copy devices
    [C], entries); prefer: expert -> [C] entries preferring each copy (breaks ties). Returns expert -> [C]
    entries each copy serves (summing to the expert's entries). A first greedy pass, then up to ``rounds``
    passes re-pouring each expert given the others."""
    load = np.asarray(base_load, dtype=np.int64).copy()
    out: dict[int, np.ndarray] = {}
    order = sorted(experts, key=lambda x: (-experts[x][1], x))
    for e in order:
        devices, count = experts[e]
        quota = level_fill(load[np.asarray(devices)], int(count), (prefer or {}).get(e))
        load[np.asarray(devices)] += quota
        out[e] = quota
    # refine: each expert in turn re-poured given the others (a greedy first pass can strand a device whose
    # copies were filled before its own load was known), until nothing moves
    for _ in range(rounds):
        moved = False
        for e in order:
            devices = np.asarray(experts[e][0])
            load[devices] -= out[e]
            quota = level_fill(load[devices], int(experts[e][1]), (prefer or {}).get(e))
            load[devices] += quota
            moved |= not np.array_equal(quota, out[e])
            out[e] = quota
        if not moved:
            break
    return out


def assign_to_quotas(score: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """[N] copy index for N entries given their preference ``score [N, C]`` and ``quota [C]`` (sum N).

    Entries in order each take their best-scored copy while it has quota; the rest then take, in order,
    their best-scored copy among those with quota left.
    """
    num, num_copies = score.shape
    left = np.asarray(quota, dtype=np.int64).copy()
    if left.sum() != num:
        raise ValueError(f"quotas sum to {left.sum()} for {num} entries")
    choice = np.full(num, -1, dtype=np.int64)
    first = np.argmax(score, axis=1)
    for c in range(num_copies):
        rows = np.nonzero(first == c)[0][: left[c]]
        choice[rows] = c
        left[c] -= len(rows)
    for i in np.nonzero(choice < 0)[0]:
        s = np.where(left > 0, score[i], -np.inf)
        c = int(np.argmax(s))
        choice[i] = c
        left[c] -= 1
    return choice
