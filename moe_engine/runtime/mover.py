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
from concurrent.futures import Future

import torch

from moe_engine.runtime.store import CheckpointStore, ExpertLocation


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
