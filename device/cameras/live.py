"""The newest-frame machinery shared by live sources (OpenCV devices and streams, picamera2).

A grabber thread drains the device as fast as it delivers, so frames never pile up in a driver
or network buffer, and keeps one frame per period of the configured rate in a single slot.
read() takes whatever is in the slot: a consumer that falls behind skips frames (an index gap)
instead of working through a queue of stale ones.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod

import numpy as np
from serenbox.device.cameras.base import CameraError, Frame, FrameSource, as_bgr

log = logging.getLogger(__name__)

# A camera that delivers nothing for this long is treated as failed (unplugged, stream stalled).
READ_TIMEOUT_S = 10.0
# A frame this early (fraction of the period) still counts as on time: camera frame times jitter,
# and a strict cut would halve the rate when the camera runs at a multiple of the configured fps.
PACE_TOLERANCE = 0.2
# close() waits this long for a grab in flight; shutdown must stay well inside systemd's stop timeout.
CLOSE_WAIT_S = 2.0


class LiveSource(FrameSource):
    live = True
    read_timeout_s = READ_TIMEOUT_S

    @abstractmethod
    def _open_device(self) -> None:
        """Open the device; CameraError when it cannot be opened."""

    @abstractmethod
    def _grab(self) -> None:
        """Wait for the next frame from the device without decoding it; CameraError on failure."""

    @abstractmethod
    def _retrieve(self) -> np.ndarray:
        """The frame last grabbed, decoded; CameraError on failure."""

    @abstractmethod
    def _close_device(self) -> None:
        """Release the device; called from the grabber thread, never while it is grabbing."""

    def open(self) -> None:
        previous = getattr(self, "_thread", None)
        if previous is not None and previous.is_alive():
            # Its device handle is still in use: opening another now would race with it.
            raise CameraError(f"{self.name}: the previous capture is still blocked in a read")
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._error: str | None = None
        self._handed = -1  # index of the last frame read() returned
        self._next_index = 0
        self._running = threading.Event()
        self._open_device()
        self._running.set()
        self._thread = threading.Thread(target=self._grab_loop, name=f"camera {self.name}", daemon=True)
        self._thread.start()

    def read(self) -> Frame | None:
        # The next kept frame may be a whole period away at a low configured rate.
        timeout = self.read_timeout_s + 1.0 / self.fps
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._latest is not None and self._latest.index > self._handed:
                    self._handed = self._latest.index
                    return self._latest
                if self._error is not None:
                    raise CameraError(self._error)
                if not self._running.is_set():
                    raise CameraError(f"{self.name}: camera is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CameraError(f"{self.name}: no frame for {timeout:.3g} s")
                self._cond.wait(left)

    def close(self) -> None:
        running = getattr(self, "_running", None)
        if running is None:
            return
        running.clear()
        with self._cond:
            self._cond.notify_all()
        # The thread releases the device itself once its current grab returns: releasing it from
        # here while a grab is in flight is a use-after-free in some capture backends.
        self._thread.join(timeout=CLOSE_WAIT_S)
        if self._thread.is_alive():
            log.warning("%s: camera thread still blocked in a read; leaving it to finish", self.name)

    def _grab_loop(self) -> None:
        next_keep = -float("inf")
        try:
            while self._running.is_set():
                self._grab()
                now = time.monotonic()
                period = 1.0 / self.fps
                if now < next_keep - PACE_TOLERANCE * period:
                    continue  # above the configured rate: dropped before decoding
                image = as_bgr(self._retrieve())
                # Keep to a grid so the average rate is the configured one despite the tolerance,
                # but never try to catch up on time lost in a stall.
                next_keep = next_keep + period if next_keep + period > now else now + period
                with self._cond:
                    self._latest = Frame(image, now, self._next_index)
                    self._next_index += 1
                    self._cond.notify_all()
        except CameraError as e:
            self._fail(str(e))
        except Exception as e:  # a backend bug must surface as a camera failure, not a dead thread
            log.exception("%s: camera thread failed", self.name)
            self._fail(f"{self.name}: {type(e).__name__}: {e}")
        finally:
            try:
                self._close_device()
            except Exception:
                log.exception("%s: releasing the camera failed", self.name)

    def _fail(self, message: str) -> None:
        with self._cond:
            self._error = message
            self._cond.notify_all()
