"""Face crops → emotion probabilities with the int8 TFLite model (no TensorFlow).

The manifest beside the model says how to feed it; a model without a matching manifest is
refused, because a silently mismatched model gives confident wrong emotions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from serenbox.device import preprocess
from serenbox.device.config import ModelConfig
from serenbox.device.interpreter import load_interpreter
from serenbox.device.manifest import Manifest, ManifestError, check_against_interpreter, load_manifest

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "emotion_int8.tflite"
Box = tuple[float, float, float, float]
# Faces leaning less than this are cropped as they are: the eye line of an upright face wobbles
# by about this much from frame to frame, and a resampling would only soften the crop.
MIN_ROLL_DEG = 3.0


class ModelError(ValueError):
    """A model that cannot be used; the message names the file and the problem."""


def resolve_model_path(path: str | None) -> Path:
    """config.model.path, or the model that ships in the package."""
    return Path(path).expanduser() if path else DEFAULT_MODEL


def from_config(cfg: ModelConfig) -> Classifier:
    """The classifier `model.*` describes (the shipped model unless model.path is set); ModelError if it is unusable."""
    path = resolve_model_path(cfg.path)
    if not path.is_file():
        if cfg.path:
            raise ModelError(f"model.path: {path} does not exist")
        raise ModelError(f"model.path: not set, and the shipped model {path} is missing (set model.path to a .tflite)")
    return Classifier(path, cfg.num_threads, flip_tta=cfg.flip_tta)


def crop_box(box: Box, margin: float, frame_width: int, frame_height: int) -> tuple[int, int, int, int]:
    """The face box grown by `margin` of its size on every side, clipped to the frame: x0, y0, x1, y1."""
    x, y, w, h = box
    mx, my = w * margin, h * margin
    x0, y0 = max(0, round(x - mx)), max(0, round(y - my))
    x1, y1 = min(frame_width, round(x + w + mx)), min(frame_height, round(y + h + my))
    return x0, y0, x1, y1


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """Loads and verifies a model; `classify(gray, boxes)` returns probabilities (n, 7).

    `batch=True` runs all faces of a frame in one invoke (the input resized to n); that needs
    one interpreter per batch size, since resizing re-plans the tensors. On one thread a loop
    over a batch-1 interpreter measured as fast (see benchmarks/bench_pipeline.py), so the
    loop is the default: less memory, no re-planning.
    """

    def __init__(
        self, model_path: str | Path, num_threads: int = 1, batch: bool = False, flip_tta: bool = False
    ) -> None:
        self.path = Path(model_path)
        self.num_threads = num_threads
        self.batch = batch
        self.flip_tta = flip_tta
        try:
            self.manifest: Manifest = load_manifest(self.path)
        except ManifestError as e:
            raise ModelError(str(e)) from None
        try:
            interpreter = load_interpreter(str(self.path), num_threads)
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{self.path}: not a loadable TFLite model ({e})") from None
        try:
            check_against_interpreter(self.manifest, interpreter, str(self.path))
        except ManifestError as e:
            raise ModelError(str(e)) from None
        self._interpreters: dict[int, Any] = {1: interpreter}
        spec = self.manifest.input
        self.input_shape = (spec.height, spec.width, spec.channels)
        self._in_dtype = np.dtype(spec.dtype)
        log.info(
            "model %s: input %dx%dx%d %s, output %s",
            self.path.name,
            *self.input_shape,
            spec.dtype,
            self.manifest.output.activation,
        )

    def prepare(self, gray_crop: np.ndarray) -> np.ndarray:
        """A gray uint8 crop → one quantized model input (H, W, C)."""
        spec = self.manifest.input
        face = preprocess.resize_face(gray_crop, spec.height, spec.width).astype(np.float32)
        # The model contract: C=3 means RGB; FER2013 faces are gray, so the three channels are equal.
        face = face[..., None] if spec.channels == 1 else np.repeat(face[..., None], 3, axis=-1)
        return preprocess.quantize(face, spec.scale, spec.zero_point, self._in_dtype)

    def crops(
        self, gray: np.ndarray, boxes: Sequence[Box], margin: float, rolls: Sequence[float | None] | None = None
    ) -> list[np.ndarray]:
        """The crops the model sees. `rolls`: per box, the face's lean in degrees (Face.roll) to
        turn it upright by, or None to crop it as it is."""
        h, w = gray.shape[:2]
        out = []
        for box, roll in zip(boxes, rolls or [None] * len(boxes), strict=True):
            x0, y0, x1, y1 = crop_box(box, margin, w, h)
            if roll is None or abs(roll) < MIN_ROLL_DEG:
                out.append(gray[y0:y1, x0:x1])
            else:
                out.append(preprocess.upright_crop(gray, x0, y0, x1, y1, roll))
        return out

    def classify(
        self,
        gray: np.ndarray,
        boxes: Sequence[Box],
        margin: float = 0.0,
        rolls: Sequence[float | None] | None = None,
    ) -> np.ndarray:
        """Probabilities (n, 7) for the faces at `boxes` in a gray frame (turned upright by
        `rolls` where given: see crops)."""
        return self.classify_crops(self.crops(gray, boxes, margin, rolls))

    def classify_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, len(self.manifest.labels)), np.float32)
        inputs = np.stack([self.prepare(c) for c in crops])
        if self.flip_tta:
            # Faces are near-symmetric: the mirror image is a second view at twice the cost, and
            # averaging the two also averages out int8 rounding noise (docs/model-card.md).
            n = len(inputs)
            probs = self._probabilities(np.concatenate([inputs, inputs[:, :, ::-1]]))
            return (probs[:n] + probs[n:]) / 2
        return self._probabilities(inputs)

    def _probabilities(self, inputs: np.ndarray) -> np.ndarray:
        if self.batch and len(inputs) > 1:
            raw = self._invoke(self._interpreter_for(len(inputs)), inputs)
        else:
            raw = np.concatenate([self._invoke(self._interpreters[1], x[None]) for x in inputs])
        out = self.manifest.output
        values = preprocess.dequantize(raw, out.scale, out.zero_point)
        if out.activation == "none":
            return softmax(values / out.temperature)
        if out.temperature != 1.0:
            # log p is the logits up to a constant per face; a zero of the int8 softmax stands for
            # anything below one step, so it counts as half a step.
            return softmax(np.log(np.maximum(values, out.scale / 2)) / out.temperature)
        # An int8 softmax is exact only to a step of the scale; renormalise so the sum is 1.
        values = np.clip(values, 0.0, None)
        sums = values.sum(axis=-1, keepdims=True)
        uniform = np.full_like(values, 1.0 / values.shape[-1])
        return np.where(sums > 0, values / np.where(sums > 0, sums, 1.0), uniform)

    def _interpreter_for(self, n: int) -> Any:
        if n not in self._interpreters:
            interpreter = load_interpreter(str(self.path), self.num_threads)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, [n, *self.input_shape], strict=False)
            interpreter.allocate_tensors()
            self._interpreters[n] = interpreter
        return self._interpreters[n]

    @staticmethod
    def _invoke(interpreter: Any, inputs: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], inputs)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def to_gray(image: np.ndarray) -> np.ndarray:
    """BGR (or already gray) uint8 → gray uint8."""
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
