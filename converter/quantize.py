"""Full-integer quantization: calibrate on a stratified Training sample, convert, prove every op is integer."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from serenbox.converter.contract import one_line
from serenbox.device.labels import LABELS

IO_TYPES = ("int8", "uint8")
_INTEGER = {"int8", "uint8", "int16", "int32", "int64", "bool"}


class QuantizeError(RuntimeError):
    """The model cannot be fully integer-quantized; the message names the op."""


def stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of `size` images drawn per class in proportion to the class's share (at least one each).

    Proportional, so activation ranges reflect the data the device will see; the floor of one
    keeps a rare class (FER2013's disgust) from being absent from calibration.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=len(LABELS))
    size = min(size, int(counts.sum()))
    share = counts / counts.sum() * size
    take = np.minimum(counts, np.maximum(np.floor(share).astype(int), (counts > 0).astype(int)))
    # Largest remainders get the images still missing after flooring.
    for k in np.argsort(-(share - np.floor(share))):
        if take.sum() >= size:
            break
        if take[k] < counts[k]:
            take[k] += 1
    picked = [rng.choice(np.flatnonzero(labels == k), size=int(take[k]), replace=False) for k in range(len(LABELS))]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _unsupported_ops(message: str) -> list[str]:
    # The MLIR converter names ops as 'tf.Sin' / 'tfl.sin' in its diagnostics.
    return sorted(set(re.findall(r"'(tfl?\.[A-Za-z0-9_]+)'", message)))


def convert_int8(model: Any, representative: np.ndarray, io_type: str) -> bytes:
    """The Keras model as full-int8 TFLite bytes; `representative` is float32 (N, H, W, C) pixels 0..255."""
    import tensorflow as tf

    if io_type not in IO_TYPES:
        raise ValueError(f"io type must be one of {IO_TYPES}, got {io_type!r}")

    def samples() -> Iterator[list[np.ndarray]]:
        for x in representative:
            yield [x[None]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = samples
    # INT8 builtins only: an op without an int8 kernel fails the conversion instead of staying float.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = getattr(tf, io_type)
    converter.inference_output_type = getattr(tf, io_type)
    try:
        # Keras' export prints "Saved artifact at ..." to stdout; the CLI's table should stay clean.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # Said for every int8-io model: the input statistics come from calibration, as intended.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            return converter.convert()
    except Exception as e:
        ops = _unsupported_ops(str(e))
        named = f"op(s) {', '.join(ops)} cannot be quantized to int8" if ops else "conversion to int8 failed"
        raise QuantizeError(f"{named} ({one_line(e, 240)})") from None


def check_integer_only(tflite_path: Path, io_type: str) -> list[str]:
    """The op names of the model; raise QuantizeError naming any op that reads or writes a float tensor."""
    from serenbox.device.interpreter import load_interpreter

    interpreter = load_interpreter(str(tflite_path), num_threads=1)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    for side, details in (("input", interpreter.get_input_details()), ("output", interpreter.get_output_details())):
        dtype = np.dtype(details[0]["dtype"]).name
        if dtype != io_type:
            raise QuantizeError(f"model {side} is {dtype}, expected {io_type}")
    names, floating = [], []
    # _get_ops_details is the interpreter's only per-op view; both LiteRT and tf.lite have it.
    for op in interpreter._get_ops_details():
        if op["op_name"] == "DELEGATE":  # XNNPACK's stand-in for ops that are listed themselves too
            continue
        names.append(op["op_name"])
        used = [i for i in (*op["inputs"], *op["outputs"]) if i >= 0 and i in tensors]
        kinds = {np.dtype(tensors[i]["dtype"]).name for i in used}
        if kinds - _INTEGER:
            floating.append(f"{op['op_name']} ({', '.join(sorted(kinds - _INTEGER))})")
    # QUANTIZE/DEQUANTIZE only wrap the op that stayed float; name that op.
    culprits = [f for f in floating if not f.startswith(("QUANTIZE ", "DEQUANTIZE "))] or floating
    if culprits:
        raise QuantizeError(f"op(s) left in float after quantization (no int8 kernel): {', '.join(culprits)}")
    return names
