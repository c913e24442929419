"""Ctrl-C held back while the cache's bookkeeping changes state.

``deferred_interrupts()`` is a context manager: on the main thread it records a SIGINT that arrives
inside the block and raises ``KeyboardInterrupt`` (or calls the handler the user installed) when the
block ends, so an interrupt lands between two bookkeeping operations, never inside one. Off the main
thread, or where SIGINT is not Python's to handle, it does nothing (signals only reach the main
thread). Waits for copies and compute are never inside such a block: Ctrl-C stops them at once.

The bookkeeping is also written to stay consistent when an exception lands anywhere (a load that was
admitted but never submitted is submitted on use; a lost slot is found again): this is the second line.

Example::

    with deferred_interrupts():
        core_operation()
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_main = threading.main_thread()
_depth = 0  # deferred blocks open on the main thread (tests that inject interrupts honour it)


def deferring() -> bool:
    """True while the main thread is inside a ``deferred_interrupts`` block."""
    return _depth > 0


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    if threading.current_thread() is not _main:
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGINT)
    except (ValueError, AttributeError):  # no signals here (e.g. some embedded interpreters)
        yield
        return
    if not callable(previous):  # SIG_IGN / SIG_DFL: Python raises nothing, nothing to defer
        yield
        return
    global _depth
    received: list[tuple[int, Any]] = []
    entered = False
    try:  # the handler is installed inside the try: whatever is raised next, the previous one comes back
        signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
        entered = True
        _depth += 1
        yield
    finally:
        if entered:
            _depth -= 1
        signal.signal(signal.SIGINT, previous)
        if received:
            previous(*received[0])  # the default handler raises KeyboardInterrupt here
