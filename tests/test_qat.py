"""Quantization-aware fine-tuning: the rounding it simulates, weight hand-over, CLI and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_training import _write_npz, convert_quick, write_votes

ROOT = Path(__file__).resolve().parents[1]
QAT = [sys.executable, str(ROOT / "training" / "qat.py")]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_npz(tmp_path_factory.mktemp("fer") / "tiny.npz")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    import keras
    from serenbox.training.model import build_model

    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("model") / "base.keras"
    build_model(32, None).save(path)
    return path


def test_weights_are_rounded_to_int8_per_output_channel():
    import tensorflow as tf
    from serenbox.training.qat import _fake_quant_weight

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (3, 3, 4, 5)).astype(np.float32) * np.array([0.01, 0.1, 1, 10, 100], np.float32)
    q = _fake_quant_weight(tf.constant(w), (3,)).numpy()
    for c in range(5):
        scale = np.abs(w[..., c]).max() / 127
        levels = q[..., c] / scale
        assert np.allclose(levels, np.round(levels), atol=1e-3), "not on the channel's int8 grid"
        assert np.abs(q[..., c] - w[..., c]).max() <= scale / 2 + 1e-6
        assert np.abs(q[..., c]).max() == pytest.approx(np.abs(w[..., c]).max(), rel=1e-6)
    # Straight-through: the gradient of the rounding is the identity.
    x = tf.Variable(w)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(_fake_quant_weight(x, (3,)) * 2.0)
    assert np.allclose(tape.gradient(y, x).numpy(), 2.0)


def test_twin_rounds_activations_and_hands_weights_back(base_model: Path):
    import keras
    from serenbox.training.qat import copy_weights, make_qat_model

    base = keras.models.load_model(base_model)
    twin = make_qat_model(base)
    names = {type(layer).__name__ for layer in twin.get_layer("mobilenetv2_1.00").layers}
    assert {"QuantizedReLU", "QuantizedBatchNormalization", "QuantizedAdd", "QuantizedConv2D"} <= names
    assert "QuantizedDepthwiseConv2D" in names

    # Compared early in the backbone in training mode (batch statistics): a randomly initialised
    # network is chaotic, so deeper down any perturbation grows. The first call measures ranges.
    x = np.random.default_rng(1).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)

    def features(model):
        bb = model.get_layer("mobilenetv2_1.00")
        return keras.Model(bb.input, bb.get_layer("block_2_add").output)(x, training=True).numpy()

    ref, sim = features(base), features(twin)
    assert np.abs(ref).max() > 0
    assert not np.allclose(ref, sim, atol=1e-7), "no rounding was simulated"
    assert np.abs(ref - sim).max() < 0.1 * np.abs(ref).max(), "simulated int8 strays far from float"
    # The ranges of the layers that ran are measurements, not their initial zeros.
    ran = ("Conv1_", "expanded_conv_", "block_1_", "block_2_")
    ranges = [w for w in twin.weights if w.path.endswith("/hi") and w.path.startswith(ran)]
    assert len(ranges) >= 4 and all(float(w.numpy()) > 0 for w in ranges)
    # ReLU6 outputs sit on the converter's fixed 0..6 grid, whatever their measured range.
    bb = twin.get_layer("mobilenetv2_1.00")
    relu = keras.Model(bb.input, bb.get_layer("block_1_expand_relu").output)(x).numpy()
    assert np.allclose(relu / (6 / 255), np.round(relu / (6 / 255)), atol=1e-3)
    assert len(np.unique(relu)) > 2

    copy_weights(base, twin)  # undo the BN statistics those training calls moved
    fresh = keras.models.load_model(base_model)
    for w in fresh.weights:
        w.assign(w.numpy() + 1.0)
    copy_weights(twin, fresh)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(fresh.weights, base.weights, strict=True))


def test_cli_writes_a_plain_model_that_converts(data: Path, base_model: Path, tmp_path: Path):
    out = tmp_path / "qat"
    args = ["--model", str(base_model), "--data", str(data), "--out", str(out), "--epochs", "1"]
    r = subprocess.run(
        [*QAT, *args, "--batch-size", "16", "--calibration-batches", "2"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "qat.json").read_text())
    assert result["epochs"] == 1 and 0 <= result["best"]["epoch"] <= 1
    assert 0.0 <= result["simulated_int8_val_accuracy_before"] <= 1.0
    assert not list(out.glob("*.tmp*"))

    # A plain model: no fake-quant layers, loads without custom objects, converts unchanged.
    import keras

    model = keras.models.load_model(out / "model.keras")
    assert not [layer for layer in model.get_layer("mobilenetv2_1.00").layers if "Quantized" in type(layer).__name__]
    tflite = tmp_path / "q.tflite"
    r = convert_quick(out / "model.keras", data, tflite)
    assert r.returncode == 0, r.stderr[-2000:]
    assert tflite.stat().st_size > 0


def test_ferplus_targets_select_on_ferplus_majority(base_model: Path, tmp_path: Path):
    data = _write_npz(tmp_path / "tiny.npz")
    write_votes(data)
    out = tmp_path / "qat"
    args = ["--model", str(base_model), "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "16"]
    r = subprocess.run(
        [*QAT, *args, "--calibration-batches", "2", "--labels", "ferplus-probability", "--contempt", "vote"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "qat.json").read_text())
    assert result["labels"] == "ferplus-probability" and result["contempt"] == "vote"
    assert result["selection"] == "PublicTest FER+ majority"
    assert (out / "model.keras").is_file()


def test_missing_model_is_a_clear_error(data: Path, tmp_path: Path):
    r = subprocess.run(
        [*QAT, "--model", str(tmp_path / "nope.keras"), "--data", str(data), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.keras'}: model file does not exist"
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_overwritten(data: Path, base_model: Path, tmp_path: Path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model.keras").write_bytes(b"keep me")
    r = subprocess.run(
        [*QAT, "--model", str(base_model), "--data", str(data), "--out", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert r.returncode == 2 and "already holds a model" in r.stderr and "Traceback" not in r.stderr
    assert (out / "model.keras").read_bytes() == b"keep me"
