"""`serenbox` as a user runs it: real processes, real images and video, the tiny brightness model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests import media
from tests.test_pipeline import FPS, HAPPY, SAD, TIMELINE, face_patch, scene
from tests.tinymodels import brightness_model, convert_tiny

SERENBOX = [sys.executable, "-m", "serenbox"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_tiny(brightness_model(), tmp_path_factory.mktemp("brightness"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("files")
    patch = face_patch()
    media.write_image(folder / "happy.png", scene(patch, HAPPY))
    media.write_image(folder / "sad.jpg", scene(patch, SAD))
    media.write_image(folder / "empty.png", np.full((240, 320, 3), 128, np.uint8))
    (folder / "notes.png").write_text("not an image\n")
    media.write_video(folder / "faces.avi", [scene(patch, level, at) for level, at in TIMELINE], FPS)
    return folder


def write_config(path: Path, model: Path, **sections: Any) -> Path:
    data: dict[str, Any] = {
        "device_id": "cli-test",
        "log_level": "INFO",
        "state_dir": str(path.parent / "state"),
        "model": {"path": str(model)},
        "camera": {"source": "demo", "fps": 10},
        "tracker": {"confirm_frames": 2, "smoothing_s": 0.2, "switch_after_s": 0.5, "end_after_s": 1.0},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def serenbox(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERENBOX, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    # The TFLite runtime's C++ code announces its CPU delegate on stderr by itself; that is not ours.
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("INFO: Created TensorFlow Lite")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


# --- classify ---------------------------------------------------------------------------------


def test_classify_prints_one_json_line_per_image(model: Path, files: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "serenbox.yaml", model)
    images = [files / "happy.png", files / "sad.jpg", files / "empty.png"]
    proc = serenbox("classify", *map(str, images), "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in images]
    happy, sad, empty = lines
    assert empty["faces"] == []
    for line, emotion in ((happy, "happy"), (sad, "sad")):
        (face,) = line["faces"]
        assert face["emotion"] == emotion
        assert list(face["probabilities"]) == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
        assert sum(face["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert face["confidence"] == face["probabilities"][emotion] == max(face["probabilities"].values())
        box = face["box"]
        # The face was pasted with its top left corner at (200, 100) of a 640×480 frame.
        assert 200 / 640 < box["x"] < 0.5 and 100 / 480 < box["y"] < 0.5
        assert 0.05 < box["w"] < 0.3 and 0.05 < box["h"] < 0.4


def test_classify_the_astronaut_photo_as_it_is(model: Path, tmp_path: Path) -> None:
    photo = media.write_image(tmp_path / "astronaut.jpg", media.astronaut_bgr())
    proc = serenbox("classify", str(photo), "--config", str(write_config(tmp_path / "c.yaml", model)))
    assert proc.returncode == 0, proc.stderr
    (face,) = json.loads(proc.stdout)["faces"]
    assert face["emotion"] in ("sad", "neutral", "happy")  # the only labels the brightness model uses


def test_classify_missing_or_unreadable_image(model: Path, files: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "serenbox.yaml", model)
    proc = serenbox("classify", str(files / "nope.png"), "--config", str(config))
    assert_one_line_error(proc, "nope.png", "no such file")
    assert proc.stdout == ""
    proc = serenbox("classify", str(files / "notes.png"), "--config", str(config))
    assert_one_line_error(proc, "notes.png", "not an image")
    # The readable image in a batch still gets its line; the exit status reports the failure.
    proc = serenbox("classify", str(files / "happy.png"), str(files / "nope.png"), "--config", str(config))
    assert proc.returncode == 2
    assert [json.loads(line)["image"] for line in proc.stdout.splitlines()] == [str(files / "happy.png")]


# --- configuration and model errors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"camera": {"fsp": 10}}, "camera.fsp"),
        ({"camera": {"fps": "fast"}}, "camera.fps"),
        ({"camera": {"fps": 0}}, "camera.fps"),
        ({"tracker": {"confirm_frames": 1.5}}, "tracker.confirm_frames"),
        ({"mqtt": {"port": 70000}}, "mqtt.port"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_config_error_names_the_key(model: Path, tmp_path: Path, sections: dict, key: str) -> None:
    config = write_config(tmp_path / "bad.yaml", model, **sections)
    assert_one_line_error(serenbox("run", "--config", str(config), "--max-frames", "1"), key)
    assert_one_line_error(serenbox("classify", "x.png", "--config", str(config)), key)


def test_missing_and_malformed_config_files(tmp_path: Path) -> None:
    assert_one_line_error(serenbox("run", "--config", str(tmp_path / "absent.yaml")), "absent.yaml", "does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("camera: [1, 2\n")
    assert_one_line_error(serenbox("run", "--config", str(broken)), "broken.yaml", "YAML")


def test_model_without_manifest_is_refused(model: Path, files: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(model.read_bytes())
    config = write_config(tmp_path / "c.yaml", bare)
    assert_one_line_error(serenbox("run", "--config", str(config), "--max-frames", "1"), "manifest missing")
    absent = write_config(tmp_path / "d.yaml", tmp_path / "absent.tflite")
    assert_one_line_error(serenbox("classify", str(files / "happy.png"), "--config", str(absent)), "absent.tflite")


def test_bad_source_is_a_one_line_error(model: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", model)
    proc = serenbox("run", "--config", str(config), "--source", str(tmp_path / "missing.avi"))
    assert_one_line_error(proc, "missing.avi")
    fake = tmp_path / "fake.avi"
    fake.write_text("not a video\n")
    proc = serenbox("run", "--config", str(config), "--source", str(fake))
    assert_one_line_error(proc, "camera.source", "fake.avi")


# --- run --------------------------------------------------------------------------------------


def test_run_a_video_file_prints_the_events(model: Path, files: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", model)
    proc = serenbox("run", "--config", str(config), "--source", str(files / "faces.avi"), "--print-events")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(e["type"], e["emotion"]) for e in events] == [
        ("new", "happy"),
        ("update", "sad"),
        ("end", "sad"),
        ("new", "neutral"),
        ("end", "neutral"),
    ]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert {e["device_id"] for e in events} == {"cli-test"}
    assert "INFO" in proc.stderr  # logs go to stderr with levels; stdout is events only


def test_run_the_demo_source_with_max_frames(model: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", model, camera={"fps": 20})
    started = time.monotonic()
    proc = serenbox("run", "--config", str(config), "--print-events", "--max-frames", "30")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 30
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    # The demo face is found, tracked, announced, and closed at the end of the run.
    assert events and events[0]["type"] == "new"
    assert events[-1]["type"] == "end"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def start_daemon(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SERENBOX, "run", "--config", str(config), "--print-events", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(stream: Any, needle: str, timeout: float = 30) -> str:
    """Read lines until one contains `needle` (the stream is line-buffered text from a child)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not seen in {''.join(seen)[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_within_5_s(model: Path, tmp_path: Path, sig: signal.Signals) -> None:
    proc = start_daemon(write_config(tmp_path / "c.yaml", model))
    try:
        first = json.loads(wait_for_line(proc.stdout, '"type":"new"'))
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert elapsed < 5.0
    events = [first] + [json.loads(line) for line in out.splitlines()]
    # Flushed: every track announced got its end before the exit.
    news = {e["track_id"] for e in events if e["type"] == "new"}
    ends = {e["track_id"] for e in events if e["type"] == "end"}
    assert news == ends
    assert "Traceback" not in err


def test_sighup_reloads_the_configuration(model: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", model)
    proc = start_daemon(config)
    try:
        wait_for_line(proc.stderr, "running")
        write_config(config, model, tracker={"switch_after_s": 2.0})
        proc.send_signal(signal.SIGHUP)
        wait_for_line(proc.stderr, "configuration reloaded")
        config.write_text("camera: {fps: -1}\n")
        proc.send_signal(signal.SIGHUP)
        line = wait_for_line(proc.stderr, "reload failed")
        assert "camera.fps" in line
        assert proc.poll() is None  # a bad file never takes the daemon down
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0


def test_console_script_and_module_are_the_same_command() -> None:
    script = Path(sys.executable).parent / "serenbox"
    if not script.exists():
        pytest.skip("serenbox console script not installed in this environment")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert proc.stdout.startswith("serenbox ")
    assert serenbox("--version").stdout == proc.stdout
    usage = serenbox("run")
    assert usage.returncode == 2 and "--config" in usage.stderr
