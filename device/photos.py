"""Still photos → the emotion of each face: the one code path of `serenbox classify` and `serenbox.classify`.

Both print or return what `classify_photo` gives, so a face gets the same box, emotion and
probabilities, and an exact tie the same winner (`describe` → events.dominant), either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from serenbox.device import images
from serenbox.device.classifier import Classifier, to_gray
from serenbox.device.events import dominant, normalised_box, rounded_probabilities
from serenbox.device.faces import FaceDetector
from serenbox.device.faces.base import face_rolls

# A photo no larger than this on its longest side, with no face found, is most likely a face crop
# (FER2013's are 48×48): the detector needs context around a face and a face of detector.min_face.
CROP_HINT_MAX_SIDE = 160


class Box(NamedTuple):
    """A face box as fractions of the image's width and height (0..1): left, top, width, height."""

    x: float
    y: float
    w: float
    h: float


class PixelBox(NamedTuple):
    """A face box in pixels of the image as given (full size, before any scaling down): left, top, width, height."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class FaceEmotion:
    """One face: where it is, its emotion (the most probable; exact ties go to the first in label order),
    that emotion's probability, and all seven probabilities (4 decimals, summing to 1)."""

    box: Box
    pixels: PixelBox
    emotion: str
    confidence: float
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the face as `serenbox classify` prints it."""
        return {
            "box": self.box._asdict(),
            "emotion": self.emotion,
            "confidence": self.confidence,
            "probabilities": dict(self.probabilities),
            "pixels": self.pixels._asdict(),
        }


@dataclass(frozen=True)
class Photo:
    """A checked image ready for the model: BGR or gray uint8, at most images.MAX_SIDE long, and its full size."""

    name: str
    image: np.ndarray
    width: int
    height: int

    def looks_like_crop(self) -> bool:
        return max(self.width, self.height) <= CROP_HINT_MAX_SIDE


def open_photo(source: str | os.PathLike[str] | bytes | np.ndarray, rgb: bool = False) -> Photo:
    """A path, an encoded image's bytes, or pixels (images.from_array); images.ImageError if it is unusable."""
    if isinstance(source, np.ndarray):
        image, (width, height) = images.from_array(source, "<array>", rgb)
        return Photo("<array>", image, width, height)
    if rgb:
        raise ValueError("rgb=True is for numpy arrays; an image file or its bytes say their own channel order")
    if isinstance(source, bytes | bytearray | memoryview):
        image, (width, height) = images.decode(bytes(source), "<bytes>")
        return Photo("<bytes>", image, width, height)
    if isinstance(source, str | os.PathLike):
        image, (width, height) = images.read(source)
        return Photo(os.fspath(source), image, width, height)
    raise TypeError(f"image: expected a path, bytes or a numpy array, got {type(source).__name__}")


def describe(probs: Sequence[float] | np.ndarray, box: Box, pixels: PixelBox) -> FaceEmotion:
    """A face's result from its model probabilities; the tie rule is events.dominant's, as in the daemon."""
    probabilities = rounded_probabilities(probs)
    emotion = dominant(probs)  # rounded_probabilities keeps this emotion's published value the largest
    return FaceEmotion(box, pixels, emotion, probabilities[emotion], probabilities)


def classify_photo(
    photo: Photo, classifier: Classifier, detector: FaceDetector | None, margin: float, align: bool = True
) -> list[FaceEmotion]:
    """The faces the detector finds, largest first; with no detector the whole photo is one face (a crop).

    `align`: turn each face upright by its eye line before the crop, where the detector gives landmarks.
    """
    gray = to_gray(photo.image)
    height, width = gray.shape[:2]
    if detector is None:
        (probs,) = classifier.classify_crops([gray])
        return [describe(probs, Box(0.0, 0.0, 1.0, 1.0), PixelBox(0, 0, photo.width, photo.height))]
    faces = detector.detect(gray)
    boxes = [(float(f.x), float(f.y), float(f.w), float(f.h)) for f in faces]
    probs = classifier.classify(gray, boxes, margin, face_rolls(faces, align))
    return [
        describe(p, Box(**normalised_box(b, width, height)), _full_size_pixels(b, (width, height), photo))
        for b, p in zip(boxes, probs, strict=True)
    ]


def _full_size_pixels(box: Sequence[float], seen: tuple[int, int], photo: Photo) -> PixelBox:
    # Large photos are detected scaled down (images.MAX_SIDE); the caller's pixels are the full-size ones.
    sx, sy = photo.width / seen[0], photo.height / seen[1]
    x, y, w, h = box
    x0, y0 = min(max(round(x * sx), 0), photo.width), min(max(round(y * sy), 0), photo.height)
    x1, y1 = min(max(round((x + w) * sx), 0), photo.width), min(max(round((y + h) * sy), 0), photo.height)
    return PixelBox(x0, y0, x1 - x0, y1 - y0)


def result_line(photo: Photo, faces: Sequence[FaceEmotion]) -> dict[str, Any]:
    """One photo's JSON line for `serenbox classify`."""
    return {"image": photo.name, "width": photo.width, "height": photo.height, "faces": [f.to_dict() for f in faces]}
