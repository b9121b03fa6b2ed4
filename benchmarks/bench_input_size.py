"""int8 latency and size of the SerenBox MobileNetV2 at several input sizes, on the device interpreter.

    python benchmarks/bench_input_size.py --weights IMAGENET_H5 [--data FER2013] [--sizes 64 96 128]

Latency and file size depend on the architecture and input size, not on trained weights, so
each size is built from the ImageNet backbone with an untrained head, calibrated on FER2013
Training faces (or on generated faces without --data), converted full-int8 by the project's
converter and timed per face with 1 thread, exactly as the device runs it. Together with the
PublicTest accuracy of a training run per size it chooses the default input size (model card).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from serenbox.converter.proof import run_int8
from serenbox.converter.quantize import convert_int8
from serenbox.device.interpreter import runtime_version
from serenbox.device.preprocess import resize_face


def faces(data: str | None, n: int) -> np.ndarray:
    if data is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    from serenbox.training.fer2013 import load

    train = load(data).split("Training")
    idx = np.random.default_rng(0).choice(len(train), n, replace=False)
    return train.images[idx]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="ImageNet MobileNetV2 no-top h5")
    p.add_argument("--data", default=None, help="FER2013 for calibration and timing (default: generated faces)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--images", type=int, default=300, help="faces timed per size")
    args = p.parse_args(argv)

    from serenbox.training.model import build_model

    gray = faces(args.data, args.images)
    print(f"interpreter: {runtime_version()}, 1 thread, batch 1, {len(gray)} faces per size")
    print(f"{'input':>8}{'size':>10}{'median':>10}{'p95':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            model = build_model(size, args.weights)
            pixels = np.stack([resize_face(g, size, size) for g in gray]).astype(np.float32)[..., None]
            path = Path(tmp) / f"m{size}.tflite"
            path.write_bytes(convert_int8(model, pixels[:100], "int8"))
            _, seconds = run_int8(path, pixels, threads=1)
            ms = np.asarray(seconds) * 1000
            print(
                f"{size:>5}px{path.stat().st_size / 1e6:>8.2f}MB{np.median(ms):>8.2f}ms{np.percentile(ms, 95):>8.2f}ms",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
