"""Bit allocation for routed experts: importance measured on calibration text, then an integer program.

Owns: measuring each expert's *importance-weighted output error* for every candidate format on
calibration tokens, turning "mean bits" into a byte budget, choosing one format per expert by a pulp
integer program under that budget, and the uniform baseline at equal bytes.

Glossary (L = MoE layers, E = experts per layer, F = candidate formats, T = calibration tokens):

* cost ``[L, E, F]``: for expert ``e`` of layer ``l`` in format ``f``,
  ``sum over the tokens t routed to e of w_t^2 * ||y_f(x_t) - y(x_t)||^2 / r``: ``w_t`` its router
  weight for t, ``y``/``y_f`` the expert's output with stored / quantized-then-dequantized weights,
  ``r`` the mean squared norm of the residual stream over all MoE layers (one constant, for units).
  ``w_t * (y_f - y)`` is exactly what the quantized expert adds to the MoE block's output, so the sum
  counts how often the router picks the expert, how much weight it gives it and how wrong its output
  is. One constant for all layers, not each layer's own residual norm: an error added at layer l stays
  in the residual stream to the last layer, so what matters is its size against the final stream, and
  dividing by each layer's norm over-weights the first layers (on the default model the stream entering
  layer 0 is 4000x smaller than at layer 1: per-layer division put all of layer 0 in int8, starved the
  rest and lost to uniform int3; one constant beat it at 3 and 2.5 bits). Experts that calibration
  routes few tokens to get a prior of ``prior_tokens`` tokens at the layer's mean ``w^2``, measured on a
  sample of all of the layer's tokens, so an expert unseen in calibration is not given 2 bits for free.
* tried and not shipped (issue 12): rescaling each layer's costs, per format, to a *measured* loss (the
  KL from the stored model's next-token distribution, or the NLL increase, of that layer quantized alone
  or at the operating point of uniform bits) before the integer program. On the default model at mean 3
  bits it gave +0.171 % to +0.280 % validation perplexity (this cost model with groups of 32/64 only: +0.184 %; uniform int3-g64:
  +0.162 %) and +0.52-0.54 % at 2.5 bits (this: +0.482 %). Every ILP allocation is ~18 % closer to the
  stored model in KL on the validation text than uniform int3 (-4.3e-4 +- 1.6e-5 nats per token), yet
  its NLL is higher by 2.5e-4 +- 1.8e-4 nats (1.4 standard errors): uniform int3's errors happen to lower
  the NLL below their KL, a first-order effect per-layer measurements cannot resolve at 16k tokens. The
  3-bit comparison sits at the resolution of the validation text. With groups of 32/64 only (128 does
  not divide this model's widths) any departure from uniform int3-g64 at 3 bits needed int2 experts;
  the ``-row`` formats (one group per output row, int3 at 3.19 bits per weight here) give the program
  cheaper int3 for the experts the router rarely picks instead, and the bytes saved go to int4 for the
  busy ones (see ``benchmarks/quant_quality.py`` and the README for the figures).
* byte budget of "mean bits B" at group size G: the bytes of every expert stored uniformly in
  ``int{B}-g{G}`` (``int8`` for B = 8), interpolated linearly between the neighbouring integer widths for
  a fractional B (2.5 = halfway between uniform int2-g64 and int3-g64). Mean 3 bits therefore means
  exactly the bytes of uniform int3 with the same group size: the two are compared at equal bytes.
* uniform baseline: the single format for all experts with the lowest cost among those whose bytes fit
  the budget (e.g. int2-g32 at mean 2.5 bits and group 64: the same 3 bits of storage per weight).

Example::

    imp = measure_importance(model, src, sequences, candidate_formats(src.gate_up_shape, src.down_shape))
    budget = mean_bits_budget(3, 64, src.gate_up_shape, src.down_shape, src.num_layers * src.num_experts)
    ilp = solve_allocation(imp, budget)           # Allocation: formats [L][E], cost, bytes
    uni = uniform_allocation(imp, budget)         # at most the same bytes
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from moe_engine.quant.checkpoint import SourceCheckpoint

BITS = (2, 3, 4, 8)


def format_for_bits(bits: int, group_size: int | str) -> str:
    """The uniform format of ``bits`` (8: int8 per output channel; 4, 3, 2: group-wise with ``group_size``,
    or ``"row"``: one group per output row)."""
    if bits not in BITS:
        raise ValueError(f"unsupported bits {bits}; choose one of {', '.join(map(str, BITS))}")
    if bits == 8:
        return "int8"
    return f"int{bits}-row" if group_size == "row" else f"int{bits}-g{group_size}"


def expert_nbytes(fmt: str, gate_up_shape: tuple[int, int], down_shape: tuple[int, int]) -> int:
    """Bytes of one expert (both matrices, packed) in format ``fmt``."""
    from moe_engine.quant.formats import get_format

    f = get_format(fmt)
    return f.nbytes(gate_up_shape) + f.nbytes(down_shape)


def candidate_formats(gate_up_shape: tuple[int, int], down_shape: tuple[int, int]) -> list[str]:
    """The registered int2/int3/int4 group-wise formats whose group divides both input widths (``-row``
    formats: one group per row, always), and int8."""
    from moe_engine.quant.formats import GroupFormat, available_formats, get_format

    out = []
    for name in available_formats():
        if name == "int8":
            out.append(name)
            continue
        if not name.startswith(("int2-", "int3-", "int4-")):
            continue
        f = get_format(name)
        if not isinstance(f, GroupFormat):
            continue
        if f.divides(gate_up_shape[1]) and f.divides(down_shape[1]):
            out.append(name)
    return sorted(out, key=lambda n: expert_nbytes(n, gate_up_shape, down_shape))


def mean_bits_budget(
    mean_bits: float, group_size: int | str, gate_up_shape: tuple[int, int], down_shape: tuple[int, int], num_experts: int
) -> int:
    """Bytes for ``num_experts`` experts at ``mean_bits`` (see the module docstring); ValueError outside [2, 8]."""
    if not (isinstance(mean_bits, (int, float)) and 2 <= mean_bits <= 8):
        raise ValueError(f"--mean-bits {mean_bits} must be between 2 and 8 (the narrowest and widest integer formats)")
    lo = max(b for b in BITS if b <= mean_bits)
    hi = min(b for b in BITS if b >= mean_bits)
    nb_lo = expert_nbytes(format_for_bits(lo, group_size), gate_up_shape, down_shape)
    nb_hi = expert_nbytes(format_for_bits(hi, group_size), gate_up_shape, down_shape)
    frac = 0.0 if hi == lo else (mean_bits - lo) / (hi - lo)
    return int(math.floor(num_experts * (nb_lo + frac * (nb_hi - nb_lo))))


# ----------------------------------------------------------------------------------------------------
# importance


def calibration_windows(ids: Sequence[int], seq_len: int, max_tokens: int) -> list[list[int]]:
    """Windows of ``seq_len`` tokens from ``ids``, at most ``max_tokens`` in all, evenly spaced over the
    whole text (not its head: a long text's first pages may cover one topic, leaving experts that serve
    the others unmeasured)."""
    assert seq_len > 0 and max_tokens > 0
    starts = list(range(0, len(ids) - seq_len + 1, seq_len))
    if not starts:
        return [list(ids)] if len(ids) else []
    keep = max(1, max_tokens // seq_len)
    if len(starts) > keep:
        starts = [starts[int(i)] for i in np.linspace(0, len(starts) - 1, keep).round()]
    return [list(ids[s : s + seq_len]) for s in starts]


@dataclass(frozen=True)
class Importance:
    """Calibration measurements. ``cost [L, E, F]`` (module docstring); ``nbytes [F]``: bytes of one
    expert per format; ``counts [L, E]``: tokens routed; ``weight [L, E]``: summed router weights;
    ``residual [L]``: mean squared norm of the residual stream entering each MoE layer."""

    formats: tuple[str, ...]
    cost: np.ndarray
    nbytes: np.ndarray
    counts: np.ndarray
    weight: np.ndarray
    tokens: int
    residual: np.ndarray | None = None

    def __post_init__(self) -> None:
        assert self.cost.ndim == 3 and self.cost.shape[2] == len(self.formats) == len(self.nbytes), self.cost.shape

    @property
    def num_experts_total(self) -> int:
        return int(self.cost.shape[0] * self.cost.shape[1])


WEIGHTINGS = ("output", "fisher", "fisher_dot")


@dataclass
class _Capture:
    x: list[torch.Tensor] = field(default_factory=list)  # [T, H] router inputs (experts' hidden states)
    idx: list[torch.Tensor] = field(default_factory=list)  # [T, K]
    w: list[torch.Tensor] = field(default_factory=list)  # [T, K]
    g: list[torch.Tensor] = field(default_factory=list)  # [T, H] d(summed token loss) / d(MoE output)
    resid: float = 0.0  # sum of ||h||^2 of the residual stream entering the decoder layer
    resid_tokens: int = 0


def _expert_out(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Callable) -> torch.Tensor:
    """An expert's output ``[T, H]`` for tokens ``x [T, H]`` (transformers' fused layout: gate rows first)."""
    gate, up = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    return torch.nn.functional.linear(act(gate) * up, down)


def _token_error(diff: torch.Tensor, g: torch.Tensor | None, weighting: str) -> torch.Tensor:
    """Per-token error ``[T]`` of an output difference ``diff [T, H]`` (``g [T, H]``: loss gradients)."""
    if weighting == "output":
        return diff.pow(2).sum(-1)
    assert g is not None
    if weighting == "fisher":
        return (diff * g).pow(2).sum(-1)
    return (diff * g).sum(-1).pow(2)


def measure_importance(
    model: torch.nn.Module,
    src: SourceCheckpoint,
    sequences: Sequence[Sequence[int]],
    formats: Sequence[str],
    *,
    weighting: str = "output",
    batch_size: int = 8,
    prior_tokens: float | None = None,
    probe_tokens: int = 256,
    progress: bool = False,
    seed: int = 0,
) -> Importance:
    """Run ``model`` (a transformers MoE model of ``src``, any dtype) on ``sequences`` of token ids and
    measure ``cost [L, E, F]`` for the candidate ``formats`` from the source's stored expert weights.

    ``weighting``: how a token's output error ``d = w_t (y_f - y)`` counts: ``output`` ``||d||^2``;
    ``fisher`` ``sum_i (g_i d_i)^2`` and ``fisher_dot`` ``(g . d)^2``, with ``g`` the gradient of the
    token losses with respect to the MoE block's output (one backward pass per calibration batch)."""
    return measure_importances(
        model, src, sequences, formats, weightings=(weighting,), batch_size=batch_size, prior_tokens=prior_tokens,
        probe_tokens=probe_tokens, progress=progress, seed=seed,
    )[weighting]  # fmt: skip


def measure_importances(
    model: torch.nn.Module,
    src: SourceCheckpoint,
    sequences: Sequence[Sequence[int]],
    formats: Sequence[str],
    *,
    weightings: Sequence[str] = ("output",),
    batch_size: int = 8,
    prior_tokens: float | None = None,
    probe_tokens: int = 256,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, Importance]:
    """``measure_importance`` for several weightings from one calibration run: weighting -> Importance."""
    from tqdm.auto import tqdm
    from transformers.activations import ACT2FN

    from moe_engine.quant.formats import get_format
    from moe_engine.runtime.adapters import moe_blocks

    for wt in weightings:
        if wt not in WEIGHTINGS:
            raise ValueError(f"unknown importance weighting {wt!r}; choose one of {', '.join(WEIGHTINGS)}")
    grads = any(wt != "output" for wt in weightings)
    blocks = moe_blocks(model)
    if [dec for dec, _ in blocks] != list(src.decoder_layers):
        raise ValueError("the model's MoE layers differ from the checkpoint's; calibrate the model the checkpoint holds")
    caps = [_Capture() for _ in blocks]
    handles = []
    layers: Any = model.model.layers  # type: ignore[union-attr]

    def on_experts(cap: _Capture):
        def hook(module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs[n] for n in names[len(args) :]]
            cap.x.append(vals[0].detach().float().reshape(-1, vals[0].shape[-1]).cpu())
            cap.idx.append(vals[1].detach().reshape(vals[0].shape[0], -1).cpu())
            cap.w.append(vals[2].detach().float().reshape(vals[0].shape[0], -1).cpu())

        return hook

    def on_experts_out(cap: _Capture):
        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda g: cap.g.append(g.detach().float().reshape(-1, g.shape[-1]).cpu()))

        return hook

    def on_layer(cap: _Capture):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            cap.resid += float(h.detach().float().pow(2).sum())
            cap.resid_tokens += h.shape[0] * h.shape[1] if h.dim() == 3 else h.shape[0]

        return hook

    for cap, (dec, block) in zip(caps, blocks):
        experts: Any = block.experts
        layer_module: Any = layers[dec]
        handles.append(experts.register_forward_pre_hook(on_experts(cap), with_kwargs=True))
        handles.append(layer_module.register_forward_pre_hook(on_layer(cap), with_kwargs=True))
        if grads:
            handles.append(experts.register_forward_hook(on_experts_out(cap)))
    if grads:  # gradients flow to the activations only: the embeddings' output starts the graph
        emb: Any = model.get_input_embeddings()  # type: ignore[operator]
        handles.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    tokens = 0
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.set_grad_enabled(grads):
            order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            for b in tqdm(batches, desc="calibration forward", unit="batch", disable=not progress):
                n = min(len(sequences[i]) for i in b)  # equal lengths: no padding
                ids = torch.tensor([list(sequences[i][:n]) for i in b], dtype=torch.long, device=device)
                out = model(input_ids=ids, use_cache=False)
                if grads:  # the summed next-token loss; the last position (no label) gets a zero gradient
                    logits = out.logits[:, :-1].float()
                    loss = torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                    )
                    loss.backward()
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    if tokens == 0:
        raise ValueError("no calibration tokens: give a longer calibration text")

    act = ACT2FN[src.config.get("hidden_act", "silu")]
    nlayers, nexp = src.num_layers, src.num_experts
    fobjs = [get_format(f) for f in formats]
    costs = {wt: np.zeros((nlayers, nexp, len(formats))) for wt in weightings}
    counts = np.zeros((nlayers, nexp), dtype=np.int64)
    wsum = np.zeros((nlayers, nexp))
    residual = np.zeros(nlayers)
    gen = torch.Generator().manual_seed(seed)
    work = [(layer, e) for layer in range(nlayers) for e in range(nexp)]
    bar = tqdm(total=len(work), desc="measuring expert errors", unit="expert", disable=not progress)
    for layer, cap in enumerate(caps):
        x, idx, w = torch.cat(cap.x), torch.cat(cap.idx), torch.cat(cap.w)
        g = torch.cat(cap.g) if grads else None
        residual[layer] = cap.resid / max(cap.resid_tokens, 1)
        pick = torch.randperm(x.shape[0], generator=gen)[:probe_tokens]
        probe = x[pick]
        mean_w2 = float((w**2).mean())
        prior = prior_tokens if prior_tokens is not None else max(1.0, 0.01 * idx.numel() / nexp)
        for e in range(nexp):
            rows, slots = torch.where(idx == e)
            xe, we = x[rows], w[rows, slots]
            ge = torch.cat([g[rows], g[pick]]) if g is not None else None
            counts[layer, e] = len(rows)
            wsum[layer, e] = float(we.sum())
            gu, dn = src.read_expert(layer, e)
            gu32, dn32 = gu.float(), dn.float()
            xs = torch.cat([xe, probe])
            ref = _expert_out(xs, gu32, dn32, act)
            for k, f in enumerate(fobjs):
                qgu = f.dequantize(f.quantize(gu), torch.float32)
                qdn = f.dequantize(f.quantize(dn), torch.float32)
                diff = _expert_out(xs, qgu, qdn, act) - ref
                for wt, cost in costs.items():
                    err = _token_error(diff, ge, wt)  # [rows + probe]
                    routed = float((we**2 * err[: len(rows)]).sum())
                    prior_term = prior * mean_w2 * float(err[len(rows) :].mean()) if len(pick) else 0.0
                    cost[layer, e, k] = routed + prior_term
            bar.update(1)
    bar.close()
    nbytes = np.array([expert_nbytes(f, src.gate_up_shape, src.down_shape) for f in formats], dtype=np.int64)
    out = {}
    for wt, cost in costs.items():
        scale = float(residual.mean()) if wt == "output" else 1.0  # fisher costs are already in loss units
        out[wt] = Importance(tuple(formats), cost / (scale or 1.0), nbytes, counts, wsum, tokens, residual)
    return out


# ----------------------------------------------------------------------------------------------------
# the integer program


@dataclass(frozen=True)
class Allocation:
    """One format per expert: ``formats[l][e]``; ``cost``: its summed cost; ``nbytes``: its expert bytes."""

    method: str
    formats: list[list[str]]
    cost: float
    nbytes: int
    budget: int
    optimal: bool = True
    seconds: float = 0.0
    solver: str = ""

    def mean_bits(self, weights_per_expert: int) -> float:
        """Stored bits per expert weight, scales and zero points included."""
        n = sum(len(layer) for layer in self.formats)
        return 8.0 * self.nbytes / (n * weights_per_expert)

    def histogram(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.formats:
            for f in layer:
                out[f] = out.get(f, 0) + 1
        return dict(sorted(out.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method, "cost": self.cost, "bytes": self.nbytes, "budget_bytes": self.budget,
            "optimal": self.optimal, "seconds": round(self.seconds, 3), "solver": self.solver,
            "formats": self.histogram(),
        }  # fmt: skip


def _from_choice(method: str, imp: Importance, choice: np.ndarray, budget: int, **kw: Any) -> Allocation:
    nlayers, nexp, _ = imp.cost.shape
    choice = choice.reshape(nlayers, nexp)
    cost = float(imp.cost[np.arange(nlayers)[:, None], np.arange(nexp)[None, :], choice].sum())
    formats = [[imp.formats[int(c)] for c in row] for row in choice]
    return Allocation(method, formats, cost, int(imp.nbytes[choice].sum()), budget, **kw)


def uniform_allocation(imp: Importance, budget: int) -> Allocation:
    """The best single format for every expert whose bytes fit ``budget`` (lowest cost)."""
    n = imp.num_experts_total
    fits = [k for k in range(len(imp.formats)) if n * int(imp.nbytes[k]) <= budget]
    if not fits:
        raise ValueError(f"no format fits {budget} bytes for {n} experts; raise --mean-bits")
    best = min(fits, key=lambda k: float(imp.cost[:, :, k].sum()))
    return _from_choice("uniform", imp, np.full(imp.cost.shape[:2], best), budget)


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to stderr, so stdout stays the command's output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve_allocation(imp: Importance, budget: int, *, solver: str = "auto", time_limit: float = 60.0) -> Allocation:
    """Minimise ``sum cost[l, e, f] x[l, e, f]`` over binaries with one format per expert and
    ``sum nbytes[f] x[l, e, f] <= budget`` (pulp: HiGHS when available, else CBC)."""
    import pulp

    from moe_engine.placement.ilp import available_solver

    nlayers, nexp, nf = imp.cost.shape
    n = nlayers * nexp
    if n * int(imp.nbytes.min()) > budget:
        raise ValueError(
            f"the byte budget {budget} is below every expert in the smallest format ({n} x {int(imp.nbytes.min())} "
            "bytes); raise --mean-bits"
        )
    name = available_solver(solver)
    # Costs spread over many orders of magnitude: scale so the largest is 1e6 for the solver's tolerances.
    scale = 1e6 / max(float(imp.cost.max()), 1e-300)
    prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = [[pulp.LpVariable(f"x_{i}_{k}", cat="Binary") for k in range(nf)] for i in range(n)]
    flat = imp.cost.reshape(n, nf)
    prob += pulp.lpSum(float(flat[i, k]) * scale * x[i][k] for i in range(n) for k in range(nf))
    for i in range(n):
        prob += pulp.lpSum(x[i]) == 1
    prob += pulp.lpSum(int(imp.nbytes[k]) * x[i][k] for i in range(n) for k in range(nf)) <= budget
    t0 = time.perf_counter()
    with _native_stdout_to_stderr():  # HiGHS prints its banner on the C stdout even with msg=False
        if name == "highs":
            # No threads option: HiGHS sizes one thread pool per process at its first solve and refuses a
            # later solve asking for another size (e.g. after a placement ILP), reporting "Not Solved".
            status = prob.solve(pulp.HiGHS(msg=False, timeLimit=time_limit))
        else:
            status = prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, threads=1))
    seconds = time.perf_counter() - t0
    values = np.array([[x[i][k].varValue or 0.0 for k in range(nf)] for i in range(n)])
    if not np.allclose(values.sum(1), 1.0, atol=1e-6):
        raise RuntimeError(f"the bit-allocation ILP found no feasible solution (status {pulp.LpStatus[status]})")
    choice = values.argmax(1)
    alloc = _from_choice(
        "ilp", imp, choice, budget, optimal=pulp.LpStatus[status] == "Optimal", seconds=seconds, solver=name
    )
    assert alloc.nbytes <= budget, (alloc.nbytes, budget)
    # The ILP's feasible set holds every uniform allocation: never return one worse than the best of them.
    uni = uniform_allocation(imp, budget)
    if uni.cost < alloc.cost:
        return Allocation("ilp", uni.formats, uni.cost, uni.nbytes, budget, False, seconds, name)
    return alloc
