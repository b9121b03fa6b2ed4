"""OpenCV's Haar frontal-face cascade: no model download, fast enough on a Pi for a few faces.

The cascade ships in opencv-python 4.x wheels (cv2.data.haarcascades) and in Debian's
opencv-data (/usr/share/opencv4/haarcascades); OpenCV 5.x wheels no longer carry it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from serenbox.device.config import DetectorConfig
from serenbox.device.faces.base import DetectorError, Face, FaceDetector, largest

CASCADE = "haarcascade_frontalface_default.xml"
DEBIAN_DIRS = ("/usr/share/opencv4/haarcascades", "/usr/share/opencv/haarcascades")
# The cascade's own window is 24×24 pixels; faces are searched on a frame scaled down so that the
# smallest wanted face is about this size, which makes detection several times cheaper with a
# large min_face at no loss (smaller windows than the cascade's cannot match anyway).
DETECT_MIN_PX = 30


def cascade_dirs() -> list[Path]:
    dirs = []
    data = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if data:
        dirs.append(Path(data))
    dirs.extend(Path(d) for d in DEBIAN_DIRS)
    return dirs


def find_cascade(dirs: list[Path] | None = None) -> Path:
    searched = cascade_dirs() if dirs is None else dirs
    for folder in searched:
        if (folder / CASCADE).is_file():
            return folder / CASCADE
    where = ", ".join(str(d) for d in searched) or "nowhere"
    raise DetectorError(
        f"detector.kind: haar: {CASCADE} not found (looked in {where}); "
        "install opencv-python-headless<5 or Debian's opencv-data"
    )


class HaarDetector(FaceDetector):
    def __init__(self, cfg: DetectorConfig, cascade: Path | None = None) -> None:
        self.cfg = cfg
        path = cascade or find_cascade()
        try:
            self.classifier = cv2.CascadeClassifier(str(path))
            loaded = not self.classifier.empty()
        except (cv2.error, SystemError):  # OpenCV raises on malformed XML instead of returning empty
            loaded = False
        if not loaded:
            raise DetectorError(f"detector.kind: haar: {path} is not a cascade OpenCV can load")
        self.path = path
        self.scale = min(1.0, DETECT_MIN_PX / cfg.min_face)

    def detect(self, gray: np.ndarray) -> list[Face]:
        if gray.ndim == 3:
            gray = cv2.cvtColor(gray, cv2.COLOR_BGR2GRAY)
        small = gray
        if self.scale < 1.0:
            small = cv2.resize(gray, None, fx=self.scale, fy=self.scale, interpolation=cv2.INTER_AREA)
        min_px = max(1, int(self.cfg.min_face * self.scale))
        boxes = self.classifier.detectMultiScale(
            small,
            scaleFactor=self.cfg.scale_factor,
            minNeighbors=self.cfg.min_neighbors,
            minSize=(min_px, min_px),
        )
        inv = 1.0 / self.scale
        faces = [Face(round(x * inv), round(y * inv), round(w * inv), round(h * inv)) for x, y, w, h in boxes]
        return largest(faces, self.cfg.min_face, self.cfg.max_faces)
