"""Fault suite, in process: the loop's own defences (bounded commands, reload, stats that mean
what they say, a debug aid that cannot stop the box, one way to break ties) and the MQTT
backlog on a disk that refuses writes. The shipped model, real frames."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterable
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serenbox.device import cli
from serenbox.device.cameras import open_source
from serenbox.device.classifier import Classifier, resolve_model_path
from serenbox.device.commands import SOURCE_MIN_FPS, CommandError, validate_command
from serenbox.device.config import Config, from_dict
from serenbox.device.events import dominant, rounded_probabilities
from serenbox.device.faces import build_detector
from serenbox.device.labels import LABELS
from serenbox.device.pipeline import Pipeline
from serenbox.device.sinks.backlog import Backlog, advance
from serenbox.device.sinks.base import Sink
from serenbox.device.sinks.mqtt_topics import error_payload, parse_command
from serenbox.device.spool import Spool, SpoolError

from tests import media


class Recorder(Sink):
    def __init__(self, problem: str | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.states: list[dict[str, Any]] = []
        self.stats_seen: list[dict[str, Any]] = []
        self._problem = problem
        self.handler: Any = None

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def state(self, state: dict[str, Any]) -> None:
        self.states.append(state)

    def stats(self, stats: dict[str, Any]) -> None:
        self.stats_seen.append(stats)

    def on_command(self, handler: Any) -> None:
        self.handler = handler

    def problem(self) -> str | None:
        return self._problem


def config(source: str, **overrides: Any) -> Config:
    data: dict[str, Any] = {"camera": {"source": source, "fps": 10}, "tracker": {"confirm_frames": 2}}
    for key, value in overrides.items():
        data.setdefault(key, {}).update(value)
    return from_dict(data, env={})


def pipeline(cfg: Config, sinks: list[Sink], **kwargs: Any) -> Pipeline:
    source = open_source(cfg.camera.source, cfg.camera)
    classifier = Classifier(resolve_model_path(None))
    return Pipeline(cfg, source, build_detector(cfg.detector), classifier, sinks, **kwargs)


@pytest.fixture(scope="module")
def face_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return media.moving_face_video(tmp_path_factory.mktemp("video") / "face.avi", seconds=4, fps=10)


def test_no_fps_command_can_make_the_loop_wait_long() -> None:
    for bad in (1e-300, 0.001, 0.05, 0, -1, 121, float("nan"), float("inf"), "5", True, None):
        with pytest.raises(CommandError):
            validate_command({"command": "fps", "value": bad})
    p = pipeline(config("demo"), [Recorder()])
    p._set_fps(0.1)  # the slowest allowed
    assert p.source.fps == SOURCE_MIN_FPS and p._fps_limit == 0.1  # thinned by the loop, not the camera


def test_a_slow_configured_fps_still_reads_the_camera_often(face_video: Path) -> None:
    p = pipeline(config(str(face_video), camera={"fps": 0.1}), [Recorder()])
    assert p.source.fps == SOURCE_MIN_FPS and p._fps_limit == 0.1


def test_command_answers_are_bounded() -> None:
    huge = json.dumps({"command": "x" * (1 << 20)}).encode()
    with pytest.raises(CommandError) as err:
        parse_command(huge)
    assert len(str(err.value)) < 200
    assert len(error_payload(str(err.value), huge)) < 1000
    # Deep nesting: refused for its size before the parser could recurse, or for its depth.
    for deep in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 200 + b"1" + b"}" * 200, b"[" * 512 + b"]" * 512):
        with pytest.raises(CommandError):
            parse_command(deep)


def test_frames_not_read_while_paused_are_not_dropped_frames() -> None:
    # 2 fps: processing a frame takes far less than a period, so the loop itself never drops one.
    p = pipeline(config("demo", camera={"fps": 2}), [Recorder()])
    p.source.open()
    for _ in range(3):
        p.process(p.source.read())
    p.handle_command({"command": "pause"})
    p._between_frames()
    time.sleep(2.5)  # the demo camera goes on counting frames meanwhile: 5 of them
    p.handle_command({"command": "resume"})
    p._between_frames()
    for _ in range(3):
        p.process(p.source.read())
    assert p.stats()["dropped_frames"] == 0
    p.source.close()


def test_state_confidence_is_the_published_probability(face_video: Path) -> None:
    rec = Recorder()
    p = pipeline(config(str(face_video)), [rec], max_frames=15)
    p.run()
    tracked = [s for s in rec.states if s["tracks"]]
    assert tracked
    for state in tracked:
        (track,) = state["tracks"]  # one face: the state's probabilities are that track's
        assert track["confidence"] == state["probabilities"][track["emotion"]]


def test_exact_ties_are_broken_the_same_way_everywhere() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(5000):
        steps = rng.integers(0, 40, len(LABELS)).astype(np.float64)
        i, j = rng.choice(len(LABELS), 2, replace=False)
        steps[j] = steps[i] = steps.max()  # an exact tie for the top, as int8 scores give
        p = steps / 256
        p = p / p.sum()
        published = rounded_probabilities(p)
        largest = max(published, key=published.__getitem__)  # what a reader of the JSON picks
        assert dominant(p) == largest == LABELS[int(np.flatnonzero(p == p.max())[0])]
        assert abs(sum(published.values()) - 1) < 1e-9
        checked += 1
    assert checked == 5000


def test_reverting_a_restart_only_key_leaves_nothing_pending(face_video: Path, caplog: Any) -> None:
    first = config(str(face_video))
    changed = config(str(face_video), mqtt={"topic_prefix": "other"})
    files = iter([changed, first])
    p = pipeline(first, [Recorder()], reload=lambda: next(files))
    with caplog.at_level(logging.WARNING):
        p._reload()
        assert "mqtt changed; takes effect after a restart" in caplog.text
        assert p.cfg.mqtt.topic_prefix == "serenbox"  # what runs, not what the file says
        caplog.clear()
        p._reload()
    assert "takes effect after a restart" not in caplog.text


def test_an_unwritable_debug_dir_is_refused_at_start(tmp_path: Path, face_video: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    path = tmp_path / "c.yaml"
    path.write_text(
        json.dumps(
            {
                "camera": {"source": str(face_video)},
                "state_dir": str(tmp_path / "s"),
                "debug": {"save_crops": True, "dir": str(blocked / "crops")},
            }
        )
    )
    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.main(["run", "--config", str(path), "--max-frames", "3"])
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1 and "debug.dir" in lines[0]


def test_a_debug_dir_that_breaks_mid_run_turns_saving_off(tmp_path: Path, face_video: Path, caplog: Any) -> None:
    crops = tmp_path / "crops"
    cfg = config(str(face_video), debug={"save_crops": True, "dir": str(crops)})
    p = pipeline(cfg, [Recorder()], max_frames=20)
    crops.mkdir()
    crops.chmod(0o500)
    (tmp_path / "crops").rename(tmp_path / "gone")
    (tmp_path / "crops").write_text("now a file")  # mkdir fails: FileExistsError, an OSError
    with caplog.at_level(logging.ERROR):
        assert p.run() == "max frames"
    assert "saving crops is off" in caplog.text and not p.cfg.debug.save_crops


def test_a_sink_that_can_no_longer_deliver_ends_the_run(face_video: Path) -> None:
    p = pipeline(config(str(face_video), camera={"loop": True}), [Recorder(problem="worker thread died")])
    assert p.run() == "failed: worker thread died" and p.failure


class RefusingSpool(Spool):
    """The spool on a disk that refuses writes while `full` is set (the hardware boundary)."""

    full = False
    deletes_fail = False

    def append(self, payload: str, now: float | None = None) -> int:
        if self.full:
            raise SpoolError(f"{self.path}: cannot write to the event spool (database or disk is full)")
        return super().append(payload, now)

    def delete(self, rowids: Iterable[int]) -> None:
        if self.full or self.deletes_fail:
            raise SpoolError(f"{self.path}: cannot delete from the event spool (database or disk is full)")
        super().delete(rowids)


def test_a_failed_delete_does_not_hide_that_events_go_to_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # On a full disk a delete can fail first (appends still fit in the WAL); the operator must
    # still be told when events start living in memory, and when each problem is over.
    spool = RefusingSpool(tmp_path / "s.sqlite", 1000, 3600)
    backlog = Backlog(spool)
    caplog.set_level(logging.WARNING, logger="serenbox.mqtt")
    backlog.append("e0")
    spool.deletes_fail = True
    backlog.ack([(0, 1)])
    assert "acknowledged events stay on disk" in caplog.text and backlog.has_undeleted()
    spool.full = True
    backlog.append("e1")
    assert "keeping events in memory" in caplog.text
    spool.full = spool.deletes_fail = False
    backlog.ack([(1, 1)])
    backlog.append("e2")
    assert "writable again" in caplog.text and "deletes work again" in caplog.text
    assert not backlog.has_undeleted() and len(spool) == 1
    backlog.close()


def test_the_backlog_keeps_order_through_a_disk_outage(tmp_path: Path) -> None:
    spool = RefusingSpool(tmp_path / "s.sqlite", 1000, 3600)
    backlog = Backlog(spool, memory_events=5)
    sent: list[str] = []
    cursor = (0, 0)

    def publish(n: int) -> None:
        nonlocal cursor
        items = backlog.after(cursor, n)
        for key, _ in items:
            cursor = advance(cursor, key)
        sent.extend(p for _, p in items)
        backlog.ack(k for k, _ in items)

    backlog.append("e0")
    backlog.append("e1")
    spool.full = True
    for i in range(2, 6):
        backlog.append(f"e{i}")  # memory
    spool.full = False
    backlog.append("e6")  # memory still holds events: this one follows them there
    publish(3)
    publish(100)
    backlog.append("e7")  # memory has drained: back to the spool
    publish(100)
    assert sent == [f"e{i}" for i in range(8)]
    assert len(backlog) == 0 and backlog.dropped == 0 and backlog.write_errors == 5
    spool.full = True
    for i in range(8):
        backlog.append(f"x{i}")
    assert backlog.memory_dropped == 3 and backlog.dropped == 3  # bounded, and counted
    backlog.close()
