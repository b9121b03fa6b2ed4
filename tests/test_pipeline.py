"""The whole loop on a real video file: camera → faces → int8 model → tracker → events → sinks.

The video is written by the test: scikit-image's astronaut face pasted into a 640×480 frame,
painted darker or lighter so the tiny brightness model (tests/tinymodels.py) changes emotion.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from serenbox.device.cameras import open_source
from serenbox.device.classifier import Classifier
from serenbox.device.config import Config, from_dict
from serenbox.device.faces import build_detector
from serenbox.device.notify import Notifier
from serenbox.device.pipeline import Pipeline, validate_command
from serenbox.device.sinks.base import Sink
from serenbox.device.sinks.stdout import StdoutSink

from tests import media
from tests.tinymodels import BRIGHTNESS_OF, brightness_model, convert_tiny

WIDTH, HEIGHT, FPS = 640, 480, 10.0
FACE_AT = (200, 100)  # where the face patch's top left corner goes


def face_patch() -> np.ndarray:
    """The astronaut's head (tests/media.py), gray, with room around the face for the crop margin."""
    return cv2.cvtColor(media.head(210), cv2.COLOR_BGR2GRAY)


def painted(patch: np.ndarray, mean: float) -> np.ndarray:
    """The patch with its mean moved to `mean` and its contrast reduced so nothing clips."""
    p = patch.astype(np.float32)
    return np.clip((p - p.mean()) * 0.35 + mean, 0, 255).astype(np.uint8)


def scene(patch: np.ndarray, level: float | None, at: tuple[int, int] = FACE_AT) -> np.ndarray:
    """A BGR 640×480 frame: mid-gray, with the face painted at brightness `level` (None: nobody there)."""
    frame = np.full((HEIGHT, WIDTH), 128, np.uint8)
    if level is not None:
        face = painted(patch, level)
        x, y = at
        frame[y : y + face.shape[0], x : x + face.shape[1]] = face
    return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)


HAPPY, SAD, NEUTRAL = BRIGHTNESS_OF["happy"], BRIGHTNESS_OF["sad"], BRIGHTNESS_OF["neutral"]
# Per frame at 10 fps: 3 s happy with one dark frame (a flicker that must not become an event),
# 3 s sad, 2 s nobody, 2 s a neutral face somewhere else (a new person), then the video ends.
TIMELINE: list[tuple[float | None, tuple[int, int]]] = (
    [(HAPPY, FACE_AT)] * 15
    + [(SAD, FACE_AT)]
    + [(HAPPY, FACE_AT)] * 14
    + [(SAD, (FACE_AT[0] + 4 * i, FACE_AT[1])) for i in range(30)]  # moving slowly to the right
    + [(None, FACE_AT)] * 20
    + [(NEUTRAL, (40, 200))] * 20
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_tiny(brightness_model(), tmp_path_factory.mktemp("brightness"))


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    patch = face_patch()
    frames = [scene(patch, level, at) for level, at in TIMELINE]
    return media.write_video(tmp_path_factory.mktemp("video") / "faces.avi", frames, FPS)


def make_config(model: Path, source: Path | str, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "device_id": "test-box",
        "model": {"path": str(model)},
        "camera": {"source": str(source), "fps": FPS},
        "tracker": {"confirm_frames": 2, "smoothing_s": 0.2, "switch_after_s": 0.5, "end_after_s": 1.0},
    }
    for key, value in overrides.items():
        data.setdefault(key, {}).update(value)
    return from_dict(data, env={})


class RecordingSink(Sink):
    """A sink that keeps what it is given, for the tests to inspect (an implementation of the interface)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.states: list[dict] = []
        self.stats_seen: list[dict] = []
        self.handler: Any = None

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def state(self, state: dict[str, Any]) -> None:
        self.states.append(state)

    def stats(self, stats: dict[str, Any]) -> None:
        self.stats_seen.append(stats)

    def counters(self) -> dict[str, Any]:
        return {"spool_depth": 0}

    def on_command(self, handler: Any) -> None:
        self.handler = handler


def build(cfg: Config, sinks: list[Sink], **kwargs: Any) -> Pipeline:
    source = kwargs.pop("source", None) or open_source(cfg.camera.source, cfg.camera)
    return Pipeline(cfg, source, build_detector(cfg.detector), Classifier(cfg.model.path), sinks, **kwargs)


@pytest.fixture(scope="module")
def video_run(model: Path, video: Path) -> tuple[Pipeline, str, RecordingSink, str]:
    """The test video through the pipeline once: the pipeline, stdout sink text, recorder and why it stopped."""
    out = io.StringIO()
    recorder = RecordingSink()
    pipeline = build(make_config(model, video), [StdoutSink(out), recorder])
    reason = pipeline.run()
    return pipeline, out.getvalue(), recorder, reason


def test_video_gives_new_update_end_in_order(video_run: tuple[Pipeline, str, RecordingSink, str]) -> None:
    pipeline, out, recorder, reason = video_run
    assert reason == "end of source"
    assert pipeline.frames == len(TIMELINE)

    events = [json.loads(line) for line in out.splitlines()]
    assert events == recorder.events  # every sink sees the same events
    summary = [(e["type"], e["track_id"], e["emotion"]) for e in events]
    # The single dark frame at 1.5 s is absorbed; the lasting change at 3 s is one update.
    assert summary == [
        ("new", 1, "happy"),
        ("update", 1, "sad"),
        ("end", 1, "sad"),
        ("new", 2, "neutral"),
        ("end", 2, "neutral"),
    ]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["id"] for e in events}) == len(events)
    assert {e["run_id"] for e in events} == {pipeline.events.run_id}
    for e in events:
        assert e["schema"] == "serenbox.event/1"
        assert e["device_id"] == "test-box"
        assert e["timestamp"].endswith("Z")
        assert list(e["probabilities"]) == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
        assert sum(e["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert e["confidence"] == e["probabilities"][e["emotion"]] > 0.5
        assert all(0.0 <= v <= 1.0 for v in e["box"].values())
        assert ("duration_s" in e) == ("summary" in e) == (e["type"] == "end")

    new, _update, end1, new2, end2 = events
    # The box is normalised to the frame: the face was pasted at x=200 of 640.
    assert new["box"]["x"] == pytest.approx((FACE_AT[0] + 60) / WIDTH, abs=0.06)
    assert end1["box"]["x"] > new["box"]["x"]  # it moved right before leaving
    # Track 1 was seen from 0.0 s to 5.9 s: half happy, half sad.
    assert end1["duration_s"] == pytest.approx(5.9, abs=0.25)
    assert end1["summary"]["share"]["happy"] == pytest.approx(0.55, abs=0.1)
    assert end1["summary"]["share"]["sad"] == pytest.approx(0.45, abs=0.1)
    assert new2["box"]["x"] < 0.2
    assert end2["duration_s"] == pytest.approx(1.9, abs=0.25)
    assert end2["summary"]["dominant"] == "neutral"

    # State followed the room; stats were sent at shutdown with every stage timed.
    assert recorder.states[-1] == {"faces": 0, "dominant": None, "probabilities": None, "tracks": [], "paused": False}
    assert any(s["faces"] == 1 and s["dominant"] == "sad" for s in recorder.states)
    stats = recorder.stats_seen[-1]
    assert stats["frames"] == len(TIMELINE)
    assert stats["spool_depth"] == 0  # the sink's counters are merged in
    for stage in ("detect", "classify", "track"):
        assert stats["latency_ms"][stage]["p50"] is not None
        assert stats["latency_ms"][stage]["p95"] >= stats["latency_ms"][stage]["p50"]


def test_same_video_gives_the_same_events(
    model: Path, video: Path, video_run: tuple[Pipeline, str, RecordingSink, str]
) -> None:
    def key(events: list[dict]) -> list[tuple]:
        return [(e["type"], e["track_id"], e["emotion"], e["box"], e["probabilities"]) for e in events]

    recorder = RecordingSink()
    build(make_config(model, video), [recorder]).run()
    assert key(recorder.events) == key(video_run[2].events)


def test_max_frames_ends_open_tracks(model: Path, video: Path) -> None:
    recorder = RecordingSink()
    pipeline = build(make_config(model, video), [recorder], max_frames=10)
    assert pipeline.run() == "max frames"
    assert [(e["type"], e["emotion"]) for e in recorder.events] == [("new", "happy"), ("end", "happy")]


def test_pause_resume_and_fps_commands(model: Path, video: Path) -> None:
    recorder = RecordingSink()
    pipeline = build(make_config(model, video), [recorder], max_frames=20)
    assert recorder.handler is not None  # the pipeline registered itself with the sink
    # Commands arrive from another thread (the MQTT client's) and are applied between frames.
    sender = threading.Thread(target=recorder.handler, args=({"command": "fps", "value": 5},))
    sender.start()
    sender.join()
    pipeline.run()
    # At 5 fps, 20 processed frames of the 10 fps video span 3.8 s of it (1.9 s at the video's rate).
    end = recorder.events[-1]
    assert end["type"] == "end"
    assert end["duration_s"] == pytest.approx(3.8, abs=0.25)
    with pytest.raises(ValueError, match="unknown command"):
        recorder.handler({"command": "explode"})
    with pytest.raises(ValueError, match="fps"):
        recorder.handler({"command": "fps", "value": 0})

    recorder = RecordingSink()
    pipeline = build(make_config(model, video), [recorder], max_frames=60)
    original = pipeline.process

    def process_then_pause(frame: Any) -> None:
        original(frame)
        if pipeline.frames == 10:
            recorder.handler({"command": "pause"})
            threading.Timer(0.3, recorder.handler, args=({"command": "resume"},)).start()

    pipeline.process = process_then_pause  # type: ignore[method-assign]
    pipeline.run()
    kinds = [(e["type"], e["track_id"]) for e in recorder.events]
    # Pausing ends the open track at once; after resuming the face is a new track.
    assert kinds[:3] == [("new", 1), ("end", 1), ("new", 2)]
    assert any(s["paused"] for s in recorder.states)
    assert recorder.states[-1]["paused"] is False


def test_validate_command() -> None:
    assert validate_command({"command": "pause"}) == {"command": "pause"}
    assert validate_command({"command": "fps", "value": 5}) == {"command": "fps", "value": 5.0}
    for bad in ([], {"command": "fps"}, {"command": "fps", "value": True}, {"command": "fps", "value": 500}):
        with pytest.raises(ValueError):
            validate_command(bad)


def test_reload_applies_new_tracker_settings_and_survives_a_bad_file(model: Path, video: Path) -> None:
    cfg = make_config(model, video)
    replies: list[Any] = [make_config(model, video, tracker={"confirm_frames": 50}), ValueError("broken file")]

    def reload() -> Config:
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    recorder = RecordingSink()
    pipeline = build(cfg, [recorder], reload=reload, max_frames=40)
    pipeline.request_reload()  # as SIGHUP does; applied before the first frame
    original = pipeline.process

    def process_then_reload(frame: Any) -> None:
        original(frame)
        if pipeline.frames == 10:
            pipeline.request_reload()  # now the file is broken: the running configuration stays

    pipeline.process = process_then_reload  # type: ignore[method-assign]
    assert pipeline.run() == "max frames"
    assert replies == []
    assert pipeline.frames == 40
    assert pipeline.cfg.tracker.confirm_frames == 50
    assert recorder.events == []  # no face was seen 50 times


class FlakyCamera:
    """A live camera device that fails after some frames and works again once reopened: a hardware fake.

    `fail_opens` reopen attempts fail too (the device is still unplugged)."""

    live = True

    def __init__(self, frame: np.ndarray, fail_after: int, fail_opens: int = 0, fps: float = 50.0) -> None:
        self.frame, self.fail_after, self.fail_opens = frame, fail_after, fail_opens
        self.name, self.fps = "flaky", fps
        self.reads = self.opens = self.index = 0
        self.closed = threading.Event()

    def open(self) -> None:
        from serenbox.device.cameras import CameraError

        self.opens += 1
        if self.opens > 1 and self.fail_opens > 0:
            self.fail_opens -= 1
            raise CameraError("flaky: no such device")
        self.closed.clear()

    def read(self) -> Any:
        from serenbox.device.cameras import CameraError, Frame

        self.reads += 1
        if self.reads == self.fail_after:
            raise CameraError("flaky: device disappeared")
        if self.closed.wait(1.0 / self.fps):
            raise CameraError("flaky: closed")
        frame = Frame(self.frame, time.monotonic(), self.index)
        self.index += 1
        return frame

    def close(self) -> None:
        self.closed.set()

    def set_fps(self, fps: float) -> None:
        self.fps = fps


def test_camera_that_fails_then_returns(model: Path) -> None:
    from serenbox.device.cameras import ReopeningSource

    cfg = make_config(model, "demo", camera={"reopen_initial_s": 0.05, "reopen_max_s": 0.2})
    device = FlakyCamera(scene(face_patch(), HAPPY), fail_after=10, fail_opens=2)
    recorder = RecordingSink()
    pipeline = build(cfg, [recorder], source=ReopeningSource(device, cfg.camera), max_frames=30)
    assert pipeline.run() == "max frames"
    # One failed read, two failed reopen attempts, then frames again: the run goes on.
    assert device.opens == 4
    assert pipeline.frames == 30
    assert recorder.stats_seen[-1]["camera_errors"] == 3
    assert [e["type"] for e in recorder.events][:1] == ["new"]
    assert recorder.events[-1]["type"] == "end"


def test_stop_ends_a_reopen_backoff_at_once(model: Path) -> None:
    from serenbox.device.cameras import ReopeningSource

    cfg = make_config(model, "demo", camera={"reopen_initial_s": 60.0, "reopen_max_s": 60.0})
    device = FlakyCamera(scene(face_patch(), HAPPY), fail_after=5)
    pipeline = build(cfg, [RecordingSink()], source=ReopeningSource(device, cfg.camera))
    reasons: list[str] = []
    thread = threading.Thread(target=lambda: reasons.append(pipeline.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while pipeline.source.camera_errors == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pipeline.source.camera_errors == 1  # now waiting 60 s before the reopen
    stopped = time.monotonic()
    pipeline.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - stopped < 1.0
    assert reasons == ["stopped"]


class HangingCamera:
    """A camera device that delivers frames, then hangs in read() (a wedged driver): a hardware fake."""

    def __init__(self, frame: np.ndarray, frames_before_hang: int) -> None:
        self.frame, self.left = frame, frames_before_hang
        self.release = threading.Event()
        self.hanging = threading.Event()
        self.hang_t = math.inf
        self.index = 0

    def open(self) -> None:
        pass

    def read(self) -> Any:
        from serenbox.device.cameras import Frame

        if self.left == 0:
            self.hang_t = time.monotonic()
            self.hanging.set()
            self.release.wait(10)
            return None
        self.left -= 1
        self.index += 1
        time.sleep(0.02)
        return Frame(self.frame, time.monotonic(), self.index)

    def close(self) -> None:
        self.release.set()


def listen(path: Path) -> tuple[list[tuple[float, str]], threading.Event]:
    """Datagrams arriving on a real AF_UNIX socket at `path`, with their arrival times, until the event is set."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.02)
    got: list[tuple[float, str]] = []
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                got.append((time.monotonic(), sock.recv(1024).decode()))
        sock.close()

    threading.Thread(target=loop, daemon=True).start()
    return got, done


def test_a_stuck_loop_stops_the_watchdog(model: Path, tmp_path: Path) -> None:
    got, done = listen(tmp_path / "notify.sock")
    camera = HangingCamera(scene(face_patch(), HAPPY), frames_before_hang=15)
    notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "40000"})
    pipeline = build(make_config(model, "demo"), [RecordingSink()], source=camera, notifier=notifier)
    thread = threading.Thread(target=pipeline.run, daemon=True)
    thread.start()
    assert camera.hanging.wait(20)
    time.sleep(0.5)  # a hung read for more than 20 ping intervals
    released = time.monotonic()
    pipeline.stop()
    camera.release.set()
    thread.join(5)
    time.sleep(0.1)
    done.set()
    messages = [m for _, m in got]
    assert messages[0].startswith("READY=1")
    pings = [t for t, m in got if m == "WATCHDOG=1"]
    assert len([t for t in pings if t < camera.hang_t]) >= 3  # the loop pinged while it ran
    assert [t for t in pings if camera.hang_t + 0.01 < t < released] == []  # and not once while stuck
    assert messages[-1] == "STOPPING=1"


def test_ready_and_watchdog_while_running(model: Path, video: Path, tmp_path: Path) -> None:
    got, done = listen(tmp_path / "notify.sock")
    notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1"})
    build(make_config(model, video), [RecordingSink()], notifier=notifier, max_frames=10).run()
    time.sleep(0.1)
    done.set()
    messages = [m for _, m in got]
    assert messages[0].startswith("READY=1\nSTATUS=")
    assert messages.count("WATCHDOG=1") >= 10  # a 1 µs timeout: a ping every loop iteration
    assert messages[-1] == "STOPPING=1"


def test_watchdog_keeps_beating_while_an_unplugged_camera_is_reopened(model: Path) -> None:
    """An unplugged camera is a reason to wait, not a hang: the backoff (up to reopen_max_s, far
    above systemd's watchdog timeout) must not cost the daemon its watchdog pings."""
    from serenbox.device.cameras import ReopeningSource

    name = f"serenbox-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(0.1)
    notifier = Notifier(env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000"})
    cfg = make_config(model, "demo", camera={"reopen_initial_s": 3.0, "reopen_max_s": 3.0})
    device = FlakyCamera(scene(face_patch(), HAPPY), fail_after=5, fail_opens=1000)  # never comes back
    pipeline = build(cfg, [RecordingSink()], source=ReopeningSource(device, cfg.camera), notifier=notifier)
    thread = threading.Thread(target=pipeline.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while pipeline.source.camera_errors == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pipeline.source.camera_errors >= 1
        frames_when_down = pipeline.frames
        messages: list[str] = []
        until = time.monotonic() + 2.5  # inside the first 3 s backoff wait
        while time.monotonic() < until:
            with contextlib.suppress(TimeoutError):
                messages.extend(listener.recv(4096).decode().splitlines())
    finally:
        pipeline.stop()
        thread.join(5)
        listener.close()
        notifier.close()
    assert pipeline.frames == frames_when_down  # no frame arrived: the camera really was down
    assert messages.count("WATCHDOG=1") >= 2
    assert any(m.startswith("STATUS=camera unavailable") for m in messages)
