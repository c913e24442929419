"""Learned expert predictors: a small network trained on routing traces, CPU-trainable in minutes.

Two registered variants share one network:

* ``mlp_history`` (``inputs = "history"``): reads only expert ids, so it works on traces recorded
  without gate inputs;
* ``mlp_gate`` (``inputs = "gate_input"``): also reads the current layer's router input.

What the network sees when MoE layer ``l`` of a token has been routed, to score layer ``l + d``:

1. the token's path: its experts at the ``recent_layers`` latest layers ``l, l-1, ...`` (an embedding per
   (layer, expert), summed);
2. path matches: among the earlier tokens of the same sequence (at most ``copy_window`` back), the
   ``copy_matches`` tokens whose experts at layers ``0..l`` overlap the token's the most. Text repeats
   (a word, a name, a template), and a repeated token follows the same expert path, so the matches'
   experts at layer ``l + d`` are strong evidence. They enter as embeddings keyed by (match rank,
   similarity bucket, expert) and as a direct logit bonus learned per (rank, similarity bucket), so the
   network learns how far to trust a match of a given quality and falls back on the path when none is good;
3. (``mlp_gate``) the gate input of layer ``l``, RMS-normalised, through a linear map into the hidden
   layer, and through a per-(target layer, distance) linear map straight to logits (a learned
   cross-layer gate);
4. embeddings of the target layer and of the distance ``d``.

Their sum goes through ``ReLU -> Linear -> ReLU`` and a per-target-layer output head ``[H, E]``. Training
minimises softmax cross-entropy against the K true experts, on all distances at once, with early stopping
on held-out sequences of the training traces (recall@K at distance 1).

Calibration: on text unlike its training data the network's own logits lose more than the path matches
do (a repeated token repeats its path whatever the domain), but a network trained on some domains
learns to trust its own logits as much as they deserve there. So with two or more training traces the
last one is held out whole: the network trains on the others, then a per-distance scale of its logits
and the direct match bonus are refitted on the held-out trace with the network frozen. (With one trace,
held-out sequences of it serve.) On the shared traces, leave-one-domain-out, this lifts next-layer
recall@6 by several points over the uncalibrated network.

Shapes: T tokens, L MoE layers, K experts per token, E experts per layer, M path matches, S similarity
buckets, H hidden width, Hg gate-input width.

Example::

    pred = HistoryMLP.fit([law, summary, translation])  # calibrated on translation
    pred.trace_scores(intent, distance=1)       # [T, L - 1, E]
    pred.save("mlp.pt"); pred = make_predictor("mlp_history", path="mlp.pt")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moe_engine.predictors.base import PredictionContext, Predictor, TraceLike, register_predictor
from torch import nn

_NO_MATCH = -1


@dataclass(frozen=True)
class LearnedConfig:
    """Architecture and training settings of a learned predictor."""

    use_gate_input: bool = False
    hidden: int = 256
    recent_layers: int = 3  # how many latest layers of the token's own path are read
    copy_matches: int = 2  # M: earlier tokens whose paths match best
    copy_window: int = 256  # how far back in the sequence matches are looked for
    sim_buckets: int = 8  # S
    distances: tuple[int, ...] = (1, 2, 3)
    epochs: int = 3
    batch_tokens: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # share of each training trace's sequences held out for early stopping
    patience: int = 1  # epochs without a better held-out recall before stopping
    calibrate: bool = True  # fit logit scale and match bonus on the last training trace, held out
    seed: int = 0
    threads: int = 0  # torch threads while training (0: leave torch's setting alone)

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.recent_layers < 1 or self.copy_matches < 0 or self.sim_buckets < 1:
            raise ValueError("hidden, recent_layers and sim_buckets must be >= 1, copy_matches >= 0")
        if not self.distances or min(self.distances) < 1:
            raise ValueError(f"distances must be a non-empty tuple of ints >= 1, got {self.distances}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")


# ---------------------------------------------------------------------------------------------- features
def _multi_hot(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[..., K]`` ids -> ``[..., E]`` float32 multi-hot."""
    return torch.zeros(*ids.shape[:-1], num_experts).scatter_(-1, ids.long(), 1.0)


def path_matches(
    history: torch.Tensor, prev: torch.Tensor, num_experts: int, matches: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-matching earlier tokens for each token and layer.

    ``history [T, Lh, K]``: the tokens' experts at layers ``0..Lh-1``; ``prev [P, Lp, K]`` with
    ``Lp >= Lh``: earlier tokens (oldest first), all of them earlier than every token of ``history``.
    Returns ``index [T, Lh, M]`` (row of ``prev``, ``-1`` where none) and ``sim [T, Lh, M]``: the share
    of the token's experts at layers ``0..l`` that the match also chose there. Ties go to the most recent.
    """
    T, Lh, K = history.shape
    P = prev.shape[0]
    M = min(matches, P)
    idx = torch.full((T, Lh, matches), _NO_MATCH, dtype=torch.long)
    sim = torch.zeros(T, Lh, matches)
    if M == 0 or T == 0:
        return idx, sim
    a = _multi_hot(history, num_experts)  # [T, Lh, E]
    b = _multi_hot(prev[:, :Lh], num_experts)  # [P, Lh, E]
    overlap = torch.einsum("tle,ple->tpl", a, b).cumsum(-1)  # [T, P, Lh]
    overlap = overlap / (K * torch.arange(1, Lh + 1))
    # Recency tie-break: later rows win among equal overlaps.
    ranked = overlap + torch.linspace(0, 1e-4, P)[None, :, None]
    top = ranked.topk(M, dim=1)  # over P
    idx[..., :M] = top.indices.permute(0, 2, 1)
    sim[..., :M] = overlap.gather(1, top.indices).permute(0, 2, 1)
    return idx, sim


def trace_path_matches(
    expert_ids: torch.Tensor, sequence_starts: np.ndarray, num_experts: int, matches: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``path_matches`` for every token of a trace against the earlier tokens of its own sequence.

    Returns ``index [T, L, M]`` (absolute trace rows, ``-1`` where none) and ``sim [T, L, M]``.
    """
    T, L, _ = expert_ids.shape
    idx = torch.full((T, L, matches), _NO_MATCH, dtype=torch.long)
    sim = torch.zeros(T, L, matches)
    chunk = 128
    for s in range(len(sequence_starts) - 1):
        lo, hi = int(sequence_starts[s]), int(sequence_starts[s + 1])
        for c0 in range(lo + 1, hi, chunk):
            c1 = min(hi, c0 + chunk)
            p0 = max(lo, c0 - window)
            prev = expert_ids[p0:c1]  # candidates: window before the chunk, plus the chunk itself
            cur = expert_ids[c0:c1]
            a = _multi_hot(cur, num_experts)  # [C, L, E]
            b = _multi_hot(prev, num_experts)  # [P, L, E]
            overlap = torch.einsum("tle,ple->tpl", a, b).cumsum(-1) / (expert_ids.shape[2] * torch.arange(1, L + 1))
            rows = torch.arange(c0, c1)[:, None]
            cand = torch.arange(p0, c1)[None, :]
            valid = (cand < rows) & (cand >= rows - window)  # strictly earlier, inside the window
            ranked = overlap + torch.linspace(0, 1e-4, cand.shape[1])[None, :, None]
            ranked = ranked.masked_fill(~valid[:, :, None], -1.0)
            M = min(matches, cand.shape[1])
            top = ranked.topk(M, dim=1)
            ok = top.values.permute(0, 2, 1) >= 0
            got = (top.indices + p0).permute(0, 2, 1)
            idx[c0:c1, :, :M] = torch.where(ok, got, torch.full_like(got, _NO_MATCH))
            sim[c0:c1, :, :M] = torch.where(ok, overlap.gather(1, top.indices).permute(0, 2, 1), torch.zeros(()))
    return idx, sim


# ---------------------------------------------------------------------------------------------- network
class _Net(nn.Module):
    """See the module docstring. Inputs are built by ``LearnedPredictor._batch``."""

    def __init__(self, cfg: LearnedConfig, num_layers: int, num_experts: int, gate_width: int) -> None:
        super().__init__()
        L, E, H, M, S = num_layers, num_experts, cfg.hidden, max(cfg.copy_matches, 1), cfg.sim_buckets
        self.cfg, self.L, self.E = cfg, L, E
        self.path = nn.EmbeddingBag(L * E, H, mode="sum")
        self.copy = nn.EmbeddingBag(M * S * E + 1, H, mode="sum", padding_idx=M * S * E)
        self.copy_bonus = nn.Parameter(torch.zeros(M, S))
        # Per-distance scale of the network's own logits: 1 while training, set by calibration.
        self.logit_scale = nn.Parameter(torch.ones(max(cfg.distances) + 1), requires_grad=False)
        self.target = nn.Embedding(L, H)
        self.dist = nn.Embedding(max(cfg.distances) + 1, H)
        self.gate = nn.Linear(gate_width, H) if cfg.use_gate_input else None
        # A learned cross-layer gate: per (target layer, distance), a linear map from the gate input
        # straight to logits (zero at start), beside the hidden-layer path.
        self.gate_head = (
            nn.Parameter(torch.zeros(gate_width, L * (max(cfg.distances) + 1) * E)) if cfg.use_gate_input else None
        )
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(H, H), nn.ReLU())
        self.head = nn.Parameter(torch.randn(L, H, E) * H**-0.5)
        self.head_bias = nn.Parameter(torch.zeros(L, E))
        for emb in (self.path, self.copy, self.target, self.dist):
            nn.init.normal_(emb.weight, std=0.05)
        with torch.no_grad():
            self.copy.weight[-1].zero_()

    def base_logits(
        self,
        path: torch.Tensor,  # [N, R * K] ids into path embedding (layer * E + expert), R recent layers
        path_w: torch.Tensor,  # [N, R * K] 1 for real entries, 0 for padding (layers before 0)
        copy: torch.Tensor,  # [N, M * K] ids into copy embedding (padding index where no match)
        target: torch.Tensor,  # [N] target layer
        distance: torch.Tensor,  # [N]
        gate: torch.Tensor | None,  # [N, Hg] or None
    ) -> torch.Tensor:
        """``[N, E]`` the network's logits before scaling and the direct match bonus."""
        h = self.path(path, per_sample_weights=path_w) + self.copy(copy) + self.target(target) + self.dist(distance)
        direct = None
        if self.gate is not None:
            assert gate is not None and self.gate_head is not None, "this predictor reads gate inputs"
            g = gate / gate.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            h = h + self.gate(g)
            per_pair = (g @ self.gate_head).view(g.shape[0], self.L, -1, self.E)  # [N, L, D + 1, E]
            direct = per_pair[torch.arange(g.shape[0]), target, distance]
        h = self.body(h)
        logits = torch.einsum("nh,nhe->ne", h, self.head[target]) + self.head_bias[target]
        return logits if direct is None else logits + direct

    def combine(
        self,
        base: torch.Tensor,  # [N, E] from base_logits
        copy_hot: torch.Tensor,  # [N, M, E] multi-hot of each match's experts at the target layer
        copy_bucket: torch.Tensor,  # [N, M] similarity bucket (0 when no match)
        distance: torch.Tensor,  # [N]
    ) -> torch.Tensor:
        logits = self.logit_scale[distance][:, None] * base
        if self.cfg.copy_matches:
            M = copy_hot.shape[1]
            bonus = self.copy_bonus[torch.arange(M)[None, :], copy_bucket]  # [N, M]
            logits = logits + (bonus[:, :, None] * copy_hot).sum(1)
        return logits

    def forward(self, path, path_w, copy, copy_hot, copy_bucket, target, distance, gate) -> torch.Tensor:
        base = self.base_logits(path, path_w, copy, target, distance, gate)
        return self.combine(base, copy_hot, copy_bucket, distance)


# ---------------------------------------------------------------------------------------------- predictor
class LearnedPredictor(Predictor):
    """Base of ``mlp_history`` and ``mlp_gate``; build with ``fit`` or ``load`` (or ``make_predictor(name,
    path=...)``)."""

    net: _Net
    config: LearnedConfig
    num_layers: int
    gate_width: int
    train_history: dict[str, Any]

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        net: _Net | None = None,
        config: LearnedConfig | None = None,
        num_layers: int = 0,
        num_experts: int = 0,
        gate_width: int = 0,
        history: dict[str, Any] | None = None,
    ) -> None:
        if path is not None:
            other: LearnedPredictor = type(self).load(path)
            net, config = other.net, other.config
            num_layers, num_experts, gate_width = other.num_layers, other.num_experts, other.gate_width
            history = other.train_history
        if net is None or config is None:
            raise ValueError(f"{self.name}: give a saved model path, or build one with {type(self).__name__}.fit")
        if config.use_gate_input != (self.inputs == "gate_input"):
            raise ValueError(f"{self.name}: the saved model was trained with use_gate_input={config.use_gate_input}")
        self.net = net.eval()
        self.config = config
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.gate_width = gate_width
        self.train_history = history or {}
        self.uses_prev_tokens = config.copy_matches > 0
        self.prev_window = config.copy_window

    # ------------------------------------------------------------------ inputs
    def _batch(
        self,
        ids: torch.Tensor,  # [T, L', K] experts of the tokens (at least layers 0..max source layer)
        match_idx: torch.Tensor,  # [T, L', M] rows of `pool` (or -1)
        match_sim: torch.Tensor,  # [T, L', M]
        pool: torch.Tensor,  # [P, L, K] expert ids the matches index into
        layers: torch.Tensor,  # [N] source layer of each example
        rows: torch.Tensor,  # [N] token of each example (row of ids)
        distance: torch.Tensor,  # [N]
        gate: torch.Tensor | None,  # [T, L', Hg] or None
    ) -> dict[str, Any]:
        cfg, E = self.config, self.num_experts
        K = ids.shape[2]
        R = cfg.recent_layers
        src = layers[:, None] - torch.arange(R)[None, :]  # [N, R]
        valid = src >= 0
        src_c = src.clamp_min(0)
        path = src_c[:, :, None] * E + ids[rows[:, None], src_c]  # [N, R, K]
        path_w = valid[:, :, None].expand_as(path).float()
        target = layers + distance
        M = max(cfg.copy_matches, 1)
        S = cfg.sim_buckets
        pad = M * S * E
        if cfg.copy_matches:
            midx = match_idx[rows, layers]  # [N, M]
            msim = match_sim[rows, layers]
            has = midx >= 0
            bucket = torch.where(has, (msim * S).long().clamp(0, S - 1), torch.zeros((), dtype=torch.long))
            mexp = pool[midx.clamp_min(0), target[:, None]]  # [N, M, K]
            copy = (torch.arange(M)[None, :, None] * S + bucket[:, :, None]) * E + mexp
            copy = torch.where(has[:, :, None], copy, torch.full_like(copy, pad))
            copy_hot = _multi_hot(mexp, E) * has[:, :, None]
        else:
            n = rows.shape[0]
            copy = torch.full((n, K), pad, dtype=torch.long)
            copy_hot = torch.zeros(n, 1, E)
            bucket = torch.zeros(n, 1, dtype=torch.long)
        return {
            "path": path.reshape(path.shape[0], -1),
            "path_w": path_w.reshape(path.shape[0], -1),
            "copy": copy.reshape(copy.shape[0], -1),
            "copy_hot": copy_hot,
            "copy_bucket": bucket,
            "target": target,
            "distance": distance,
            "gate": None if gate is None else gate[rows, layers],
        }

    # ------------------------------------------------------------------ scoring
    def scores(self, ctx: PredictionContext, distance: int) -> torch.Tensor:
        L = self.num_layers
        if not 1 <= distance or ctx.layer + distance >= L:
            raise ValueError(f"layer {ctx.layer} + distance {distance} is past the last MoE layer ({L - 1})")
        if self.inputs == "gate_input" and ctx.gate_input is None:
            raise ValueError(f"{self.name} needs the gate input of the current layer")
        hist = ctx.history.long().cpu()
        T = hist.shape[0]
        M = self.config.copy_matches
        prev = ctx.prev_tokens
        if M and prev is not None and prev.shape[0] > 0:
            prev = prev[-self.config.copy_window :].long().cpu()
            midx, msim = path_matches(hist, prev, self.num_experts, M)
            pool = prev
        else:
            midx = torch.full((T, ctx.layer + 1, max(M, 1)), _NO_MATCH, dtype=torch.long)
            msim = torch.zeros(T, ctx.layer + 1, max(M, 1))
            pool = torch.zeros(1, L, hist.shape[2], dtype=torch.long)
        gate = None
        if self.inputs == "gate_input":
            assert ctx.gate_input is not None
            g = ctx.gate_input.float().cpu()  # [T, Hg]
            gate = g[:, None].expand(T, ctx.layer + 1, g.shape[-1])
        rows = torch.arange(T)
        layers = torch.full((T,), ctx.layer, dtype=torch.long)
        dist = torch.full((T,), distance, dtype=torch.long)
        with torch.no_grad():
            return self.net(**self._batch(hist, midx, msim, pool, layers, rows, dist, gate))

    def _trace_inputs(self, trace: TraceLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        ids = torch.as_tensor(np.asarray(trace.expert_ids, dtype=np.int64))
        cfg = self.config
        if cfg.copy_matches:
            midx, msim = trace_path_matches(ids, np.asarray(trace.sequence_starts), self.num_experts, cfg.copy_matches, cfg.copy_window)
        else:
            midx = torch.full((*ids.shape[:2], 1), _NO_MATCH, dtype=torch.long)
            msim = torch.zeros(*ids.shape[:2], 1)
        gate = None
        if self.inputs == "gate_input":
            if trace.gate_inputs is None:
                raise ValueError(f"{self.name} needs a trace with gate_inputs (record with --gate-inputs)")
            gate = torch.as_tensor(np.asarray(trace.gate_inputs, dtype=np.float32))
        return ids, midx, msim, gate

    def trace_scores(self, trace: TraceLike, distance: int) -> np.ndarray:
        ids, midx, msim, gate = self._trace_inputs(trace)
        return self._trace_scores(ids, midx, msim, gate, distance)

    def _trace_scores(self, ids, midx, msim, gate, distance: int, rows_subset: torch.Tensor | None = None) -> np.ndarray:
        T, L, _ = ids.shape
        if L != self.num_layers:
            raise ValueError(f"the trace has {L} MoE layers, the model {self.num_layers}")
        rows_all = torch.arange(T) if rows_subset is None else rows_subset
        n = L - distance
        out = np.zeros((len(rows_all), n, self.num_experts), dtype=np.float32)
        self.net.eval()
        with torch.no_grad():
            for c0 in range(0, len(rows_all), 256):
                r = rows_all[c0 : c0 + 256]
                rows = r.repeat_interleave(n)
                layers = torch.arange(n).repeat(len(r))
                dist = torch.full_like(rows, distance)
                logits = self.net(**self._batch(ids, midx, msim, ids, layers, rows, dist, gate))
                out[c0 : c0 + len(r)] = logits.reshape(len(r), n, -1).numpy()
        return out

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(
        cls,
        traces: Sequence[TraceLike],
        config: LearnedConfig | None = None,
        log: Callable[[str], None] | None = None,
        **options: Any,
    ) -> LearnedPredictor:
        """Train on ``traces`` (held-out sequences of each for early stopping); ``options`` override
        fields of ``LearnedConfig``."""
        if not traces:
            raise ValueError("no training traces given")
        cfg = replace(config or LearnedConfig(), use_gate_input=cls.inputs == "gate_input", **options)
        if isinstance(cfg.distances, list):
            cfg = replace(cfg, distances=tuple(cfg.distances))
        L = int(traces[0].expert_ids.shape[1])
        E = max(int(t.num_experts) for t in traces)
        gate_width = 0
        if cfg.use_gate_input:
            if any(t.gate_inputs is None for t in traces):
                raise ValueError(f"{cls.name} trains on traces with gate_inputs (record with --gate-inputs)")
            gate_width = int(traces[0].gate_inputs.shape[-1])  # type: ignore[union-attr]
        old_threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            torch.manual_seed(cfg.seed)
            net = _Net(cfg, L, E, gate_width)
            pred = cls(net=net, config=cfg, num_layers=L, num_experts=E, gate_width=gate_width)
            pred._train(traces, log or (lambda s: None))
        finally:
            torch.set_num_threads(old_threads)
        return pred

    def _train(self, traces: Sequence[TraceLike], log: Callable[[str], None]) -> None:
        cfg = self.config
        calib_trace = None
        if cfg.calibrate and len(traces) >= 2:
            # Calibrate on a whole trace the network never saw: on a new domain the network's own
            # logits are less reliable than in training while path matches are as good as ever.
            calib_trace, traces = traces[-1], traces[:-1]
        train_parts, val_parts = [], []
        for tr in traces:
            starts = np.asarray(tr.sequence_starts)
            n_seq = len(starts) - 1
            n_val = int(round(n_seq * cfg.val_fraction)) if n_seq > 1 else 0
            cut = int(starts[n_seq - n_val])
            inputs = self._trace_inputs(tr)
            train_parts.append((inputs, np.arange(0, cut)))
            if n_val:
                val_parts.append((inputs, np.arange(cut, int(starts[-1]))))
        # One pool of tokens: concatenate per-trace tensors, shifting match rows.
        ids, midx, msim, gate, train_rows, val_rows = _concat_parts(train_parts, val_parts)
        L = self.num_layers
        pairs = [(layer, d) for d in cfg.distances for layer in range(L - d)]
        pl = torch.tensor([p[0] for p in pairs])
        pd = torch.tensor([p[1] for p in pairs])
        net = self.net.train()
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = (len(train_rows) + cfg.batch_tokens - 1) // cfg.batch_tokens
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch), pct_start=0.1
        )
        best, best_state, bad = -1.0, None, 0
        hist: dict[str, Any] = {"epochs": []}
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed)
        for epoch in range(cfg.epochs):
            net.train()
            perm = train_rows[torch.randperm(len(train_rows), generator=gen)]
            total = 0.0
            for b0 in range(0, len(perm), cfg.batch_tokens):
                r = perm[b0 : b0 + cfg.batch_tokens]
                rows = r.repeat_interleave(len(pairs))
                layers = pl.repeat(len(r))
                dist = pd.repeat(len(r))
                logits = net(**self._batch(ids, midx, msim, ids, layers, rows, dist, gate))
                target = _multi_hot(ids[rows, layers + dist], self.num_experts)
                loss = -(torch.log_softmax(logits, -1) * target).sum(-1).mean() / ids.shape[2]
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
            net.eval()
            val = self._recall(ids, midx, msim, gate, val_rows) if len(val_rows) else float("nan")
            rec = {"epoch": epoch, "loss": total / steps_per_epoch, "val_recall_d1": val, "seconds": time.perf_counter() - t0}
            hist["epochs"].append(rec)
            log(f"{self.name} epoch {epoch}: loss {rec['loss']:.4f} held-out recall@K(d=1) {val:.4f} ({rec['seconds']:.0f} s)")
            if not len(val_rows):
                continue
            if val > best:
                best, bad = val, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
                if bad > cfg.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        hist["best_val_recall_d1"] = best
        self.net = net.eval()
        if cfg.calibrate:
            if calib_trace is not None:
                c_ids, c_midx, c_msim, c_gate = self._trace_inputs(calib_trace)
                c_rows = torch.arange(c_ids.shape[0])
                hist["calibrated_on"] = "held-out trace"
            else:
                c_ids, c_midx, c_msim, c_gate, c_rows = ids, midx, msim, gate, val_rows
                hist["calibrated_on"] = "held-out sequences"
            if len(c_rows):
                before, after = self._calibrate(c_ids, c_midx, c_msim, c_gate, c_rows)
                hist["calibration_recall_d1"] = [before, after]
                log(f"{self.name} calibration: recall@K(d=1) on the calibration set {before:.4f} -> {after:.4f}")
        self.train_history = hist

    def _calibrate(self, ids, midx, msim, gate, rows: torch.Tensor, max_tokens: int = 4096, steps: int = 300):
        """Fit the per-distance logit scale and the match bonus on held-out tokens (network frozen)."""
        cfg, L = self.config, self.num_layers
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        if len(rows) > max_tokens:
            rows = rows[torch.randperm(len(rows), generator=gen)[:max_tokens]]
        pairs = [(layer, d) for d in cfg.distances for layer in range(L - d)]
        pl = torch.tensor([p[0] for p in pairs]).repeat(len(rows))
        pd = torch.tensor([p[1] for p in pairs]).repeat(len(rows))
        rr = rows.repeat_interleave(len(pairs))
        net = self.net
        bases, hots, buckets = [], [], []
        with torch.no_grad():
            for c0 in range(0, len(rr), 16384):
                b = self._batch(ids, midx, msim, ids, pl[c0 : c0 + 16384], rr[c0 : c0 + 16384], pd[c0 : c0 + 16384], gate)
                bases.append(net.base_logits(b["path"], b["path_w"], b["copy"], b["target"], b["distance"], b["gate"]))
                hots.append(b["copy_hot"])
                buckets.append(b["copy_bucket"])
        base, hot, bucket = torch.cat(bases), torch.cat(hots), torch.cat(buckets)
        true = ids[rr, pl + pd]
        target = _multi_hot(true, self.num_experts)
        d1 = pd == min(cfg.distances)

        def recall() -> float:
            with torch.no_grad():
                top = net.combine(base[d1], hot[d1], bucket[d1], pd[d1]).topk(ids.shape[2], -1).indices
                return float((top[:, :, None] == true[d1][:, None, :]).any(-1).float().mean())

        before = recall()
        params = [net.logit_scale, net.copy_bonus]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=0.05)
        for _ in range(steps):
            sel = torch.randint(0, len(rr), (8192,), generator=gen)
            logits = net.combine(base[sel], hot[sel], bucket[sel], pd[sel])
            loss = -(torch.log_softmax(logits, -1) * target[sel]).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.logit_scale.requires_grad_(False)  # back to training state: only calibration moves the scale
        return before, recall()

    def _recall(self, ids, midx, msim, gate, rows: torch.Tensor) -> float:
        d = min(self.config.distances)
        s = torch.from_numpy(self._trace_scores(ids, midx, msim, gate, d, rows_subset=rows))  # [N, L-d, E]
        K = ids.shape[2]
        top = s.topk(K, -1).indices
        true = ids[rows][:, d:]
        return float((top[..., :, None] == true[..., None, :]).any(-1).float().mean())

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        torch.save(
            {
                "format": "moe-engine-learned-predictor/1",
                "name": self.name,
                "config": asdict(self.config),
                "num_layers": self.num_layers,
                "num_experts": self.num_experts,
                "gate_width": self.gate_width,
                "state_dict": self.net.state_dict(),
                "train_history": self.train_history,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> LearnedPredictor:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"predictor file {path} does not exist; train one with LearnedPredictor.fit")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != "moe-engine-learned-predictor/1":
            raise ValueError(f"{path} is not a saved learned predictor")
        conf = dict(blob["config"])
        conf["distances"] = tuple(conf["distances"])
        config = LearnedConfig(**conf)
        target_cls = _REGISTERED[blob["name"]]
        if cls is not LearnedPredictor and target_cls is not cls:
            raise ValueError(f"{path} holds a {blob['name']!r} predictor, not {cls.name!r}")
        net = _Net(config, blob["num_layers"], blob["num_experts"], blob["gate_width"])
        net.load_state_dict(blob["state_dict"])
        return target_cls(
            net=net,
            config=config,
            num_layers=blob["num_layers"],
            num_experts=blob["num_experts"],
            gate_width=blob["gate_width"],
            history=blob.get("train_history"),
        )


def _concat_parts(train_parts, val_parts):
    """Stack per-trace inputs into one token pool; returns tensors and the train / held-out rows."""
    seen: dict[int, int] = {}
    ids_l, midx_l, msim_l, gate_l = [], [], [], []
    offset = 0
    train_rows, val_rows = [], []
    for parts, dest in ((train_parts, train_rows), (val_parts, val_rows)):
        for inputs, rows in parts:
            key = id(inputs)
            if key not in seen:
                ids, midx, msim, gate = inputs
                seen[key] = offset
                ids_l.append(ids)
                midx_l.append(torch.where(midx >= 0, midx + offset, midx))
                msim_l.append(msim)
                gate_l.append(gate)
                offset += ids.shape[0]
            dest.append(torch.as_tensor(rows, dtype=torch.long) + seen[key])
    gate_all = None if any(g is None for g in gate_l) else torch.cat(gate_l)
    empty = torch.zeros(0, dtype=torch.long)
    train = torch.cat(train_rows) if train_rows else empty
    val = torch.cat(val_rows) if val_rows else empty
    return torch.cat(ids_l), torch.cat(midx_l), torch.cat(msim_l), gate_all, train, val


@register_predictor("mlp_history")
class HistoryMLP(LearnedPredictor):
    """Learned predictor reading expert ids only (this token's path and earlier tokens' paths)."""

    inputs = "history"


@register_predictor("mlp_gate")
class GateMLP(LearnedPredictor):
    """Learned predictor that also reads the current layer's gate input."""

    inputs = "gate_input"


_REGISTERED: dict[str, type[LearnedPredictor]] = {"mlp_history": HistoryMLP, "mlp_gate": GateMLP}
