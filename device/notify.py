"""systemd's notify protocol (sd_notify) over the datagram socket in $NOTIFY_SOCKET.

A dozen lines of socket code instead of a dependency. The watchdog ping is rate-limited here
but must be *driven* by the processing loop (`Notifier.watchdog()` once per iteration): a
timer thread would keep pinging while the loop hangs, defeating the watchdog.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace: the kernel spells it with a leading NUL.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._clock = clock
        self.watchdog_interval_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                # Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
                self.watchdog_interval_s = int(usec) / 2e6 if int(usec) > 0 else None
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        self._last_ping: float | None = None
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A full receive queue must cost a notification, never block the processing loop.
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` lines in one datagram; a lost notification must never stop the daemon."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
            return True
        except OSError as e:
            log.debug("notify %s failed: %s", fields, e)
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def watchdog(self) -> bool:
        """Ping if half the watchdog timeout has passed since the last ping; call from the loop."""
        if self._sock is None or self.watchdog_interval_s is None:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.watchdog_interval_s:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
