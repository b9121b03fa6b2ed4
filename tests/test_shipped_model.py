"""The int8 model that ships in device/models: usable as shipped, and as good as its model card says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from serenbox.device.classifier import DEFAULT_MODEL, Classifier
from serenbox.device.interpreter import load_interpreter
from serenbox.device.labels import LABELS

from tests import media

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "docs" / "model" / "eval_privatetest.json"
MAX_BYTES = 4 * 1024 * 1024


def test_shipped_model_is_full_int8_with_a_matching_manifest() -> None:
    assert DEFAULT_MODEL.is_file(), "device/models/emotion_int8.tflite is not in the checkout"
    assert DEFAULT_MODEL.stat().st_size <= MAX_BYTES
    # Loading verifies the manifest's sha256 against the file and its details against the interpreter.
    manifest = Classifier(DEFAULT_MODEL).manifest
    assert tuple(manifest.labels) == tuple(LABELS)
    interpreter = load_interpreter(str(DEFAULT_MODEL), 1)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    assert list(inp["shape"][1:]) == [manifest.input.height, manifest.input.width, manifest.input.channels]


def test_shipped_model_reads_a_real_smile(tmp_path: Path) -> None:
    """scikit-image's astronaut photo (Eileen Collins, smiling), through `serenbox classify` as shipped."""
    photo = media.write_image(tmp_path / "astronaut.jpg", media.astronaut_bgr())
    proc = subprocess.run(
        [sys.executable, "-m", "serenbox", "classify", str(photo)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (face,) = json.loads(proc.stdout)["faces"]
    assert face["emotion"] == "happy"
    assert sum(face["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


def test_readme_main_command_prints_events_with_the_shipped_model(tmp_path: Path) -> None:
    """The README's main job: the demo camera, the shipped model, events on stdout."""
    config = tmp_path / "demo.yaml"
    config.write_text((ROOT / "configs" / "demo.yaml").read_text().replace("./.serenbox-state", str(tmp_path)))
    proc = subprocess.run(
        [sys.executable, "-m", "serenbox", "run", "--config", str(config), "--print-events", "--max-frames", "60"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events and events[0]["type"] == "new"
    assert events[0]["emotion"] in LABELS
    assert events[-1]["type"] == "end"  # --max-frames ends the run; open tracks are closed


def test_shipped_model_scores_what_the_model_card_reports(fer2013_npz: Path) -> None:
    """PrivateTest accuracy of the shipped int8 model, recomputed, equals the committed evaluation."""
    from serenbox.training.evaluate import tflite_predictor
    from serenbox.training.fer2013 import load

    recorded = json.loads(EVAL.read_text())
    entry = next(m for spec, m in recorded["models"].items() if spec.endswith(DEFAULT_MODEL.name))
    test = load(fer2013_npz).split("PrivateTest")
    accuracy = float((tflite_predictor(DEFAULT_MODEL)(test.images).argmax(1) == test.labels).mean())
    assert accuracy == pytest.approx(entry["all"]["accuracy"], abs=0.003)


def test_flip_tta_averages_a_face_with_its_mirror_image() -> None:
    gray = cv2.cvtColor(media.astronaut_bgr(), cv2.COLOR_BGR2GRAY)
    # The face at FER2013's 48×48, so mirroring the crop and mirroring the model input are the same.
    crop = cv2.resize(gray[40:200, 150:310], (48, 48), interpolation=cv2.INTER_AREA)
    plain = Classifier(DEFAULT_MODEL)
    tta = Classifier(DEFAULT_MODEL, flip_tta=True)
    one, mirrored = plain.classify_crops([crop]), plain.classify_crops([crop[:, ::-1].copy()])
    assert not np.allclose(one, mirrored, atol=1e-3)  # the real model sees the mirror image differently
    np.testing.assert_allclose(tta.classify_crops([crop, crop]), np.repeat((one + mirrored) / 2, 2, axis=0), atol=1e-6)


@pytest.mark.shared
def test_shipped_confidences_are_calibrated_on_ferplus(fer2013_npz: Path) -> None:
    """With its manifest's temperature, the shipped model's ECE on FER+ PrivateTest meets the 0.05
    target and equals the committed as-shipped evaluation."""
    from serenbox.training import ferplus
    from serenbox.training.calibration import expected_calibration_error
    from serenbox.training.evaluate import tflite_predictor
    from serenbox.training.fer2013 import load

    votes = fer2013_npz.parent / ferplus.FILE_NAME
    if not votes.is_file():
        pytest.skip("../shared/fer2013/ferplus.npz is absent")
    assert Classifier(DEFAULT_MODEL).manifest.output.temperature != 1.0
    recorded = json.loads((ROOT / "docs" / "model" / "ferplus" / "as-shipped" / "eval_privatetest.json").read_text())
    entry = next(m for spec, m in recorded["models"].items() if spec.endswith(DEFAULT_MODEL.name))
    test = ferplus.official(ferplus.attach(load(fer2013_npz), votes).split("PrivateTest"))
    assert len(test) == 3136
    ece = expected_calibration_error(tflite_predictor(DEFAULT_MODEL)(test.images), test.labels)
    assert ece <= 0.05
    assert ece == pytest.approx(entry["calibration"]["ferplus"]["ece"], abs=1e-4)
