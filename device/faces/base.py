"""The face-detector interface: a gray frame in, face boxes out (largest first)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from serenbox.device.config import ConfigError


class DetectorError(ConfigError):
    """A detector that cannot be built (missing model file); the message says how to fix it.

    A ConfigError, so the command line reports it as one line naming `detector.*`."""


Point = tuple[float, float]


class Face(NamedTuple):
    """A face box in pixels of the frame it was found in, with landmarks where the detector
    gives them (BlazeFace: the subject's right eye, left eye, nose tip, mouth centre, right ear
    tragion, left ear tragion, as (x, y); Haar: none)."""

    x: int
    y: int
    w: int
    h: int
    landmarks: tuple[Point, ...] | None = None

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.w, self.h

    @property
    def area(self) -> int:
        return self.w * self.h

    @property
    def roll(self) -> float | None:
        """How far the face is turned in the picture's plane, in degrees, from its eye line:
        positive when it leans clockwise as seen (its left eye, on the image's right, lower).
        Turning the picture anticlockwise by this much (OpenCV's sense of a positive angle)
        levels the eyes. None without landmarks."""
        if self.landmarks is None:
            return None
        (rx, ry), (lx, ly) = self.landmarks[0], self.landmarks[1]
        return math.degrees(math.atan2(ly - ry, lx - rx))


class FaceDetector(ABC):
    """Implementations return at most `max_faces` faces, largest first, none shorter than `min_face`."""

    @abstractmethod
    def detect(self, gray: np.ndarray) -> list[Face]: ...


def face_rolls(faces: Sequence[Face], align: bool) -> list[float | None]:
    """Per face, how far to turn it upright before it is classified (detector.align): its eye
    line's lean where the detector gave landmarks, else None (cropped as it is)."""
    return [getattr(f, "roll", None) if align else None for f in faces]


def largest(faces: list[Face], min_face: int, max_faces: int) -> list[Face]:
    """The contract's filter, shared by every detector: size floor, largest first, count cap."""
    kept = [f for f in faces if min(f.w, f.h) >= min_face]
    kept.sort(key=lambda f: f.area, reverse=True)
    return kept[:max_faces]
