"""The BlazeFace backend with its shipped models on the real interpreter, on real photos.

Generic detector behaviour (boxes where faces were pasted, min_face, max_faces, empty frames)
is tested for every backend in test_faces.py; here is what is particular to BlazeFace: the
decoding (boxes and landmarks on rotated and rescaled photos), the passes it plans, its
configuration keys and its errors.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from serenbox.device.config import ConfigError, DetectorConfig, from_dict
from serenbox.device.faces import DetectorError, build_detector
from serenbox.device.faces.blazeface import MODEL_DIR, MODELS, BlazeFaceDetector, anchors, find_model

from tests import media
from tests.test_faces import gray, iou

W, H = media.WIDTH, media.HEIGHT
FACE_40PX_SCALE = 40 / media.FACE_IN_PHOTO[3]  # the astronaut's face 40 px tall
FACE_CENTRE = (media.FACE_IN_PHOTO[0] + media.FACE_IN_PHOTO[2] / 2, media.FACE_IN_PHOTO[1] + media.FACE_IN_PHOTO[3] / 2)


@pytest.fixture(scope="module", params=["short", "full"])
def detector(request: pytest.FixtureRequest) -> BlazeFaceDetector:
    return BlazeFaceDetector(DetectorConfig(kind="blazeface", blazeface_model=request.param))


def astronaut_in_frame(scale: float, angle: float, centre: tuple[float, float]) -> np.ndarray:
    """The astronaut photo scaled and rolled `angle` degrees about her face centre, which lands at
    `centre` of a 640×480 frame, on gray where the photo does not reach."""
    m = cv2.getRotationMatrix2D(FACE_CENTRE, angle, scale)
    m[:, 2] += (centre[0] - FACE_CENTRE[0], centre[1] - FACE_CENTRE[1])
    return cv2.warpAffine(
        media.astronaut_bgr(), m, (W, H), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT, borderValue=(110,) * 3
    )


def eye_line(landmarks: np.ndarray) -> float:
    """The tilt of the eye line in degrees, anticlockwise positive as OpenCV turns pictures.
    The subject's right eye is the first landmark, on the image's left."""
    right_eye, left_eye = landmarks[0], landmarks[1]
    return math.degrees(math.atan2(-(left_eye[1] - right_eye[1]), left_eye[0] - right_eye[0]))


def test_models_ship_with_their_provenance() -> None:
    for spec in MODELS.values():
        assert find_model(spec).stat().st_size > 100_000
    provenance = (MODEL_DIR / "PROVENANCE.md").read_text()
    for spec in MODELS.values():
        assert spec.file in provenance
    assert "Apache" in provenance and "sha256" in provenance
    assert (MODEL_DIR / "LICENSE").is_file()


def test_finds_the_astronaut_in_the_original_photo(detector: BlazeFaceDetector) -> None:
    faces = detector.detect(gray(media.astronaut_bgr()))
    assert len(faces) == 1
    assert iou(faces[0].box, media.FACE_IN_PHOTO) > 0.6
    assert all(isinstance(v, int) for v in faces[0].box)
    assert detector.last[0].score > 0.7


@pytest.mark.parametrize(
    ("scale", "angle", "centre"),
    [(0.5, 0, (120, 100)), (1.0, 0, (480, 300)), (2.0, 0, (320, 240)), (1.0, 30, (320, 200)), (0.7, -30, (200, 300))],
)
def test_box_and_eye_line_follow_a_scaled_and_rolled_face(
    detector: BlazeFaceDetector, scale: float, angle: float, centre: tuple[float, float]
) -> None:
    faces = detector.detect(gray(astronaut_in_frame(scale, angle, centre)))
    size = media.FACE_IN_PHOTO[3] * scale
    assert len(faces) == 1
    x, y, w, h = faces[0].box
    assert math.hypot(x + w / 2 - centre[0], y + h / 2 - centre[1]) < 0.25 * size
    assert 0.75 < h / size < 1.35
    if detector.cfg.blazeface_model == "full" and scale < 1:
        return  # full-range's landmarks on small rolled faces are off by up to 25°; only its box is used
    marks = detector.last[0].landmarks.copy()
    detector.detect(gray(media.astronaut_bgr()))
    upright = eye_line(detector.last[0].landmarks)  # her head is a little tilted in the photo
    assert abs(eye_line(marks) - upright - angle) < 10
    # Upright in the face's own frame: eyes, then nose, then mouth.
    turn = np.deg2rad(angle)
    rot = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    right_eye, left_eye, nose, mouth = (marks[:4] - marks[2]) @ rot.T
    assert right_eye[0] < nose[0] < left_eye[0]
    assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1]


def test_nothing_in_empty_and_textured_frames(detector: BlazeFaceDetector) -> None:
    from skimage import data

    assert detector.detect(np.full((H, W), 128, np.uint8)) == []
    assert detector.detect(np.zeros((H, W), np.uint8)) == []
    noise = np.random.default_rng(0).integers(0, 256, (H, W), dtype=np.uint8)
    assert detector.detect(noise) == []
    for texture in (data.brick(), data.grass(), data.text()):
        assert detector.detect(cv2.resize(texture, (W, H))) == []
    assert detector.last == []


def test_odd_frame_sizes_keep_boxes_in_frame_pixels(detector: BlazeFaceDetector) -> None:
    image = media.scene([(40, 30, 160)], width=300, height=250)
    faces = detector.detect(gray(image))
    assert len(faces) == 1
    assert iou(faces[0].box, media.face_in_head(40, 30, 160)) > 0.5


def test_frames_of_many_sizes_keep_few_interpreters() -> None:
    from serenbox.device.faces.blazeface import MAX_INTERPRETERS

    detector = BlazeFaceDetector(DetectorConfig(kind="blazeface"))
    for width in range(200, 1000, 50):
        image = gray(media.scene([(20, 20, 170)], width=width, height=240))
        faces = detector.detect(image)
        assert len(faces) == 1 and iou(faces[0].box, media.face_in_head(20, 20, 170)) > 0.5
        assert len(detector._interpreters) <= MAX_INTERPRETERS


def test_short_range_passes_follow_min_face() -> None:
    spec = MODELS["short"]
    near = BlazeFaceDetector(DetectorConfig(kind="blazeface", min_face=40))
    plan = near.passes(W, H)
    # The frame shrunk so that a 40 px face is min_px tall, rounded up to the model's stride...
    assert plan[0].window == (0, 0, W, H)
    assert plan[0].input_hw == (math.ceil(H * spec.min_px / 40 / 16) * 16, math.ceil(W * spec.min_px / 40 / 16) * 16)
    # ...and a smaller pass for faces too big for the first.
    assert len(plan) == 2 and plan[1].input_hw[0] < plan[0].input_hw[0]
    far = BlazeFaceDetector(DetectorConfig(kind="blazeface", min_face=10)).passes(W, H)
    assert far[0].input_hw == (H, W)  # never upscaled


def test_full_range_tiles_the_frame_for_small_faces() -> None:
    coarse = BlazeFaceDetector(DetectorConfig(kind="blazeface", blazeface_model="full", min_face=120))
    assert [p.window for p in coarse.passes(W, H)] == [(0, 0, W, H)]
    fine = BlazeFaceDetector(DetectorConfig(kind="blazeface", blazeface_model="full", min_face=20))
    tiles = [p.window for p in fine.passes(W, H)][1:]
    assert len(tiles) > 1
    covered = np.zeros((H, W), bool)
    for x, y, w, h in tiles:
        assert x >= 0 and y >= 0 and x + w <= W and y + h <= H
        covered[y : y + h, x : x + w] = True
    assert covered.all()
    # A 33 px face, 10 px in the whole-frame pass (too small for it), 27 px in a tile.
    image = gray(media.scene([(300, 200, 60)]))
    faces = fine.detect(image)
    assert len(faces) == 1
    assert iou(faces[0].box, media.face_in_head(300, 200, 60)) > 0.5


@pytest.mark.parametrize("name", ["short", "full"])
def test_anchors_match_the_model_outputs(name: str) -> None:
    spec = MODELS[name]
    detector = BlazeFaceDetector(DetectorConfig(kind="blazeface", blazeface_model=name))
    native = anchors(spec, spec.size, spec.size)
    assert len(native) == {"short": 896, "full": 2304}[name]
    assert native.min() > 0 and native.max() < spec.size
    interpreter = detector._interpreter((spec.size, spec.size))[0]
    assert all(d["shape"][1] == len(native) for d in interpreter.get_output_details())


def test_second_look_removes_weak_candidates() -> None:
    from skimage import data

    # The Hubble deep field fools the whole-frame pass (three weak candidates); a second look
    # at each, centred and at the model's own scale, sees no face.
    sky = cv2.resize(cv2.cvtColor(data.hubble_deep_field(), cv2.COLOR_RGB2GRAY), (W, H))
    once = build_detector(DetectorConfig(kind="blazeface", verify_threshold=0.0))
    assert len(once.detect(sky)) >= 2 and all(d.score < 0.8 for d in once.last)
    assert build_detector(DetectorConfig(kind="blazeface")).detect(sky) == []
    # A confidently found face skips the second look, so even an impossible one keeps it.
    face = gray(media.scene([(200, 100, 200)]))
    strict = build_detector(DetectorConfig(kind="blazeface", verify_threshold=1.0))
    assert len(strict.detect(face)) == 1 and strict.last[0].score >= 0.8


def test_score_threshold_is_used() -> None:
    image = gray(media.scene([(200, 100, 200)]))
    assert build_detector(DetectorConfig(kind="blazeface", score_threshold=1.0)).detect(image) == []


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"kind": "yunet"}, "detector.kind"),
        ({"blazeface_model": "medium"}, "detector.blazeface_model"),
        ({"score_threshold": 0}, "detector.score_threshold"),
        ({"score_threshold": 1.5}, "detector.score_threshold"),
        ({"verify_threshold": -0.1}, "detector.verify_threshold"),
        ({"nms_iou": 0}, "detector.nms_iou"),
        ({"nms_iou": "high"}, "detector.nms_iou"),
        ({"num_threads": 0}, "detector.num_threads"),
    ],
)
def test_config_refuses_bad_values(section: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict({"detector": section}, env={})


def test_config_accepts_the_blazeface_keys() -> None:
    cfg = from_dict(
        {
            "detector": {
                "kind": "blazeface",
                "blazeface_model": "full",
                "score_threshold": 0.6,
                "verify_threshold": 0,
                "nms_iou": 0.4,
                "num_threads": 2,
            }
        },
        env={},
    ).detector
    assert (cfg.kind, cfg.blazeface_model, cfg.score_threshold, cfg.verify_threshold) == ("blazeface", "full", 0.6, 0.0)
    assert from_dict({"detector": {"score_threshold": None}}, env={}).detector.score_threshold is None
    assert (cfg.nms_iou, cfg.num_threads) == (0.4, 2)


def test_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DetectorError) as err:
        BlazeFaceDetector(DetectorConfig(kind="blazeface"), model_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "detector.kind" in message and str(tmp_path / MODELS["short"].file) in message and "missing" in message
    assert isinstance(err.value, ConfigError)  # the command line reports it as one line, exit 2


def test_corrupt_model_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / MODELS["short"].file).write_bytes(b"not a flatbuffer" * 100)
    with pytest.raises(DetectorError) as err:
        BlazeFaceDetector(DetectorConfig(kind="blazeface"), model_dir=tmp_path)
    assert "\n" not in str(err.value) and "cannot be loaded" in str(err.value)


def test_a_model_with_other_outputs_is_refused(tmp_path: Path) -> None:
    from serenbox.device.classifier import resolve_model_path

    # The emotion classifier: a real TFLite model, but not a face detector.
    (tmp_path / MODELS["short"].file).write_bytes(resolve_model_path(None).read_bytes())
    with pytest.raises(DetectorError, match="BlazeFace"):
        BlazeFaceDetector(DetectorConfig(kind="blazeface"), model_dir=tmp_path)


def test_faces_at_min_face_are_kept_though_their_box_comes_out_short() -> None:
    # At the coarsest pass a min_face face is only min_px tall on the model's input, and its box
    # comes out a few pixels short of min_face: the size floor must not drop it for that.
    detector = BlazeFaceDetector(DetectorConfig(kind="blazeface", min_face=40))
    found, heights = 0, []
    rng = np.random.default_rng(3)
    for i in range(12):
        centre = (float(rng.uniform(80, W - 80)), float(rng.uniform(80, H - 80)))
        frame = cv2.cvtColor(astronaut_in_frame(FACE_40PX_SCALE, 30.0 if i % 2 else -30.0, centre), cv2.COLOR_BGR2GRAY)
        faces = [f for f in detector.detect(frame) if math.dist(centre, (f.x + f.w / 2, f.y + f.h / 2)) < 15]
        found += bool(faces)
        heights += [f.h for f in faces]
    assert found >= 11, (found, heights)
    assert min(heights) < 40  # the case that matters: boxes under min_face, kept


def test_blurred_and_half_covered_faces_pass_the_second_look() -> None:
    # bench_detectors' own scenes (real photos, a pasted head, the same degradations): blurred
    # (Gaussian, sigma 2) and half-covered faces score just under verify_threshold on a 128×128
    # second look and were dropped; on 112×112 they are kept. Counts with the settings before
    # (score 0.4, 128×128 look) on these scenes: 9, 25, 29 (63 of 90).
    from benchmarks import bench_detectors as bench

    detector = BlazeFaceDetector(DetectorConfig(kind="blazeface"))
    found = {}
    for condition, size in (("blur", 40), ("occluded", 60), ("blur", 60)):
        scenes = list(bench.face_samples(size, condition, 30, np.random.default_rng(1), None))
        found[(condition, size)] = sum(any(bench.matches(f.box, s) for f in detector.detect(s.image)) for s in scenes)
    assert found[("blur", 40)] >= 14, found
    assert found[("occluded", 60)] + found[("blur", 60)] >= 57, found
