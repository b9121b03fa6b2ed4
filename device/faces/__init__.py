"""Face detectors behind one interface (`FaceDetector`), picked by `detector.kind`.

haar: OpenCV's cascade; blazeface: MediaPipe's BlazeFace on the TFLite interpreter. A new
detector is a module with a FaceDetector subclass and a line in build_detector; everything
downstream only sees Face boxes.
"""

from __future__ import annotations

from serenbox.device.config import DetectorConfig
from serenbox.device.faces.base import DetectorError, Face, FaceDetector

__all__ = ["DetectorError", "Face", "FaceDetector", "build_detector"]


def build_detector(cfg: DetectorConfig) -> FaceDetector:
    if cfg.kind == "haar":
        from serenbox.device.faces.haar import HaarDetector

        return HaarDetector(cfg)
    if cfg.kind == "blazeface":
        from serenbox.device.faces.blazeface import BlazeFaceDetector

        return BlazeFaceDetector(cfg)
    raise DetectorError(f"detector.kind: unknown detector {cfg.kind!r} (known: haar, blazeface)")
