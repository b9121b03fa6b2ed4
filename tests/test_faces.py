"""Every face detector on real pictures: scikit-image's astronaut pasted into scenes.

The tests that take `kind` run for each backend; Haar's own knobs and errors are tested at the
end, BlazeFace's in test_blazeface.py."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from serenbox.device.config import ConfigError, DetectorConfig
from serenbox.device.faces import DetectorError, Face, FaceDetector, build_detector
from serenbox.device.faces.haar import CASCADE, HaarDetector, find_cascade

from tests import media


def gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


KINDS = ["haar", "blazeface"]


@pytest.fixture(scope="module", params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def detector(kind: str) -> FaceDetector:
    return build_detector(DetectorConfig(kind=kind, min_face=24, max_faces=5))


def test_finds_the_astronaut_in_the_original_photo(detector: FaceDetector) -> None:
    faces = detector.detect(gray(media.astronaut_bgr()))
    assert len(faces) == 1
    assert iou(faces[0].box, media.FACE_IN_PHOTO) > 0.6
    assert all(isinstance(v, int) for v in faces[0].box)


@pytest.mark.parametrize(("x", "y", "size"), [(30, 40, 90), (300, 200, 200), (420, 10, 150)])
def test_face_box_is_where_the_face_was_pasted(detector: FaceDetector, x: int, y: int, size: int) -> None:
    faces = detector.detect(gray(media.scene([(x, y, size)])))
    assert len(faces) == 1
    assert iou(faces[0].box, media.face_in_head(x, y, size)) > 0.5


def test_accepts_a_bgr_frame_too(detector: FaceDetector) -> None:
    image = media.scene([(200, 100, 200)])
    assert detector.detect(image) == detector.detect(gray(image))


def test_blank_and_noise_images_have_no_faces(detector: FaceDetector) -> None:
    assert detector.detect(np.full((480, 640), 128, np.uint8)) == []
    assert detector.detect(np.zeros((480, 640), np.uint8)) == []
    assert detector.detect(gray(media.scene())) == []


def test_min_face_drops_smaller_faces(kind: str) -> None:
    image = gray(media.scene([(20, 20, 250), (400, 300, 110)]))  # faces of about 139 and 61 px
    both = build_detector(DetectorConfig(kind=kind, min_face=30)).detect(image)
    assert len(both) == 2
    big_only = build_detector(DetectorConfig(kind=kind, min_face=100)).detect(image)
    assert len(big_only) == 1
    assert big_only[0].w >= 100
    assert iou(big_only[0].box, media.face_in_head(20, 20, 250)) > 0.5
    assert build_detector(DetectorConfig(kind=kind, min_face=200)).detect(image) == []


def test_max_faces_keeps_the_largest_first(kind: str) -> None:
    heads = [(330, 40, 180), (20, 20, 250), (300, 300, 130)]
    image = gray(media.scene(heads))
    every = build_detector(DetectorConfig(kind=kind, min_face=30, max_faces=5)).detect(image)
    assert len(every) == 3
    areas = [f.w * f.h for f in every]
    assert areas == sorted(areas, reverse=True)
    # Largest first: the 250 head, then 180, then 130.
    for face, (x, y, size) in zip(every, sorted(heads, key=lambda h: -h[2]), strict=True):
        assert iou(face.box, media.face_in_head(x, y, size)) > 0.5

    two = build_detector(DetectorConfig(kind=kind, min_face=30, max_faces=2)).detect(image)
    assert two == every[:2]
    one = build_detector(DetectorConfig(kind=kind, min_face=30, max_faces=1)).detect(image)
    assert one == every[:1]


def test_detection_on_a_downscaled_search_matches_full_resolution(kind: str) -> None:
    # A large min_face searches a smaller image; boxes must come back in frame pixels.
    image = gray(media.scene([(150, 60, 300)]))
    coarse = build_detector(DetectorConfig(kind=kind, min_face=120))
    faces = coarse.detect(image)
    assert len(faces) == 1
    assert iou(faces[0].box, media.face_in_head(150, 60, 300)) > 0.5


def test_haar_searches_a_downscaled_frame_for_large_faces() -> None:
    assert HaarDetector(DetectorConfig(kind="haar", min_face=120)).scale < 1.0
    assert HaarDetector(DetectorConfig(kind="haar", min_face=24)).scale == 1.0


def test_scale_factor_and_min_neighbors_are_used() -> None:
    image = gray(media.scene([(200, 100, 200)]))
    strict = build_detector(DetectorConfig(kind="haar", min_face=30, min_neighbors=50))
    assert strict.detect(image) == []  # no real face gathers 50 overlapping hits
    coarse = build_detector(DetectorConfig(kind="haar", min_face=30, scale_factor=1.5, min_neighbors=1))
    assert len(coarse.detect(image)) >= 1


def test_missing_cascade_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DetectorError) as err:
        find_cascade([tmp_path / "nowhere"])
    message = str(err.value)
    assert "\n" not in message
    assert CASCADE in message and str(tmp_path / "nowhere") in message and "opencv-data" in message
    assert isinstance(err.value, ConfigError)  # the command line reports it as one line, exit 2


def test_corrupt_cascade_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / CASCADE
    bad.write_text("<opencv_storage>not a cascade</opencv_storage>")
    with pytest.raises(DetectorError, match="not a cascade"):
        HaarDetector(DetectorConfig(kind="haar"), cascade=bad)


def test_default_cascade_is_found() -> None:
    assert find_cascade().name == CASCADE


def test_unknown_detector_kind_is_refused() -> None:
    cfg = DetectorConfig()
    cfg.kind = "yunet"  # type: ignore[assignment]  # the config validator refuses it earlier
    with pytest.raises(DetectorError, match="yunet"):
        build_detector(cfg)


def test_face_is_a_small_value_type() -> None:
    face = Face(1, 2, 30, 40)
    assert (face.x, face.y, face.w, face.h) == (1, 2, 30, 40)
    assert face.area == 1200
