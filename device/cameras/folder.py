"""A directory of still images played as a clip: one image per frame at the configured fps."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from serenbox.device import images
from serenbox.device.cameras.base import CameraError, Frame, FrameSource
from serenbox.device.config import CameraConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})


def natural_key(path: Path) -> list[int | str]:
    """frame2.png before frame10.png: numbered exports play in the order they were taken."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=natural_key)


class FolderSource(FrameSource):
    """Images in natural name order; image i has media time i/fps. Unreadable images are skipped."""

    def __init__(self, folder: str, cfg: CameraConfig) -> None:
        super().__init__(folder, cfg.fps)
        self.folder = Path(folder)
        self.loop = cfg.loop
        try:
            self.images = list_images(self.folder)
        except OSError as e:
            raise CameraError(f"{folder}: cannot list the folder ({e.strerror})") from None
        if not self.images:
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            raise CameraError(f"{folder}: no images in the folder (looked for {kinds})")
        self._pos = 0
        self._index = 0
        self._t = 0.0

    def open(self) -> None:
        self._pos = 0
        self._index = 0
        self._t = 0.0

    def read(self) -> Frame | None:
        skipped = 0
        while skipped < len(self.images):  # bounds a looping folder in which nothing decodes
            if self._pos >= len(self.images):
                if not self.loop:
                    return None
                self._pos = 0
            path = self.images[self._pos]
            self._pos += 1
            try:
                image, _ = images.read(path)
            except images.ImageError as e:
                # One bad file (too large, truncated, not an image) must not end the run.
                log.warning("%s; skipped", e)
                skipped += 1
                continue
            frame = Frame(image, self._t, self._index)
            self._index += 1
            self._t += 1.0 / self.fps
            return frame
        raise CameraError(f"{self.name}: none of the images in the folder can be read")

    def close(self) -> None:
        pass
