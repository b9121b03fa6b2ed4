"""`demo`: a live-like camera that needs no hardware, for first runs and demonstrations.

A 640×480 scene built at run time from scikit-image's astronaut photo (it ships inside the
scikit-image package: nothing is downloaded). Her face sways across the room for 12 s, then is
gone for 6 s, and comes back, so a run shows `new`, `update` and `end` events. Frames come in real
time at the configured fps; a consumer that falls behind gets the newest frame (an index gap).
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from serenbox.device.cameras.base import CameraError, Frame, FrameSource
from serenbox.device.config import CameraConfig

WIDTH, HEIGHT = 640, 480
FACE_BOX = (177, 66, 95, 95)  # x, y, w, h of the face in the 512×512 astronaut photo
HEAD_SIZE = 200  # pixels the head crop (face plus margin) occupies in the scene
CYCLE_S, VISIBLE_S = 18.0, 12.0
INSTALL_HINT = "the demo source needs scikit-image's astronaut photo: pip install serenbox[demo]"


def astronaut_bgr() -> np.ndarray:
    """The astronaut photo as BGR, read straight from scikit-image's package data."""
    try:
        spec = importlib.util.find_spec("skimage")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise CameraError(f"demo: {INSTALL_HINT}")
    # Reading the PNG directly keeps `import skimage` (and its dependencies) out of the daemon.
    image = cv2.imread(str(Path(spec.origin).parent / "data" / "astronaut.png"), cv2.IMREAD_COLOR)
    if image is None:
        try:
            from skimage import data

            image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
        except Exception:
            raise CameraError(f"demo: {INSTALL_HINT}") from None
    return image


def head_crop(photo: np.ndarray, size: int = HEAD_SIZE) -> np.ndarray:
    """The astronaut's head with a margin around the face, as a size×size BGR image."""
    x, y, w, h = FACE_BOX
    side = int(w * 1.8)
    x0, y0 = max(0, x + w // 2 - side // 2), max(0, y + h // 2 - side // 2)
    return cv2.resize(photo[y0 : y0 + side, x0 : x0 + side], (size, size), interpolation=cv2.INTER_AREA)


def background() -> np.ndarray:
    """A plain wall with soft light from above: nothing a face detector could mistake for a face."""
    ramp = np.linspace(150, 70, HEIGHT, dtype=np.float32)[:, None, None]
    tint = np.array([1.0, 0.97, 0.92], dtype=np.float32)  # warm indoor light, B G R
    return np.broadcast_to(ramp * tint, (HEIGHT, WIDTH, 3)).astype(np.uint8)


def paste(scene: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    """Copy patch onto scene at (x, y), clipped to the scene's borders."""
    h, w = patch.shape[:2]
    sx0, sy0 = max(0, x), max(0, y)
    sx1, sy1 = min(scene.shape[1], x + w), min(scene.shape[0], y + h)
    if sx0 < sx1 and sy0 < sy1:
        scene[sy0:sy1, sx0:sx1] = patch[sy0 - y : sy1 - y, sx0 - x : sx1 - x]


class DemoScene:
    """The scene at any time t: deterministic, so the same t always draws the same frame."""

    def __init__(self) -> None:
        self.background = background()
        self.head = head_crop(astronaut_bgr())

    def head_position(self, t: float) -> tuple[int, int] | None:
        """Top-left corner of the head at time t, None while she is away."""
        phase = t % CYCLE_S
        if phase >= VISIBLE_S:
            return None
        cx = WIDTH / 2 + 150 * math.sin(2 * math.pi * phase / 6.0)
        cy = HEIGHT / 2 + 30 * math.sin(2 * math.pi * phase / 3.0)
        return int(cx - HEAD_SIZE / 2), int(cy - HEAD_SIZE / 2)

    def render(self, t: float) -> np.ndarray:
        scene = self.background.copy()
        pos = self.head_position(t)
        if pos is not None:
            paste(scene, self.head, *pos)
        return scene


class DemoSource(FrameSource):
    live = True

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__("demo", cfg.fps)
        self.scene = DemoScene()  # fails here, at configuration time, when scikit-image is missing
        self._closed = threading.Event()

    def open(self) -> None:
        self._closed.clear()
        self._start = time.monotonic()
        self._next = self._start
        self._index = 0

    def read(self) -> Frame | None:
        wait = self._next - time.monotonic()
        if wait > 0 and self._closed.wait(wait):
            raise CameraError("demo: camera is closed")
        now = time.monotonic()
        period = 1.0 / self.fps
        late = int((now - self._next) // period)
        if late > 0:  # the consumer fell behind: skip to the newest frame
            self._index += late
            self._next += late * period
        frame = Frame(self.scene.render(now - self._start), now, self._index)
        self._index += 1
        self._next += period
        return frame

    def close(self) -> None:
        self._closed.set()
