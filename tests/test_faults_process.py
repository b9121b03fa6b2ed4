"""Fault suite: the process around the pipeline. Two copies on one state directory, signals at
bad moments, a daemon that dies where no Last Will can fire, a camera missing at start, a sink
whose worker thread dies. Real processes, a real broker."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import media
from tests.daemon import Daemon, received_events, write_config
from tests.mosquitto import Mosquitto, Watcher, mosquitto_binary, retained

needs_broker = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
BASE = "serenbox/fault-box"


@pytest.fixture(scope="module")
def face_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Two seconds there, one away: a new and an end event every three seconds when looped.
    path = tmp_path_factory.mktemp("video") / "face.avi"
    return media.moving_face_video(path, seconds=6, fps=10, present=lambda t: t % 3 < 2)


@needs_broker
def test_a_second_daemon_on_the_same_state_directory_is_refused(face_video: Path, tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker, Watcher(broker, [f"{BASE}/#"]) as w:
        config = write_config(tmp_path, face_video, broker, camera={"loop": True})
        first = Daemon(config)
        try:
            first.wait_events(2)
            second = Daemon(config)
            assert second.finish(timeout=60) == 2
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "in use by another serenbox" in lines[0], second.stderr
            n = len(first.events)
            first.wait_events(n + 2)  # the first one never noticed
        finally:
            assert first.finish(signal.SIGTERM) == 0
        printed = first.events
        w.wait_for(lambda: len(received_events(w)) >= len(printed), what="every event")
        assert received_events(w) == printed


def heavy_logging_folder(folder: Path) -> Path:
    """One face and 40 files that are not images: every frame logs 40 warnings from the main thread,
    into a stderr pipe read slowly, so the main thread is blocked in a write most of the time."""
    folder.mkdir()
    media.write_image(folder / "a000.jpg", media.scene([(220, 140, 200)]))
    for i in range(40):
        (folder / f"b{i:03d}.png").write_bytes(b"not an image " * 10)
    return folder


@pytest.mark.slow
def test_stop_always_works_in_signal_storms_while_logging_heavily(tmp_path: Path) -> None:
    folder = heavy_logging_folder(tmp_path / "frames")
    rng = random.Random(7)
    plans = [(rng.randrange(0, 4), [rng.uniform(0, 0.2) for _ in range(5)]) for _ in range(100)]

    def one(i: int) -> tuple[int, float, str]:
        d = tmp_path / f"try{i}"
        d.mkdir()
        hups, gaps = plans[i]
        config = write_config(d, folder, camera={"loop": True, "fps": 120})
        daemon = Daemon(config, stderr_bytes_per_s=50_000)
        daemon.wait_log("; skipped", timeout=60)
        for k in range(hups):
            time.sleep(gaps[k])
            daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(gaps[4])
        sent = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.proc.wait(timeout=10)
        took = time.monotonic() - sent
        return daemon.finish(kill=True, timeout=5), took, daemon.stderr[-2000:]

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(one, range(100)))
    slowest = max(took for _, took, _ in results)
    failures = [(i, code, took, err) for i, (code, took, err) in enumerate(results) if code != 0 or took > 2.0]
    print(f"signal storms: 100 tries, slowest stop {slowest:.2f} s")
    assert not failures, failures[:2]


@needs_broker
def test_availability_expires_when_the_daemon_died_while_the_broker_was_down(face_video: Path, tmp_path: Path) -> None:
    # The broker restores the retained `online` from its store and fires no Last Will for a
    # client it never saw go: the expiry (3 stats intervals) is what ends it.
    broker = Mosquitto(tmp_path / "broker", persistent=True).start()
    daemon = Daemon(write_config(tmp_path, face_video, broker, camera={"loop": True}, mqtt={"stats_interval_s": 1}))
    try:
        daemon.wait_log("connected to MQTT broker")
        assert retained(broker, f"{BASE}/availability") == b"online"
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGUSR1)  # mosquitto writes its store now...
        time.sleep(0.5)
        broker.stop(signal.SIGKILL)  # ...and then the power goes: no will, no goodbye
        daemon.finish(kill=True)
        broker.start()
        assert retained(broker, f"{BASE}/availability") == b"online"  # what a subscriber would trust...
        time.sleep(3.5)
        assert retained(broker, f"{BASE}/availability") in (None, b"offline")  # ...until it expires
    finally:
        daemon.finish(kill=True)
        broker.stop()


@needs_broker
def test_online_stays_retained_while_the_daemon_lives(face_video: Path, tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        daemon = Daemon(write_config(tmp_path, face_video, broker, camera={"loop": True}, mqtt={"stats_interval_s": 1}))
        try:
            daemon.wait_log("connected to MQTT broker")
            time.sleep(5)  # more than the 3 s expiry: the refresh keeps it
            assert retained(broker, f"{BASE}/availability") == b"online"
        finally:
            assert daemon.finish(signal.SIGTERM) == 0
        assert retained(broker, f"{BASE}/availability") == b"offline"


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str, list[str]]:
    """A real sd_notify datagram socket; what the daemon sends is collected in the list."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    got: list[str] = []

    def read() -> None:
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except OSError:
                return

    threading.Thread(target=read, daemon=True).start()
    return sock, path, got


def test_a_camera_missing_at_start_is_waited_for_not_fatal(tmp_path: Path) -> None:
    sock, path, got = notify_socket(tmp_path)
    config = write_config(tmp_path, "/dev/video99", camera={"reopen_initial_s": 0.2, "reopen_max_s": 1})
    daemon = Daemon(config, env={"NOTIFY_SOCKET": path})
    try:
        daemon.wait(lambda: any("READY=1" in m for m in got), timeout=60, what="READY")
        assert any("camera unavailable" in m for m in got)
        daemon.wait(lambda: daemon.stderr.count("cannot open") >= 3, timeout=20, what="retries")
        assert daemon.proc.poll() is None
        sent = time.monotonic()
        assert daemon.finish(signal.SIGTERM, timeout=5) == 0
        assert time.monotonic() - sent < 2.0
    finally:
        daemon.finish(kill=True)
        sock.close()
    assert "Traceback" not in daemon.stderr


@needs_broker
def test_a_dead_mqtt_network_thread_stops_the_daemon_for_a_restart(tmp_path: Path) -> None:
    from serenbox.device.config import from_dict
    from serenbox.device.sinks.mqtt import MqttSink

    with Mosquitto(tmp_path / "broker") as broker:
        cfg = from_dict({"state_dir": str(tmp_path / "s"), "mqtt": {"host": broker.host, "port": broker.port}}, env={})
        sink = MqttSink(cfg)
        sink.start()
        try:
            deadline = time.monotonic() + 10
            while not sink.counters()["mqtt_connected"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sink.problem() is None
            sink._client.loop_stop()  # paho's thread gone, as when it died of an exception
            sink._client._thread = threading.Thread(target=lambda: None)  # a finished thread object
            sink._client._thread.start()
            sink._client._thread.join()
            assert "network thread" in (sink.problem() or "")
        finally:
            sink.close()


@needs_broker
def test_an_exception_in_a_callback_does_not_kill_the_network_thread(tmp_path: Path, caplog) -> None:
    from serenbox.device.config import from_dict
    from serenbox.device.sinks.mqtt import MqttSink

    with Mosquitto(tmp_path / "broker") as broker, Watcher(broker, ["serenbox/#"]) as w:
        cfg = from_dict({"state_dir": str(tmp_path / "s"), "mqtt": {"host": broker.host, "port": broker.port}}, env={})
        sink = MqttSink(cfg)
        calls = {"n": 0}
        real_len = type(sink._backlog).__len__

        class Broken(type(sink._backlog)):  # type: ignore[misc]
            def __len__(self) -> int:  # what two daemons sharing a spool once produced
                calls["n"] += 1
                if calls["n"] == 1:
                    raise ValueError("__len__() should return >= 0")
                return real_len(self)

        sink._backlog.__class__ = Broken
        sink.start()
        try:
            sink.emit({"id": "e1", "type": "new"})
            w.wait_for(lambda: w.on("/events"), what="the event after the failed callback")
            assert json.loads(w.on("/events")[0].payload)["id"] == "e1"
            assert sink.problem() is None
            assert "callback" in caplog.text
        finally:
            sink.close()
