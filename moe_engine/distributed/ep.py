"""Expert parallelism: one MoE layer's experts split across the ranks of a torch.distributed group.

This module owns the per-layer data flow (dispatch / combine with ``all_to_all_single``), which rank
serves each (token, expert) pair, the plan check against the model, and the per-rank counters.

Execution model (replicated context). Every rank loads the whole non-expert model (embeddings,
attention, norms, routers, shared experts, LM head) and runs it on every token, so every rank holds
the whole context, as ExFlow's context-coherent scheme assumes, and every rank's ``generate()`` stays
in lockstep (same routing, same tokens, no collective outside the MoE layers). Only the routed experts
are split: rank r computes the (token, expert) pairs whose expert copy lives on r; the other ranks'
rows reach it through ``all_to_all_single`` with uneven splits (gloo on CPU, NCCL on CUDA). Every
rank then holds every weighted row of the layer, in (token, slot) order, and reduces them exactly as
the model's ``experts_implementation`` does (``grouped_mm``: ``view(T, K, H).sum(1)``; ``eager``: from
zeros, in ascending expert order), so the result equals the single-process engine's (fp32 logits within
1e-5; only the GEMM row blocking can differ, since a rank computes a subset of an expert's rows).

Glossary (shapes): T tokens in the call, K top-k slots, S = T * K pairs (flat index s = t * K + k), H
hidden size, G world size, r this rank. *serving rank* of a pair: the device of the expert copy the
plan's route rule (``moe_engine.placement.plan.split_by_load`` = ``token_devices``, the one
implementation; a hot replicated expert's tokens split across its copies by load, EPLB-style, over the
tokens of each forward call) picks for it; without a plan, round-robin (expert e on rank e % G). *home rank* of a token: ``t_global % G``, where
``t_global`` counts tokens since the model was loaded (the prefill's tokens, then one per decode step
for batch 1), the same numbering ``token_devices`` uses for a trace of the same tokens.

Modes:

* ``standard`` (DeepSpeed-MoE style, two all-to-alls per MoE layer): *dispatch* sends each pair's hidden
  row from the token's home rank to its serving rank (the serving rank computes from the received rows);
  *combine* sends every computed weighted row to every other rank (the home rank needs it for its token,
  and every rank keeps the whole context).
* ``coherent`` (ExFlow's context-coherent expert parallelism, one all-to-all per MoE layer): the serving
  rank already holds every token's hidden state, so there is no dispatch; the one all-to-all sends every
  computed weighted row to every other rank, which is also what delivers a token from the ranks of its
  layer-l expert copies to the ranks of its layer-(l+1) copies.

Token regrouping (``regroup=True``, standard mode): a token's home is t % G only before the first MoE
layer; afterwards it is the rank the cross-layer gate (layer l+1's router applied to layer l's router
input, ``predictors/gate.py``) predicts to serve the token's first slot at layer l+1, through the plan's
route rule. The combine already reaches every rank, so moving the home costs nothing, and the next
dispatch stays on-rank wherever the prediction holds: fewer dispatch rows and bytes. Results are unchanged
(the rows are the same, only their source rank changes). In ``coherent`` mode there is no dispatch to
regroup: every token is already on every rank before it is needed.

Counters (``EPStats``, per rank, per MoE layer): all-to-all calls, messages (non-empty cross-rank
splits sent), bytes sent to other ranks (rows x H x element size; a rank's rows to itself never touch
the wire), rows sent to other ranks, seconds inside collectives (``comm``) and computing experts
(``compute``), and *tokens sent across ranks*:

    ``cross_pairs[l]`` (l >= 1) counts, on the receiving rank, the (token, layer-(l-1) copy k, layer-l
    copy k') handoffs where copy k' is served here and copy k was computed on another rank: the row of
    copy k came over the wire from that rank (in layer l-1's last all-to-all) and copy k' consumes it.
    Summed over ranks and divided by ``T * (L - 1) * K * K`` this is exactly ``moe-engine plan-eval``'s
    ``cross_device_share`` (pairs of consecutive-layer expert copies on different devices, K x K per
    token) for the same tokens, because both come from ``token_devices`` (with replicas: when plan-eval
    is given the same calls, since the load split is over each call's tokens).

Example::

    ep = ExpertParallel.attach(model, plan=load_plan("plan.json"), mode="coherent")  # inside a process group
    model.generate(ids, max_new_tokens=8)
    ep.stats().summary()
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from moe_engine.runtime.interrupts import deferred_interrupts, interruptible
from moe_engine.runtime.kernels import ExpertsKernel, _EagerPlan, _GroupedPlan

MODES = ("standard", "coherent")


class PlanMismatchError(ValueError):
    """A placement plan does not fit the model or the process group."""


class RankFailedError(RuntimeError):
    """A collective failed: another rank died or the group timed out. Every rank stops."""


# ----------------------------------------------------------------------------------------------- counters


@dataclass
class EPStats:
    """Per-rank counters since the last reset; lists are indexed by MoE layer."""

    rank: int
    world_size: int
    mode: str
    tokens: int = 0  # tokens through MoE layer 0
    a2a_calls: list[int] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    rows_sent: list[int] = field(default_factory=list)
    cross_pairs: list[int] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)  # T * K * K at layers >= 1 (the plan-eval denominator)
    comm_seconds: float = 0.0
    compute_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        t = max(self.tokens, 1)
        return (
            f"rank {self.rank}/{self.world_size} ({self.mode}): {self.tokens} tokens, "
            f"{sum(self.a2a_calls)} all-to-alls ({sum(self.a2a_calls) / t:.1f}/token), "
            f"{sum(self.bytes_sent)} B sent ({sum(self.bytes_sent) / t:.0f} B/token), "
            f"{sum(self.cross_pairs)} cross-rank token handoffs, "
            f"comm {self.comm_seconds:.3f} s, compute {self.compute_seconds:.3f} s"
        )


@dataclass(frozen=True)
class GroupStats:
    """Every rank's ``EPStats`` together (``ExpertParallel.gather_stats``)."""

    ranks: tuple[EPStats, ...]

    @property
    def tokens(self) -> int:
        return self.ranks[0].tokens

    @property
    def cross_device_share(self) -> float:
        """Tokens sent across ranks as a share of consecutive-layer copy pairs (plan-eval's metric)."""
        pairs = sum(self.ranks[0].pairs)
        return sum(sum(s.cross_pairs) for s in self.ranks) / max(pairs, 1)

    @property
    def cross_pairs(self) -> int:
        return sum(sum(s.cross_pairs) for s in self.ranks)

    def per_token(self) -> dict[str, float]:
        t = max(self.tokens, 1)
        return {
            "a2a_calls_per_token": sum(sum(s.a2a_calls) for s in self.ranks) / len(self.ranks) / t,
            "bytes_per_token": sum(sum(s.bytes_sent) for s in self.ranks) / t,
            "messages_per_token": sum(sum(s.messages) for s in self.ranks) / t,
            "rows_per_token": sum(sum(s.rows_sent) for s in self.ranks) / t,
            "cross_pairs_per_token": self.cross_pairs / t,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "cross_device_share": self.cross_device_share,
            "cross_pairs": self.cross_pairs,
            **self.per_token(),
            "comm_seconds_max": max(s.comm_seconds for s in self.ranks),
            "compute_seconds_max": max(s.compute_seconds for s in self.ranks),
            "ranks": [s.to_json() for s in self.ranks],
        }


# ------------------------------------------------------------------------------------------------- plans


def check_plan(plan, *, num_layers: int, num_experts: int, world_size: int, decoder_layers: list[int] | None = None):
    """Refuse a ``moe-placement/1`` plan that does not fit the model (MoE layers, experts) or the group."""
    problems = []
    if plan.num_layers != num_layers:
        problems.append(f"{plan.num_layers} MoE layers but the model has {num_layers}")
    if plan.num_experts != num_experts:
        problems.append(f"{plan.num_experts} experts per layer but the model has {num_experts}")
    if plan.num_devices != world_size:
        problems.append(f"{plan.num_devices} devices but the process group has {world_size} ranks")
    moe_layers = tuple(plan.moe_layers or ())
    if decoder_layers is not None and moe_layers and moe_layers not in (tuple(decoder_layers), tuple(range(num_layers))):
        problems.append(f"MoE layers at decoder layers {list(moe_layers)} but the model's are {decoder_layers}")
    if problems:
        raise PlanMismatchError(
            "the placement plan does not fit: it has " + "; ".join(problems) + ". Make a plan for this model "
            f"and world size with `moe-engine trace` on this model, then `moe-engine plan --devices {world_size}`, "
            "or run without --plan (round-robin)"
        )


def _cross_layer_gate(model):
    """The cross-layer gate predictor over the model's own routers (as the engine's prefetch builds it)."""
    from moe_engine.runtime.adapters import get_adapter
    from moe_engine.runtime.loader import _build_predictor

    return _build_predictor("cross_layer_gate", model, get_adapter(model.config))


def _round_robin(num_layers: int, num_experts: int, world_size: int):
    from moe_engine.placement.plan import round_robin_plan

    return round_robin_plan(num_layers, num_experts, world_size)


# ---------------------------------------------------------------------------------------------- the layer


class ExpertParallel:
    """Expert-parallel MoE layers for one offloaded model on one rank of a process group.

    Attach with ``ExpertParallel.attach(model, ...)``: every ``OffloadedExperts`` module of the model then
    calls ``experts_forward`` here instead of the engine's. This rank's experts stay behind the model's
    own engine cache and budget (``model.engine``); only owned experts are ever requested from it.
    """

    def __init__(self, model, *, plan=None, mode: str = "standard", group=None, regroup: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"ep mode {mode!r} is not one of {MODES}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "expert parallelism needs an initialised torch.distributed process group: launch with "
                "`torchrun --nproc-per-node N -m moe_engine.distributed ...` or call "
                "torch.distributed.init_process_group first"
            )
        self.model = model
        self.engine = model.engine
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.mode = mode
        layers = self.engine.layers
        self.num_layers = len(layers)
        self.num_experts = layers[0].num_experts
        if plan is None:
            plan = _round_robin(self.num_layers, self.num_experts, self.world_size)
        check_plan(plan, num_layers=self.num_layers, num_experts=self.num_experts, world_size=self.world_size,
                   decoder_layers=[i.decoder_layer for i in layers])  # fmt: skip
        self.plan = plan
        self._owned = [set(experts) for experts in self.owned_experts()]
        self.regroup = regroup
        self._gate = _cross_layer_gate(model) if regroup and mode == "standard" else None
        self._next_home: np.ndarray | None = None  # [T] regrouped home ranks for the next layer
        self.lock = threading.RLock()
        self._next_token = 0  # tokens seen at MoE layer 0 since load: the global token numbering
        self._base = 0
        self._hist: np.ndarray | None = None  # [T, L, K] routing of the current forward pass
        self._prev_dev: np.ndarray | None = None  # [T, K] serving ranks at the previous layer
        self.recorded: list[np.ndarray] | None = None  # per forward pass [T, L, K], when recording
        self.reset_stats()

    # ------------------------------------------------------------------ setup
    @classmethod
    def attach(cls, model, *, plan=None, mode: str = "standard", group=None, regroup: bool = False) -> ExpertParallel:
        from moe_engine.runtime.adapters import moe_blocks

        ep = cls(model, plan=plan, mode=mode, group=group, regroup=regroup)
        from moe_engine.runtime.engine import OffloadedExperts

        for _, block in moe_blocks(model):
            experts = block.experts
            if not isinstance(experts, OffloadedExperts):
                raise TypeError("expert parallelism attaches to a model loaded with moe_engine.from_pretrained")
            experts.attach(cast(Any, ep))  # it has Engine.experts_forward's contract, all the module calls
        model.expert_parallel = ep
        return ep

    def owned_experts(self) -> list[list[int]]:
        """Per MoE layer, the experts with a copy on this rank (primaries and replicas)."""
        copies = self.plan.copy_table()  # [L, E, C]
        return [sorted(int(e) for e in np.nonzero((copies[layer] == self.rank).any(axis=1))[0])
                for layer in range(self.num_layers)]  # fmt: skip

    def record(self, on: bool = True) -> None:
        """Keep each forward pass's routing ``[T, L, K]`` in ``self.recorded`` (for measurements)."""
        self.recorded = [] if on else None

    # ------------------------------------------------------------------ stats
    def reset_stats(self) -> None:
        n = self.num_layers
        self._stats = EPStats(self.rank, self.world_size, self.mode, a2a_calls=[0] * n, messages=[0] * n,
                              bytes_sent=[0] * n, rows_sent=[0] * n, cross_pairs=[0] * n, pairs=[0] * n)  # fmt: skip

    def stats(self) -> EPStats:
        return self._stats

    def gather_stats(self) -> GroupStats:
        """Every rank's counters (a collective: call it on every rank)."""
        out: list[Any] = [None] * self.world_size
        self._guard(lambda: dist.all_gather_object(out, self._stats, group=self.group), "gathering stats")
        return GroupStats(tuple(out))

    # ------------------------------------------------------------------ routing
    def _serving_ranks(self, layer: int, top_k_index: torch.Tensor) -> np.ndarray:
        """[T, K] rank serving each pair at ``layer``: the route rule on the pass's routing so far, with the
        global token numbering."""

        ids = top_k_index.detach().to("cpu", torch.int64).numpy()
        T, K = ids.shape
        if layer == 0 or self._hist is None or self._hist.shape[0] != T:
            self._base = self._next_token
            self._next_token += T
            self._hist = np.broadcast_to(np.arange(K), (T, self.num_layers, K)).copy()  # future layers: filler
            self._prev_dev = None
        self._hist[:, layer] = ids
        if layer == self.num_layers - 1 and self.recorded is not None:
            self.recorded.append(self._hist.copy())
        return self._devices(self._hist, layer)

    def _devices(self, hist: np.ndarray, layer: int) -> np.ndarray:
        """The plan's route rule (``placement.plan.split_by_load``, i.e. ``token_devices``) at ``layer`` for
        routing ``hist [T, L, K]``, tokens numbered from ``self._base``. Layers after ``layer`` hold filler:
        the rule runs layer by layer, so layer l's devices depend on layers <= l only. A replicated expert's
        tokens are split across its copies by load over the T tokens of this call."""
        from moe_engine.placement.plan import split_by_load

        return split_by_load(self.plan, hist, first_token=self._base)[:, layer]

    def _predict_homes(self, layer: int, hidden_states: torch.Tensor) -> np.ndarray:
        """[T] rank predicted to serve each token's first slot at ``layer + 1``: the cross-layer gate
        (layer l+1's router on layer l's router input) gives the predicted top-k, the plan's route rule
        the rank."""
        from moe_engine.predictors.base import PredictionContext

        assert self._gate is not None and self._hist is not None
        K = self._hist.shape[2]
        ctx = PredictionContext(layer=layer, history=torch.as_tensor(self._hist[:, : layer + 1]), gate_input=hidden_states)
        predicted = self._gate.scores(ctx, 1).topk(K, dim=-1).indices.cpu().numpy()  # [T, K]
        hist = self._hist.copy()
        hist[:, layer + 1] = predicted
        return self._devices(hist, layer + 1)[:, 0]

    # ------------------------------------------------------------------ communication
    def _guard(self, fn, what: str):
        try:
            return fn()
        except RuntimeError as exc:  # gloo: connection closed / timeout; NCCL: watchdog or remote error
            detail = " ".join(str(exc).split())[:300]
            raise RankFailedError(
                f"moe-engine expert parallelism, rank {self.rank} of {self.world_size}: {what} failed, another "
                f"rank has died or stopped answering ({detail}); every rank stops. Check the other ranks' "
                "output for the first error"
            ) from exc

    def _all_to_all(self, layer: int, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """``all_to_all_single`` with uneven splits; counts what leaves this rank."""
        recv = send.new_empty((sum(recv_counts), send.shape[1]))
        send = send.contiguous()
        t0 = time.perf_counter()
        self._guard(
            lambda: dist.all_to_all_single(recv, send, recv_counts, send_counts, group=self.group),
            f"the all-to-all of MoE layer {layer}",
        )
        if send.is_cuda:
            torch.cuda.current_stream(send.device).synchronize()  # so comm time is the collective's, not compute's
        self._stats.comm_seconds += time.perf_counter() - t0
        st = self._stats
        st.a2a_calls[layer] += 1
        others = [c for g, c in enumerate(send_counts) if g != self.rank]
        st.messages[layer] += sum(1 for c in others if c)
        st.rows_sent[layer] += sum(others)
        st.bytes_sent[layer] += sum(others) * send.shape[1] * send.element_size()
        return recv

    # ------------------------------------------------------------------ compute
    def _expert_rows(self, layer: int, kernel: ExpertsKernel, rows: torch.Tensor, experts: torch.Tensor,
                     weights: torch.Tensor, num_experts: int) -> torch.Tensor:  # fmt: skip
        """Weighted expert outputs ``[m, H]`` of ``m`` (row, expert, weight) pairs, one slot each, computed
        with the model's kernel and this rank's engine cache (stock's per-expert ops and dtypes)."""
        t0 = time.perf_counter()
        plan = kernel.plan(rows, experts[:, None], weights[:, None], num_experts)
        foreign = set(plan.experts) - self._owned[layer]
        if foreign:  # the route rule picked a copy this rank does not hold: a plan/runtime inconsistency
            raise RuntimeError(f"rank {self.rank} was routed experts {sorted(foreign)} of MoE layer {layer}, which the plan "
                               "does not place on it")  # fmt: skip
        engine = self.engine
        with deferred_interrupts(), engine.lock, interruptible():  # see Engine's _serialized
            if engine.closed:
                from moe_engine.runtime.engine import ModelClosedError

                raise ModelClosedError("this moe-engine model was closed; load it again to use it")
            engine.stream_layer(layer)  # a prefill's loads leave this rank's decode working set alone
            for e, gate_up, down in engine.cache.iter_experts(layer, plan.experts):
                plan.compute(e, gate_up, down)
        dtype = torch.promote_types(rows.dtype, weights.dtype)
        if isinstance(plan, _GroupedPlan):
            out = plan.out if plan.out is not None else rows.new_zeros((rows.shape[0], rows.shape[1]), dtype=dtype)
        elif isinstance(plan, _EagerPlan):
            out = rows.new_zeros((rows.shape[0], rows.shape[1]), dtype=dtype)
            for token_idx, current in plan.outputs.values():
                out[token_idx] = current.to(dtype)
        else:  # pragma: no cover - a kernel added without an EP path
            raise NotImplementedError(f"expert parallelism has no row extraction for the {kernel.name} kernel")
        self._stats.compute_seconds += time.perf_counter() - t0
        return out

    @staticmethod
    def _reduce(kernel: ExpertsKernel, rows: torch.Tensor, top_k_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Weighted rows ``[S, H]`` in (token, slot) order -> ``[T, H]``, summed as the kernel does."""
        T, K = top_k_index.shape
        rows3 = rows.view(T, K, rows.shape[-1])
        if kernel.name == "grouped_mm":
            return rows3.sum(dim=1).to(dtype)
        # eager: index_add_ into zeros, one expert at a time in ascending order
        order = torch.argsort(top_k_index, dim=1, stable=True)
        final = torch.zeros((T, rows.shape[-1]), dtype=dtype, device=rows.device)
        ar = torch.arange(T, device=rows.device)
        for j in range(K):
            final += rows3[ar, order[:, j]].to(dtype)
        return final

    # ------------------------------------------------------------------ the MoE layer
    def experts_forward(self, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor, kernel: ExpertsKernel, num_experts: int) -> torch.Tensor:  # fmt: skip
        """Same contract as ``Engine.experts_forward``, computed across the group (every rank calls it)."""
        with deferred_interrupts(), self.lock, interruptible(), torch.no_grad():  # see Engine's _serialized
            return self._forward(layer, hidden_states, top_k_index, top_k_weights, kernel, num_experts)

    def _forward(self, layer, hidden_states, top_k_index, top_k_weights, kernel, num_experts) -> torch.Tensor:
        G, r = self.world_size, self.rank
        T, K = top_k_index.shape
        H = hidden_states.shape[-1]
        dev = self._serving_ranks(layer, top_k_index)  # [T, K]
        st = self._stats
        if layer == 0:
            st.tokens += T
        # tokens sent across ranks: handoffs from the previous layer's copies to the copies served here
        if self._prev_dev is not None:
            mine = dev == r  # [T, K]
            remote_prev = (self._prev_dev != r).sum(axis=1)  # [T] previous-layer copies computed elsewhere
            st.cross_pairs[layer] += int((mine.sum(axis=1) * remote_prev).sum())
            st.pairs[layer] += T * K * K
        self._prev_dev = dev
        serve = dev.reshape(-1)  # [S]
        flat_idx = top_k_index.reshape(-1)
        flat_w = top_k_weights.reshape(-1)
        device = hidden_states.device
        mine_s = np.nonzero(serve == r)[0]  # pairs served here, ascending s
        mine_t = torch.as_tensor(mine_s, device=device)

        if self.mode == "standard":
            # dispatch: home rank -> serving rank, hidden rows, ordered by (destination, s)
            # home: data-parallel owner t % G, or (regrouped) the rank predicted at the previous layer
            regrouped = layer > 0 and self._next_home is not None and len(self._next_home) == T
            home = self._next_home if regrouped else (self._base + np.arange(T)) % G
            self._next_home = None
            if self._gate is not None and layer + 1 < self.num_layers:
                # the combine of this layer sends each token to the rank it is predicted to need next
                self._next_home = self._predict_homes(layer, hidden_states)
            assert home is not None
            home_s = np.repeat(home, K)
            out_s = np.nonzero(home_s == r)[0]
            out_s = out_s[np.argsort(serve[out_s], kind="stable")]
            send_counts = np.bincount(serve[out_s], minlength=G).tolist()
            in_s = mine_s[np.argsort(home_s[mine_s], kind="stable")]  # arrival order: by source, then s
            recv_counts = np.bincount(home_s[mine_s], minlength=G).tolist()
            send = hidden_states[torch.as_tensor(out_s // K, device=device)]
            recv = self._all_to_all(layer, send, send_counts, recv_counts)
            rows = recv.new_empty((len(mine_s), H))
            pos = np.searchsorted(mine_s, in_s)  # where each arriving row goes in ascending-s order
            rows[torch.as_tensor(pos, device=device)] = recv
        else:
            # context-coherent: every rank holds every token's hidden state, no dispatch
            rows = hidden_states[torch.as_tensor(mine_s // K, device=device)]

        computed = self._expert_rows(layer, kernel, rows, flat_idx[mine_t], flat_w[mine_t], num_experts)
        # combine: every computed row to every other rank (homes and next-layer copies included)
        send_counts = [0 if g == r else len(mine_s) for g in range(G)]
        counts = np.bincount(serve, minlength=G)
        recv_counts = [0 if g == r else int(counts[g]) for g in range(G)]
        send = computed.repeat(G - 1, 1) if G > 1 else computed[:0]
        recv = self._all_to_all(layer, send, send_counts, recv_counts)
        full = computed.new_empty((T * K, H))
        full[mine_t] = computed
        order = np.argsort(serve, kind="stable")  # arrival order: by source rank, then s
        others = order[serve[order] != r]
        full[torch.as_tensor(others, device=device)] = recv
        return self._reduce(kernel, full, top_k_index, hidden_states.dtype)
