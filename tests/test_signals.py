"""Tests of the deferral of SIGINT and SIGTERM around checkpoint writes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dst._signals import deferred_signals


@pytest.fixture
def handled() -> Iterator[list[int]]:
    """Record SIGINT and SIGTERM in a list for the test, then restore their handlers."""
    received: list[int] = []

    def record(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {
        signum: signal.signal(signum, record) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    yield received
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def deliver(signum: int) -> None:
    """Send ``signum`` to this process and give the main thread time to run its handler."""
    os.kill(os.getpid(), signum)
    for _ in range(50):
        time.sleep(0.01)


def test_signals_held_until_block_ends(handled: list[int]) -> None:
    with deferred_signals():
        deliver(signal.SIGTERM)
        deliver(signal.SIGINT)
        assert handled == []

    assert handled == [signal.SIGTERM, signal.SIGINT]


def test_repeated_signal_raised_once(handled: list[int]) -> None:
    with deferred_signals():
        deliver(signal.SIGTERM)
        deliver(signal.SIGTERM)

    assert handled == [signal.SIGTERM]


def test_handlers_restored_after_block(handled: list[int]) -> None:
    before = signal.getsignal(signal.SIGTERM)

    with deferred_signals():
        assert signal.getsignal(signal.SIGTERM) is not before

    assert signal.getsignal(signal.SIGTERM) is before
    deliver(signal.SIGTERM)
    assert handled == [signal.SIGTERM]


def test_interrupt_raised_after_block() -> None:
    finished = False

    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            deliver(signal.SIGINT)
            finished = True

    assert finished


def test_block_in_other_thread_changes_nothing(handled: list[int]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def run() -> None:
        with deferred_signals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()

    assert seen == [before]
