"""Real image and video files for tests, built from a real face photo (scikit-image's astronaut).

Everything is written with OpenCV the way a user's files would be: PNG/JPEG stills and MJPG
.avi clips (MJPG encodes with opencv-python-headless alone, no system codecs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 640, 480
FACE_IN_PHOTO = (177, 66, 95, 95)  # x, y, w, h of the astronaut's face in the 512×512 photo
HEAD_MARGIN = 1.8  # a head image is this many face widths wide, face centred
BACKGROUND = 110  # gray level of the plain wall behind pasted heads


@cache
def astronaut_bgr() -> np.ndarray:
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def head(size: int, brightness: float = 1.0) -> np.ndarray:
    """The astronaut's head as a size×size BGR image; brightness scales its pixel values."""
    x, y, w, h = FACE_IN_PHOTO
    side = round(w * HEAD_MARGIN)
    x0, y0 = x + w // 2 - side // 2, y + h // 2 - side // 2
    crop = astronaut_bgr()[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if size < side else cv2.INTER_LINEAR
    out = cv2.resize(crop, (size, size), interpolation=interp)
    if brightness != 1.0:
        out = np.clip(out.astype(np.float32) * brightness, 0, 255).astype(np.uint8)
    return out


def face_in_head(x: int, y: int, size: int) -> tuple[int, int, int, int]:
    """Where the face lies in a head of `size` pasted at (x, y): x, y, w, h."""
    face = size / HEAD_MARGIN
    off = (size - face) / 2
    return round(x + off), round(y + off), round(face), round(face)


def scene(
    heads: Sequence[tuple[int, int, int]] = (),
    width: int = WIDTH,
    height: int = HEIGHT,
    brightness: float | Sequence[float] = 1.0,
) -> np.ndarray:
    """A plain wall with astronaut heads pasted at (x, y, size), clipped at the borders."""
    image = np.full((height, width, 3), BACKGROUND, np.uint8)
    levels = [brightness] * len(heads) if isinstance(brightness, int | float) else list(brightness)
    for (x, y, size), level in zip(heads, levels, strict=True):
        patch = head(size, level)
        sx0, sy0, sx1, sy1 = max(0, x), max(0, y), min(width, x + size), min(height, y + size)
        if sx0 < sx1 and sy0 < sy1:
            image[sy0:sy1, sx0:sx1] = patch[sy0 - y : sy1 - y, sx0 - x : sx1 - x]
    return image


def write_image(path: Path, image: np.ndarray) -> Path:
    path = Path(path)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"OpenCV could not write {path}")
    return path


def write_video(path: Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    """An MJPG .avi of BGR frames (all the size of the first) at `fps`."""
    path = Path(path)
    writer = None
    count = 0
    try:
        for frame in frames:
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
                if not writer.isOpened():
                    raise OSError(f"OpenCV cannot write MJPG video to {path}")
            writer.write(frame)
            count += 1
    finally:
        if writer is not None:
            writer.release()
    if count == 0:
        raise ValueError("write_video needs at least one frame")
    return path


# --- clips whose frames say which frame they are ---------------------------------------------

LEVEL0, LEVEL_STEP = 20, 4  # survives JPEG compression: a flat frame decodes to within ±1


def numbered_frame(i: int, width: int = 160, height: int = 120) -> np.ndarray:
    """A flat gray frame whose level encodes i (0 ≤ i < 58)."""
    level = LEVEL0 + LEVEL_STEP * i
    if i < 0 or level > 255:
        raise ValueError(f"frame number {i} does not fit in a gray level")
    return np.full((height, width, 3), level, np.uint8)


def frame_number(image: np.ndarray) -> int:
    return round((float(image.mean()) - LEVEL0) / LEVEL_STEP)


def numbered_video(path: Path, count: int, fps: float) -> Path:
    return write_video(path, (numbered_frame(i) for i in range(count)), fps)


# --- a face moving, leaving and coming back ---------------------------------------------------


def moving_face_video(
    path: Path,
    seconds: float,
    fps: float,
    present: Callable[[float], bool] = lambda t: True,
    brightness: Callable[[float], float] = lambda t: 1.0,
    size: int = 200,
) -> Path:
    """A 640×480 clip of one head swaying left and right; `present(t)` and `brightness(t)` let a
    test script when the face is there and how bright it is (to drive a brightness model)."""

    def frames() -> Iterable[np.ndarray]:
        for i in range(round(seconds * fps)):
            t = i / fps
            if not present(t):
                yield scene()
                continue
            x = round(WIDTH / 2 - size / 2 + 120 * math.sin(2 * math.pi * t / 6.0))
            y = round(HEIGHT / 2 - size / 2)
            yield scene([(x, y, size)], brightness=brightness(t))

    return write_video(path, frames(), fps)
