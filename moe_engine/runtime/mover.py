"""Mover: asynchronous slow-tier -> fast-tier copies of one expert into one slot.

Two implementations behind one interface:

* ``ThreadMover`` (CPU-only machines, here): I/O threads read the expert's byte ranges from the
  checkpoint files straight into the slot's memory (``os.preadv`` releases the GIL, so reads overlap
  compute).
* ``CudaMover`` (``moe_engine.runtime.cuda_mover``): copies from pinned host memory on a copy stream.

A ``Ticket`` is the handle of one copy: ``done()`` says it has stopped (finished, failed or cancelled:
it will never write its slot again), ``wait()`` blocks until compute may read the slot and returns the
seconds spent waiting (the stall), re-raising the copy's error, ``cancel()`` stops a copy that has not
started. A copy submitted with ``after=`` (the slot's previous copy) never writes before that one has
stopped, so an evicted prefetch still in flight can never overwrite its slot's next expert.

Example::

    mover = ThreadMover(store, io_threads=2)
    ticket = mover.submit(location, slot_tensor, slot_index=3, key=(0, 5))
    stall = ticket.wait()
    mover.close()
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from typing import Any

import torch

from moe_engine.runtime.interrupts import deferred_interrupts
from moe_engine.runtime.store import CheckpointStore, ExpertLocation


class MoverClosedError(RuntimeError):
    """The mover was closed (the model was closed); reload the model to use it again."""


class Ticket(ABC):
    @abstractmethod
    def done(self) -> bool:
        """The copy has stopped (finished, failed or cancelled): it will never write its slot again."""

    @abstractmethod
    def wait(self) -> float:
        """Block until compute may read the slot; re-raise the copy's error; return seconds waited."""

    def cancel(self) -> bool:
        """Cancel the copy if it has not started; True when it will never write its slot."""
        return self.done()


class Mover(ABC):
    @abstractmethod
    def submit(
        self,
        loc: ExpertLocation,
        slot: torch.Tensor,
        slot_index: int,
        key: tuple[int, int],
        prefetch: bool = False,
        after: Ticket | None = None,
    ) -> Ticket:
        """Start copying expert ``key`` into ``slot``; prefetch copies yield to demand copies; the copy
        does not write before ``after`` (the slot's previous copy) has stopped."""

    def release(self, slot_index: int) -> None:
        """Compute has finished enqueuing its reads of ``slot_index`` (CUDA orders the next copy after them)."""

    def close(self) -> None:
        """Stop every copy and thread; idempotent. Later submits raise ``MoverClosedError``."""


class _Job:
    """One queued read (and, on CUDA, its copy). It may sit in the queue twice after a promotion; it runs
    at most once. Shared by ``ThreadMover`` and ``CudaMover``'s disk mode."""

    __slots__ = ("loc", "slot", "slot_index", "after", "future", "_state", "_lock")

    QUEUED, RUNNING, CANCELLED = 0, 1, 2

    def __init__(self, loc: ExpertLocation, slot: torch.Tensor, after: Ticket | None, slot_index: int = -1) -> None:
        self.loc, self.slot, self.slot_index, self.after = loc, slot, slot_index, after
        self.future: Future = Future()
        self._state = _Job.QUEUED
        self._lock = threading.RLock()

    def claim(self) -> bool:
        """A worker takes the job: True once, if it was neither taken nor cancelled. (I/O threads only:
        no SIGINT reaches them, so nothing is held back here.)"""
        with self._lock:
            if self._state != _Job.QUEUED:
                return False
            self._state = _Job.RUNNING
            return True

    def cancel(self) -> bool:
        """Withdraw a queued job: True when it will never run (cancelled now or before). Ctrl-C is held
        back around the lock (the compute thread calls this): one landing on the block's exit line would
        leave it held, and the I/O thread's ``claim`` waiting forever."""
        with deferred_interrupts(), self._lock:
            if self._state == _Job.QUEUED:
                self._state = _Job.CANCELLED
                self.future.cancel()
                self.drop()
                return True
            return self._state == _Job.CANCELLED

    @property
    def started(self) -> bool:
        return self._state != _Job.QUEUED

    def drop(self) -> None:
        self.loc = self.slot = self.after = None  # type: ignore[assignment]  # free the slot view


def wait_job(fut: Future, mover) -> Any:
    """``fut.result()``, but a close() of ``mover`` from elsewhere ends the wait with ``MoverClosedError``
    instead of blocking forever (polls twice a second; a finished result returns at once)."""
    while True:
        try:
            return fut.result(timeout=0.5)
        except FutureTimeout:
            if mover.closed and not fut.done():
                raise MoverClosedError("the model was closed while an expert was loading") from None


class _JobTicket(Ticket):
    def __init__(self, job: _Job, mover: ThreadMover) -> None:
        self.job, self.mover = job, mover

    def done(self) -> bool:
        return self.job.future.done()

    def cancel(self) -> bool:
        return self.job.cancel() or self.job.future.done()

    def wait(self) -> float:
        fut = self.job.future
        if fut.done():
            fut.result()  # re-raise a read error here, in the compute thread
            return 0.0
        if not self.job.started:  # a prefetch still queued is now demanded: move it to the front
            self.mover._put(JobQueue.DEMAND, self.job)
        t0 = time.perf_counter()
        wait_job(fut, self.mover)
        return time.perf_counter() - t0


class JobQueue:
    """Reads waiting for an I/O thread, shared by ``ThreadMover`` and ``CudaMover``'s disk mode: demand
    reads (``DEMAND``) before prefetches (``PREFETCH``), first in first out within a priority; stop
    markers (``STOP``) after everything else."""

    DEMAND, PREFETCH, STOP = 0, 1, 2

    def __init__(self) -> None:
        self.queue: queue.PriorityQueue = queue.PriorityQueue()  # the workers ``get`` from it
        self._order = itertools.count()

    def put(self, priority: int, job: _Job | None) -> None:
        self.queue.put((priority, next(self._order), job))

    def shutdown(self, threads: list[threading.Thread]) -> None:
        """Cancel every job still queued, wake each worker with a stop marker and join it."""
        pending = []
        while True:
            try:
                pending.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for _, _, job in pending:
            if job is not None:
                job.cancel()
        for _ in threads:
            self.put(JobQueue.STOP, None)
        for t in threads:
            t.join(timeout=30)  # a read in progress finishes first (bounded by one expert's bytes)


class ThreadMover(Mover):
    """CPU fast tier: read experts from the checkpoint files into slots on I/O threads.

    Reads are queued by priority: demand loads (priority 0) before prefetches (priority 1), first in
    first out within a priority; a queued prefetch that a layer starts waiting for is promoted.
    """

    def __init__(self, store: CheckpointStore, io_threads: int = 2) -> None:
        self.store = store
        self.closed = False
        self._jobs = JobQueue()
        self._threads = [
            threading.Thread(target=_worker, args=(self._jobs.queue, store), name=f"moe-io-{i}", daemon=True)
            for i in range(io_threads)
        ]
        for t in self._threads:
            t.start()

    def _put(self, priority: int, job: _Job | None) -> None:
        self._jobs.put(priority, job)

    def submit(
        self,
        loc: ExpertLocation,
        slot: torch.Tensor,
        slot_index: int,
        key: tuple[int, int],
        prefetch: bool = False,
        after: Ticket | None = None,
    ) -> Ticket:
        if self.closed:
            raise MoverClosedError("moe-engine: this model was closed; load it again to use it")
        if after is not None and after.cancel():
            after = None  # the slot's previous copy will never write: no need to wait for it
        job = _Job(loc, slot, after)
        self._put(JobQueue.PREFETCH if prefetch else JobQueue.DEMAND, job)
        return _JobTicket(job, self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._jobs.shutdown(self._threads)
        self._threads = []


def _worker(q: queue.PriorityQueue, store: CheckpointStore) -> None:
    """I/O thread body. A module function (not a method), so a running thread keeps no reference to
    the mover, and it drops each job before blocking again, so no slot view outlives its read."""
    while True:
        _, _, job = q.get()
        if job is None:
            return
        if job.claim():
            try:
                after = job.after
                if after is not None and isinstance(after, _JobTicket):
                    wait_futures([after.job.future])  # it is running (it could not be cancelled): let it stop
                store.read_expert_into(job.loc, job.slot)
            except BaseException as exc:  # delivered to the waiting compute thread
                job.future.set_exception(exc)
            else:
                job.future.set_result(None)
            job.drop()
        del job


__all__ = ["CancelledError", "Mover", "MoverClosedError", "ThreadMover", "Ticket"]
