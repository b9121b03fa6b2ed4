"""Fault suite: broken configurations. Each is refused before anything runs, with one line on
stderr that names the key (or the file and line), exit 2, no traceback, and in bounded time and
memory; a bad file sent with SIGHUP never takes a running daemon down."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from serenbox.device import cli
from serenbox.device.config import ConfigError, from_dict, load

from tests import media
from tests.daemon import Daemon, write_config

LAUGHS = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n".encode() for i in range(9)
)

# (file bytes, what the one line must contain)
MUTATIONS: list[tuple[bytes, str]] = [
    (b"device_id: caf\xe9\n", "not UTF-8"),
    (b"a: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", "nested deeper"),
    (b"".join(b" " * i + b"k:\n" for i in range(300)), "nested deeper"),
    (b'device_id: "\\ud800"\n', "device_id"),
    (LAUGHS, "aliases"),
    (b"", "empty"),
    (b"# only a comment\n\n", "empty"),
    (b"device_id: a\ndevice_id: b\n", "duplicate key"),
    (b"camera:\n  fps: 1\ncamera:\n  fps: 2\n", "duplicate key"),
    (b"camera: [1, 2\n", "not valid YAML"),
    (b"- a\n- b\n", "expected a mapping"),
    (b"just a string\n", "expected a mapping"),
    (b"x" * (2 << 20), "larger than"),
    (b"camera:\n  fps: .nan\n", "camera.fps"),
    (b"camera:\n  fps: .inf\n", "camera.fps"),
    (b"camera:\n  fps: 1.0e-300\n", "camera.fps"),
    (b"camera:\n  fps: 0\n", "camera.fps"),
    (b"camera:\n  fps: -5\n", "camera.fps"),
    (b"camera:\n  fps: 121\n", "camera.fps"),
    (b"camera:\n  fps: fast\n", "camera.fps"),
    (b"camera:\n  fps: true\n", "camera.fps"),
    (b"camera:\n  width: 10.5\n", "camera.width"),
    (b'camera:\n  source: ""\n', "camera.source"),
    (b'camera:\n  source: "a\\nb"\n', "camera.source"),
    (b"camera:\n  loop: yes please\n", "camera.loop"),
    (b"camera:\n  reopen_initial_s: 10\n  reopen_max_s: 1\n", "camera.reopen_initial_s"),
    (b"camera:\n  lens: wide\n", "camera.lens"),
    (b"detector:\n  margin: .nan\n", "detector.margin"),
    (b"detector:\n  scale_factor: .nan\n", "detector.scale_factor"),
    (b"detector:\n  kind: yolo\n", "detector.kind"),
    (b"detector:\n  max_faces: 0\n", "detector.max_faces"),
    (b"tracker:\n  smoothing_s: .nan\n", "tracker.smoothing_s"),
    (b"tracker:\n  iou_match: .nan\n", "tracker.iou_match"),
    (b"tracker:\n  end_after_s: .nan\n", "tracker.end_after_s"),
    (b"tracker:\n  iou_match: 0\n", "tracker.iou_match"),
    (b"mqtt:\n  spool:\n    max_age_s: .nan\n", "mqtt.spool.max_age_s"),
    (b"mqtt:\n  stats_interval_s: .nan\n", "mqtt.stats_interval_s"),
    (b"mqtt:\n  port: 70000\n", "mqtt.port"),
    (b'mqtt:\n  host: ""\n', "mqtt.host"),
    (b'mqtt:\n  host: "my broker"\n', "mqtt.host"),
    (b"mqtt:\n  topic_prefix: $SYS\n", "mqtt.topic_prefix"),
    (b'mqtt:\n  topic_prefix: "a//b"\n', "mqtt.topic_prefix"),
    (b'mqtt:\n  topic_prefix: "home/+"\n', "mqtt.topic_prefix"),
    (b'mqtt:\n  topic_prefix: "a\\0b"\n', "mqtt.topic_prefix"),
    (b"mqtt:\n  protocol: 4\n", "mqtt.protocol"),
    (b"mqtt:\n  reconnect_min_s: 10\n  reconnect_max_s: 1\n", "mqtt.reconnect_min_s"),
    (b"mqtt:\n  tls:\n    cert_file: /c.pem\n", "mqtt.tls.cert_file"),
    (b'mqtt:\n  client_id: "a\\nb"\n', "mqtt.client_id"),
    (b'device_id: "a\\0b"\n', "device_id"),
    (b'device_id: "living\\nroom"\n', "device_id"),
    (b'device_id: "a/b"\n', "device_id"),
    (b'device_id: "a+b"\n', "device_id"),
    (b'device_id: "living room"\n', "device_id"),
    (b"device_id: " + b"x" * 70_000 + b"\n", "device_id"),
    (b'state_dir: ""\n', "state_dir"),
    (b"log_level: LOUD\n", "log_level"),
    (b"model:\n  num_threads: 0\n", "model.num_threads"),
    (b'model:\n  path: ""\n', "model.path"),
    (b"debug:\n  save_crops: true\n", "debug.dir"),
    (b"mqtt:\n  spool:\n    max_events: 0\n", "mqtt.spool.max_events"),
    (b"3: x\n", "unknown key"),
]


@pytest.mark.parametrize("i", range(len(MUTATIONS)))
def test_a_bad_configuration_is_one_line_naming_the_key(i: int, tmp_path: Path) -> None:
    raw, words = MUTATIONS[i]
    path = tmp_path / "serenbox.yaml"
    path.write_bytes(raw)
    err = io.StringIO()
    t0 = time.monotonic()
    with redirect_stderr(err):
        code = cli.main(["run", "--config", str(path)])  # a traceback would fail the test here
    assert time.monotonic() - t0 < 5.0
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1, err.getvalue()[:500]
    assert lines[0].startswith(f"serenbox run: {path}") and words in lines[0], lines[0]
    assert len(lines[0]) < 400


def test_fifty_mutations_at_least() -> None:
    assert len(MUTATIONS) >= 50


def test_secrets_never_appear_in_errors() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"mqtt": {"password": __import__("datetime").date(2024, 1, 1)}}, env={})
    assert "2024" not in str(err.value) and "mqtt.password" in str(err.value)


def test_paths_expand_the_home_directory(tmp_path: Path) -> None:
    cfg = from_dict({"mqtt": {"host": "b", "spool": {"path": "~/spool.sqlite"}}, "state_dir": "~/state"}, env={})
    assert cfg.mqtt.spool.path == str(Path.home() / "spool.sqlite") and cfg.state_dir == str(Path.home() / "state")


def test_the_documented_default_config_is_the_built_in_default() -> None:
    # An empty-but-valid `{}` runs what configs/serenbox.yaml documents, not the demo camera.
    documented = load(Path(__file__).resolve().parents[1] / "configs" / "serenbox.yaml", env={})
    assert documented == from_dict({}, env={})


def test_a_bad_file_on_reload_keeps_the_daemon_running(tmp_path: Path) -> None:
    video = media.moving_face_video(tmp_path / "face.avi", seconds=4, fps=10)
    config = write_config(tmp_path, video, camera={"loop": True})
    good = config.read_text()
    daemon = Daemon(config)
    try:
        daemon.wait_log("running")
        for bad in (b"camera:\n  fps: .nan\n", b"\xff\xfe", LAUGHS):
            config.write_bytes(bad)
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.wait_log("keeping the running configuration", timeout=10)
            daemon._err.clear()
        config.write_text(good)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("configuration reloaded", timeout=10)
        n = len(daemon.events)
        daemon.wait_events(n + 1, timeout=20)  # still processing
    finally:
        code = daemon.finish(signal.SIGTERM)
    assert code == 0 and "Traceback" not in daemon.stderr


def test_a_real_process_gets_the_same_one_line(tmp_path: Path) -> None:
    path = tmp_path / "serenbox.yaml"
    path.write_bytes(b"camera:\n  fps: .nan\n")
    proc = subprocess.run(
        [sys.executable, "-m", "serenbox", "run", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "camera.fps" in proc.stderr
