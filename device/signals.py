"""SIGTERM, SIGINT and SIGHUP, handled outside the signal handler.

A Python signal handler runs in the main thread between two bytecodes, wherever it happens to
be: in the middle of a write to stderr (logging from the handler then raises "reentrant call"
and the stop is lost), or holding a lock the handler needs (a deadlock). So the handlers here do
nothing at all: `signal.set_wakeup_fd` makes the interpreter's C-level handler write the
signal's number to a socket, and a thread of ours reads it and does the work (log, stop,
reload) as ordinary code. The C handler also fires while the main thread is stuck in C code.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("serenbox")


def _ignore(_signum: int, _frame: Any) -> None:
    """Installed as the Python-level handler so the default action (terminate) does not run."""


class SignalThread:
    """Calls `actions[signum]()` from its own thread for each of those signals received."""

    def __init__(self, actions: Mapping[int, Callable[[], None]]) -> None:
        self._actions = dict(actions)
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous: dict[int, Any] = {}
        self._previous_fd: int | None = None
        self._thread = threading.Thread(target=self._run, name="signals", daemon=True)

    def start(self) -> SignalThread:
        """Must be called from the main thread (Python's rule for signal.signal)."""
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for signum in self._actions:
            self._previous[signum] = signal.signal(signum, _ignore)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data:
                return  # closed
            for signum in data:
                action = self._actions.get(signum)
                if action is None:
                    continue
                try:
                    action()
                except Exception:  # a failing action must not end signal handling
                    log.exception("handling signal %d failed", signum)

    def close(self) -> None:
        """Restores the previous handlers (main thread only)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self._previous_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
            self._previous_fd = None
        self._writer.close()
        with contextlib.suppress(OSError):
            self._reader.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=1.0)
        self._reader.close()
