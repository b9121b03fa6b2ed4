"""Frame sources behind one interface (`FrameSource`), picked from `camera.source` by open_source.

Backends with optional dependencies (picamera2, the scikit-image demo) are imported only when
their source is asked for, so a box without them still runs every other source.
"""

from __future__ import annotations

import re
from pathlib import Path

from serenbox.device.cameras.base import CameraError, Frame, FrameSource, redact
from serenbox.device.cameras.reopening import ReopeningSource
from serenbox.device.config import CameraConfig

__all__ = ["CameraError", "Frame", "FrameSource", "ReopeningSource", "open_source"]

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp")
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def open_source(spec: str, cfg: CameraConfig) -> FrameSource:
    """The source a `camera.source` value names (not yet opened); CameraError if there is none."""
    spec = str(spec).strip()
    if not spec:
        raise CameraError("camera source is empty (use picamera2, demo, 0, /dev/video0, a file, a folder or a URL)")
    if spec == "picamera2":
        from serenbox.device.cameras.picamera2 import Picamera2Source

        return Picamera2Source(cfg)
    if spec == "demo":
        from serenbox.device.cameras.demo import DemoSource

        return DemoSource(cfg)

    from serenbox.device.cameras.folder import FolderSource
    from serenbox.device.cameras.opencv import OpenCVCamera, VideoFileSource

    if spec.isdigit():
        return OpenCVCamera(int(spec), cfg)
    url = _URL.match(spec)
    if url:
        if url.group(1).lower() not in STREAM_SCHEMES:
            raise CameraError(f"{redact(spec)}: unsupported URL scheme (use one of {', '.join(STREAM_SCHEMES)})")
        return OpenCVCamera(spec, cfg)
    path = Path(spec)
    if spec.startswith("/dev/video"):
        # Not there yet is not wrong: a USB camera may be plugged in later (the daemon waits).
        return OpenCVCamera(spec, cfg)
    if path.is_dir():
        return FolderSource(spec, cfg)
    if path.is_file():
        return VideoFileSource(spec, cfg)
    raise CameraError(
        f"{spec!r} is not a camera source: expected picamera2, demo, a camera index (0), /dev/videoN, "
        "an rtsp/http URL, an image folder or an existing video file"
    )
