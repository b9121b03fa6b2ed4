"""Eye-line alignment: faces carry BlazeFace's landmarks, and the classifier's crop turns a rolled
face upright by them (detector.align). On the real detector, classifier and pipeline, with the
astronaut photo rolled; what it is worth in accuracy is measured by bench_detectors.py."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from serenbox.device import preprocess
from serenbox.device.cameras import open_source
from serenbox.device.classifier import MIN_ROLL_DEG, Classifier, resolve_model_path
from serenbox.device.config import ConfigError, DetectorConfig, from_dict
from serenbox.device.events import rounded_probabilities
from serenbox.device.faces import Face, build_detector
from serenbox.device.faces.base import face_rolls
from serenbox.device.pipeline import Pipeline

from tests.test_blazeface import astronaut_in_frame
from tests.test_faces import gray

MARGIN = DetectorConfig().margin


@pytest.fixture(scope="module")
def detector() -> object:
    return build_detector(DetectorConfig(kind="blazeface"))


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(resolve_model_path(None))


def face_at(frame: np.ndarray, detector: object) -> Face:
    """The largest face (the rolled photo can show a weak second one in the flag's patch)."""
    faces = detector.detect(frame)  # type: ignore[attr-defined]
    assert faces
    return faces[0]


def seen(classifier: Classifier, frame: np.ndarray, face: Face, roll: float | None) -> np.ndarray:
    """The crop as the model gets it (48×48), as floats."""
    crop = classifier.crops(frame, [face.box], MARGIN, [roll])[0]
    return preprocess.resize_face(crop, 48, 48).astype(np.float32)


def test_roll_follows_the_eye_line() -> None:
    def face(right_eye: tuple[float, float], left_eye: tuple[float, float]) -> Face:
        return Face(0, 0, 100, 100, (right_eye, left_eye, (50, 60), (50, 80), (10, 50), (90, 50)))

    assert face((30, 40), (70, 40)).roll == pytest.approx(0)
    # The subject's left eye (on the image's right) lower: the face leans clockwise as seen.
    assert face((30, 40), (70, 40 + 40 * math.tan(math.radians(20)))).roll == pytest.approx(20)
    assert face((30, 50), (70, 30)).roll == pytest.approx(-math.degrees(math.atan(0.5)))
    assert Face(0, 0, 10, 10).roll is None  # Haar's faces have no landmarks
    assert Face(1, 2, 3, 4, ((0, 0),) * 6).box == (1, 2, 3, 4)


def test_blazeface_faces_carry_landmarks_and_haar_faces_none() -> None:
    frame = gray(astronaut_in_frame(1.0, 0, (320, 240)))
    blaze = build_detector(DetectorConfig(kind="blazeface")).detect(frame)[0]
    assert blaze.landmarks is not None and len(blaze.landmarks) == 6
    right_eye, left_eye, nose, mouth = blaze.landmarks[:4]
    assert right_eye[0] < nose[0] < left_eye[0] and nose[1] < mouth[1]
    assert blaze.x <= nose[0] <= blaze.x + blaze.w and blaze.y <= nose[1] <= blaze.y + blaze.h
    haar = build_detector(DetectorConfig(kind="haar")).detect(frame)[0]
    assert haar.landmarks is None and face_rolls([haar, blaze], True) == [None, blaze.roll]
    assert face_rolls([haar, blaze], False) == [None, None]


@pytest.mark.parametrize("angle", [-30, -15, 15, 30, 45])
def test_crop_of_a_rolled_face_comes_out_upright(detector: object, classifier: Classifier, angle: float) -> None:
    upright_frame = gray(astronaut_in_frame(1.5, 0, (320, 240)))
    upright = face_at(upright_frame, detector)
    reference = seen(classifier, upright_frame, upright, None)
    frame = gray(astronaut_in_frame(1.5, angle, (320, 240)))  # turned anticlockwise by `angle`
    face = face_at(frame, detector)
    assert face.roll is not None and upright.roll is not None
    # The picture turned anticlockwise leans the face anticlockwise: a negative roll.
    assert abs(face.roll - (upright.roll - angle)) < 8
    as_is = np.abs(seen(classifier, frame, face, None) - reference).mean()
    levelled = np.abs(seen(classifier, frame, face, face.roll) - reference).mean()
    assert levelled < 0.7 * as_is


def test_upright_crop_keeps_the_frame_crop_when_level() -> None:
    frame = gray(astronaut_in_frame(1.0, 0, (320, 240)))
    same = preprocess.upright_crop(frame, 250, 180, 390, 320, 0.0)
    assert np.array_equal(same, frame[180:320, 250:390])
    # Off the frame's edge, the edge repeats (no black corners for the model to read).
    corner = preprocess.upright_crop(frame, 0, 0, 60, 60, 30.0)
    assert corner.shape == (60, 60) and corner.min() > 0


def test_nearly_level_faces_are_cropped_as_they_are(classifier: Classifier) -> None:
    frame = gray(astronaut_in_frame(1.0, 0, (320, 240)))
    box = (250.0, 180.0, 140.0, 140.0)
    as_is = classifier.crops(frame, [box], MARGIN)[0]
    assert np.array_equal(classifier.crops(frame, [box], MARGIN, [MIN_ROLL_DEG / 2])[0], as_is)
    assert not np.array_equal(classifier.crops(frame, [box], MARGIN, [MIN_ROLL_DEG * 2])[0], as_is)
    probs = classifier.classify(frame, [box, box], MARGIN, [None, 20.0])
    assert probs.shape == (2, 7) and not np.allclose(probs[0], probs[1])
    with pytest.raises(ValueError):
        classifier.crops(frame, [box], MARGIN, [None, None])  # one roll per box


@pytest.mark.parametrize("align", [True, False])
def test_pipeline_classifies_the_levelled_crop_when_align_is_on(
    tmp_path: Path, classifier: Classifier, detector: object, align: bool
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    frame = astronaut_in_frame(1.5, 30, (320, 240))
    cv2.imwrite(str(folder / "rolled.png"), frame)
    crops = tmp_path / "crops"
    cfg = from_dict(
        {
            "camera": {"source": str(folder)},
            "detector": {"align": align},
            "debug": {"save_crops": True, "dir": str(crops)},
        },
        env={},
    )
    pipeline = Pipeline(cfg, open_source(cfg.camera.source, cfg.camera), build_detector(cfg.detector), classifier, [])
    pipeline.run()
    saved = sorted(crops.glob("*.png"))
    assert len(saved) == 1
    crop = cv2.imread(str(saved[0]), cv2.IMREAD_GRAYSCALE)
    face = face_at(gray(frame), detector)
    assert np.array_equal(crop, classifier.crops(gray(frame), [face.box], MARGIN, [face.roll if align else None])[0])


def test_config_align_is_a_boolean() -> None:
    assert from_dict({}, env={}).detector.align is True
    assert from_dict({"detector": {"align": False}}, env={}).detector.align is False
    with pytest.raises(ConfigError, match=r"detector\.align"):
        from_dict({"detector": {"align": "yes"}}, env={})


@pytest.mark.parametrize("align", [True, False])
def test_photos_are_classified_on_the_levelled_crop_when_align_is_on(
    classifier: Classifier, detector: object, align: bool
) -> None:
    # serenbox.classify (and `serenbox classify`, the same code path) follow detector.align too.
    import serenbox

    frame = astronaut_in_frame(1.5, 30, (320, 240))
    face = face_at(gray(frame), detector)
    (found,) = serenbox.classify(frame, config={"detector": {"align": align}})
    expected = classifier.classify(gray(frame), [face.box], MARGIN, [face.roll if align else None])[0]
    other = classifier.classify(gray(frame), [face.box], MARGIN, [None if align else face.roll])[0]
    assert not np.allclose(expected, other)
    assert found.probabilities == rounded_probabilities(expected)
