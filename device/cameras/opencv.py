"""OpenCV sources: a V4L2 camera (/dev/video* or its index), an RTSP/HTTP stream, a video file."""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np
from serenbox.device.cameras.base import CameraError, Frame, FrameSource, as_bgr, redact
from serenbox.device.cameras.live import LiveSource
from serenbox.device.config import CameraConfig

log = logging.getLogger(__name__)

STREAM_TIMEOUT_MS = 10_000  # FFmpeg's open/read timeouts for network streams


class OpenCVCamera(LiveSource):
    """A camera device (index or /dev/video path) or a network stream URL, newest frame first."""

    def __init__(self, device: int | str, cfg: CameraConfig) -> None:
        name = f"camera {device} (/dev/video{device})" if isinstance(device, int) else redact(device)
        super().__init__(name, cfg.fps)
        self.device = device
        self.cfg = cfg
        self._cap: cv2.VideoCapture | None = None

    @property
    def is_stream(self) -> bool:
        return isinstance(self.device, str) and "://" in self.device

    def _open_device(self) -> None:
        if self.is_stream:
            timeout = STREAM_TIMEOUT_MS
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout]
            cap = cv2.VideoCapture(self.device, cv2.CAP_FFMPEG, params)
        else:
            cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"{self.name}: cannot open (missing, busy or not a camera)")
        if not self.is_stream:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height)
            # The grabber thread drains the device anyway; a one-frame driver queue keeps
            # the newest frame as fresh as the hardware allows.
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            got = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
            if got != (self.cfg.width, self.cfg.height):
                wanted = (self.cfg.width, self.cfg.height)
                log.info("%s: asked for %dx%d, the camera delivers %dx%d", self.name, *wanted, *got)
        self._cap = cap
        log.info("%s: opened", self.name)

    def _grab(self) -> None:
        assert self._cap is not None
        if not self._cap.grab():
            raise CameraError(f"{self.name}: read failed (camera gone or stream ended)")

    def _retrieve(self) -> np.ndarray:
        assert self._cap is not None
        ok, image = self._cap.retrieve()
        if not ok or image is None:
            raise CameraError(f"{self.name}: could not decode a frame")
        return image

    def _close_device(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class VideoFileSource(FrameSource):
    """A video file sampled by media time at the configured fps, as fast as it decodes.

    Sample k is the first frame whose timestamp is at or after k/fps, so the frames a test sees
    depend on the file alone, never on the machine's speed. With `loop` the file replays forever
    and time keeps counting up across replays.
    """

    def __init__(self, path: str, cfg: CameraConfig) -> None:
        super().__init__(path, cfg.fps)
        self.path = path
        self.loop = cfg.loop
        self._cap: cv2.VideoCapture | None = None
        # Fail at configuration time, not mid-run, for a file OpenCV cannot decode.
        cap = self._open_capture()
        decodes = cap.grab()
        cap.release()
        if not decodes:
            raise CameraError(f"{self.path}: not a video OpenCV can read")

    def _open_capture(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.path)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"{self.path}: not a video OpenCV can read")
        return cap

    def open(self) -> None:
        self._cap = self._open_capture()
        native = self._cap.get(cv2.CAP_PROP_FPS)
        self._native_fps = native if math.isfinite(native) and native > 0 else None
        self._file_index = 0  # frame number within the current pass
        self._offset = 0.0  # media time at the start of the current pass
        self._last_t = -math.inf
        self._next_t = 0.0
        self._index = 0

    def read(self) -> Frame | None:
        if self._cap is None:
            raise CameraError(f"{self.name}: read before open")
        while True:
            if not self._cap.grab():
                if not self.loop or self._file_index == 0:
                    return None
                self._restart()
                continue
            t = self._offset + self._media_time()
            self._file_index += 1
            self._last_t = t
            if t + 1e-6 < self._next_t:
                continue  # between samples at the configured rate: never decoded
            while self._next_t <= t + 1e-6:
                self._next_t += 1.0 / self.fps
            ok, image = self._cap.retrieve()
            if not ok or image is None:
                log.warning("%s: frame %d does not decode; skipped", self.name, self._file_index - 1)
                continue
            frame = Frame(as_bgr(image), t, self._index)
            self._index += 1
            return frame

    def _media_time(self) -> float:
        # Frame number over the container's rate is exact and deterministic; POS_MSEC is the
        # fallback for containers that do not declare a rate.
        if self._native_fps is not None:
            return self._file_index / self._native_fps
        return self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0 if self._cap is not None else 0.0

    def _restart(self) -> None:
        assert self._cap is not None
        self._cap.release()
        frame_time = 1.0 / self._native_fps if self._native_fps else 1.0 / self.fps
        self._offset = self._last_t + frame_time
        self._file_index = 0
        self._cap = self._open_capture()
        log.debug("%s: looping", self.name)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
