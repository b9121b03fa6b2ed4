"""Signals land anywhere, also while the main thread is blocked writing a log line. A Python-level
handler that logs then re-enters the same stream ("reentrant call inside BufferedWriter"); the
daemon's handlers do nothing, and its signal thread acts (device/signals.py)."""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time

from serenbox.device.signals import SignalThread


def blocked_logger() -> tuple[logging.Logger, io.StringIO, int]:
    """A logger writing to a pipe nobody reads yet: its writes block once the pipe is full.
    Logging's own complaints (handleError) go to the returned buffer via sys.stderr."""
    r, w = os.pipe()
    stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(w, "w"), 8192), line_buffering=True)
    log = logging.getLogger(f"blocked-{r}")
    log.propagate = False
    log.addHandler(logging.StreamHandler(stream))
    log.setLevel(logging.INFO)
    return log, io.StringIO(), r


def signal_then_drain(r: int) -> None:
    time.sleep(0.3)  # the main thread is blocked in a write by now
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.3)
    while os.read(r, 1 << 16):
        pass


def write_until(log: logging.Logger, done: threading.Event, errors: io.StringIO) -> None:
    import sys

    real, sys.stderr = sys.stderr, errors
    try:
        for _ in range(100_000):
            log.info("x" * 100)
            if done.is_set():
                return
    finally:
        sys.stderr = real


def test_a_logging_signal_handler_reenters_the_stream_it_interrupted() -> None:
    # The failure the daemon's old handlers had, shown on the same machinery.
    log, errors, r = blocked_logger()
    done = threading.Event()

    def handler(_signum: int, _frame: object) -> None:
        log.info("stopping")
        done.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        threading.Thread(target=signal_then_drain, args=(r,), daemon=True).start()
        write_until(log, done, errors)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "reentrant call" in errors.getvalue()


def test_the_signal_thread_acts_without_touching_the_interrupted_stream() -> None:
    log, errors, r = blocked_logger()
    done = threading.Event()
    acted_in: list[str] = []

    def stop() -> None:
        log.info("stopping")  # logs like the daemon's stop does, from its own thread
        acted_in.append(threading.current_thread().name)
        done.set()

    signals = SignalThread({signal.SIGTERM: stop}).start()
    try:
        threading.Thread(target=signal_then_drain, args=(r,), daemon=True).start()
        write_until(log, done, errors)
    finally:
        signals.close()
    assert done.is_set() and acted_in == ["signals"]
    assert "reentrant" not in errors.getvalue() and "Logging error" not in errors.getvalue()
