"""Deferral of SIGINT and SIGTERM around writes that must not stop half-way."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then raise them again in order.

    A Python signal handler runs between two bytecodes of the main thread, so a handler
    that raises (Ctrl-C, or a worker's SIGTERM) can cut a ``torch.save`` short, and the
    zip writer then replaces the interruption with its own ``RuntimeError``. Inside this
    block the signals are only recorded. On exit the previous handlers come back and each
    recorded signal is raised again, so it has the effect it would have had, a moment
    later. Outside the main thread, where handlers cannot be changed, the block changes
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: Any) -> None:
        if signum not in received:
            received.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in _DEFERRED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for number in received:
            signal.raise_signal(number)
