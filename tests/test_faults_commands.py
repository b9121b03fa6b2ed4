"""Fault suite: whatever arrives on `set`, the box keeps running, keeps answering, and obeys
only valid commands from those the broker lets command it. Real mosquitto with docs/mqtt.md's
access list, the real daemon on a real video, the shipped model."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests import media
from tests.daemon import Daemon, publisher, secure_broker, watcher, write_config
from tests.mosquitto import mosquitto_binary

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
DEVICE = "fault-box"
BASE = f"serenbox/{DEVICE}"
SET = f"{BASE}/set"


@pytest.fixture(scope="module")
def face_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return media.moving_face_video(tmp_path_factory.mktemp("video") / "face.avi", seconds=6, fps=10)


def fuzz_payloads(n: int, seed: int = 0) -> list[bytes]:
    """`n` payloads a hostile or broken publisher might send (bounded: the largest is 1 MB)."""
    rng = random.Random(seed)
    values: list[Any] = [0, -1, 0.001, 0.05, 1e-300, 1e308, 121, "5", True, None, [], {}, "fps", 10**40]
    literal = [b"NaN", b"Infinity", b"-Infinity", b"1e999"]

    def junk(depth: int = 0) -> Any:
        kind = rng.randrange(6 if depth < 4 else 3)
        if kind == 0:
            return rng.choice(values)
        if kind == 1:
            return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 40)))
        if kind == 2:
            return rng.uniform(-1e6, 1e6)
        if kind == 3:
            return [junk(depth + 1) for _ in range(rng.randrange(4))]
        return {str(junk(depth + 1))[:20]: junk(depth + 1) for _ in range(rng.randrange(4))}

    out: list[bytes] = [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError bait
        json.dumps({"command": "x" * (1 << 20)}).encode(),  # a 1 MB command name
        json.dumps({"command": "fps", "value": 1e-300}).encode(),
        json.dumps({"command": "fps", "value": 0.001}).encode(),
        b'{"command": "fps", "value": NaN}',
        b"",
        b"\xff\xfe\x00garbage",
        b'{"command": "\\ud800"}',
    ]
    while len(out) < n:
        kind = rng.randrange(6)
        if kind == 0:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200))))
        elif kind == 1:
            out.append(json.dumps(junk()).encode())
        elif kind == 2:
            name = rng.choice(["fps", "pause", "resume", "FPS", "explode", "", "fps "])
            out.append(json.dumps({"command": name, "value": rng.choice(values)}).encode())
        elif kind == 3:
            out.append(b'{"command": "fps", "value": ' + rng.choice(literal) + b"}")
        elif kind == 4:
            depth = rng.randrange(10, 5000)
            out.append(b'{"a":' * depth + b"1" + b"}" * depth)
        else:
            out.append(json.dumps({"command": "y" * rng.randrange(100, 70_000)}).encode())
    return out[:n]


def paused(w: Any) -> bool | None:
    states = w.on("/state")
    return states[-1].json()["paused"] if states else None


def test_two_thousand_fuzzed_commands_neither_crash_nor_block_nor_flood(face_video: Path, tmp_path: Path) -> None:
    payloads = fuzz_payloads(2000)
    with secure_broker(tmp_path / "broker") as broker, watcher(broker, [f"{BASE}/#"]) as w:
        config = write_config(tmp_path, face_video, broker, camera={"loop": True}, mqtt={"stats_interval_s": 1})
        daemon = Daemon(config)
        try:
            daemon.wait_log("connected to MQTT broker")
            controller = publisher(broker)
            started = time.monotonic()
            for i in range(0, len(payloads), 100):
                infos = [controller.publish(SET, p, qos=1) for p in payloads[i : i + 100]]
                for info in infos:
                    info.wait_for_publish(timeout=30)
            # Every refused command is answered, briefly; the answers stop coming when the fuzz does.
            w.wait_for(lambda: len(w.on("/error")) >= 1500, timeout=120, what="error answers")
            errors = w.on("/error")
            assert max(len(m.payload) for m in errors) < 2048
            assert all(set(m.json()) == {"error", "payload", "timestamp"} for m in errors)
            # The loop is alive: valid commands still act within a second or two, whatever came before.
            controller.publish(SET, json.dumps({"command": "resume"}), qos=1).wait_for_publish(10)
            controller.publish(SET, json.dumps({"command": "fps", "value": 0.1}), qos=1).wait_for_publish(10)
            time.sleep(0.5)
            t0 = time.monotonic()
            controller.publish(SET, json.dumps({"command": "pause"}), qos=1).wait_for_publish(10)
            w.wait_for(lambda: paused(w) is True, timeout=5, what="paused")
            assert time.monotonic() - t0 < 3.0  # not stuck behind a 10 s frame wait
            controller.publish(SET, json.dumps({"command": "resume"}), qos=1).wait_for_publish(10)
            controller.publish(SET, json.dumps({"command": "fps", "value": 10}), qos=1).wait_for_publish(10)
            w.wait_for(lambda: paused(w) is False, timeout=5, what="resumed")
            stats_before = len(w.on("/stats"))
            w.wait_for(lambda: len(w.on("/stats")) >= stats_before + 2, timeout=10, what="stats still coming")
            assert daemon.proc.poll() is None
            controller.loop_stop()
            fuzz_s = time.monotonic() - started
        finally:
            code = daemon.finish(signal.SIGTERM)
    assert code == 0, daemon.stderr[-3000:]
    assert "Traceback" not in daemon.stderr
    assert max(len(line) for line in daemon.stderr.splitlines()) < 2048  # no megabyte log lines
    print(f"fuzz: {len(payloads)} payloads, {len(errors)} error answers, {fuzz_s:.1f} s")


def test_a_retained_command_is_never_executed_at_start(face_video: Path, tmp_path: Path) -> None:
    # A crashing command published retained once used to crash every restart: the unit ended failed.
    with secure_broker(tmp_path / "broker") as broker, watcher(broker, [f"{BASE}/#"]) as w:
        controller = publisher(broker)
        for command in ({"command": "fps", "value": 1e-300}, {"command": "pause"}):
            controller.publish(SET, json.dumps(command), qos=1, retain=True).wait_for_publish(10)
        controller.loop_stop()
        for start in range(3):
            daemon = Daemon(write_config(tmp_path, face_video, broker), "--max-frames", "30")
            assert daemon.finish(timeout=60) == 0, daemon.stderr[-3000:]
            assert "Traceback" not in daemon.stderr
            assert len(daemon.events) >= 1, f"start {start}: not processing (paused by a retained command?)"
        assert not any(m.json().get("paused") for m in w.on("/state"))


def test_only_controllers_may_command_the_box(face_video: Path, tmp_path: Path) -> None:
    with secure_broker(tmp_path / "broker") as broker, watcher(broker, [f"{BASE}/#"]) as w:
        daemon = Daemon(write_config(tmp_path, face_video, broker, camera={"loop": True}))
        try:
            daemon.wait_log("connected to MQTT broker")
            w.wait_for(lambda: paused(w) is False, what="the first state")
            viewer = publisher(broker, "viewer")
            viewer.publish(SET, json.dumps({"command": "pause"}), qos=1).wait_for_publish(10)
            viewer.loop_stop()
            time.sleep(2.0)
            assert paused(w) is False and "command" not in daemon.stderr  # never reached the box
            controller = publisher(broker, "controller")
            controller.publish(SET, json.dumps({"command": "pause"}), qos=1).wait_for_publish(10)
            controller.loop_stop()
            w.wait_for(lambda: paused(w) is True, timeout=5, what="paused by the controller")
        finally:
            assert daemon.finish(signal.SIGTERM) == 0, daemon.stderr[-3000:]
