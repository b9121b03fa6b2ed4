"""The Raspberry Pi camera through picamera2 (libcamera). picamera2 is imported only here.

picamera2 comes from Raspberry Pi OS (`apt install python3-picamera2`), not from PyPI wheels
that would match the system's libcamera, so the venv must see system packages.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from serenbox.device.cameras.base import CameraError
from serenbox.device.cameras.live import LiveSource
from serenbox.device.config import CameraConfig

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "picamera2 is not installed: on Raspberry Pi OS run `sudo apt install python3-picamera2` "
    "and create the venv with --system-site-packages"
)


def _import_picamera2() -> Any:
    try:
        from picamera2 import Picamera2
    except ImportError:
        raise CameraError(f"picamera2: {INSTALL_HINT}") from None
    return Picamera2


class Picamera2Source(LiveSource):
    def __init__(self, cfg: CameraConfig, camera_num: int = 0) -> None:
        super().__init__(f"picamera2 camera {camera_num}", cfg.fps)
        self.cfg = cfg
        self.camera_num = camera_num
        self._picamera2 = _import_picamera2()
        self._cam: Any = None
        self._image: np.ndarray | None = None

    def _frame_duration_us(self) -> int:
        return round(1_000_000 / self.fps)

    def _open_device(self) -> None:
        try:
            cam = self._picamera2(self.camera_num)
        except Exception as e:  # picamera2 raises IndexError/RuntimeError when no camera is attached
            raise CameraError(f"{self.name}: cannot open ({e})") from None
        try:
            us = self._frame_duration_us()
            config = cam.create_video_configuration(
                # libcamera's "RGB888" is B, G, R in memory: exactly OpenCV's BGR, no conversion.
                main={"size": (self.cfg.width, self.cfg.height), "format": "RGB888"},
                # The sensor itself runs at the configured rate: no frames are read only to be dropped.
                controls={"FrameDurationLimits": (us, us)},
                buffer_count=3,
            )
            cam.configure(config)
            cam.start()
        except Exception as e:
            cam.close()
            raise CameraError(f"{self.name}: cannot start ({e})") from None
        self._cam = cam
        log.info("%s: opened at %dx%d", self.name, self.cfg.width, self.cfg.height)

    def _grab(self) -> None:
        try:
            self._image = self._cam.capture_array("main")
        except Exception as e:
            raise CameraError(f"{self.name}: read failed ({e})") from None

    def _retrieve(self) -> np.ndarray:
        assert self._image is not None
        return self._image

    def _close_device(self) -> None:
        if self._cam is not None:
            try:
                self._cam.stop()
            finally:
                self._cam.close()
                self._cam = None

    def set_fps(self, fps: float) -> None:
        super().set_fps(fps)
        if self._cam is not None:
            us = self._frame_duration_us()
            try:
                self._cam.set_controls({"FrameDurationLimits": (us, us)})
            except Exception as e:  # the grabber thread still thins frames to the new rate
                log.warning("%s: could not change the sensor frame rate: %s", self.name, e)
