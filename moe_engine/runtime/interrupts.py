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

import _signal  # the C functions behind ``signal`` (whose wrappers convert every handler to an enum: slow)
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_main = threading.main_thread()
_depth = 0  # deferred blocks open on the main thread (tests that inject interrupts honour it)
_received: list[tuple[int, Any]] = []  # SIGINTs held back by the outermost open block


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
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    try:
        previous = _signal.getsignal(signal.SIGINT)
    except (ValueError, AttributeError):  # no signals here (e.g. some embedded interpreters)
        yield
        return
    if not callable(previous):  # SIG_IGN / SIG_DFL: Python raises nothing, nothing to defer
        yield
        return
    entered = False
    try:  # the handler is installed inside the try: whatever is raised next, the previous one comes back
        _received.clear()
        _signal.signal(signal.SIGINT, _record)
        entered = True
        _depth += 1
        yield
    finally:
        if entered:
            _depth -= 1
        _signal.signal(signal.SIGINT, previous)
        if _received:
            got = _received[0]
            _received.clear()
            previous(*got)  # the default handler raises KeyboardInterrupt here
