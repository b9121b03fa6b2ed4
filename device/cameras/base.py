"""The frame-source interface every camera backend implements, and the frame it hands out."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Self

import cv2
import numpy as np


class CameraError(Exception):
    """A source that cannot be opened or read; the message is one line naming the source."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # BGR uint8, (height, width, 3)
    t: float  # seconds: media time for files and folders, time.monotonic() for live sources
    index: int  # consecutive per delivered frame; a gap means the consumer missed (dropped) frames


class FrameSource(ABC):
    """open() → read() … → close(). read() returns None when a finite source ends."""

    # Live sources (cameras, streams, demo) pace themselves and can fail transiently, so a
    # ReopeningSource retries them; files and folders cannot recover, so their errors end the run.
    live: ClassVar[bool] = False

    def __init__(self, name: str, fps: float) -> None:
        self.name = name  # for messages; never contains a password
        self.fps = fps

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> Frame | None: ...

    @abstractmethod
    def close(self) -> None: ...

    def set_fps(self, fps: float) -> None:
        """Change the frame rate while running (the `fps` command)."""
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.fps = fps

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def as_bgr(image: np.ndarray) -> np.ndarray:
    """Every source hands out 3-channel BGR uint8, whatever the device delivered."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def redact(spec: str) -> str:
    """A source as it may appear in logs: rtsp://user:secret@cam → rtsp://user:***@cam.

    Camera passwords are often pasted unencoded, with '/' or '@' in them, so the credentials
    are everything up to the *last* '@'; a bare token (rtsp://TOKEN@cam) is hidden whole. A URL
    whose path has an '@' loses more than it needs to: a log line may be vague, never a leak.
    """
    scheme = _SCHEME.match(spec)
    if scheme is None:
        return spec
    rest = spec[scheme.end() :]
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return spec
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon and "/" not in user else "***"
    return f"{scheme.group(0)}{shown}@{host}"
