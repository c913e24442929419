"""Mover: asynchronous slow-tier -> fast-tier copies of one expert into one slot.

Two implementations behind one interface:

* ``ThreadMover`` (CPU-only machines): I/O threads read the expert's byte ranges from the checkpoint
  files straight into the slot's memory (``os.preadv`` releases the GIL, so reads overlap compute).
* ``CudaMover`` (GPUs): the slow tier is pinned host memory holding every expert as one contiguous
  buffer (``host_tier="pinned"``), or the files read by threads into pinned staging buffers
  (``host_tier="disk"``); each copy is one ``non_blocking`` copy on a dedicated copy stream, ordered
  after the slot's previous readers by an event, and announced by an event the compute stream waits on.

A ``Ticket`` is the handle of one copy: ``ready()`` polls it, ``wait()`` blocks until the slot may be
read by compute and returns the seconds spent waiting (the stall).

Example::

    mover = ThreadMover(store, io_threads=2)
    ticket = mover.submit(location, slot_tensor, slot_index=3)
    stall = ticket.wait()
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from moe_engine.store import CheckpointStore, ExpertLocation


class Ticket(ABC):
    @abstractmethod
    def ready(self) -> bool: ...

    @abstractmethod
    def wait(self) -> float:
        """Block until the copy is usable by the compute stream; return seconds waited."""


class Mover(ABC):
    @abstractmethod
    def submit(
        self, loc: ExpertLocation, slot: torch.Tensor, slot_index: int, key: tuple[int, int], prefetch: bool = False
    ) -> Ticket:
        """Start copying expert ``key`` into ``slot``; ``prefetch`` copies yield to demand copies."""

    def release(self, slot_index: int) -> None:
        """Compute has finished enqueuing its reads of ``slot_index`` (CUDA orders the next copy after them)."""

    def close(self) -> None:
        pass


class _FutureTicket(Ticket):
    def __init__(self, future: Future) -> None:
        self.future = future

    def ready(self) -> bool:
        return self.future.done()

    def wait(self) -> float:
        if self.future.done():
            self.future.result()  # re-raise a read error here, in the compute thread
            return 0.0
        t0 = time.perf_counter()
        self.future.result()
        return time.perf_counter() - t0


class _Job:
    """One queued read; may sit in the queue twice after a promotion, runs once."""

    __slots__ = ("loc", "slot", "future", "_started", "_lock")

    def __init__(self, loc: ExpertLocation, slot: torch.Tensor) -> None:
        self.loc, self.slot = loc, slot
        self.future: Future = Future()
        self._started = False
        self._lock = threading.Lock()

    def claim(self) -> bool:
        with self._lock:
            if self._started:
                return False
            self._started = True
            return True

    @property
    def started(self) -> bool:
        return self._started


class _JobTicket(_FutureTicket):
    def __init__(self, job: _Job, mover: ThreadMover) -> None:
        super().__init__(job.future)
        self.job, self.mover = job, mover

    def wait(self) -> float:
        if not self.job.started:  # a prefetch still queued is now demanded: move it to the front
            self.mover._put(0, self.job)
        return super().wait()


class ThreadMover(Mover):
    """CPU fast tier: read experts from the checkpoint files into slots on I/O threads.

    Reads are queued by priority: demand loads (priority 0) before prefetches (priority 1), first in
    first out within a priority; a queued prefetch that a layer starts waiting for is promoted.
    """

    def __init__(self, store: CheckpointStore, io_threads: int = 2) -> None:
        self.store = store
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [
            threading.Thread(target=self._worker, name=f"moe-io-{i}", daemon=True) for i in range(io_threads)
        ]
        for t in self._threads:
            t.start()

    def _put(self, priority: int, job: _Job | None) -> None:
        self._queue.put((priority, next(self._order), job))

    def _worker(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            if not job.claim():
                continue
            try:
                self.store.read_expert_into(job.loc, job.slot)
            except BaseException as exc:  # delivered to the waiting compute thread
                job.future.set_exception(exc)
            else:
                job.future.set_result(None)

    def submit(
        self, loc: ExpertLocation, slot: torch.Tensor, slot_index: int, key: tuple[int, int], prefetch: bool = False
    ) -> Ticket:
        job = _Job(loc, slot)
        self._put(1 if prefetch else 0, job)
        return _JobTicket(job, self)

    def close(self) -> None:
        for _ in self._threads:
            self._put(2, None)
        for t in self._threads:
            t.join()
        self._threads = []


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
