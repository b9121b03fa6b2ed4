"""Tiny FER-like data and tiny Keras models, converted with the project's converter, for tests.

API (import as `from tests.tinymodels import ...`):
- `make_dataset(per_class=None, seed=0) -> Fer2013`: generated 48×48 faces whose class is where
  a bright or dark blob sits (learnable in seconds), background brightness spread over 20..235;
  `per_class` maps split name → images per class (default `DEFAULT_PER_CLASS`: 60/15/5).
- `write_npz(data, path)`, `write_csv(data, path)` (Kaggle codes, `KAGGLE_CODE`),
  `write_folders(data, root)` (train/<class>/Training_N.png, test/<class>/PublicTest_N.png ...):
  each layout the readers accept; each returns the path.
- `tiny_cnn(data=None, size=32) -> keras.Model`: three convolutions trained for a few seconds
  (input 32×32×1, 7 softmax outputs; ~99% on generated data).
- `brightness_model(size=32, channels=1) -> keras.Model`: hand-set weights, no training; its
  emotion follows the mean brightness of the face: sad below 85, neutral 85..170, happy from 170
  (`BANDS`, `BAND_EDGES`, `expected_emotion(mean)`; `BRIGHTNESS_OF[emotion]` is a level well inside
  each band). Only those three labels ever win. After conversion the int8 model agrees with
  `expected_emotion` at every level 0..255 except the edge levels themselves, and the same input
  always gives the same output bytes.
- `convert_tiny(model, tmp_dir, data=None, name="emotion_int8", io="int8") -> Path`: saves
  `tmp_dir/<name>.keras`, writes generated data, and runs converter.convert: returns
  `tmp_dir/<name>.tflite` with its manifest `<name>.json` and report beside it (int8 input
  scale 1, zero point -128). About 3 s with the brightness model.
- `edit_manifest(model, {"output.activation": "none"})`: change keys of a converted model's
  manifest, to test that the device refuses a manifest that does not match its model.

Build models once per test session (session-scoped fixtures): each costs seconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from serenbox.device.labels import LABELS
from serenbox.training.fer2013 import SPLITS, Fer2013

SIZE = 48
DEFAULT_PER_CLASS = {"Training": 60, "PublicTest": 15, "PrivateTest": 5}
# Kaggle's CSV emotion code of each label (its order differs from LABELS).
KAGGLE_CODE = {"angry": 0, "disgust": 1, "fear": 2, "happy": 3, "sad": 4, "surprise": 5, "neutral": 6}

# Mean face brightness (0..255) → the brightness model's emotion. Bands are wide and the
# logits steep, so an int8 model follows them except within a few levels of an edge.
BANDS: tuple[tuple[str, float, float], ...] = (("sad", 0.0, 85.0), ("neutral", 85.0, 170.0), ("happy", 170.0, 256.0))
BAND_EDGES: tuple[float, float] = (85.0, 170.0)
# A brightness well inside each band, for tests that paint faces.
BRIGHTNESS_OF = {"sad": 40, "neutral": 128, "happy": 215}


def expected_emotion(mean_brightness: float) -> str:
    """The emotion the brightness model gives a face of this mean brightness (0..255)."""
    for name, lo, hi in BANDS:
        if lo <= mean_brightness < hi:
            return name
    raise ValueError(f"mean brightness {mean_brightness} is outside 0..255")


def _blob_centre(label: int) -> tuple[int, int]:
    # Seven cells of a 3×3 grid: the class is the blob's position, which survives any brightness.
    row, col = divmod(label, 3)
    return 8 + 16 * row, 8 + 16 * col


def make_dataset(per_class: dict[str, int] | None = None, seed: int = 0) -> Fer2013:
    """Generated FER-like faces: `per_class[split]` images of each of the 7 classes per split."""
    per_class = DEFAULT_PER_CLASS if per_class is None else per_class
    rng = np.random.default_rng(seed)
    images, labels, splits = [], [], []
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for s, split in enumerate(SPLITS):
        for label in range(len(LABELS)):
            for _ in range(per_class.get(split, 0)):
                level = rng.uniform(20, 235)
                img = np.full((SIZE, SIZE), level) + rng.normal(0, 8, (SIZE, SIZE))
                cy, cx = _blob_centre(label)
                cy, cx = cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2))
                img += (70 if level < 128 else -70) * blob
                images.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
                labels.append(label)
                splits.append(s)
    return Fer2013(np.stack(images), np.array(labels, np.uint8), np.array(splits, np.uint8), "generated")


def write_npz(data: Fer2013, path: Path) -> Path:
    np.savez_compressed(path, x=data.images, y=data.labels, split=data.splits)
    return path


def write_csv(data: Fer2013, path: Path) -> Path:
    """The Kaggle layout: emotion (Kaggle code), pixels (space-separated), Usage."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for img, label, split in zip(data.images, data.labels, data.splits, strict=True):
            w.writerow([KAGGLE_CODE[LABELS[label]], " ".join(map(str, img.ravel())), SPLITS[split]])
    return path


def write_folders(data: Fer2013, root: Path, suffix: str = ".png") -> Path:
    """The public image-folder layout: train/<class>/Training_N, test/<class>/PublicTest_N|PrivateTest_N."""
    for i, (img, label, split) in enumerate(zip(data.images, data.labels, data.splits, strict=True)):
        top = "train" if SPLITS[split] == "Training" else "test"
        folder = root / top / LABELS[label]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{SPLITS[split]}_{i}{suffix}"), img)
    return root


def _model_input(images48: np.ndarray, size: int) -> np.ndarray:
    from serenbox.device.preprocess import resize_face

    return np.stack([resize_face(im, size, size) for im in images48]).astype(np.float32)[..., None]


def tiny_cnn(data: Fer2013 | None = None, size: int = 32, epochs: int = 8, seed: int = 0) -> Any:
    """A small CNN honouring the model contract (0..255 in, 7 probabilities out), trained for seconds."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    data = make_dataset(seed=seed) if data is None else data
    train = data.split("Training")
    inputs = keras.Input((size, size, 1), name="pixels")
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(len(LABELS), activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="tiny_cnn")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(_model_input(train.images, size), train.labels, epochs=epochs, batch_size=32, verbose=0)
    return model


def brightness_model(size: int = 32, channels: int = 1, steepness: float = 30.0) -> Any:
    """An untrained model whose emotion follows mean brightness (`BANDS`), with hand-set weights.

    u = mean pixel mapped to -1..1; logit_k = s·(2·c_k·u − c_k²) peaks at the band centre c_k
    nearest u (sad −2/3, neutral 0, happy +2/3, i.e. pixels 42.5, 127.5, 212.5), so the bands'
    edges sit halfway between centres (85 and 170). The other four classes get a constant
    logit of −20: never the winner, and their probabilities stay below 1e-8.
    """
    import keras
    from keras import layers

    inputs = keras.Input((size, size, channels), name="pixels")
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    dense = layers.Dense(len(LABELS), activation="softmax", name="emotion")
    outputs = dense(x)
    model = keras.Model(inputs, outputs, name="brightness_model")
    centres = {"sad": -2 / 3, "neutral": 0.0, "happy": 2 / 3}
    kernel = np.zeros((channels, len(LABELS)), np.float32)
    bias = np.full(len(LABELS), -20.0, np.float32)
    for name, c in centres.items():
        k = LABELS.index(name)
        kernel[:, k] = steepness * 2 * c / channels  # the pooled channels are equal: split the weight
        bias[k] = -steepness * c * c
    dense.set_weights([kernel, bias])
    return model


def convert_tiny(
    keras_model: Any,
    tmp_dir: Path,
    data: Fer2013 | Path | None = None,
    name: str = "emotion_int8",
    io: str = "int8",
    max_drop: float = 100.0,
    calibration_size: int = 140,
) -> Path:
    """Save `keras_model` in `tmp_dir`, convert it with converter.convert; the .tflite path (manifest beside it).

    `max_drop` defaults to 100: fixtures want a model, while test_convert tests the proof itself.
    """
    from serenbox.converter.convert import convert

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    if not isinstance(data, Path):
        data = write_npz(make_dataset() if data is None else data, tmp_dir / f"{name}-data.npz")
    source = tmp_dir / f"{name}.keras"
    keras_model.save(source)
    result = convert(
        source, data, tmp_dir / f"{name}.tflite", io=io, calibration_size=calibration_size, max_drop=max_drop
    )
    return result.tflite


def edit_manifest(model: Path, edit: dict[str, Any]) -> None:
    """Set keys of the manifest beside `model`; dotted keys reach into sections ("output.activation")."""
    path = model.with_suffix(".json")
    data = json.loads(path.read_text())
    for dotted, value in edit.items():
        *parents, key = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[key] = value
    path.write_text(json.dumps(data))
