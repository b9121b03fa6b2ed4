"""Distillation: teacher targets from trained models, and train.py/qat.py learning from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serenbox.device.labels import LABELS
from serenbox.training.fer2013 import load
from serenbox.training.teacher import TeacherError, keys_of, targets_for
from serenbox.training.train import Recipe, training_targets

from tests.test_training import _run, _write_npz

ROOT = Path(__file__).resolve().parents[1]
TEACHER = [sys.executable, str(ROOT / "training" / "teacher.py")]
QAT = [sys.executable, str(ROOT / "training" / "qat.py")]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def _tool(cmd: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=ENV, timeout=300)


def _targets_file(path: Path, images: np.ndarray, probs: np.ndarray) -> Path:
    np.savez(path, keys=keys_of(images), probs=probs.astype(np.float32))
    return path


def test_targets_are_found_by_pixels_in_any_order(tmp_path: Path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 48, 48)).astype(np.uint8)
    probs = rng.dirichlet(np.ones(len(LABELS)), 5)
    f = _targets_file(tmp_path / "t.npz", images, probs)
    order = [3, 0, 4]
    assert np.allclose(targets_for(f, images[order]), probs[order])


def test_targets_for_other_images_are_refused(tmp_path: Path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4, 48, 48)).astype(np.uint8)
    f = _targets_file(tmp_path / "t.npz", images[:3], rng.dirichlet(np.ones(len(LABELS)), 3))
    with pytest.raises(TeacherError, match="no targets for 1 of 4"):
        targets_for(f, images)
    with pytest.raises(TeacherError, match="does not exist"):
        targets_for(tmp_path / "missing.npz", images)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TeacherError, match="not a teacher targets file"):
        targets_for(tmp_path / "junk.npz", images)


def test_training_target_mixes_label_and_teacher(tmp_path: Path):
    data = load(_write_npz(tmp_path / "d.npz", per_class=2)).split("Training")
    teacher = np.full((len(data), len(LABELS)), 1 / len(LABELS))
    f = _targets_file(tmp_path / "t.npz", data.images, teacher)
    onehot = np.eye(len(LABELS), dtype=np.float32)[data.labels]
    y = training_targets(data, onehot, Recipe(teacher=str(f), teacher_weight=0.7))
    assert np.allclose(y, 0.3 * onehot + 0.7 / len(LABELS))
    assert np.allclose(y.sum(1), 1.0)
    assert np.array_equal(training_targets(data, onehot, Recipe()), onehot)


@pytest.mark.slow
def test_teacher_then_distilled_run_from_a_trained_model(tmp_path: Path):
    data = _write_npz(tmp_path / "tiny.npz")
    base = tmp_path / "base"
    r = _run(["--data", str(data), "--weights", "none", "--out", str(base), "--quick"])
    assert r.returncode == 0, r.stderr[-2000:]

    targets = tmp_path / "teacher.npz"
    r = _tool(TEACHER, "--data", str(data), "--model", str(base / "model.keras"), "--out", str(targets))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PublicTest" in r.stdout
    with np.load(targets) as f:
        probs, keys = f["probs"], f["keys"]
    assert probs.shape == (6 * len(LABELS), len(LABELS)) and keys.shape == (len(probs), 16)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    record = json.loads(targets.with_suffix(".json").read_text())
    assert record["models"] == [str(base / "model.keras")] and record["images"] == len(probs)
    assert 0.0 <= record["public_accuracy"] <= 1.0

    # A learning rate too small to move a weight: the result must still be the --init model.
    student = tmp_path / "student"
    args = ["--data", str(data), "--weights", "none", "--out", str(student), "--quick"]
    r = _run([*args, "--init", str(base / "model.keras"), "--teacher", str(targets), "--lr", "1e-12"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (student / "history_head.csv").exists()
    config = json.loads((student / "train_config.json").read_text())
    assert config["recipe"]["teacher"] == str(targets) and config["recipe"]["init"] == str(base / "model.keras")
    import keras

    a = keras.models.load_model(base / "model.keras").get_layer("emotion").get_weights()
    b = keras.models.load_model(student / "model.keras").get_layer("emotion").get_weights()
    assert all(np.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))

    r = _tool(
        QAT,
        *("--model", str(base / "model.keras"), "--data", str(data), "--out", str(tmp_path / "qt")),
        *("--epochs", "1", "--teacher", str(targets), "--teacher-weight", "0.5"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((tmp_path / "qt" / "qat.json").read_text())
    assert record["teacher"] == str(targets) and record["teacher_weight"] == 0.5


@pytest.mark.slow
def test_teacher_for_other_data_is_a_clear_error(tmp_path: Path):
    data = _write_npz(tmp_path / "tiny.npz")
    rng = np.random.default_rng(3)
    other = _targets_file(
        tmp_path / "other.npz",
        rng.integers(0, 256, (3, 48, 48)).astype(np.uint8),
        rng.dirichlet(np.ones(len(LABELS)), 3),
    )
    out = tmp_path / "o"
    r = _run(["--data", str(data), "--weights", "none", "--out", str(out), "--quick", "--teacher", str(other)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {other}: no targets for 42 of 42 training images")
    assert not (out / "model.keras").exists()


def test_missing_init_model_is_a_clear_error(tmp_path: Path):
    data = _write_npz(tmp_path / "tiny.npz")
    out = tmp_path / "o"
    r = _run(["--data", str(data), "--weights", "none", "--out", str(out), "--quick", "--init", str(tmp_path / "x")])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'x'}: --init model file does not exist"
    assert not (out / "model.keras").exists()


def test_unusable_teacher_model_is_a_clear_error(tmp_path: Path):
    data = _write_npz(tmp_path / "tiny.npz")
    model = tmp_path / "renamed.tflite"  # its manifest names the shipped file, not this one
    model.write_bytes((ROOT / "device" / "models" / "emotion_int8.tflite").read_bytes())
    model.with_suffix(".json").write_text((ROOT / "device" / "models" / "emotion_int8.json").read_text())
    out = tmp_path / "t.npz"
    r = _tool(TEACHER, "--data", str(data), "--model", str(model), "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {model.with_suffix('.json')}: describes")
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_unusable_init_model_is_a_clear_error(tmp_path: Path):
    data = _write_npz(tmp_path / "tiny.npz")
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    out = tmp_path / "o"
    r = _run(["--data", str(data), "--weights", "none", "--out", str(out), "--quick", "--init", str(junk)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {junk}: not usable as --init")
    assert not (out / "model.keras").exists()
