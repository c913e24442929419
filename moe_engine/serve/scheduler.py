"""Step schedulers of the server: which running sequences decode together in the next step.

Pure functions over small records (no torch, no model), so they are testable alone. The batcher
(``moe_engine.serve.batcher``) calls ``choose(...)`` once per decode step with every sequence that is
ready to decode and uses the returned ids as that step's batch; the others wait one step.

Glossary:
    ready sequence: prefilled, not finished, waiting for its next token.
    step cap: at most this many sequences decode in one step (``--step-seqs``).
    predicted experts: per sequence, the ``(moe_layer, expert)`` pairs its last token was routed to
        (the router's last choices, recorded by a forward pre-hook on each experts module). Consecutive
        tokens of one sequence reuse experts often, so this predicts the next step's experts.
    waited: decode steps a ready sequence has been left out of, in a row. With ``n`` ready sequences
        and a cap of ``c``, round robin leaves each out ``ceil(n / c) - 1`` steps in a row; expert_aware
        may leave one out ``max_wait`` steps longer, then takes it first (bounded waiting: no starvation).

Policies (``SCHEDULERS``):
    ``fcfs``: the longest-waiting first, then the oldest arrival (first come, first served; with a cap
        below the number of ready sequences this is round robin).
    ``expert_aware``: sequences at the waiting bound first; then an anchor (the longest waiting); then,
        one at a time, the candidate that adds the fewest predicted experts that are neither already in
        the step nor resident in the cache (ties: fewest new experts in the step, then longest waiting).
        So a step touches fewer distinct experts and reuses resident ones: fewer bytes move per token.

Example::

    seqs = [SeqView(1, 0, 0, frozenset({(0, 1), (1, 3)})), SeqView(2, 1, 0, frozenset({(0, 5), (1, 6)})),
            SeqView(3, 2, 0, frozenset({(0, 1), (1, 3)}))]
    choose("expert_aware", seqs, cap=2, resident=frozenset(), max_wait=4)  # -> [1, 3]
    choose("fcfs", seqs, cap=2, resident=frozenset(), max_wait=4)          # -> [1, 2]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

ExpertKey = tuple[int, int]


@dataclass(frozen=True)
class SeqView:
    """What a scheduler sees of one ready sequence."""

    seq_id: int
    arrival: int  # admission order (smaller = earlier)
    waited: int  # decode steps left out in a row
    predicted: frozenset[ExpertKey]  # (moe_layer, expert) of its last token; empty before its first step


def _by_wait(s: SeqView) -> tuple[int, int]:
    return (-s.waited, s.arrival)


def choose_fcfs(seqs: Sequence[SeqView], cap: int, resident: frozenset[ExpertKey], max_wait: int) -> list[int]:
    """The ``cap`` sequences that waited longest (ties: earliest arrival)."""
    del resident, max_wait  # FCFS ignores experts; waiting is bounded by the order itself
    return [s.seq_id for s in sorted(seqs, key=_by_wait)[:cap]]


def _cost(s: SeqView, union: set[ExpertKey], resident: frozenset[ExpertKey]) -> tuple[int, int, int, int]:
    new = s.predicted - union
    return (len(new - resident), len(new), -s.waited, s.arrival)


def choose_expert_aware(
    seqs: Sequence[SeqView], cap: int, resident: frozenset[ExpertKey], max_wait: int
) -> list[int]:
    """Group sequences whose predicted experts overlap (and are resident), bounded waiting first."""
    if len(seqs) <= cap:
        return [s.seq_id for s in sorted(seqs, key=_by_wait)]
    # Step 1: sequences at the waiting bound go first, longest waiting first.
    bound = -(-len(seqs) // cap) - 1 + max_wait  # round robin's wait, plus max_wait
    ordered = sorted(seqs, key=_by_wait)
    chosen = [s for s in ordered if s.waited >= bound][:cap]
    # Step 2: no forced sequence: the longest waiting one anchors the step.
    if not chosen:
        chosen = [ordered[0]]
    union: set[ExpertKey] = set()
    for s in chosen:
        union |= s.predicted
    rest = [s for s in ordered if s not in chosen]
    # Step 3: greedily add the candidate that loads the fewest experts.
    while len(chosen) < cap and rest:
        best = min(rest, key=lambda s: _cost(s, union, resident))
        rest.remove(best)
        chosen.append(best)
        union |= best.predicted
    return [s.seq_id for s in chosen]


SCHEDULERS: dict[str, Callable[[Sequence[SeqView], int, frozenset[ExpertKey], int], list[int]]] = {
    "fcfs": choose_fcfs,
    "expert_aware": choose_expert_aware,
}


def choose(policy: str, seqs: Sequence[SeqView], cap: int, resident: frozenset[ExpertKey], max_wait: int) -> list[int]:
    """Ids of the sequences that decode in the next step (at most ``cap``, at least one if any are ready)."""
    if policy not in SCHEDULERS:
        raise ValueError(f"unknown scheduling policy {policy!r}; choose one of {sorted(SCHEDULERS)}")
    if cap < 1:
        raise ValueError(f"the step cap must be at least 1, got {cap}")
    return SCHEDULERS[policy](seqs, cap, resident, max_wait)
