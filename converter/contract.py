"""The model contract, checked on a Keras model before anything is converted.

A SerenBox model takes face pixels 0..255 at its input size (gray when it has one channel,
RGB when three), does all normalisation inside, and outputs 7 scores in `LABELS` order.
A model that breaks this would convert fine and then mislabel every face, so it is refused here.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from serenbox.device.labels import LABELS
from serenbox.device.preprocess import resize_face


class ContractError(ValueError):
    """The model cannot be loaded or breaks the model contract; the message names the file."""


@dataclass(frozen=True)
class ModelInfo:
    height: int
    width: int
    channels: int
    activation: str  # "softmax" when the model outputs probabilities, "none" for logits


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception as a single short line: library errors can span pages."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_keras_model(path: Path) -> Any:
    if not path.is_file():
        raise ContractError(f"{path}: model file does not exist")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        # Keras says "file not found" for a damaged archive, which sends people looking in the wrong place.
        raise ContractError(f"{path}: not a Keras .keras archive (corrupt or truncated file)")
    import keras  # only now: importing TensorFlow takes seconds, too long to wait for a typo's message

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a corrupt or foreign file
        raise ContractError(f"{path}: cannot load as a Keras model ({one_line(e, 200)})") from None


def _shape(tensors: Any, what: str, where: str) -> tuple:
    if len(tensors) != 1:
        raise ContractError(f"{where}: model has {len(tensors)} {what}s, the contract needs exactly 1")
    return tuple(tensors[0].shape)


def model_input(images48: np.ndarray, info: ModelInfo) -> np.ndarray:
    """48×48 gray uint8 faces → float32 (N, H, W, C) pixels 0..255, resized as the device does."""
    faces = np.stack([resize_face(im, info.height, info.width) for im in images48]).astype(np.float32)
    faces = faces[..., None]
    return np.repeat(faces, 3, axis=-1) if info.channels == 3 else faces


def check_contract(model: Any, where: str, probe: np.ndarray) -> ModelInfo:
    """Check shapes, then run `probe` (48×48 gray uint8 faces) plus black and white frames through the model."""
    shape_in = _shape(model.inputs, "input", where)
    shape_out = _shape(model.outputs, "output", where)
    if len(shape_in) != 4 or shape_in[0] is not None or any(s is None for s in shape_in[1:]):
        raise ContractError(f"{where}: input shape {shape_in} is not (None, height, width, channels)")
    height, width, channels = (int(s) for s in shape_in[1:])
    if channels not in (1, 3):
        raise ContractError(f"{where}: input has {channels} channels; the contract allows 1 (gray) or 3 (RGB)")
    if shape_out != (None, len(LABELS)):
        raise ContractError(f"{where}: output shape {shape_out} is not (None, {len(LABELS)}), one score per emotion")

    info = ModelInfo(height, width, channels, "none")
    extremes = np.stack([np.zeros((48, 48), np.uint8), np.full((48, 48), 255, np.uint8)])
    x = model_input(np.concatenate([extremes, probe]), info)
    try:
        scores = np.asarray(model.predict(x, verbose=0, batch_size=64), dtype=np.float64)
    except Exception as e:
        raise ContractError(
            f"{where}: model fails on 0..255 input of shape {x.shape[1:]} ({one_line(e, 200)})"
        ) from None
    if not np.isfinite(scores).all():
        raise ContractError(f"{where}: model outputs non-finite scores for 0..255 pixels (normalisation missing?)")
    is_probability = bool((scores >= -1e-6).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3))
    return ModelInfo(height, width, channels, "softmax" if is_probability else "none")
