"""The face-detector interface: a gray frame in, face boxes out (largest first)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
from serenbox.device.config import ConfigError


class DetectorError(ConfigError):
    """A detector that cannot be built (missing model file); the message says how to fix it.

    A ConfigError, so the command line reports it as one line naming `detector.*`."""


class Face(NamedTuple):
    """A face box in pixels of the frame it was found in."""

    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h


class FaceDetector(ABC):
    """Implementations return at most `max_faces` faces, largest first, none shorter than `min_face`."""

    @abstractmethod
    def detect(self, gray: np.ndarray) -> list[Face]: ...


def largest(faces: list[Face], min_face: int, max_faces: int) -> list[Face]:
    """The contract's filter, shared by every detector: size floor, largest first, count cap."""
    kept = [f for f in faces if min(f.w, f.h) >= min_face]
    kept.sort(key=lambda f: f.area, reverse=True)
    return kept[:max_faces]
