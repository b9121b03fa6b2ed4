"""Face-crop preprocessing shared by the device and the converter's proof.

A crop goes to FER2013's native 48×48 first, then to the model's input size, so the device
feeds the model what training fed it; then it is quantized with the manifest's input
scale and zero point. No TensorFlow here: this module runs on the SerenBox.
"""

from __future__ import annotations

import cv2
import numpy as np

FER_SIZE = 48


def resize_face(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """A gray uint8 face crop (h, w) at the model's size, via FER2013's 48×48."""
    face = np.asarray(gray)
    if face.shape != (FER_SIZE, FER_SIZE):
        # INTER_AREA averages when shrinking a large crop; FER2013's images were made that way.
        face = cv2.resize(face, (FER_SIZE, FER_SIZE), interpolation=cv2.INTER_AREA)
    if (height, width) != (FER_SIZE, FER_SIZE):
        # Training upsamples 48×48 bilinearly to the model size; do the same.
        face = cv2.resize(face, (width, height), interpolation=cv2.INTER_LINEAR)
    return face


def upright_crop(gray: np.ndarray, x0: int, y0: int, x1: int, y1: int, roll: float) -> np.ndarray:
    """The crop (x0, y0)–(x1, y1) of a gray frame with the picture turned `roll` degrees
    anticlockwise about the crop's centre first, so that a face leaning by `roll` comes out
    upright (faces.Face.roll). Only the crop's pixels are computed, not the whole frame's;
    what would come from outside the frame repeats its edge, as a clipped crop would end there."""
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    m = cv2.getRotationMatrix2D(centre, roll, 1.0)
    m[:, 2] -= (x0, y0)
    return cv2.warpAffine(gray, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def quantize(pixels: np.ndarray, scale: float, zero_point: int, dtype: type | np.dtype) -> np.ndarray:
    """Float pixels (0..255) → integer tensor values: round(x / scale) + zero_point, clipped to the dtype."""
    info = np.iinfo(dtype)
    q = np.round(np.asarray(pixels, np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Integer tensor values → float: (q - zero_point) * scale."""
    return (np.asarray(values, np.float32) - np.float32(zero_point)) * np.float32(scale)
