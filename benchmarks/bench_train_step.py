"""Benchmark training throughput: host augmentation per batch, and one training step of the
model train.py fits, on whichever Keras backend and device this process gets.

    python benchmarks/bench_train_step.py [--input-size 112] [--batch-size 64] [--steps 30]
    KERAS_BACKEND=jax python benchmarks/bench_train_step.py     # a GPU machine without TensorFlow

Random faces and targets (the speed does not depend on them); random weights (no download).
Prints figures; asserts nothing. An epoch of FER2013 Training is 449 steps of 64.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from serenbox.training.augment import augment_batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()

    import keras
    from serenbox.training.model import build_model
    from serenbox.training.train import FitData, Recipe, training_batches, with_input_pipeline

    rng = np.random.default_rng(0)
    n = a.batch_size * a.steps
    faces = rng.integers(0, 256, (n, 48, 48, 1)).astype(np.float32)
    targets = np.eye(7, dtype=np.float32)[rng.integers(0, 7, n)]

    t = time.perf_counter()
    for i in range(a.steps):
        augment_batch(faces[i * a.batch_size : (i + 1) * a.batch_size], rng)
    aug_ms = (time.perf_counter() - t) / a.steps * 1000

    r = Recipe(input_size=a.input_size, batch_size=a.batch_size)
    d = FitData(faces, targets, np.ones(n, np.float32), faces[:64], targets[:64])
    model = build_model(a.input_size, None)
    pipeline = with_input_pipeline(model, r)
    pipeline.compile(keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    warm = FitData(
        faces[: 2 * a.batch_size],
        targets[: 2 * a.batch_size],
        np.ones(2 * a.batch_size, np.float32),
        faces[:64],
        targets[:64],
    )
    t = time.perf_counter()
    pipeline.fit(training_batches(warm, r), epochs=1, verbose=0)  # traces and compiles the step
    compile_s = time.perf_counter() - t
    for augment in (False, True):
        batches = training_batches(d, Recipe(input_size=a.input_size, batch_size=a.batch_size, augment=augment))
        t = time.perf_counter()
        pipeline.fit(batches, epochs=1, verbose=0)
        step_ms = (time.perf_counter() - t) / a.steps * 1000
        print(
            f"backend {keras.backend.backend()}  input {a.input_size}  batch {a.batch_size}  "
            f"augment {'on ' if augment else 'off'}  step {step_ms:.1f} ms  "
            f"(epoch of 449 steps ≈ {step_ms * 449 / 1000:.0f} s)",
            flush=True,
        )
    print(f"host augmentation {aug_ms:.2f} ms per batch of {a.batch_size}; first step (compile) {compile_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
