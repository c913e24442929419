"""CUDA mover: slow tier (pinned host RAM, or the files through pinned staging buffers) -> GPU slots.

Each copy is one ``non_blocking`` copy on a dedicated copy stream, ordered after the slot's previous
readers by an event (``release``), and announced by an event the compute stream waits on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from moe_engine.runtime.mover import Mover, Ticket
from moe_engine.runtime.store import CheckpointStore, ExpertLocation


class _CudaTicket(Ticket):
    def __init__(self, event: torch.cuda.Event | None = None, future: Future | None = None) -> None:
        self.event = event
        self.future = future

    def _event(self) -> torch.cuda.Event:
        if self.event is None:
            assert self.future is not None
            self.event = self.future.result()
        return self.event

    def ready(self) -> bool:
        if self.future is not None and not self.future.done():
            return False
        return self._event().query()

    def wait(self) -> float:
        t0 = time.perf_counter()
        event = self._event()
        if not event.query():
            # Host-side wait so the stall is measured and the CPU does not run ahead of a missing expert.
            event.synchronize()
        # Order compute-stream kernels after the copy (free when it has completed).
        torch.cuda.current_stream().wait_event(event)
        return time.perf_counter() - t0


class CudaMover(Mover):
    """GPU fast tier: copies from pinned host memory on a dedicated stream, ordered by events."""

    def __init__(
        self,
        store: CheckpointStore,
        locations: Sequence[tuple[tuple[int, int], ExpertLocation]],
        slot_numel: int,
        dtype: torch.dtype,
        device: torch.device,
        num_slots: int,
        host_tier: str = "pinned",
        io_threads: int = 2,
        progress: bool = False,
    ) -> None:
        assert torch.cuda.is_available()
        self.store = store
        self.device = device
        self.copy_stream = torch.cuda.Stream(device=device)
        self.host_tier = host_tier
        # Event recorded on the compute stream when a slot's last reader was enqueued.
        self._slot_free: list[torch.cuda.Event | None] = [None] * num_slots
        self._host: dict[tuple[int, int], torch.Tensor] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._staging: threading.local = threading.local()
        self.slot_numel, self.dtype = slot_numel, dtype
        if host_tier == "pinned":
            # Slow tier = pinned host RAM: one contiguous pinned buffer per expert, so a transfer is one copy.
            for key, loc in tqdm(locations, desc="pinning experts in host memory", unit="expert", disable=not progress):
                buf = torch.empty(slot_numel, dtype=dtype, pin_memory=True)
                store.read_expert_into(loc, buf)
                self._host[key] = buf
        else:
            self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="moe-io")

    def release(self, slot_index: int) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._slot_free[slot_index] = ev

    def _copy(self, src: torch.Tensor, slot: torch.Tensor, slot_index: int) -> torch.cuda.Event:
        done = torch.cuda.Event()
        with torch.cuda.stream(self.copy_stream):
            free = self._slot_free[slot_index]
            if free is not None:
                self.copy_stream.wait_event(free)  # never overwrite a slot compute may still read
            slot.copy_(src, non_blocking=True)
            done.record(self.copy_stream)
        return done

    def _disk_copy(self, loc: ExpertLocation, slot: torch.Tensor, slot_index: int) -> torch.cuda.Event:
        staging = getattr(self._staging, "buf", None)
        if staging is None:
            staging = torch.empty(self.slot_numel, dtype=self.dtype, pin_memory=True)
            self._staging.buf = staging
        self.store.read_expert_into(loc, staging)
        done = self._copy(staging, slot, slot_index)
        # The staging buffer is reused by this thread's next read: wait for the copy out of it.
        done.synchronize()
        return done

    def submit(
        self, loc: ExpertLocation, slot: torch.Tensor, slot_index: int, key: tuple[int, int], prefetch: bool = False
    ) -> Ticket:
        if self.host_tier == "pinned":
            return _CudaTicket(event=self._copy(self._host[key], slot, slot_index))
        assert self._pool is not None
        return _CudaTicket(future=self._pool.submit(self._disk_copy, loc, slot, slot_index))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._host.clear()
