"""training/evaluate.py: the script behind the model card's figures, on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from serenbox.training.evaluate import main
from serenbox.training.fer2013 import Fer2013

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
