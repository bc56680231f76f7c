"""Tests of the signal handling: deferral around checkpoint writes and the worker's SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dst._signals import deferred_signals
from dst._study import (
    WorkerStopped,
    _sigterm_stops_worker,
    _StopCheck,
    raise_if_stop_requested,
)


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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_worker_sigterm_lost_in_finalizer_is_raised_later() -> None:
    class Finalized:
        def __del__(self) -> None:
            # The handler runs during the sleep, inside __del__, where Python drops its
            # exception with "Exception ignored in".
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)

    with _sigterm_stops_worker():
        finalized = Finalized()
        del finalized

        with pytest.raises(WorkerStopped, match="SIGTERM"):
            raise_if_stop_requested()
        with pytest.raises(WorkerStopped, match="SIGTERM"):
            _StopCheck().on_epoch_end(None, None)  # type: ignore[arg-type]


def test_worker_stop_request_cleared_on_start() -> None:
    with _sigterm_stops_worker():
        deliver_and_catch(signal.SIGTERM)
    with _sigterm_stops_worker():
        raise_if_stop_requested()


def deliver_and_catch(signum: int) -> None:
    with pytest.raises(WorkerStopped):
        deliver(signum)
