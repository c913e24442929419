"""Host tier on CUDA machines: where experts wait between the checkpoint files and the GPU slots.

Owns the sizing decision (``plan_host_tier``, a pure function) and the pinned arena (``PinnedArena``).

Glossary:

* *host tier*: the slow tier on a CUDA machine. One of three modes (``HostTierPlan.mode``):

  - ``"none"``: every expert fits in the GPU budget, so nothing is pinned. Each expert is read once
    from the files into its GPU slot (through a small pinned staging buffer) and never evicted.
  - ``"pinned"``: all experts live in one pinned host buffer, the *arena*, filled once at load; a
    miss is one host -> device copy on the copy stream (the fastest slow tier).
  - ``"disk"``: experts are read from the files on demand, through pinned staging buffers (the arena
    would not fit in RAM, or the caller asked for it).

* *arena*: ONE contiguous page-locked host buffer of exactly ``num_experts * expert_bytes`` bytes;
  expert ``i`` is the view ``arena[i * n:(i + 1) * n]`` (``n`` = elements per expert).

* *safety margin*: RAM left free beside the arena, ``max(10 % of total RAM, 2 GiB)``. Pinned pages
  cannot be swapped or reclaimed, so an arena that leaves the OS (and this process's own transient
  allocations: tokenizer, activations copied to host, Python) less than this drives the machine into
  the OOM killer or a swap storm instead of a clean error. 10 % scales with big hosts (a 2 TiB
  DeepSeek-V3 server keeps ~200 GiB for page cache and other processes); 2 GiB is the floor for small
  ones.

Why not ``torch.empty(..., pin_memory=True)`` per expert: PyTorch's caching host allocator rounds each
block up to the next power of two (a 336 MiB Mixtral expert takes 512 MiB: 128 GiB pinned for 86 GiB
of experts) and calls ``cudaHostAlloc`` once per expert (14,848 calls for DeepSeek-V3).

Example::

    plan = plan_host_tier(expert_bytes=n_bytes, num_experts_total=len(locations), budget_bytes=budget)
    if plan.fallback:
        logger.warning(plan.reason)
    if plan.mode == "pinned":
        arena = PinnedArena.from_store(store, [loc for _, loc in locations], n, dtype, progress=True)
        arena.expert(3)       # flat view of expert 3's weights, pinned
        arena.close()
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from moe_engine.runtime.config import format_bytes
from moe_engine.runtime.store import CheckpointStore, ExpertLocation

#: what ``plan_host_tier(requested=...)`` accepts
HOST_TIERS = ("auto", "pinned", "disk")
#: the three modes of a plan
HOST_TIER_MODES = ("none", "pinned", "disk")

MARGIN_FRACTION = 0.10
MARGIN_MIN_BYTES = 2 * 2**30

# cudaHostRegisterPortable: the pages count as pinned in every CUDA context, not only the current
# device's (a multi-GPU process copies from the same arena to any device).
_CUDA_HOST_REGISTER_PORTABLE = 1


def safety_margin(total_ram: int) -> int:
    """RAM to leave free beside a pinned arena: ``max(10 % of total_ram, 2 GiB)`` (see the module doc)."""
    return max(int(total_ram * MARGIN_FRACTION), MARGIN_MIN_BYTES)


@dataclass(frozen=True)
class HostTierPlan:
    """Where experts live on the host of a CUDA machine; made by ``plan_host_tier``.

    * ``mode``: ``"none"``, ``"pinned"`` or ``"disk"`` (module docstring).
    * ``arena_bytes``: bytes to pin, exactly ``num_experts * expert_bytes`` in ``"pinned"``, else 0.
    * ``expert_bytes``, ``num_experts``: what the plan was made for (the mover checks them).
    * ``reason``: one sentence saying why, with the numbers; log it (as a warning when ``fallback``).
    * ``fallback``: the caller got less than it asked for (pinned was wanted but does not fit).
    """

    mode: str
    arena_bytes: int
    expert_bytes: int
    num_experts: int
    reason: str
    fallback: bool = False

    def __post_init__(self) -> None:
        if self.mode not in HOST_TIER_MODES:
            raise ValueError(f"host tier mode must be one of {HOST_TIER_MODES}, got {self.mode!r}")
        want = self.expert_bytes * self.num_experts if self.mode == "pinned" else 0
        if self.arena_bytes != want:
            raise ValueError(f"a {self.mode!r} plan pins {want} bytes, got arena_bytes={self.arena_bytes}")


def plan_host_tier(
    expert_bytes: int,
    num_experts_total: int,
    budget_bytes: int,
    *,
    requested: str = "auto",
    available_ram: int | None = None,
    total_ram: int | None = None,
) -> HostTierPlan:
    """Decide the host tier. Pure when ``available_ram`` and ``total_ram`` are given (psutil otherwise).

    Args:
        expert_bytes: bytes of one routed expert in the compute dtype (one slot).
        num_experts_total: routed experts over all MoE layers.
        budget_bytes: GPU bytes the expert slots may use (already resolved from a fraction).
        requested: ``"auto"`` (size it), ``"pinned"`` (pin even inside the safety margin; still refused
            when the arena exceeds available RAM outright) or ``"disk"`` (never pin).
        available_ram: bytes the OS can hand out now (default ``psutil.virtual_memory().available``).
        total_ram: physical RAM (default ``psutil.virtual_memory().total``), for the margin.

    Rules, in order:
      1. every expert fits in the budget -> ``"none"`` (whatever was requested: pinning would only cost RAM);
      2. ``requested="disk"`` -> ``"disk"``;
      3. arena + ``safety_margin(total_ram)`` <= available -> ``"pinned"``;
      4. ``requested="pinned"`` and arena <= available -> ``"pinned"`` (forced, inside the margin);
      5. ``requested="pinned"`` -> ValueError (the arena cannot be pinned at all);
      6. otherwise ``"disk"`` with ``fallback=True`` and a reason naming the bytes and how to force it.
    """
    if requested not in HOST_TIERS:
        raise ValueError(f"host_tier must be one of {', '.join(map(repr, HOST_TIERS))}, got {requested!r}")
    if expert_bytes <= 0 or num_experts_total <= 0:
        raise ValueError(
            f"expert_bytes ({expert_bytes}) and num_experts_total ({num_experts_total}) must be positive"
        )
    if budget_bytes < expert_bytes:
        raise ValueError(f"budget {budget_bytes} bytes holds no expert of {expert_bytes} bytes")
    if available_ram is None or total_ram is None:
        import psutil

        vm = psutil.virtual_memory()
        available_ram = vm.available if available_ram is None else available_ram
        total_ram = vm.total if total_ram is None else total_ram

    total = expert_bytes * num_experts_total
    fb = format_bytes

    def plan(mode: str, reason: str, fallback: bool = False) -> HostTierPlan:
        return HostTierPlan(
            mode, total if mode == "pinned" else 0, expert_bytes, num_experts_total, reason, fallback
        )

    if budget_bytes >= total:
        return plan(
            "none",
            f"host tier: none; all {num_experts_total} experts ({fb(total)}) fit in the GPU budget "
            f"({fb(budget_bytes)}): each is read once from the files into its GPU slot, nothing is pinned",
        )
    if requested == "disk":
        return plan(
            "disk", f"host tier: disk (requested); experts are read from the files on demand ({fb(total)})"
        )
    margin = safety_margin(total_ram)
    numbers = (
        f"the pinned arena needs {fb(total)} ({total} bytes) and {fb(available_ram)} ({available_ram} bytes) "
        f"of RAM are available, with a safety margin of {fb(margin)} (max of 10 % of {fb(total_ram)} RAM, 2 GiB)"
    )
    if total + margin <= available_ram:
        return plan("pinned", f"host tier: pinned; {numbers}")
    if requested == "pinned":
        if total <= available_ram:
            return plan("pinned", f"host tier: pinned (requested, inside the safety margin); {numbers}")
        raise ValueError(
            f"host_tier='pinned' cannot be honoured: {numbers}. Free RAM, use a smaller dtype, or pass "
            "host_tier='disk' (or 'auto') to stream experts from the files"
        )
    return plan(
        "disk",
        f"host tier: disk (fallback); {numbers}, so experts are streamed from the files through pinned "
        "staging buffers (slower misses). Free RAM, or pass host_tier='pinned' to pin inside the margin "
        "(at your own risk), or host_tier='disk' to silence this warning",
        fallback=True,
    )


# ----------------------------------------------------------------------------------------------------
# the arena


def _check_cuda(err: object, what: str) -> None:
    code = int(err)  # type: ignore[call-overload]  # cudaError enum -> int
    if code != 0:
        raise RuntimeError(
            f"{what} failed with cudaError {code}; the host may lack the RAM to page-lock it (host_tier='disk' "
            "streams experts instead)"
        )


def _unregister(buffer: torch.Tensor, ptr: int) -> None:
    """Finalizer: unpin the arena's pages. ``buffer`` is passed only so the finalizer keeps the memory
    alive until it is unregistered; weakref.finalize drops it right after this call."""
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown: the CUDA context may already be gone
        pass


class PinnedArena:
    """ONE contiguous host buffer of ``num_experts * expert_numel`` elements, page-locked once.

    How it is pinned: ``torch.empty`` (plain pageable memory of exactly the requested size) followed
    by ONE ``cudaHostRegister`` of exactly its bytes. The alternative, a single ``pin_memory=True``
    allocation through PyTorch's caching host allocator, rounds the block up to the next power of two
    (86 GiB of Mixtral-8x22B experts would page-lock 128 GiB, more than many hosts have) and keeps the
    block cached after it is freed; ``cudaHostRegister`` locks exactly the arena's pages and
    ``cudaHostUnregister`` gives them back at ``close()``. Copies from registered memory are truly
    asynchronous (``cudaPointerGetAttributes`` reports it as host-pinned, so ``tensor.is_pinned()``
    is True and ``copy_(non_blocking=True)`` does not stage through a pageable bounce buffer).

    ``pin=False`` makes the same layout in pageable memory (CPU tests, no CUDA).
    """

    def __init__(self, num_experts: int, expert_numel: int, dtype: torch.dtype, *, pin: bool = True) -> None:
        if num_experts <= 0 or expert_numel <= 0:
            raise ValueError(
                f"an arena needs num_experts ({num_experts}) and expert_numel ({expert_numel}) > 0"
            )
        if pin and not torch.cuda.is_available():
            raise RuntimeError("a pinned arena needs CUDA; use pin=False (pageable) or host_tier='disk'")
        self.num_experts = num_experts
        self.expert_numel = expert_numel
        self.dtype = dtype
        self.nbytes = num_experts * expert_numel * dtype.itemsize
        self.buffer: torch.Tensor | None = torch.empty(num_experts * expert_numel, dtype=dtype)
        #: bytes page-locked by this arena's single cudaHostRegister (0 when pin=False or closed)
        self.registered_bytes = 0
        self._finalizer: weakref.finalize | None = None
        if pin:
            ptr = self.buffer.data_ptr()
            _check_cuda(
                torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, _CUDA_HOST_REGISTER_PORTABLE),
                f"cudaHostRegister of the {format_bytes(self.nbytes)} expert arena",
            )
            self.registered_bytes = self.nbytes
            # Unregister even when close() is never called; the finalizer keeps the buffer alive until then.
            self._finalizer = weakref.finalize(self, _unregister, self.buffer, ptr)

    @classmethod
    def from_store(
        cls,
        store: CheckpointStore,
        locations: Sequence[ExpertLocation],
        expert_numel: int,
        dtype: torch.dtype,
        *,
        pin: bool = True,
        threads: int = 2,
        progress: bool = False,
    ) -> PinnedArena:
        """An arena holding ``locations[i]``'s weights at index ``i``, read with ``threads`` readers."""
        arena = cls(len(locations), expert_numel, dtype, pin=pin)
        try:
            arena.fill(store, locations, threads=threads, progress=progress)
        except BaseException:  # a read error or Ctrl-C: give the pages back before raising
            arena.close()
            raise
        return arena

    def fill(
        self,
        store: CheckpointStore,
        locations: Sequence[ExpertLocation],
        *,
        threads: int = 2,
        progress: bool = False,
    ) -> None:
        """Read every expert into its view (``store.read_expert_into``; preadv releases the GIL)."""
        if len(locations) != self.num_experts:
            raise ValueError(f"{len(locations)} locations for an arena of {self.num_experts} experts")
        bar = tqdm(
            total=self.nbytes, desc="pinning experts in host memory", unit="B", unit_scale=True,
            unit_divisor=1024, disable=not progress,
        )  # fmt: skip
        with bar, ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="moe-arena") as pool:
            futures = [
                pool.submit(store.read_expert_into, loc, self.expert(i)) for i, loc in enumerate(locations)
            ]
            try:
                for fut in futures:  # in order: the first error is raised, the rest are cancelled
                    fut.result()
                    bar.update(self.expert_numel * self.dtype.itemsize)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise

    def expert(self, index: int) -> torch.Tensor:
        """Flat view ``[expert_numel]`` of expert ``index``: ``arena[index * n:(index + 1) * n]``."""
        if self.buffer is None:
            raise RuntimeError("the expert arena is closed; reload the model")
        if not 0 <= index < self.num_experts:
            raise IndexError(f"expert index {index} outside the arena's {self.num_experts} experts")
        n = self.expert_numel
        return self.buffer[index * n : (index + 1) * n]

    @property
    def closed(self) -> bool:
        return self.buffer is None

    def close(self) -> None:
        """Unpin and free the arena. Idempotent. The caller must have waited for copies reading from it."""
        self.buffer = None
        self.registered_bytes = 0
        if self._finalizer is not None:
            self._finalizer()  # runs _unregister once; later calls do nothing
            self._finalizer = None


__all__ = ["HOST_TIERS", "HOST_TIER_MODES", "HostTierPlan", "PinnedArena", "plan_host_tier", "safety_margin"]
