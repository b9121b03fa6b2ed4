"""`serenbox run` end to end: a real video file, the tiny brightness model, a real mosquitto.

The daemon prints every event with `--print-events`; a subscriber must receive exactly those,
once each and in order, across a broker restart and across a daemon killed mid-outage.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from tests import media
from tests.daemon import Daemon, received_events
from tests.mosquitto import Mosquitto, Watcher, mosquitto_binary, retained
from tests.tinymodels import BRIGHTNESS_OF, brightness_model, convert_tiny

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
DEVICE = "e2e-box"
BASE = f"serenbox/{DEVICE}"
EVENT_KEYS = {
    "schema",
    "id",
    "type",
    "device_id",
    "run_id",
    "seq",
    "track_id",
    "timestamp",
    "emotion",
    "confidence",
    "probabilities",
    "box",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_tiny(brightness_model(), tmp_path_factory.mktemp("brightness"))


def frame(level: float | None) -> np.ndarray:
    """640×480 mid-gray with the astronaut's head painted at mean brightness `level` (None: nobody),
    low contrast so nothing clips: the brightness model then reads `level` as its emotion."""
    gray = np.full((480, 640), 128, np.uint8)
    if level is not None:
        head = cv2.cvtColor(media.head(210), cv2.COLOR_BGR2GRAY).astype(np.float32)
        gray[100:310, 200:410] = np.clip((head - head.mean()) * 0.35 + level, 0, 255).astype(np.uint8)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`mood`: 4 s of one face turning happy then sad (looped: an event every 2 s of media time);
    `short`: 3 s happy, then nobody (a new and an end, then the file ends)."""
    d = tmp_path_factory.mktemp("videos")
    happy, sad, empty = frame(BRIGHTNESS_OF["happy"]), frame(BRIGHTNESS_OF["sad"]), frame(None)
    return {
        "mood": media.write_video(d / "mood.avi", [happy] * 20 + [sad] * 20, fps=10),
        "short": media.write_video(d / "short.avi", [happy] * 30 + [empty] * 20, fps=10),
    }


def write_config(tmp: Path, model: Path, broker: Mosquitto, video: Path, loop: bool, **mqtt: Any) -> Path:
    data = {
        "device_id": DEVICE,
        "log_level": "INFO",
        "state_dir": str(tmp / "state"),
        "model": {"path": str(model)},
        "camera": {"source": str(video), "fps": 10, "loop": loop},
        "tracker": {"confirm_frames": 2, "smoothing_s": 0.2, "switch_after_s": 0.5, "end_after_s": 1.0},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "keepalive": 5,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 0.5,
            "state_interval_s": 0.5,
            **mqtt,
        },
    }
    path = tmp / f"serenbox-{video.stem}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_events_state_and_availability_from_a_video(model: Path, videos: dict[str, Path], tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker, Watcher(broker, [f"{BASE}/#"]) as w:
        daemon = Daemon(write_config(tmp_path, model, broker, videos["short"], loop=False))
        assert daemon.finish(timeout=60) == 0, daemon.stderr  # the file ends: a clean exit
        printed = daemon.events
        assert [(e["type"], e["emotion"]) for e in printed] == [("new", "happy"), ("end", "happy")]
        w.wait_for(lambda: len(received_events(w)) >= len(printed), what="events over MQTT")
        got = received_events(w)
        assert got == printed
        for e in got:
            assert e.keys() >= EVENT_KEYS and e["schema"] == "serenbox.event/1" and e["device_id"] == DEVICE
        assert {"duration_s", "summary"} <= got[-1].keys()
        assert all(not m.retain for m in w.on("/events"))
        # State: retained; bursts are rate-limited (this file plays in about a second) but the
        # latest always goes out: nobody is left at the end.
        w.wait_for(lambda: w.on("/state") and w.on("/state")[-1].json()["faces"] == 0, what="final state")
        assert json.loads(retained(broker, f"{BASE}/state"))["faces"] == 0
        w.wait_for(lambda: [m.payload for m in w.on("/availability")][-1:] == [b"offline"], what="offline")
        assert [m.payload for m in w.on("/availability")] == [b"online", b"offline"]
        assert retained(broker, f"{BASE}/availability") == b"offline"


def test_broker_restart_mid_run_loses_and_duplicates_nothing(
    model: Path, videos: dict[str, Path], tmp_path: Path
) -> None:
    # The broker keeps the subscriber's session over its restart, so the subscriber itself
    # misses nothing; the daemon has only its spool.
    broker = Mosquitto(tmp_path / "broker", persistent=True).start()
    w = Watcher(broker, [f"{BASE}/#"], persistent=True).start()
    daemon = Daemon(write_config(tmp_path, model, broker, videos["mood"], loop=True))
    try:
        daemon.wait_events(3)
        w.wait_for(lambda: len(received_events(w)) >= 3, what="events before the outage")
        broker.stop()
        before = len(daemon.events)
        daemon.wait_events(before + 4)  # printed (and spooled) while the broker is down
        broker.start()
        daemon.wait_events(len(daemon.events) + 3)
        assert daemon.finish(signal.SIGTERM) == 0, daemon.stderr
    finally:
        daemon.finish(kill=True)
    try:
        printed = daemon.events
        w.wait_for(lambda: len(received_events(w)) >= len(printed), timeout=30, what="every printed event")
        time.sleep(0.5)  # a duplicate would have arrived by now
        got = received_events(w)
        assert [e["id"] for e in got] == [e["id"] for e in printed]  # none lost, none twice, in order
        assert got == printed
        assert "MQTT connection lost" in daemon.stderr
        backlog = [int(n) for n in re.findall(r"connected to MQTT broker .*?; (\d+) spooled event", daemon.stderr)]
        assert len(backlog) >= 2 and max(backlog[1:]) >= 1, backlog  # the outage's events waited in the spool
        assert retained(broker, f"{BASE}/availability") == b"offline"  # SIGTERM: a clean goodbye
    finally:
        w.stop()
        broker.stop()


def test_commands_stats_and_last_will_after_sigkill(model: Path, videos: dict[str, Path], tmp_path: Path) -> None:
    import paho.mqtt.publish as publish

    with Mosquitto(tmp_path / "broker") as broker, Watcher(broker, [f"{BASE}/#"]) as w:
        daemon = Daemon(write_config(tmp_path, model, broker, videos["mood"], loop=True, stats_interval_s=1))
        try:
            w.wait_for(lambda: w.on("/availability"), timeout=60, what="online")
            w.wait_for(lambda: any(m.json()["faces"] == 1 for m in w.on("/state")), what="a state with the face")
            face = next(m.json() for m in w.on("/state") if m.json()["faces"] == 1)
            assert face["dominant"] in ("happy", "sad") and face["paused"] is False
            assert face["tracks"][0]["emotion"] == face["dominant"]
            # Stats: the pipeline's figures with the sink's spool counters merged in.
            w.wait_for(lambda: w.on("/stats"), what="stats")
            stats = w.on("/stats")[-1].json()
            assert {"fps", "latency_ms", "frames", "uptime_s", "spool_depth", "spool_dropped"} <= stats.keys()
            assert stats["spool_dropped"] == 0

            def send(payload: bytes) -> None:
                publish.single(f"{BASE}/set", payload, qos=1, hostname=broker.host, port=broker.port)

            send(b'{"command": "explode"}')
            send(b"{not json")
            w.wait_for(lambda: len(w.on("/error")) >= 2, what="error replies")
            errors = [m.json()["error"] for m in w.on("/error")]
            assert "unknown command 'explode'" in errors[0] and "not valid JSON" in errors[1]
            send(b'{"command": "pause"}')
            w.wait_for(lambda: any(m.json()["paused"] for m in w.on("/state")), what="paused state")
            assert json.loads(retained(broker, f"{BASE}/state")) == {
                "faces": 0,
                "dominant": None,
                "probabilities": None,
                "tracks": [],
                "paused": True,
            }
            assert daemon.proc.poll() is None  # bad commands never stop the daemon
            w.wait_for(lambda: received_events(w)[-1:] and received_events(w)[-1]["type"] == "end", what="end")
        finally:
            daemon.finish(kill=True)
        assert daemon.proc.returncode == -signal.SIGKILL
        # The kernel closes the dead process's socket, so the broker publishes the will at once
        # (a box that loses power shows offline after 1.5 keepalives instead).
        w.wait_for(lambda: w.on("/availability")[-1].payload == b"offline", what="the Last Will")
        # `online` is refreshed every stats interval (its expiry); what matters is the change.
        assert changes([m.payload for m in w.on("/availability")]) == [b"online", b"offline"]
        assert retained(broker, f"{BASE}/availability") == b"offline"


def test_daemon_killed_mid_outage_replays_its_spool(model: Path, videos: dict[str, Path], tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")  # not running yet: the first daemon only spools
    first = Daemon(write_config(tmp_path, model, broker, videos["mood"], loop=True))
    first.wait_events(4)
    assert first.finish(kill=True) == -signal.SIGKILL
    assert "could not connect to MQTT broker" in first.stderr
    p1 = first.events
    with broker, Watcher(broker, [f"{BASE}/events"]) as w:
        second = Daemon(write_config(tmp_path, model, broker, videos["short"], loop=False))
        assert second.finish(timeout=60) == 0, second.stderr
        p2 = second.events
        assert "unsent event(s) from an earlier run" in second.stderr
        w.wait_for(lambda: len(received_events(w)) >= len(p1) + len(p2), what="replayed and new events")
        time.sleep(0.3)
        got = received_events(w)
    # The spool goes out first, in order, then the new run. SIGKILL may land between the spool
    # write and the print, so the first run may have spooled one event more than it printed.
    assert got[: len(p1)] == p1 and got[len(got) - len(p2) :] == p2
    extra = got[len(p1) : len(got) - len(p2)]
    assert len(extra) <= 1 and all(e["run_id"] == p1[0]["run_id"] and e["seq"] == len(p1) + 1 for e in extra)
    assert p1[0]["run_id"] != p2[0]["run_id"]


def changes(payloads: list[bytes]) -> list[bytes]:
    """The payloads without repeats of the one before."""
    return [p for i, p in enumerate(payloads) if i == 0 or p != payloads[i - 1]]
