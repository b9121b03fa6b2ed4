"""Keeps a live source running through failures: log, count, reopen with exponential backoff."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from serenbox.device.cameras.base import CameraError, Frame, FrameSource
from serenbox.device.config import CameraConfig

log = logging.getLogger(__name__)

# A backoff wait can reach reopen_max_s, longer than systemd's watchdog timeout: beat this often.
HEARTBEAT_S = 1.0


class ReopeningSource(FrameSource):
    """Wraps a source. A live source that fails, at start or later, is closed and (re)opened,
    waiting reopen_initial_s, then
    twice as long after each further failure up to reopen_max_s. The wait ends early when
    `stop_event` is set or close() is called, and read() then returns None (the run ends).
    Files and folders cannot recover, so their errors pass straight through. A camera that is
    not there yet at start (an IP camera still booting, a USB camera unplugged) is a live failure
    like any other: the daemon starts, says so in its status, and waits for it.

    Frame indices continue across reopens, so a gap still means missed frames.

    `heartbeat` (set by the pipeline) is called at least every HEARTBEAT_S while the camera is
    down: the loop is alive and waiting on purpose, so the watchdog must not kill the daemon for
    an unplugged camera. A read or open that hangs inside the driver never reaches it.
    """

    def __init__(self, inner: FrameSource, cfg: CameraConfig, stop_event: threading.Event | None = None) -> None:
        super().__init__(inner.name, inner.fps)
        self.inner = inner
        self.initial_s = cfg.reopen_initial_s
        self.max_s = cfg.reopen_max_s
        self.stop_event = stop_event or threading.Event()
        self.camera_errors = 0
        self.reopens = 0
        self._offset = 0  # added to the inner source's indices, which restart at 0 on reopen
        self._next_index = 0
        self._is_open = False
        self._wait_before_reopen = False
        self._delay = self.initial_s
        self.live = inner.live
        self.heartbeat: Callable[[], None] | None = None

    def open(self) -> None:
        try:
            self.inner.open()
        except CameraError as e:
            if not self.inner.live:
                raise
            self._failed(e)  # read() retries with backoff, waiting first
            self._wait_before_reopen = True
            return
        self._is_open = True

    @property
    def is_open(self) -> bool:
        return self._is_open

    def read(self) -> Frame | None:
        if self._wait_before_reopen:
            self._wait_before_reopen = False
            if self._wait(self._delay):
                return None
            self._delay = min(self._delay * 2, self.max_s)
        while not self.stop_event.is_set():
            if self._is_open or self._reopen():
                try:
                    frame = self.inner.read()
                except CameraError as e:
                    if self.stop_event.is_set():
                        return None  # closed under us: not a camera failure
                    if not self.inner.live:
                        raise
                    self._failed(e)
                    self._close_inner()
                else:
                    if frame is None:
                        return None
                    self._delay = self.initial_s
                    frame = Frame(frame.image, frame.t, frame.index + self._offset)
                    self._next_index = frame.index + 1
                    return frame
            if self._wait(self._delay):
                return None
            self._delay = min(self._delay * 2, self.max_s)
        return None

    def _wait(self, seconds: float) -> bool:
        """Waits `seconds` with heartbeats; True when stopped meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            if self.heartbeat is not None:
                self.heartbeat()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self.stop_event.is_set()
            if self.stop_event.wait(min(remaining, HEARTBEAT_S)):
                return True

    def _failed(self, error: CameraError) -> None:
        self.camera_errors += 1
        log.warning("%s; reopening in %.3g s (camera error %d)", error, self._delay, self.camera_errors)

    def _reopen(self) -> bool:
        try:
            self.inner.open()
        except CameraError as e:
            self._failed(e)
            return False
        self.reopens += 1
        self._offset = self._next_index
        self._is_open = True
        log.info("%s: reopened after %d camera error(s)", self.name, self.camera_errors)
        return True

    def _close_inner(self) -> None:
        self._is_open = False
        try:
            self.inner.close()
        except Exception:
            log.exception("%s: closing the failed camera failed", self.name)

    def set_fps(self, fps: float) -> None:
        super().set_fps(fps)
        self.inner.set_fps(fps)

    def close(self) -> None:
        """Ends a backoff wait in progress (safe from another thread), then closes the source."""
        self.stop_event.set()
        if self._is_open:
            self._close_inner()
