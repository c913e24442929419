"""Step schedulers of the server: which running sequences decode together in the next step.

Pure functions over small records (no torch, no model), so they are testable alone. The batcher
(``moe_engine.serve.batcher``) calls ``choose(...)`` once per decode step with every sequence that is
ready to decode and uses the returned ids as that step's batch; the others wait one step.

Why grouping saves bytes: under a budget smaller than one step's working set (default model at 25 %:
32 expert slots; a step of 4 sequences touches ~6 of 16 experts in each of 8 layers), an LRU cache on
the cyclic layer order keeps almost nothing from one step to the next, so a step loads about every
distinct expert it touches, and bytes per output token = distinct experts per step / sequences per step.
Putting sequences whose next tokens go to the same experts into one step cuts the distinct count; and
when a step's experts overlap the previous step's, some are still resident.

Glossary:
    ready sequence: prefilled, not finished, waiting for its next token.
    step cap: at most this many sequences decode in one step (``--step-seqs``).
    predicted experts: per sequence, the ``(moe_layer, expert)`` pairs its next step will likely use.
        The batcher asks ``TokenRoutes`` for the routing last seen for the sequence's pending token id
        (known before the step runs); for an id not seen yet, the pairs its own last token used.
    waited: decode steps a ready sequence has been left out of, in a row (round robin's order).
    lag: tokens a sequence is behind its fair share. Each step every ready sequence earns
        ``min(cap, n) / n`` (``n`` ready) and a chosen one pays 1 (``next_lag``); with a fixed set of
        ready sequences round robin keeps every lag within (-1, 1). expert_aware takes a sequence first
        once it is ``max_wait`` tokens behind; a waiting sequence's lag grows every step, so none
        starves, and its latency stays near round robin's. Bounding the lag, not the wait in a row, is
        what keeps p95 latency in check: a sequence skipped often, but never long in a row, would
        otherwise fall far behind.

Policies (``SCHEDULERS``):
    ``fcfs``: the longest-waiting first, then the oldest arrival (first come, first served; with a cap
        below the number of ready sequences this is round robin).
    ``expert_aware``: sequences ``max_wait`` or more tokens behind first, most behind first; then an
        anchor (the most behind); then, one at a time, the candidate that adds the fewest predicted
        experts that are neither already in the step nor resident in the cache (ties: fewest new
        experts in the step, then most behind). A step always takes ``min(cap, n)`` sequences.

Measured (``python -m moe_engine.benchmarks.serve_eval --parts scheduling``; default model, 25 %, LRU,
step cap 4, 16 clients x 3 requests): see the README's serving section and
``benchmarks/results/serve_eval.json``.

Example::

    seqs = [SeqView(1, 0, 0, frozenset({(0, 1), (1, 3)})), SeqView(2, 1, 0, frozenset({(0, 5), (1, 6)})),
            SeqView(3, 2, 0, frozenset({(0, 1), (1, 3)}))]
    choose("expert_aware", seqs, cap=2, resident=frozenset(), max_wait=4)  # -> [1, 3]
    choose("fcfs", seqs, cap=2, resident=frozenset(), max_wait=4)          # -> [1, 2]
"""

from __future__ import annotations

import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

ExpertKey = tuple[int, int]


class TokenRoutes:
    """The routing last seen for each token id: predicts the experts of a sequence's next step.

    A decode step feeds each sequence its pending token, whose id is known before the step runs. In
    small MoEs routing depends mostly on the token itself (token-level specialisation): on the default
    model, the experts a token id was routed to the last time it was seen recall 0.81 of the experts a
    decode step uses, against 0.19 for the sequence's own previous token (0.125 by chance; the
    ``prediction`` part of ``moe_engine.benchmarks.serve_eval``). The batcher records every real token
    it forwards (prompt and generated) and asks for the pending token's route.

    Memory: at most ``max_tokens`` ids (least recently recorded dropped), each one array of 32-bit
    ``(layer, expert)`` pairs: 4 bytes x 2 x MoE layers x top-k (128 bytes on the default model).
    """

    def __init__(self, max_tokens: int = 16384) -> None:
        if max_tokens < 1:
            raise ValueError(f"TokenRoutes needs room for at least one token id, got max_tokens={max_tokens}")
        self.max_tokens = max_tokens
        self._routes: OrderedDict[int, array.array] = OrderedDict()

    def __len__(self) -> int:
        return len(self._routes)

    def record(self, token: int, route: Iterable[tuple[int, Iterable[int]]]) -> None:
        """Remember ``route`` (``(moe_layer, expert ids)`` per layer) as ``token``'s latest routing."""
        flat = array.array("I")
        for layer, experts in route:
            for e in experts:
                flat.extend((layer, e))
        self._routes[token] = flat
        self._routes.move_to_end(token)
        if len(self._routes) > self.max_tokens:
            self._routes.popitem(last=False)

    def predict(self, token: int | None, fallback: frozenset[ExpertKey]) -> frozenset[ExpertKey]:
        """``token``'s last routing as ``(moe_layer, expert)`` pairs; ``fallback`` for an id never seen."""
        flat = self._routes.get(token) if token is not None else None
        if flat is None:
            return fallback
        return frozenset(zip(flat[0::2], flat[1::2], strict=True))


@dataclass(frozen=True)
class SeqView:
    """What a scheduler sees of one ready sequence."""

    seq_id: int
    arrival: int  # admission order (smaller = earlier)
    waited: int  # decode steps left out in a row
    predicted: frozenset[ExpertKey]  # (moe_layer, expert) its next step will likely use; may be empty
    lag: float = 0.0  # tokens behind its fair share (``next_lag``); 0 when it became ready


def next_lag(lag: float, ready: int, cap: int, chosen: bool) -> float:
    """A sequence's lag after a step with ``ready`` ready sequences and step cap ``cap``.

    Every ready sequence earns its fair share of the step's ``min(cap, ready)`` tokens; a chosen one
    received a token. When a step takes ``min(cap, ready)`` sequences, the lags of the ready sequences
    sum to what they summed to before."""
    assert ready >= 1 and cap >= 1, (ready, cap)
    return lag + min(cap, ready) / ready - (1.0 if chosen else 0.0)


def _by_wait(s: SeqView) -> tuple[int, int]:
    return (-s.waited, s.arrival)


def _by_lag(s: SeqView) -> tuple[float, int]:
    return (-s.lag, s.arrival)


def choose_fcfs(seqs: Sequence[SeqView], cap: int, resident: frozenset[ExpertKey], max_wait: int) -> list[int]:
    """The ``cap`` sequences that waited longest (ties: earliest arrival)."""
    del resident, max_wait  # FCFS ignores experts; waiting is bounded by the order itself
    return [s.seq_id for s in sorted(seqs, key=_by_wait)[:cap]]


def _cost(s: SeqView, union: set[ExpertKey], resident: frozenset[ExpertKey]) -> tuple[int, int, float, int]:
    new = s.predicted - union
    return (len(new - resident), len(new), -s.lag, s.arrival)


_EPS = 1e-9  # lags are sums of fractions like 4/15: compare with a little slack


def choose_expert_aware(
    seqs: Sequence[SeqView], cap: int, resident: frozenset[ExpertKey], max_wait: int
) -> list[int]:
    """Group sequences whose predicted experts overlap (and are resident); none falls ``max_wait`` behind."""
    ordered = sorted(seqs, key=_by_lag)
    if len(ordered) <= cap:
        return [s.seq_id for s in ordered]
    # Step 1: sequences max_wait or more tokens behind their fair share go first, most behind first.
    chosen = [s for s in ordered if s.lag >= max_wait - _EPS][:cap]
    # Step 2: none forced: the most behind anchors the step.
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
