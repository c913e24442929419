"""Ctrl-C held back while the cache's bookkeeping changes state.

``deferred_interrupts()`` is a context manager: on the main thread it records a SIGINT that arrives
inside the block and raises ``KeyboardInterrupt`` (or calls the handler the user installed) when the
block ends, so an interrupt lands between two bookkeeping operations, never inside one. Off the main
thread, or where SIGINT is not Python's to handle, it does nothing (signals only reach the main
thread). Waits for copies and compute are never inside such a block: Ctrl-C stops them at once.

The bookkeeping is also written to stay consistent when an exception lands anywhere (a load that was
admitted but never submitted is submitted on use; a lost slot is found again): this is the second line.

``interruptible()``, inside a deferred block, lets Ctrl-C act at once again for its own block. Locks are
held that way (``with deferred_interrupts(): with lock: with interruptible(): ...``): Python 3.11
reports a line event at a ``with`` block's exit line before calling ``__exit__``, and an interrupt
raised there would skip the lock's release, leaving every other thread waiting forever. Acquire and
release happen with Ctrl-C held back; the body stays interruptible, and an interrupt at the inner
block's exit line is still inside the lock's block, which then releases it.

Example::

    with deferred_interrupts():
        core_operation()
    with deferred_interrupts(), lock, interruptible():
        long_computation()   # Ctrl-C stops it; the lock is released whatever happens
"""

from __future__ import annotations

import _signal  # the C functions behind ``signal`` (whose wrappers convert every handler to an enum: slow)
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_main = threading.main_thread()
_depth = 0  # deferred blocks open on the main thread (tests that inject interrupts honour it)
_received: list[tuple[int, Any]] = []  # SIGINTs held back by the outermost open block
_outer: Any = None  # the SIGINT handler the outermost open block replaced (what ``interruptible`` restores)


def deferring() -> bool:
    """True while the main thread is inside a ``deferred_interrupts`` block."""
    return _depth > 0


def _record(signum: int, frame: Any) -> None:
    _received.append((signum, frame))


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    global _depth
    if threading.current_thread() is not _main:
        yield
        return
    if _depth > 0:  # nested: the outermost block holds SIGINT back already
        depth = _depth
        _depth = depth + 1
        try:
            yield
        finally:
            _depth = depth
        return
    try:
        previous = _signal.getsignal(signal.SIGINT)
    except (ValueError, AttributeError):  # no signals here (e.g. some embedded interpreters)
        yield
        return
    if not callable(previous):  # SIG_IGN / SIG_DFL: Python raises nothing, nothing to defer
        yield
        return
    global _outer
    outer = _outer
    try:  # the handler is installed inside the try: whatever is raised next, the previous one comes back
        _received.clear()
        _outer = previous
        _signal.signal(signal.SIGINT, _record)
        _depth = 1
        yield
    finally:
        _depth = 0  # absolute, not decremented: right even if an inner block's exit was skipped
        _outer = outer
        _signal.signal(signal.SIGINT, previous)
        if _received:
            got = _received[0]
            _received.clear()
            previous(*got)  # the default handler raises KeyboardInterrupt here


class interruptible:  # noqa: N801 (used like a function: ``with interruptible():``)
    """Inside a ``deferred_interrupts`` block (main thread): Ctrl-C acts at once again within this block
    (one held back so far is raised on entry); on exit it is held back again. Elsewhere: nothing.

    A class, not a generator: if an interrupt skips ``__exit__`` (raised at the block's exit line), the
    enclosing deferred block restores everything when it ends, and nothing runs later (a generator's
    ``finally`` would run whenever it is collected, reinstalling the holding handler at a random time)."""

    def __enter__(self) -> None:
        global _depth
        self.depth = 0
        if threading.current_thread() is not _main or _depth == 0 or _outer is None:
            return
        handler = _outer
        if _received:  # a Ctrl-C held back so far (e.g. while waiting for a lock): delivered now, still
            got = _received[0]  # held back if it raises, so its unwinding is not interrupted again
            _received.clear()
            handler(*got)
        self.depth = _depth
        _depth = 0
        _signal.signal(signal.SIGINT, handler)

    def __exit__(self, *exc: object) -> None:
        global _depth
        if self.depth:
            _signal.signal(signal.SIGINT, _record)
            _depth = self.depth
