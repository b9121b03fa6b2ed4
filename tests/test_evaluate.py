"""training/evaluate.py: the script behind the model card's figures, on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from serenbox.training import ferplus
from serenbox.training.calibration import expected_calibration_error, fit_temperature, reliability, with_temperature
from serenbox.training.evaluate import main
from serenbox.training.fer2013 import Fer2013, load

from tests.tinymodels import convert_tiny, make_dataset, tiny_cnn, write_npz

PRIVATE = 2  # the split code of PrivateTest


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny trained model (float .keras and int8 .tflite) and data whose PrivateTest holds 3 Training images."""
    work = tmp_path_factory.mktemp("evaluate")
    data = make_dataset({"Training": 60, "PublicTest": 15, "PrivateTest": 10})
    images = data.images.copy()
    private = np.flatnonzero(data.splits == PRIVATE)
    training = np.flatnonzero(data.splits == 0)
    for p, t in zip(private[:3], training[:3], strict=True):
        images[p] = images[t]  # pixel-identical duplicates across splits, as FER2013 has
    data = Fer2013(images, data.labels, data.splits, data.source)
    npz = write_npz(data, work / "data.npz")
    tflite = convert_tiny(tiny_cnn(data), work, npz)
    return npz, tflite.with_suffix(".keras"), tflite


def test_reports_each_model_whole_and_without_training_duplicates(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    npz, keras_file, tflite = setup
    out = tmp_path / "eval"
    args = ["--data", str(npz), "--split", "PrivateTest", "--model", str(keras_file), "--model", str(tflite)]
    assert main([*args, "--out", str(out), "--flip-tta"]) == 0
    result = json.loads((out / "eval_privatetest.json").read_text())
    assert result["n"] == 70 and result["also_in_training"] == 3
    assert set(result["models"]) == {str(keras_file), str(tflite)}
    for spec, entry in result["models"].items():
        assert entry["all"]["n"] == 70
        assert entry["without_training_duplicates"]["n"] == 67
        assert entry["all"]["accuracy"] > 0.8, spec  # the generated classes are learnable
        assert set(entry["all"]["per_class"]) == {"angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"}
        assert entry["flip_tta"]["all"]["n"] == 70
    assert "TFLite" in result["models"][str(tflite)]["name"]
    assert sorted(p.name for p in out.glob("confusion_*.png")) == [
        "confusion_emotion_int8_keras.png",
        "confusion_emotion_int8_tflite.png",
    ]


def test_missing_model_is_a_one_line_error(setup: tuple[Path, Path, Path], tmp_path: Path, capsys) -> None:
    npz, _, _ = setup
    assert main(["--data", str(npz), "--model", str(tmp_path / "nope.tflite")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nope.tflite'}: model file does not exist"


def test_model_its_manifest_does_not_describe_is_a_one_line_error(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys
) -> None:
    npz, _, tflite = setup
    copy = tmp_path / "renamed.tflite"
    copy.write_bytes(tflite.read_bytes())
    copy.with_suffix(".json").write_text(tflite.with_suffix(".json").read_text())
    assert main(["--data", str(npz), "--model", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "renamed.tflite" in err and "\n" not in err
    assert not list(tmp_path.glob("eval_*"))


def _votes_for(labels: np.ndarray, seed: int = 3) -> np.ndarray:
    """FER+-like votes: most images 7 of 10 for their label, some unclear (unknown on top) or split 5/5."""
    rng = np.random.default_rng(seed)
    column_of = {int(label): col for col, label in enumerate(ferplus.TO_LABEL)}
    votes = np.zeros((len(labels), 10), np.uint8)
    for i, y in enumerate(labels):
        kind = rng.integers(0, 4)
        votes[i, column_of[int(y)]] = 7 if kind < 2 else 5
        votes[i, ferplus.UNKNOWN if kind in (0, 3) else column_of[(int(y) + 1) % 7]] += 3 if kind < 2 else 5
    return votes


def test_reports_ferplus_calibration_and_a_fitted_temperature(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    npz, _, tflite = setup
    data = load(npz)
    votes = _votes_for(data.labels)
    np.savez(tmp_path / "votes.npz", votes=votes)
    out = tmp_path / "eval"
    args = ["--data", str(npz), "--model", str(tflite), "--ferplus", str(tmp_path / "votes.npz")]
    assert main([*args, "--out", str(out), "--fit-temperature"]) == 0
    result = json.loads((out / "eval_privatetest.json").read_text())
    keep, majority = ferplus.majority(votes[data.splits == PRIVATE])
    assert result["ferplus_n"] == int(keep.sum()) and 0 < keep.sum() < 70
    entry = result["models"][str(tflite)]
    assert entry["ferplus"]["n"] == int(keep.sum())
    assert [m["support"] for m in entry["ferplus"]["per_class"].values()] == np.bincount(
        majority[keep], minlength=7
    ).tolist()
    assert set(entry["calibration"]) == {"fer2013", "ferplus"}
    for r in entry["calibration"].values():
        assert 0.0 <= r["ece"] <= 1.0 and len(r["table"]) == 15
    assert entry["calibration"]["ferplus"]["n"] == int(keep.sum())
    fitted = entry["fitted_temperature"]
    assert fitted["fitted_on"] == "PublicTest FER+ majority" and 0.25 <= fitted["temperature"] <= 4.0
    # A temperature never changes the top label, so accuracies stay.
    assert fitted["all"]["accuracy"] == entry["all"]["accuracy"]
    assert fitted["ferplus"]["accuracy"] == entry["ferplus"]["accuracy"]
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [
        "confusion_emotion_int8_tflite.png",
        "confusion_ferplus_emotion_int8_tflite.png",
        "reliability_emotion_int8_tflite.png",
    ]


def test_misaligned_ferplus_file_is_a_one_line_error(setup: tuple[Path, Path, Path], tmp_path: Path, capsys) -> None:
    npz, _, tflite = setup
    np.savez(tmp_path / "votes.npz", votes=np.zeros((5, 10), np.uint8))
    assert main(["--data", str(npz), "--model", str(tflite), "--ferplus", str(tmp_path / "votes.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'votes.npz'}: 5 rows of votes for ") and "\n" not in err


def test_ece_of_constructed_predictions() -> None:
    over = np.zeros((10, 7))
    over[:, 0], over[:, 1] = 0.9, 0.1  # says 90 %, right 7 times in 10
    half = np.zeros((10, 7))
    half[:, 2], half[:, 3] = 0.5, 0.5  # says 50 % (top: class 2), right 5 times in 10
    probs = np.concatenate([over, half])
    labels = np.array([0] * 7 + [1] * 3 + [2] * 5 + [3] * 5)
    r = reliability(probs, labels)
    assert r["ece"] == pytest.approx(0.5 * 0.2 + 0.5 * 0.0)
    filled = [(row["count"], row["confidence"], row["accuracy"]) for row in r["table"] if row["count"]]
    assert filled == [(10, pytest.approx(0.5), pytest.approx(0.5)), (10, pytest.approx(0.9), pytest.approx(0.7))]
    # Bins are (b/15, (b+1)/15]: a confidence of exactly 1/15 is in the first, just above it in the second.
    edge = np.full((2, 7), 0.0)
    edge[0, 0], edge[1, 0] = 1 / 15, 1 / 15 + 1e-9
    assert [row["count"] for row in reliability(edge, np.array([0, 0]))["table"][:2]] == [1, 1]
    assert expected_calibration_error(np.eye(7)[[0, 1, 2]], np.array([0, 1, 2])) == 0.0
    assert expected_calibration_error(np.eye(7)[[0, 1]], np.array([1, 0])) == 1.0


def test_fitted_temperature_undoes_overconfidence() -> None:
    rng = np.random.default_rng(0)
    # Spread small enough that probabilities stay above calibration.FLOOR (the int8 softmax's zero).
    logits = rng.normal(0, 0.8, (20000, 7))
    truth = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (truth.cumsum(1) < rng.random((len(truth), 1))).sum(1)
    overconfident = np.exp(2 * logits) / np.exp(2 * logits).sum(1, keepdims=True)
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.0, abs=0.1)
    calibrated = with_temperature(overconfident, t)
    assert np.array_equal(calibrated.argmax(1), overconfident.argmax(1))
    assert expected_calibration_error(calibrated, labels) < 0.02 < expected_calibration_error(overconfident, labels)
