"""Training augmentation of 48×48 faces, on the host with OpenCV.

The recipe the models were first trained with as Keras layers (RandomFlip, RandomRotation(0.03),
RandomTranslation(0.08), RandomZoom(0.1), all with reflected borders, then RandomBrightness(0.15)
and RandomContrast(0.25) on 0..255), except that contrast spans 1 ± 0.25 as meant: Keras 3.15's
layer only ever raised it (factor 1.0..1.25). Why not those layers: under JAX their three
separate affine resamplings made a GPU training step 650 ms against 12 ms without them (H100,
docs/model-card.md), and each resampling blurs the face once more. Here a flip mirrors the face
exactly, then rotation, shift and zoom compose into one matrix and one bilinear warp per face,
which costs microseconds on a CPU and leaves the accelerator the network alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Augmentation:
    rotation: float = 0.03  # fraction of a full turn, either way (±10.8°)
    shift: float = 0.08  # fraction of the side, each axis, either way
    zoom: float = 0.1  # sampled area grows or shrinks by up to this fraction of the side
    brightness: float = 0.15  # fraction of 255 added or removed
    contrast: float = 0.25  # spread around the face's mean scaled by 1 ± this
    erase: float = 0.0  # chance that a face gets one rectangle blanked (random erasing)
    erase_area: tuple[float, float] = (0.02, 0.2)  # that rectangle's share of the face


def affine_matrix(size: int, angle: float, shift: tuple[float, float], zoom: float) -> np.ndarray:
    """2×3 map from output pixel to source pixel: rotate by `angle` (radians), then shift by
    `shift` pixels, then zoom (>1 samples a larger area: the face looks smaller), about the centre."""
    c = (size - 1) / 2.0
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    a = zoom * rot
    b = np.array([c, c]) - a @ np.array([c, c]) - rot @ np.asarray(shift, float)
    return np.hstack([a, b[:, None]])


def erase_rectangles(faces: np.ndarray, rng: np.random.Generator, aug: Augmentation) -> None:
    """Random erasing (Zhong et al., 2017), in place: with chance `aug.erase` a face gets one
    rectangle of `aug.erase_area` of its area, aspect 0.3..3.3, set to one random gray level.
    Hiding a mouth or an eye makes the model use the rest of the face instead of one cue."""
    n, size = faces.shape[0], faces.shape[1]
    hit = rng.random(n) < aug.erase
    area = rng.uniform(*aug.erase_area, n) * size * size
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3), n))
    h = np.clip(np.rint(np.sqrt(area * aspect)), 1, size).astype(int)
    w = np.clip(np.rint(np.sqrt(area / aspect)), 1, size).astype(int)
    top = (rng.random(n) * (size - h + 1)).astype(int)
    left = (rng.random(n) * (size - w + 1)).astype(int)
    gray = rng.uniform(0.0, 255.0, n)
    for i in np.flatnonzero(hit):
        faces[i, top[i] : top[i] + h[i], left[i] : left[i] + w[i]] = gray[i]


def augment_batch(faces: np.ndarray, rng: np.random.Generator, aug: Augmentation = Augmentation()) -> np.ndarray:
    """Random flip, rotation, shift and zoom (one warp), brightness and contrast, per face; then,
    if `aug.erase`, random erasing.

    `faces`: float32 (n, h, w, 1) or (n, h, w) gray levels 0..255 with h == w; returns the same
    shape, float32, within 0..255."""
    x = np.ascontiguousarray(faces.reshape(faces.shape[:3]), dtype=np.float32)
    n, size = len(x), x.shape[1]
    flip = rng.random(n) < 0.5
    angle = rng.uniform(-aug.rotation, aug.rotation, n) * 2 * np.pi
    shift = rng.uniform(-aug.shift, aug.shift, (n, 2)) * size
    zoom = 1.0 + rng.uniform(-aug.zoom, aug.zoom, n)
    out = np.empty_like(x)
    for i in range(n):
        src = np.ascontiguousarray(x[i, :, ::-1]) if flip[i] else x[i]  # an exact mirror, not resampled
        m = affine_matrix(size, angle[i], (shift[i, 0], shift[i, 1]), zoom[i])
        out[i] = cv2.warpAffine(
            src,
            m,
            (size, size),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT,
        )
    out = np.clip(out + (rng.uniform(-aug.brightness, aug.brightness, n) * 255.0)[:, None, None], 0.0, 255.0)
    mean = out.mean(axis=(1, 2), keepdims=True)
    factor = (1.0 + rng.uniform(-aug.contrast, aug.contrast, n))[:, None, None]
    out = np.clip((out - mean) * factor + mean, 0.0, 255.0)
    if aug.erase > 0:  # drawn last, so the other draws (and outputs without it) stay as they were
        erase_rectangles(out, rng, aug)
    return out.reshape(faces.shape).astype(np.float32, copy=False)
