"""Training: the --quick pipeline on generated data, its report, resume, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from serenbox.device.labels import LABELS
from serenbox.training import ferplus
from serenbox.training.fer2013 import load
from serenbox.training.train import (
    FitData,
    Recipe,
    class_weights,
    device_pixels,
    labelled_sets,
    load_data,
    training_batches,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "training" / "train.py")]
pytestmark = pytest.mark.slow


def _write_npz(path: Path, per_class: int = 6) -> Path:
    """Generated FER-shaped data: each class a distinct brightness band, so it is learnable."""
    rng = np.random.default_rng(0)
    xs, ys, ss = [], [], []
    for split in range(3):
        for c in range(len(LABELS)):
            base = 20 + 30 * c
            xs.append(np.clip(rng.normal(base, 6, (per_class, 48, 48)), 0, 255).astype(np.uint8))
            ys += [c] * per_class
            ss += [split] * per_class
    np.savez(path, x=np.concatenate(xs), y=np.array(ys, np.uint8), split=np.array(ss, np.uint8))
    return path


def write_votes(npz: Path) -> Path:
    """FER+-like votes beside `npz` (as ferplus.npz): per image in turn a clear majority for its
    FER2013 label, a clear majority for the next class, a 5/5 split, and an unclear face."""
    labels = np.load(npz)["y"]
    column_of = {int(label): col for col, label in enumerate(ferplus.TO_LABEL)}
    votes = np.zeros((len(labels), 10), np.uint8)
    for i, y in enumerate(labels):
        own, other = column_of[int(y)], column_of[(int(y) + 1) % len(LABELS)]
        votes[i, [(own, other), (other, own), (own, other), (ferplus.UNKNOWN, own)][i % 4]] = [
            (7, 3),
            (8, 2),
            (5, 5),
            (6, 4),
        ][i % 4]
    path = npz.parent / ferplus.FILE_NAME
    np.savez(path, votes=votes)
    return path


def _run(args: list[str], backend: str = "tensorflow", **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "KERAS_BACKEND": backend}
    return subprocess.run(TRAIN + args, capture_output=True, text=True, env=env, timeout=300, **kw)


def convert_quick(model: Path, data: Path, tflite: Path) -> subprocess.CompletedProcess:
    """`converter/convert.py` on a tiny model and data set. A one-epoch model is near chance on
    either runtime, so the accuracy gate is opened: it is not what the callers test."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    convert = [sys.executable, str(ROOT / "converter" / "convert.py"), "--model", str(model), "--data", str(data)]
    return subprocess.run(
        [*convert, "--out", str(tflite), "--max-drop", "100", "--calibration-size", "28"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_npz(tmp_path_factory.mktemp("fer") / "tiny.npz")


@pytest.fixture(scope="module")
def quick_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "quick"
    r = _run(["--data", str(data), "--weights", "none", "--out", str(out), "--quick"])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_quick_run_writes_model_history_and_report(quick_run: Path):
    assert (quick_run / "model.keras").is_file()
    history = json.loads((quick_run / "history.json").read_text())
    assert len(history["finetune"]) == 1 and "val_accuracy" in history["finetune"][0]
    report = json.loads((quick_run / "report.json").read_text())
    assert report["split"] == "PublicTest"  # PrivateTest is read once, by evaluate.py
    assert report["n"] == 6 * len(LABELS)
    assert set(report["per_class"]) == set(LABELS)
    for m in report["per_class"].values():
        assert {"precision", "recall", "f1", "support"} <= set(m)
        assert m["support"] == 6
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == report["n"]
    assert report["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    png = (quick_run / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(quick_run.glob("*.tmp*"))


def test_quick_train_convert_classify_end_to_end(data: Path, quick_run: Path, tmp_path: Path):
    """What an ML engineer does after training, on the model --quick made: convert it to int8,
    then hand it to the device's `serenbox classify` on a real photo."""
    import yaml

    from tests import media

    tflite = tmp_path / "quick_int8.tflite"
    r = convert_quick(quick_run / "model.keras", data, tflite)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads(tflite.with_suffix(".json").read_text())
    assert manifest["labels"] == list(LABELS)
    # The int8 graph starts with one exact op: pixels → (p - 128) / 128, scale 1/128, zero point 0.
    from serenbox.device.interpreter import load_interpreter

    interpreter = load_interpreter(str(tflite), 1)
    first = interpreter._get_ops_details()[0]
    assert first["op_name"] == "CONV_2D"
    out = next(t for t in interpreter.get_tensor_details() if t["index"] == first["outputs"][0])
    assert out["quantization"] == (1 / 128, 0)

    photo = media.write_image(tmp_path / "astronaut.jpg", media.astronaut_bgr())
    config = tmp_path / "serenbox.yaml"
    config.write_text(yaml.safe_dump({"device_id": "quick", "model": {"path": str(tflite)}}))
    r = subprocess.run(
        [sys.executable, "-m", "serenbox", "classify", str(photo), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout)
    assert line["image"] == str(photo)
    (face,) = line["faces"]
    assert list(face["probabilities"]) == list(LABELS)
    assert sum(face["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert face["emotion"] == max(face["probabilities"], key=face["probabilities"].get)


def test_a_model_trained_on_jax_scores_the_same_and_converts_on_tensorflow(data: Path, tmp_path: Path):
    """A GPU machine without TensorFlow trains with KERAS_BACKEND=jax; the model comes back to
    TensorFlow for the quantization-aware step and the converter."""
    pytest.importorskip("jax")
    import keras
    from serenbox.training.train import predict_probs

    out = tmp_path / "jax"
    r = _run(["--data", str(data), "--weights", "none", "--out", str(out), "--quick"], backend="jax")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "train_config.json").read_text())["recipe"]["input_size"] == 32
    report = json.loads((out / "report.json").read_text())  # PublicTest, computed under JAX
    assert keras.backend.backend() == "tensorflow"
    model = keras.models.load_model(out / "model.keras")
    with np.load(data) as f:
        public = f["split"] == 1
        images, labels = f["x"][public], f["y"][public]
    accuracy = float((predict_probs(model, images, 32).argmax(1) == labels).mean())
    assert abs(accuracy - report["accuracy"]) <= 1 / len(labels)  # at most one near-tie flips
    r = convert_quick(out / "model.keras", data, tmp_path / "jax_int8.tflite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "jax_int8.tflite").stat().st_size > 0


def test_quick_model_honours_the_contract(quick_run: Path):
    import keras

    model = keras.models.load_model(quick_run / "model.keras")
    assert model.input_shape == (None, 32, 32, 1)
    assert model.output_shape == (None, len(LABELS))
    probs = model(np.full((2, 32, 32, 1), 200.0, np.float32)).numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_existing_run_is_not_overwritten_without_resume(data, quick_run: Path):
    before = (quick_run / "model.keras").stat().st_mtime_ns
    r = _run(["--data", str(data), "--weights", "none", "--out", str(quick_run), "--quick"])
    assert r.returncode == 2
    assert "--resume" in r.stderr and "Traceback" not in r.stderr
    assert (quick_run / "model.keras").stat().st_mtime_ns == before


def test_missing_weights_file_is_a_clear_error(data, tmp_path: Path):
    r = _run(["--data", str(data), "--weights", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "o"), "--quick"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.h5'}: weights file does not exist"
    assert "Traceback" not in r.stderr


def test_missing_data_path_is_a_clear_error(tmp_path: Path):
    r = _run(["--data", str(tmp_path / "missing"), "--weights", "none", "--out", str(tmp_path / "o"), "--quick"])
    assert r.returncode == 2
    assert "data path does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "model.keras").exists()


def test_resume_continues_an_interrupted_run(data, tmp_path: Path):
    out = tmp_path / "resumable"
    args = ["--data", str(data), "--weights", "none", "--out", str(out), "--quick", "--epochs", "4"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(TRAIN + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    history = out / "history_finetune.csv"
    deadline = time.monotonic() + 240
    # Kill it hard once at least one epoch (and its backup) is on disk, as a power cut would.
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "best.json").exists() and len(history.read_text().strip().splitlines()) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be interrupted"
    done_before = len(history.read_text().strip().splitlines()) - 1
    assert 1 <= done_before < 4

    r = _run([*args, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    epochs = [int(line.split(",")[0]) for line in history.read_text().strip().splitlines()[1:]]
    # Every epoch exactly once, in order: the resumed run started where the killed one stopped.
    assert epochs == list(range(4))
    assert (out / "report.json").is_file()


def test_resume_refuses_a_different_recipe(data, quick_run: Path):
    r = _run(["--data", str(data), "--weights", "none", "--out", str(quick_run), "--quick", "--resume", "--lr", "0.5"])
    assert r.returncode == 2 and "different recipe" in r.stderr


def test_resume_accepts_a_run_from_before_a_recipe_field_existed(data, quick_run: Path, tmp_path: Path):
    old = tmp_path / "old"
    shutil.copytree(quick_run, old)
    config = json.loads((old / "train_config.json").read_text())
    for field in ("erase", "labels", "contempt", "mix"):  # as written before these fields existed
        del config["recipe"][field]
    (old / "train_config.json").write_text(json.dumps(config))
    r = _run(["--data", str(data), "--weights", "none", "--out", str(old), "--quick", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(["--data", str(data), "--weights", "none", "--out", str(old), "--quick", "--resume", "--erase", "0.5"])
    assert r.returncode == 2 and "different recipe" in r.stderr


def test_erase_outside_0_to_1_is_a_clear_error(data, tmp_path: Path):
    r = _run(["--data", str(data), "--weights", "none", "--out", str(tmp_path / "o"), "--quick", "--erase", "1.5"])
    assert r.returncode == 2 and "--erase must be between 0 and 1" in r.stderr
    assert not (tmp_path / "o").exists()


def test_class_weights_favour_rare_classes_and_average_one():
    labels = np.array([0] * 90 + [1] * 10)
    w = class_weights(labels, 0.5)
    assert w[1] > w[0]
    assert (90 * w[0] + 10 * w[1]) / 100 == pytest.approx(1.0)
    assert class_weights(labels, 0.0)[0] == pytest.approx(1.0)


def test_training_inputs_are_whole_gray_levels_like_the_devices_resized_faces():
    from serenbox.device.preprocess import resize_face

    faces = np.random.default_rng(0).integers(0, 256, (8, 48, 48)).astype(np.uint8)
    x = np.asarray(device_pixels(faces[..., None].astype(np.float32), 96))[..., 0]
    assert x.shape == (8, 96, 96)
    assert np.array_equal(x, np.round(x)) and x.min() >= 0 and x.max() <= 255
    device = np.stack([resize_face(f, 96, 96) for f in faces]).astype(np.float32)
    # OpenCV's fixed-point bilinear rounds a few pixels the other way; never by more than one level.
    assert np.abs(x - device).max() <= 1
    assert (x != device).mean() < 0.2


@pytest.fixture(scope="module")
def ferplus_data(tmp_path_factory) -> Path:
    npz = _write_npz(tmp_path_factory.mktemp("ferplus") / "tiny.npz")
    write_votes(npz)
    return npz


def test_ferplus_run_selects_and_reports_on_ferplus_majority(ferplus_data: Path, tmp_path: Path):
    out = tmp_path / "fp"
    args = ["--data", str(ferplus_data), "--weights", "none", "--out", str(out), "--quick"]
    r = _run([*args, "--labels", "ferplus-crossentropy", "--mix", "0.2"])
    assert r.returncode == 0, r.stderr[-2000:]
    data = ferplus.attach(load(ferplus_data), ferplus_data.parent / "ferplus.npz")
    keep, _ = ferplus.majority(data.votes)
    config = json.loads((out / "train_config.json").read_text())
    assert config["recipe"]["labels"] == "ferplus-crossentropy" and config["recipe"]["mix"] == 0.2
    assert config["ferplus"] == str(ferplus_data.parent / "ferplus.npz")
    assert config["ferplus_kept"]["PublicTest"] == int((keep & (data.splits == 1)).sum())
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 6 * len(LABELS)  # FER2013 labels: the whole split
    assert report["ferplus"]["n"] == int((keep & (data.splits == 1)).sum()) < report["n"]
    assert "FER+ majority labels" in r.stdout


def test_ferplus_labels_without_votes_file_is_a_clear_error(data: Path, tmp_path: Path):
    missing = data.parent / "ferplus.npz"
    assert not missing.exists()
    r = _run(
        [
            "--data",
            str(data),
            "--weights",
            "none",
            "--out",
            str(tmp_path / "o"),
            "--quick",
            "--labels",
            "ferplus-majority",
        ]
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {missing}: FER+ votes file does not exist (ferplus.npz)"
    r = _run(["--data", str(data), "--weights", "none", "--out", str(tmp_path / "o"), "--quick", "--mix", "0.3"])
    assert r.returncode == 2 and "--mix mixes FER2013 into FER+ targets" in r.stderr


def test_labelled_sets_per_mode(ferplus_data: Path):
    fer = labelled_sets(load_data(str(ferplus_data), Recipe()), Recipe())
    assert fer.val.votes is None and np.array_equal(fer.targets, np.eye(7)[fer.train.labels])
    for mode in ferplus.MODES:
        r = Recipe(labels=f"ferplus-{mode}", mix=0.25)
        sets = labelled_sets(load_data(str(ferplus_data), r), r)
        keep, y = ferplus.targets(sets.train.votes, mode)
        assert keep.all()  # only the kept images are left
        # Rows whose FER+ majority is the next class: the target mixes 1/4 of the FER2013 label in.
        assert np.allclose(sets.targets, 0.75 * y + 0.25 * np.eye(7)[load_fer2013_labels(sets, ferplus_data)])
        assert np.array_equal(sets.train.labels, sets.targets.argmax(1))
        # Images whose FER+ majority is another class than FER2013's train on FER+'s.
        assert (sets.train.labels != load_fer2013_labels(sets, ferplus_data)).sum() >= len(sets.train) // 4
        official = ferplus.majority(sets.val.votes)
        assert official[0].all() and np.array_equal(official[1], sets.val.labels)


def load_fer2013_labels(sets, npz: Path) -> np.ndarray:
    """The FER2013 labels of the faces `labelled_sets` kept (its own labels are the targets' classes)."""
    data = load(npz)
    by_pixels = {im.tobytes(): y for im, y in zip(data.images, data.labels, strict=True)}
    return np.array([by_pixels[im.tobytes()] for im in sets.train.images])


def test_probability_mode_draws_a_label_per_face_and_epoch():
    shares = np.tile(np.array([0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0], np.float32), (64, 1))
    x = np.zeros((64, 48, 48, 1), np.float32)
    d = FitData(x=x, y=shares, weights=np.ones(64, np.float32), val_x=x[:2], val_y=shares[:2])
    batches = training_batches(d, Recipe(batch_size=64, augment=False, labels="ferplus-probability"))
    _, y0, _ = batches[0]
    assert np.array_equal(y0.sum(1), np.ones(64)) and set(y0.argmax(1).tolist()) == {0, 3}
    assert np.array_equal(batches[0][1], y0)  # the same batch of the same epoch draws the same labels
    batches.on_epoch_end()
    assert not np.array_equal(batches[0][1], y0)  # a new epoch draws again
    plain = training_batches(d, Recipe(batch_size=64, augment=False, labels="ferplus-crossentropy"))
    assert np.array_equal(plain[0][1], shares)
