"""CUDA mover: host tier (a pinned arena, or the files through pinned staging buffers) -> GPU slots.

Owns the copy stream, the per-slot "compute has finished reading" events, the I/O threads of the
disk path and the host buffers (``moe_engine.runtime.host_tier``: the arena, the staging buffers).
*What* lives where is decided by ``plan_host_tier`` (``HostTierPlan.mode``); this module follows it:

* ``"pinned"``: every expert sits in one pinned arena; ``submit`` enqueues one ``non_blocking``
  copy from the expert's arena view on the copy stream, at once, on the calling thread.
* ``"disk"``: an I/O thread reads the expert from the files into one of its two pinned staging
  buffers (double buffering: it reads the next expert while the previous copy runs), then enqueues
  the copy. Demand reads go before prefetches; a queued prefetch that compute waits for is promoted.
* ``"none"``: every expert has its own slot and is never evicted, so each is read exactly once;
  the path is the disk path's (a small pinned staging buffer, no arena).

Ordering (why a copy never writes a slot at the wrong time):

* after compute: each copy into slot ``s`` waits (on the GPU, ``copy_stream.wait_event``) for the
  event ``release(s)`` recorded on the compute stream after compute enqueued its last reads of ``s``;
* after the previous copy into the same slot (``after``): pinned copies are enqueued on one stream in
  submission order, so stream order is enough. Disk copies are enqueued by I/O threads whenever their
  reads finish, so a later copy could overtake an earlier one still reading into staging: the I/O
  thread waits for ``after``'s copy to be *enqueued* (or to have failed / been cancelled) before it
  enqueues its own, and stream order does the rest;
* before compute: ``Ticket.wait()`` makes the compute stream wait for the copy's event. A read error
  reaches ``wait()`` as the exception, and no event is recorded for a failed copy.

Example::

    plan = plan_host_tier(expert_bytes, len(locations), budget_bytes)
    mover = CudaMover(store, sorted(locations.items()), slot_numel, torch.bfloat16,
                      torch.device("cuda"), num_slots, plan)
    ticket = mover.submit(loc, slots[3], 3, key=(0, 5))
    ticket.wait()                 # the compute stream now waits for the copy
    ...                           # kernels reading slots[3]
    mover.release(3)              # the next copy into slot 3 waits for those kernels
    mover.close()
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import wait as wait_futures

import torch

from moe_engine.runtime.host_tier import HostTierPlan, PinnedArena
from moe_engine.runtime.mover import JobQueue, Mover, MoverClosedError, Ticket, _Job, wait_job
from moe_engine.runtime.store import CheckpointStore, ExpertLocation

ExpertKey = tuple[int, int]


class _Copier:
    """Enqueues host -> slot copies on the copy stream. Shared by the mover and its I/O threads (which
    hold this, not the mover, so a running thread keeps no reference to the mover)."""

    def __init__(self, device: torch.device, num_slots: int) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        # Per slot: event recorded on the compute stream after compute enqueued its last reads of it.
        self.slot_free: list[torch.cuda.Event | None] = [None] * num_slots

    def copy(self, src: torch.Tensor, slot: torch.Tensor, slot_index: int) -> torch.cuda.Event:
        """Enqueue ``slot.copy_(src)`` after the slot's last readers; the returned event marks its end."""
        done = torch.cuda.Event()
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            free = self.slot_free[slot_index]  # the newest release: waiting for it is never too early
            if free is not None:
                self.stream.wait_event(free)  # never overwrite a slot compute may still read
            slot.copy_(src, non_blocking=True)
            # The slots were allocated on the compute stream: tell the caching allocator this stream uses
            # them too, so their memory is not handed out again while a copy into them is in flight.
            slot.record_stream(self.stream)
            done.record(self.stream)
        return done


def _wait_event(event: torch.cuda.Event, device: torch.device) -> None:
    if not event.query():
        # Host-side wait: the stall is measured, and the CPU does not run ahead enqueuing kernels that
        # would only queue behind a missing expert (Ctrl-C stays responsive between layers).
        event.synchronize()
    # Order the compute stream's later kernels after the copy (free when it has completed).
    torch.cuda.current_stream(device).wait_event(event)


class _EventTicket(Ticket):
    """A pinned-mode copy: enqueued at submit, so it is described by its event alone."""

    def __init__(self, event: torch.cuda.Event, device: torch.device) -> None:
        self.event, self.device = event, device

    def done(self) -> bool:
        return self.event.query()

    def cancel(self) -> bool:
        return self.done()  # already on the stream: it cannot be withdrawn, only finish

    def wait(self) -> float:
        t0 = time.perf_counter()
        _wait_event(self.event, self.device)
        return time.perf_counter() - t0


class _StagedTicket(Ticket):
    def __init__(self, job: _Job, mover: CudaMover) -> None:
        self.job, self.mover = job, mover

    def enqueued(self) -> bool:
        """The copy is on the stream, or will never be (failed, cancelled)."""
        return self.job.future.done()

    def done(self) -> bool:
        fut = self.job.future
        if not fut.done():
            return False
        if fut.cancelled() or fut.exception() is not None:
            return True
        return fut.result().query()

    def cancel(self) -> bool:
        return self.job.cancel() or self.done()

    def wait(self) -> float:
        fut = self.job.future
        t0 = time.perf_counter()
        if not fut.done():
            if not self.job.started:  # a prefetch still queued is now demanded: move it to the front
                self.mover._put(JobQueue.DEMAND, self.job)
        event = wait_job(fut, self.mover)  # re-raises the read's error (no event was recorded for it)
        _wait_event(event, self.mover.device)
        return time.perf_counter() - t0


class CudaMover(Mover):
    """GPU fast tier: copies on a dedicated copy stream, ordered by events, from the host tier ``plan``.

    Args:
        store: the checkpoint (the arena is filled from it; the disk path reads it on demand).
        locations: ``(key, ExpertLocation)`` of every routed expert; in pinned mode expert ``i`` of
            this sequence is arena view ``i``.
        slot_numel, dtype: elements per slot and the compute dtype.
        device: the CUDA device of the slots.
        num_slots: slots of the cache (one "free" event each).
        plan: from ``plan_host_tier`` (mode none / pinned / disk).
        io_threads: readers filling the arena (pinned) or serving misses (disk, none); each disk reader
            owns two pinned staging buffers of one expert.
        progress: a progress bar while the arena is filled.
    """

    def __init__(
        self,
        store: CheckpointStore,
        locations: Sequence[tuple[ExpertKey, ExpertLocation]],
        slot_numel: int,
        dtype: torch.dtype,
        device: torch.device,
        num_slots: int,
        plan: HostTierPlan,
        *,
        io_threads: int = 2,
        progress: bool = False,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CudaMover needs CUDA; on a CPU-only machine the loader uses ThreadMover")
        expert_bytes = slot_numel * dtype.itemsize
        if plan.expert_bytes != expert_bytes or plan.num_experts != len(locations):
            raise ValueError(
                f"host tier plan is for {plan.num_experts} experts of {plan.expert_bytes} bytes, the model has "
                f"{len(locations)} of {expert_bytes}: make the plan with plan_host_tier(expert_bytes, "
                "len(locations), budget_bytes)"
            )
        self.store = store
        self.plan = plan
        self.mode = plan.mode
        self.device = torch.device(device)
        self.closed = False
        self._copier = _Copier(self.device, num_slots)
        self.arena: PinnedArena | None = None
        self.staging: PinnedArena | None = None
        self._index: dict[ExpertKey, int] = {}
        self._jobs = JobQueue()
        self._threads: list[threading.Thread] = []
        if self.mode == "pinned":
            self._index = {key: i for i, (key, _) in enumerate(locations)}
            self.arena = PinnedArena.from_store(
                store, [loc for _, loc in locations], slot_numel, dtype, threads=io_threads, progress=progress
            )
        else:
            # Two staging buffers per reader, registered as ONE pinned block of exactly their size.
            self.staging = PinnedArena(2 * io_threads, slot_numel, dtype)
            for i in range(io_threads):
                t = threading.Thread(
                    target=_disk_worker,
                    args=(self._jobs.queue, store, self._copier, self.staging, (2 * i, 2 * i + 1)),
                    name=f"moe-cuda-io-{i}",
                    daemon=True,
                )
                t.start()
                self._threads.append(t)

    @property
    def pinned_bytes(self) -> int:
        """Host bytes this mover page-locked (arena or staging buffers), exactly, no rounding."""
        return sum(a.registered_bytes for a in (self.arena, self.staging) if a is not None)

    def _put(self, priority: int, job: _Job | None) -> None:
        self._jobs.put(priority, job)

    def release(self, slot_index: int) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._copier.slot_free[slot_index] = ev

    def submit(
        self,
        loc: ExpertLocation,
        slot: torch.Tensor,
        slot_index: int,
        key: ExpertKey,
        prefetch: bool = False,
        after: Ticket | None = None,
    ) -> Ticket:
        if self.closed:
            raise MoverClosedError(
                "moe-engine: this model's CUDA mover is closed; load the model again to use it"
            )
        if self.arena is not None:
            index = self._index.get(key)
            if index is None:
                raise KeyError(
                    f"expert {key} is not in the pinned arena (it holds {len(self._index)} experts)"
                )
            # `after` needs nothing here: every pinned copy is enqueued now, on one stream, so the slot's
            # previous copy (enqueued earlier) finishes writing before this one starts.
            return _EventTicket(self._copier.copy(self.arena.expert(index), slot, slot_index), self.device)
        if after is not None and after.cancel():
            after = None  # the slot's previous copy will never write: nothing to order after
        job = _Job(loc, slot, after, slot_index)
        self._put(JobQueue.PREFETCH if prefetch else JobQueue.DEMAND, job)
        return _StagedTicket(job, self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._jobs.shutdown(self._threads)  # cancel what is queued, stop and join the readers
        self._threads = []
        # Copies still in flight read from the arena / staging buffers, which are unpinned and freed next.
        self._copier.stream.synchronize()
        for buf in (self.arena, self.staging):
            if buf is not None:
                buf.close()


def _disk_worker(
    q: queue.PriorityQueue,
    store: CheckpointStore,
    copier: _Copier,
    staging: PinnedArena,
    buffers: tuple[int, int],
) -> None:
    """I/O thread of the disk / none modes: read into a staging buffer, then enqueue the copy.

    A module function (not a method), so a running thread keeps no reference to the mover; it drops
    each job before blocking again, so no slot view outlives its copy's enqueue.
    """
    last: list[torch.cuda.Event | None] = [None, None]  # the last copy out of each staging buffer
    turn = 0
    while True:
        _, _, job = q.get()
        if job is None:
            return
        if not job.claim():
            del job
            continue
        b, turn = turn, turn ^ 1
        try:
            prev = last[b]
            if prev is not None:
                # The previous copy out of this staging buffer must finish before the read overwrites it.
                prev.synchronize()
            buf = staging.expert(buffers[b])
            if buf.numel() != job.slot.numel():  # a smaller copy (entries of several sizes)
                buf = buf[: job.slot.numel()]
            store.read_expert_into(job.loc, buf)
            after = job.after
            if isinstance(after, _StagedTicket) and not after.enqueued():
                # The slot's previous copy is still reading into its own staging buffer (it could not be
                # cancelled, so it is running): enqueue after it, then stream order keeps them in order.
                wait_futures([after.job.future])
            event = copier.copy(buf, job.slot, job.slot_index)
            last[b] = event
        except BaseException as exc:  # delivered to wait(); no event is recorded for a failed copy
            job.future.set_exception(exc)
        else:
            job.future.set_result(event)
        job.drop()
        del job


__all__ = ["CudaMover"]
