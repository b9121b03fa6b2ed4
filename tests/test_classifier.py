"""The classifier on the real TFLite interpreter with the tiny brightness model, and its manifest checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from serenbox.device import preprocess
from serenbox.device.classifier import Classifier, ModelError, crop_box, softmax
from serenbox.device.labels import LABELS

from tests.tinymodels import BRIGHTNESS_OF, brightness_model, convert_tiny, edit_manifest, expected_emotion


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_tiny(brightness_model(), tmp_path_factory.mktemp("brightness"))


@pytest.fixture(scope="module")
def classifier(model: Path) -> Classifier:
    return Classifier(model)


def copy_model(model: Path, folder: Path) -> Path:
    """The model and its manifest in a folder of their own, to break one of them."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, folder / model.name)
    shutil.copy(model.with_suffix(".json"), folder / model.with_suffix(".json").name)
    return folder / model.name


def face_frame(levels: list[int], size: int = 80) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """A mid-gray frame with one textured square 'face' per level, side by side; the frame and the boxes."""
    rng = np.random.default_rng(0)
    frame = np.full((size + 40, (size + 20) * len(levels) + 20), 128, np.uint8)
    boxes = []
    for i, level in enumerate(levels):
        x = 20 + i * (size + 20)
        patch = np.clip(level + rng.normal(0, 6, (size, size)), 0, 255)
        frame[20 : 20 + size, x : x + size] = patch.astype(np.uint8)
        boxes.append((float(x), 20.0, float(size), float(size)))
    return frame, boxes


def test_emotion_follows_brightness_on_the_real_interpreter(classifier: Classifier) -> None:
    levels = [BRIGHTNESS_OF["sad"], BRIGHTNESS_OF["neutral"], BRIGHTNESS_OF["happy"]]
    frame, boxes = face_frame(levels)
    probs = classifier.classify(frame, boxes)
    assert probs.shape == (3, len(LABELS))
    assert [LABELS[i] for i in probs.argmax(axis=1)] == ["sad", "neutral", "happy"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert (probs >= 0).all()
    assert probs.max(axis=1).min() > 0.9
    # Across the range, away from the band edges, the model agrees with the documented bands.
    for level in range(10, 250, 15):
        if min(abs(level - edge) for edge in (85, 170)) < 8:
            continue
        frame, boxes = face_frame([level])
        (p,) = classifier.classify(frame, boxes)
        assert LABELS[int(p.argmax())] == expected_emotion(level), level


def test_batched_invoke_matches_one_by_one(model: Path, classifier: Classifier) -> None:
    frame, boxes = face_frame([30, 100, 140, 200, 240])
    batched = Classifier(model, batch=True).classify(frame, boxes)
    np.testing.assert_allclose(batched, classifier.classify(frame, boxes), atol=1e-6)


def test_no_faces_gives_an_empty_result(classifier: Classifier) -> None:
    assert classifier.classify(np.zeros((50, 50), np.uint8), []).shape == (0, len(LABELS))


def test_margin_grows_the_crop_and_stays_inside_the_frame(classifier: Classifier) -> None:
    assert crop_box((100, 100, 50, 40), 0.2, 640, 480) == (90, 92, 160, 148)
    assert crop_box((0, 0, 50, 50), 0.5, 60, 60) == (0, 0, 60, 60)
    # A dark face on a bright background: a wide margin pulls the bright border into the crop.
    frame = np.full((200, 200), 230, np.uint8)
    frame[70:130, 70:130] = 30
    box = [(70.0, 70.0, 60.0, 60.0)]
    assert LABELS[int(classifier.classify(frame, box, margin=0.0)[0].argmax())] == "sad"
    assert LABELS[int(classifier.classify(frame, box, margin=1.0)[0].argmax())] == "happy"


def test_preprocess_goes_through_48x48_and_quantizes_with_the_manifest() -> None:
    crop = (np.arange(200 * 160) % 251).astype(np.uint8).reshape(200, 160)
    via48 = cv2.resize(
        cv2.resize(crop, (48, 48), interpolation=cv2.INTER_AREA), (32, 32), interpolation=cv2.INTER_LINEAR
    )
    np.testing.assert_array_equal(preprocess.resize_face(crop, 32, 32), via48)
    assert preprocess.resize_face(crop[:48, :48], 48, 48).shape == (48, 48)
    q = preprocess.quantize(np.array([0.0, 127.0, 255.0, 400.0]), 1.0, -128, np.int8)
    assert q.dtype == np.int8
    assert q.tolist() == [-128, -1, 127, 127]  # 400 clips to the dtype
    np.testing.assert_allclose(
        preprocess.dequantize(np.array([-128, 0, 127], np.int8), 1 / 256, -128), [0, 0.5, 255 / 256]
    )


def test_logits_model_gets_a_softmax(model: Path, classifier: Classifier, tmp_path: Path) -> None:
    np.testing.assert_allclose(softmax(np.array([[0.0, 0.0], [1.0, 3.0]])), [[0.5, 0.5], [0.1192, 0.8808]], atol=1e-4)
    # The same tensor read as logits: the device must softmax the dequantized values itself.
    logits_model = copy_model(model, tmp_path / "logits")
    edit_manifest(logits_model, {"output.activation": "none"})
    frame, boxes = face_frame([BRIGHTNESS_OF["happy"]])
    (p,) = Classifier(logits_model).classify(frame, boxes)
    (scores,) = classifier.classify(frame, boxes)
    # `scores` were renormalised after dequantizing (an int8 softmax sums to 1 only within a step).
    np.testing.assert_allclose(p, softmax(scores), atol=2e-3)
    assert LABELS[int(p.argmax())] == "happy" and p.max() < 0.5  # a softmax of near one-hot values is flat
    assert p.sum() == pytest.approx(1.0)


def test_manifest_temperature_scales_the_confidence_not_the_emotion(
    model: Path, classifier: Classifier, tmp_path: Path
) -> None:
    levels = [BRIGHTNESS_OF["sad"], 100, BRIGHTNESS_OF["happy"]]
    frame, boxes = face_frame(levels)
    plain = classifier.classify(frame, boxes)
    step = classifier.manifest.output.scale
    assert classifier.manifest.output.temperature == 1.0  # converted without --temperature
    for t in (0.5, 3.0):
        hot = copy_model(model, tmp_path / f"t{t}")
        edit_manifest(hot, {"output.temperature": t})
        probs = Classifier(hot).classify(frame, boxes)
        assert np.array_equal(probs.argmax(1), plain.argmax(1))
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
        expected = softmax(np.log(np.maximum(plain, step / 2)) / t)
        np.testing.assert_allclose(probs, expected, atol=0.02)
        top, top_plain = probs.max(1), plain.max(1)
        # T < 1 sharpens; a saturated output (the others at zero) stays just below 1, as the floor
        # of half a step for its zeros says.
        assert (top < top_plain).all() if t > 1 else (top >= top_plain - 1e-4).all()
    assert (Classifier(hot).classify(frame, boxes).max(1) < 0.9).all()  # T=3 flattens a near one-hot output


@pytest.mark.parametrize("value", [0, -1, 100, "warm", True])
def test_manifest_with_a_bad_temperature_is_refused(model: Path, tmp_path: Path, value: object) -> None:
    broken = copy_model(model, tmp_path)
    edit_manifest(broken, {"output.temperature": value})
    with pytest.raises(ModelError, match="temperature") as info:
        Classifier(broken)
    assert str(info.value).startswith(str(broken.with_suffix(".json")))


def test_model_without_manifest_is_refused(model: Path, tmp_path: Path) -> None:
    bare = copy_model(model, tmp_path)
    bare.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="manifest missing"):
        Classifier(bare)


def test_changed_model_file_is_refused(model: Path, tmp_path: Path) -> None:
    changed = copy_model(model, tmp_path)
    with changed.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        Classifier(changed)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"labels": [*LABELS[::-1]]}, "labels"),
        ({"input.height": 48, "input.width": 48}, "input shape"),
        ({"input.zero_point": 0}, "input quantization"),
        ({"output.scale": 0.5}, "output quantization"),
        ({"input.dtype": "uint8"}, "input dtype"),
        ({"format": "other/1"}, "format"),
    ],
)
def test_manifest_that_does_not_match_the_model_is_refused(
    model: Path, tmp_path: Path, edit: dict, message: str
) -> None:
    broken = copy_model(model, tmp_path)
    edit_manifest(broken, edit)
    with pytest.raises(ModelError, match=message) as info:
        Classifier(broken)
    assert str(broken.with_suffix(".json")) in str(info.value) or str(broken) in str(info.value)


def test_not_a_tflite_file_is_refused(model: Path, tmp_path: Path) -> None:
    junk = copy_model(model, tmp_path)
    junk.write_bytes(b"this is not a flatbuffer" * 10)
    edit_manifest(junk, {"sha256": __import__("hashlib").sha256(junk.read_bytes()).hexdigest()})
    with pytest.raises(ModelError, match="not a loadable TFLite model"):
        Classifier(junk)
