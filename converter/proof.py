"""The proof: the float Keras model and the int8 TFLite model side by side on a held-out split.

The int8 model runs on the interpreter the device uses (device.interpreter), one thread,
batch 1, fed exactly as the device feeds it (device.preprocess), so the figures are the
device's figures and not TensorFlow's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from serenbox.converter.contract import ModelInfo, model_input
from serenbox.device.interpreter import load_interpreter, runtime_version
from serenbox.device.labels import LABELS
from serenbox.device.preprocess import dequantize, quantize
from serenbox.training.report import classification_report

WARMUP = 10
FLOAT_LATENCY_IMAGES = 100  # eager Keras at batch 1 is slow; a sample gives its median and p95


def softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _latency(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "n": len(ms)}


def run_int8(tflite_path: Path, pixels: np.ndarray, threads: int) -> tuple[np.ndarray, list[float]]:
    """Scores (dequantized, N×7) and per-image latency (quantize + invoke + read) in seconds."""
    interpreter = load_interpreter(str(tflite_path), num_threads=threads)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    dtype = inp["dtype"]

    def one(x: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(inp["index"], quantize(x[None], in_scale, in_zero, dtype))
        interpreter.invoke()
        return interpreter.get_tensor(out["index"])[0]

    for x in pixels[: min(WARMUP, len(pixels))]:
        one(x)
    scores, seconds = [], []
    for x in pixels:
        t0 = time.perf_counter()
        q = one(x)
        seconds.append(time.perf_counter() - t0)
        scores.append(q)
    return dequantize(np.stack(scores), out_scale, out_zero), seconds


def float_latency(model: Any, pixels: np.ndarray) -> list[float]:
    import tensorflow as tf

    # A traced graph, not eager calls: eager dispatch of ~150 layers would time Python, not the model.
    call = tf.function(lambda x: model(x, training=False))
    sample = pixels[:FLOAT_LATENCY_IMAGES]
    for x in sample[: min(WARMUP, len(sample))]:
        call(x[None])
    seconds = []
    for x in sample:
        t0 = time.perf_counter()
        np.asarray(call(x[None]))
        seconds.append(time.perf_counter() - t0)
    return seconds


def prove(
    model: Any,
    info: ModelInfo,
    tflite_path: Path,
    images48: np.ndarray,
    labels: np.ndarray,
    threads: int = 1,
    ferplus_labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracy, agreement, probability difference, per-class recall and latency of both models.
    `ferplus_labels` (FER+ official majority class per image, -1 where the rule drops it) adds
    both models' accuracy and their agreement on FER+'s images."""
    pixels = model_input(images48, info)
    float_scores = np.asarray(model.predict(pixels, verbose=0, batch_size=64), dtype=np.float64)
    int8_scores, int8_seconds = run_int8(tflite_path, pixels, threads)
    float_seconds = float_latency(model, pixels)
    if info.activation == "none":  # logits: compare the probabilities the device will report
        float_probs, int8_probs = softmax(float_scores), softmax(int8_scores.astype(np.float64))
    else:
        float_probs, int8_probs = float_scores, int8_scores.astype(np.float64)
    float_pred, int8_pred = float_probs.argmax(axis=1), int8_probs.argmax(axis=1)
    float_report = classification_report(labels, float_pred)
    int8_report = classification_report(labels, int8_pred)
    delta = np.abs(float_probs - int8_probs)
    extra = {}
    if ferplus_labels is not None:
        keep = ferplus_labels >= 0
        f_fp = classification_report(ferplus_labels[keep], float_pred[keep])
        q_fp = classification_report(ferplus_labels[keep], int8_pred[keep])
        extra["ferplus"] = {
            "n": int(keep.sum()),
            "float": {"accuracy": f_fp["accuracy"], "report": f_fp},
            "int8": {"accuracy": q_fp["accuracy"], "report": q_fp},
            "agreement": float((float_pred[keep] == int8_pred[keep]).mean()) if keep.any() else 0.0,
            "accuracy_drop_points": (f_fp["accuracy"] - q_fp["accuracy"]) * 100,
        }
    return {
        "n": len(labels),
        "threads": threads,
        "runtime": runtime_version(),
        "float": {
            "accuracy": float_report["accuracy"],
            "macro_f1": float_report["macro_f1"],
            "recall": {c: float_report["per_class"][c]["recall"] for c in LABELS},
            "latency": _latency(float_seconds),
            "report": float_report,
        },
        "int8": {
            "accuracy": int8_report["accuracy"],
            "macro_f1": int8_report["macro_f1"],
            "recall": {c: int8_report["per_class"][c]["recall"] for c in LABELS},
            "latency": _latency(int8_seconds),
            "report": int8_report,
        },
        "support": {c: float_report["per_class"][c]["support"] for c in LABELS},
        "agreement": float((float_pred == int8_pred).mean()),
        "mean_abs_prob_diff": float(delta.mean()),
        "max_abs_prob_diff": float(delta.max()),
        "accuracy_drop_points": (float_report["accuracy"] - int8_report["accuracy"]) * 100,
        **extra,
    }


def gate_failures(proof: dict[str, Any], max_drop: float) -> list[str]:
    """Why the int8 model is not as good as the float one: one reason per label set that drops
    more than `max_drop` points. A model trained on FER+ votes is judged on FER+ too: its FER2013
    accuracy is low to begin with, so a loss there alone would hide what matters."""
    sides = [("int8", proof)] + ([("int8 FER+", proof["ferplus"])] if "ferplus" in proof else [])
    return [
        f"{name} accuracy {p['int8']['accuracy'] * 100:.2f}% is {p['accuracy_drop_points']:.2f} points below "
        f"float {p['float']['accuracy'] * 100:.2f}%"
        for name, p in sides
        if p["accuracy_drop_points"] > max_drop
    ]


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_table(report: dict[str, Any]) -> str:
    """The proof as a table a person reads in the terminal."""
    p, f, q = report["proof"], report["proof"]["float"], report["proof"]["int8"]
    rows = [
        f"proof on {report['split']} ({p['n']} images): float Keras vs int8 TFLite ({p['runtime']}, "
        f"{p['threads']} thread{'s' if p['threads'] != 1 else ''}, batch 1)",
        f"{'':<26}{'float':>12}{'int8':>12}",
        f"{'accuracy':<26}{f['accuracy'] * 100:>11.2f}%{q['accuracy'] * 100:>11.2f}%",
        f"{'macro-F1':<26}{f['macro_f1'] * 100:>11.2f}%{q['macro_f1'] * 100:>11.2f}%",
    ]
    for c in LABELS:
        label = f"recall {c} (n={p['support'][c]})"
        rows.append(f"{label:<26}{f['recall'][c] * 100:>11.1f}%{q['recall'][c] * 100:>11.1f}%")
    sizes = report["sizes"]
    rows += [
        f"{'file size':<26}{_size(sizes['keras_bytes']):>12}{_size(sizes['tflite_bytes']):>12}",
        f"{'latency median':<26}{f['latency']['median_ms']:>9.2f} ms{q['latency']['median_ms']:>9.2f} ms",
        f"{'latency p95':<26}{f['latency']['p95_ms']:>9.2f} ms{q['latency']['p95_ms']:>9.2f} ms",
        f"{'  (images timed)':<26}{f['latency']['n']:>12}{q['latency']['n']:>12}",
        *(
            [
                f"{'FER+ accuracy (n=' + str(p['ferplus']['n']) + ')':<26}"
                f"{p['ferplus']['float']['accuracy'] * 100:>11.2f}%{p['ferplus']['int8']['accuracy'] * 100:>11.2f}%",
                f"FER+ top-1 agreement {p['ferplus']['agreement'] * 100:.2f}% (FER+ official majority, 7 classes)",
                f"FER+ accuracy drop {p['ferplus']['accuracy_drop_points']:.2f} points",
            ]
            if "ferplus" in p
            else []
        ),
        f"top-1 agreement {p['agreement'] * 100:.2f}%   mean |Δp| {p['mean_abs_prob_diff']:.4f}   "
        f"max |Δp| {p['max_abs_prob_diff']:.3f}",
        f"accuracy drop {p['accuracy_drop_points']:.2f} points (allowed {report['max_drop']:.2f}): "
        + ("PASS" if report["passed"] else "FAIL"),
    ]
    return "\n".join(rows)
