"""Expert compute, one kernel per transformers ``experts_implementation``, each giving stock's exact bits.

transformers 5.x runs a fused experts module (``MixtralExperts``, ``Qwen2MoeExperts``, ...) through the
implementation named by ``config._experts_implementation`` (``transformers/integrations/moe.py``); its
default is ``"grouped_mm"`` (``PreTrainedModel.get_correct_experts_implementation``), falling back to
``"eager"`` only for classes without ``@use_experts_implementation``. The two round differently in
bf16/fp16 (up to ~0.016 in logits), so the engine follows the model's choice. The difference from stock
is where the weights come from: stock indexes all of a layer's experts at once, the engine receives each
routed expert's weights once, in a cache slot, in an order set by residency (not expert order), and may
keep nothing from a slot after moving to the next expert but computed results.

Glossary (shapes): T tokens, K experts per token (top-k), S = T * K (token, expert) pairs, E routed
experts, H hidden size, I expert FFN width. ``gate_up [2I, H]`` and ``down [H, I]`` are one expert's
weights. A *plan* (``LayerPlan``) is one layer call: it lists the routed experts, takes each expert's
weights once (``compute``), and returns the layer's output (``result``).

Kernels (registry ``make_kernel(name, act_fn)``; ``available_kernels()``):

* ``eager``: the fused classes' own forward (identical in every supported model): per hit expert in
  ascending order, ``linear`` -> ``act(gate) * up`` -> ``linear`` -> times the routing weight, then
  ``index_add_`` into zeros. Each expert's rows are computed by the same ops on the same shapes as in
  stock, so the bits do not depend on the device or the thread count; outputs are accumulated in
  expert order at the end, whatever order the weights arrived in. Bitwise on CPU and CUDA.
* ``grouped_mm``: ``grouped_mm_experts_forward``: the S pairs sorted by expert (``torch.sort``, the same
  call on the same tensor, so the same permutation), one grouped GEMM for gate_up, ``act(gate) * up``,
  one for down, ``* sample_weights``, the inverse permutation, ``view(T, K, H).sum(dim=1)``. The engine
  runs each expert's group alone through the same dispatcher stock uses (transformers' ``_grouped_mm``:
  ``torch.nn.functional.grouped_mm`` with a one-group weight ``[1, H, 2I]``, or its per-group ``mm``
  fallback) and scatters the weighted rows into an ``[S, H]`` buffer in the original order, then
  reduces exactly as stock does.

  CPU (measured, torch 2.13, fp32/bf16/fp16, 1 and 2 threads): the grouped GEMM computes each group as
  an independent ``mm``; a group alone, at another address, gives the same bits. The activation is the
  one place where rows are not independent: CPU elementwise kernels run a SIMD body and a scalar tail
  whose transcendental results differ (fp32 ``silu``: 1 ulp), and with several intra-op threads stock's
  one ``act(gate)`` over all S rows is cut into per-thread chunks at element offsets that can fall
  mid-row. ``_act_rows`` reproduces those cuts (ATen's GRAIN_SIZE and chunking) for each group, so the
  result is bitwise for any thread count, for activations that are one elementwise torch op (``silu``
  in every supported architecture; a Python composition of ops would be exact only single-threaded).

  CUDA: the same ``torch.nn.functional.grouped_mm`` op is called per group. Whether a CUTLASS grouped
  GEMM's per-group result depends on the other groups (its tile configuration is chosen from the whole
  problem) is NOT verified here (no GPU on the development machines): the engine's CUDA grouped_mm may
  differ from stock in the last bits. ``tests/test_numerics.py::test_cuda_grouped_mm_difference_is_bounded``
  bounds that difference where CUDA exists (and asserts eager stays bitwise). On GPUs below SM80
  transformers uses its per-group ``mm`` fallback, which is bitwise here too.

  Addresses: CPU fp32 GEMV (one row or one output column: a decode step's one-token groups) rounds
  depending on the weight's address mod 16 bytes (measured, MKL; bf16/fp16 do not). Stock's fused
  expert tensors are fresh 64-byte-aligned allocations, and so are the cache's slots; the expert
  views agree mod 16 bytes whenever ``I * H`` is a multiple of 4 (every real model).

* ``batched_mm`` is not provided: its per-pair ``bmm`` over gathered weights rounds each product
  depending on the whole batch on CPU (measured in fp32: the same expert's rows differ when computed
  with only that expert's pairs), so it cannot be reproduced one expert at a time; ``make_kernel``
  refuses it, and the other transformers kernels (``deepgemm``, ``sonicmoe``), with a message naming
  the supported ones.

Example::

    kernel = make_kernel("grouped_mm", act_fn)
    plan = kernel.plan(hidden_states, top_k_index, top_k_weights, num_experts)
    for e, gate_up, down in cache.iter_experts(layer, plan.experts):
        plan.compute(e, gate_up, down)
    out = plan.result()  # [T, H], the bits stock's grouped_mm_experts_forward returns
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

ActFn = Callable[[torch.Tensor], torch.Tensor]

# ATen's at::internal::GRAIN_SIZE: a TensorIterator op runs on one thread up to this many elements.
_GRAIN_SIZE = 32768
# A multiple of every CPU vectorized loop's step (2 * Vectorized<T>::size(), at most 64 elements with
# AVX-512 and 16-bit types): a contiguous run cut at such offsets keeps its SIMD body / scalar tail split.
_VEC_STEP = 256


def _grouped_mm_dispatch() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """transformers' own grouped-GEMM dispatcher, so the engine picks the op stock picks on each device."""
    try:
        from transformers.integrations.moe import _grouped_mm
    except ImportError as exc:  # pragma: no cover - transformers < 5 or a moved private helper
        raise ImportError(
            "moe-engine's grouped_mm kernel reproduces transformers.integrations.moe._grouped_mm, which this "
            "transformers version does not have; install transformers 5.x (pyproject pins >=5,<6) or load the "
            "model with experts_implementation='eager'"
        ) from exc
    return _grouped_mm


def _gate(act_fn: ActFn, gate_up_out: torch.Tensor) -> torch.Tensor:
    """transformers' ``_default_apply_gate``: ``[m, 2I] -> act(gate) * up [m, I]``."""
    gate, up = gate_up_out.chunk(2, dim=-1)
    return act_fn(gate) * up


def _act_rows(act_fn: ActFn, gate: torch.Tensor, row0: int, total_rows: int) -> torch.Tensor:
    """``act_fn(gate)`` for rows ``row0 .. row0 + m`` of a ``[total_rows, n]`` tensor that stock
    activates in one call, with stock's bits on CPU whatever the number of intra-op threads.

    Stock's call is serial when ``total_rows * n <= GRAIN_SIZE`` or with one thread: every row is then
    one inner loop of ``n`` elements, as in a call on any subset of rows. Otherwise ATen's OpenMP
    ``parallel_for`` cuts the flat range into ``chunk = ceil(numel / threads)`` pieces, and a piece may
    start or end mid-row; each row segment between cuts is one inner loop there, so it is one call
    here, each call small enough to stay serial itself.
    """
    m, n = gate.shape
    numel = total_rows * n
    threads = torch.get_num_threads()
    if gate.device.type != "cpu" or threads <= 1 or numel <= _GRAIN_SIZE or m == 0:
        return act_fn(gate)
    used = min(threads, -(-numel // _GRAIN_SIZE))
    chunk = -(-numel // used)
    pieces: list[torch.Tensor] = []
    full_rows: list[int] = []  # consecutive whole rows (not cut), computed together

    def flush() -> None:
        if not full_rows:
            return
        per_call = max(1, _GRAIN_SIZE // n)
        first, count = full_rows[0], len(full_rows)
        for r in range(first, first + count, per_call):
            block = gate[r - row0 : min(first + count, r + per_call) - row0]
            if block.numel() <= _GRAIN_SIZE:
                pieces.append(act_fn(block).reshape(-1))
            else:  # a row longer than GRAIN_SIZE: cut at SIMD-step multiples, which keeps its body/tail split
                for row in block:
                    pieces.extend(_segment(act_fn, row, 0, n))
        full_rows.clear()

    pos, end = row0 * n, (row0 + m) * n
    while pos < end:
        r, c0 = divmod(pos, n)
        stop = min((pos // chunk + 1) * chunk, (r + 1) * n, end)  # next cut: chunk, row end or the end
        c1 = stop - r * n
        if c0 == 0 and c1 == n:
            full_rows.append(r)
        else:
            flush()
            pieces.extend(_segment(act_fn, gate[r - row0], c0, c1))
        pos = stop
    flush()
    return torch.cat(pieces).view(m, n)


def _segment(act_fn: ActFn, row: torch.Tensor, c0: int, c1: int) -> list[torch.Tensor]:
    """``act_fn(row[c0:c1])`` as one serial inner loop (in calls of at most GRAIN_SIZE elements)."""
    step = _GRAIN_SIZE // _VEC_STEP * _VEC_STEP
    return [act_fn(row[a : min(c1, a + step)]) for a in range(c0, c1, step)]


class LayerPlan(ABC):
    """One call of one MoE layer: ``experts`` to compute (ascending), each computed once from its weights."""

    experts: list[int]

    @abstractmethod
    def compute(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Compute ``expert``'s contribution from ``gate_up [2I, H]`` and ``down [H, I]``. Keeps only
        computed tensors, never views of the weights: the slot may be reused as soon as this returns."""

    @abstractmethod
    def result(self) -> torch.Tensor:
        """The layer output ``[T, H]``, once every expert in ``experts`` was computed."""

    def _check_complete(self, done: set[int]) -> None:
        missing = sorted(set(self.experts) - done)
        if missing:
            raise RuntimeError(f"experts {missing} of this layer were never computed; the layer output is incomplete")


class ExpertsKernel(ABC):
    """One transformers experts implementation, reproduced expert by expert."""

    name: ClassVar[str]

    def __init__(self, act_fn: ActFn) -> None:
        self.act_fn = act_fn

    @abstractmethod
    def plan(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
    ) -> LayerPlan:
        """``hidden_states [T, H]``, ``top_k_index [T, K]``, ``top_k_weights [T, K]`` -> a plan for this call."""


# ----------------------------------------------------------------------------------------------------- eager


class _EagerPlan(LayerPlan):
    def __init__(self, kernel: EagerKernel, hidden_states, top_k_index, top_k_weights, num_experts: int) -> None:
        self.act_fn = kernel.act_fn
        self.linear = kernel.linear
        self.hidden_states = hidden_states
        self.top_k_weights = top_k_weights
        # As the stock forward: [E+1, K, T] one-hot, the hit experts ascending (E is the EP sentinel).
        mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        self.mask = mask
        self.experts = [e for e in hit if e != num_experts]
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def compute(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        top_k_pos, token_idx = torch.where(self.mask[expert])
        current_state = self.hidden_states[token_idx]
        gate, up = self.linear(current_state, gate_up).chunk(2, dim=-1)
        current = self.act_fn(gate) * up
        current = self.linear(current, down)
        current = current * self.top_k_weights[token_idx, top_k_pos, None]
        self.outputs[expert] = (token_idx, current)

    def result(self) -> torch.Tensor:
        self._check_complete(set(self.outputs))
        final = torch.zeros_like(self.hidden_states)
        for e in self.experts:  # ascending, as stock accumulates, whatever order the weights came in
            token_idx, current = self.outputs[e]
            final.index_add_(0, token_idx, current.to(final.dtype))
        return final


class EagerKernel(ExpertsKernel):
    """The fused experts classes' own forward (``experts_implementation="eager"``)."""

    name = "eager"
    linear: Callable = staticmethod(nn.functional.linear)

    def plan(self, hidden_states, top_k_index, top_k_weights, num_experts) -> LayerPlan:
        return _EagerPlan(self, hidden_states, top_k_index, top_k_weights, num_experts)


def _quantized_linear(x: torch.Tensor, q) -> torch.Tensor:
    from moe_engine.quant import get_format

    return get_format(q.format).linear(x, q)


class QuantizedKernel(EagerKernel):
    """Experts stored quantized (``moe_engine.quant``): the eager forward with each ``linear`` done by the
    expert's format (its fastest kernel, equal to dequantize-then-matmul within the format's tolerance).
    Lossy by construction: used only for checkpoints written by ``moe-engine quantize``."""

    name = "quantized"
    linear = staticmethod(_quantized_linear)


# ------------------------------------------------------------------------------------------------ grouped_mm


class _GroupedPlan(LayerPlan):
    def __init__(self, kernel: GroupedMMKernel, hidden_states, top_k_index, top_k_weights, num_experts: int) -> None:
        self.act_fn = kernel.act_fn
        self.mm = kernel.mm
        self.hidden_states = hidden_states
        self.num_tokens, self.top_k = top_k_index.shape
        self.sample_weights = top_k_weights.reshape(-1)  # [S]
        expert_ids = top_k_index.reshape(-1)  # [S]
        # The same sort call on the same tensor as stock: the same (unstable) permutation.
        expert_ids_g, self.perm = torch.sort(expert_ids)
        counts = torch.bincount(expert_ids_g, minlength=num_experts)  # stock: histc, the same integers
        self.counts = counts.to(torch.int32)
        ends = torch.cumsum(counts, 0).tolist()
        self.groups: dict[int, tuple[int, int]] = {}
        start = 0
        for e, end in enumerate(ends[:num_experts]):
            if end > start:
                self.groups[e] = (start, end)
            start = end
        self.experts = sorted(self.groups)
        self.total = int(expert_ids.numel())
        self.out: torch.Tensor | None = None  # [S, H] weighted rows in the original (token, k) order
        self.done: set[int] = set()

    def compute(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        start, end = self.groups[expert]
        perm = self.perm[start:end]
        rows = self.hidden_states[perm // self.top_k]  # [m, H], stock's rows start..end, same order
        offs = self.counts[expert : expert + 1]  # one group of m rows
        proj = self.mm(rows, gate_up.unsqueeze(0).transpose(-2, -1), offs)  # [m, 2I]
        gate, up = proj.chunk(2, dim=-1)
        act = _act_rows(self.act_fn, gate, start, self.total) * up  # [m, I]
        proj = self.mm(act, down.unsqueeze(0).transpose(-2, -1), offs)  # [m, H]
        weighted = proj * self.sample_weights[perm].unsqueeze(-1)
        if self.out is None:
            self.out = weighted.new_empty((self.total, weighted.shape[-1]))
        self.out.index_copy_(0, perm, weighted)  # weighted_out[inv_perm] of stock, row by row
        self.done.add(expert)

    def result(self) -> torch.Tensor:
        self._check_complete(self.done)
        hidden = self.hidden_states
        out = self.out
        if out is None:  # no (token, expert) pair at all (T == 0)
            dtype = torch.promote_types(hidden.dtype, self.sample_weights.dtype)
            out = hidden.new_zeros((self.total, hidden.shape[-1]), dtype=dtype)
        final = out.view(self.num_tokens, self.top_k, hidden.shape[-1]).sum(dim=1)
        return final.to(hidden.dtype)


class GroupedMMKernel(ExpertsKernel):
    """transformers' ``grouped_mm_experts_forward`` (the 5.x default), one expert group at a time."""

    name = "grouped_mm"

    def __init__(self, act_fn: ActFn) -> None:
        super().__init__(act_fn)
        self.mm = _grouped_mm_dispatch()

    def plan(self, hidden_states, top_k_index, top_k_weights, num_experts) -> LayerPlan:
        return _GroupedPlan(self, hidden_states, top_k_index, top_k_weights, num_experts)


# -------------------------------------------------------------------------------------------------- registry

_KERNELS: dict[str, type[ExpertsKernel]] = {k.name: k for k in (EagerKernel, GroupedMMKernel)}

_WHY_NOT = {
    "batched_mm": "its CPU bmm rounds each (token, expert) product depending on the whole batch, so it cannot "
    "be reproduced one expert at a time",
}


def available_kernels() -> list[str]:
    """Names of the experts implementations the engine reproduces (transformers' names)."""
    return sorted(_KERNELS)


def make_kernel(name: str | None, act_fn: ActFn) -> ExpertsKernel:
    """The kernel for transformers' ``experts_implementation`` ``name`` (``None``: a module used outside
    a model, which transformers runs with its eager forward)."""
    if name is None:
        name = "eager"
    cls = _KERNELS.get(name)
    if cls is None:
        why = _WHY_NOT.get(name, "moe-engine has no offloaded version of it")
        raise ValueError(
            f"experts_implementation={name!r} is not supported by moe-engine ({why}); "
            f"load the model with experts_implementation set to one of {available_kernels()} "
            "(transformers' default is 'grouped_mm')"
        )
    return cls(act_fn)
