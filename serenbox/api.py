"""`serenbox.classify`: the emotions of the faces in a photo, from Python.

The model and the face detector load on the first call and stay loaded for the process (one
set per configuration); calls from several threads are safe. The work is device/photos.py's,
the code path of `serenbox classify`, so both give the same answer for the same image.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from serenbox.device import classifier as classifier_module
from serenbox.device.config import Config, from_dict, load, to_dict
from serenbox.device.faces import FaceDetector, build_detector
from serenbox.device.photos import FaceEmotion, classify_photo, open_photo

ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray
ConfigInput = Config | Mapping[str, Any] | str | os.PathLike[str] | None


class _Models:
    """A loaded classifier and (on the first call that detects) detector, with the lock that serialises them:
    a TFLite interpreter is not safe to invoke from two threads at once."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.classifier = classifier_module.from_config(cfg.model)
        self.detector: FaceDetector | None = None
        self.lock = threading.Lock()

    def classify(self, image: ImageInput, crop: bool, rgb: bool) -> list[FaceEmotion]:
        photo = open_photo(image, rgb)  # decoding needs no lock: callers decode in parallel
        with self.lock:
            detector = None
            if not crop:
                if self.detector is None:
                    self.detector = build_detector(self.cfg.detector)
                detector = self.detector
            faces = classify_photo(photo, self.classifier, detector, self.cfg.detector.margin, self.cfg.detector.align)
        if not faces and not crop and photo.looks_like_crop():
            warnings.warn(
                f"no face found in a {photo.width}×{photo.height} image; for already-cropped faces pass crop=True",
                stacklevel=3,
            )
        return faces


_loaded: dict[str, _Models] = {}
_loading = threading.Lock()
_default: _Models | None = None  # the models without a config: most calls, so spared building a Config each time


def _config(config: ConfigInput) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return from_dict(dict(config))
    if isinstance(config, str | os.PathLike):
        return load(Path(config))
    raise TypeError(f"config: expected a Config, a dict or a YAML file's path, got {type(config).__name__}")


def _models(cfg: Config) -> _Models:
    # Only the model and detector settings decide what is loaded; the rest of a configuration does not matter here.
    settings = to_dict(cfg)
    key = json.dumps({"model": settings["model"], "detector": settings["detector"]}, sort_keys=True)
    with _loading:
        if key not in _loaded:
            _loaded[key] = _Models(cfg)
        return _loaded[key]


def classify(
    image: ImageInput,
    *,
    crop: bool = False,
    config: ConfigInput = None,
    rgb: bool = False,
) -> list[FaceEmotion]:
    """The faces in `image` with their emotions, largest face first (an empty list if there is none).

    image: a path to an image file; the bytes of an encoded image (PNG, JPEG, ...); or a uint8 numpy
        array: gray (H, W), or colour (H, W, 3) in OpenCV's BGR order (`cv2.imread` gives that),
        or BGRA (H, W, 4). Pass `rgb=True` for RGB(A) arrays (Pillow, scikit-image, matplotlib).
    crop: the whole image is one already-cropped face (no face detection), as FER2013's 48×48 faces.
    config: a serenbox.yaml path, a dict of the same keys, or a Config; its `model` and `detector`
        sections are used (default: the shipped model and the BlazeFace detector).

    Each face is a frozen FaceEmotion: `box` (fractions of the width and height, 0..1), `pixels`
    (the same box in the image's pixels), `emotion`, `confidence` (its probability) and all seven
    `probabilities` (4 decimals, summing to 1); `to_dict()` is the JSON `serenbox classify` prints.
    An exact tie goes to the emotion first in label order, as on the box.

    Raises serenbox.ImageError (a ValueError) for a missing or unreadable file, bytes that are not
    an image, an image over 40 megapixels, a truncated file or an unusable array;
    serenbox.ConfigError / serenbox.ModelError (ValueErrors) for a bad configuration or model.
    """
    global _default
    if config is not None:
        return _models(_config(config)).classify(image, crop, rgb)
    if _default is None:
        _default = _models(from_dict({}))
    return _default.classify(image, crop, rgb)
