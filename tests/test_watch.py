"""`serenbox watch` on a real daemon (`serenbox run` on a video, real mosquitto), plain and TTY views."""

from __future__ import annotations

import itertools
import json
import os
import pty
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import paho.mqtt.publish as publish
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from serenbox.messages import parse
from serenbox.watch import CLEAR_BELOW, CLEAR_LINE, HOME, Board, plain_line, redraw, render_table
from tests import media
from tests.daemon import USERS, Daemon, secure_broker, write_config
from tests.mosquitto import Mosquitto, Watcher, mosquitto_binary

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "fault-box"  # tests/daemon.py's


def _as_a_background_job() -> None:
    # A command started with `&` by a non-interactive shell (nohup, scripts, some CI runners)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class WatchProcess:
    def __init__(self, *args: str, background: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serenbox", "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            preexec_fn=_as_a_background_job if background else None,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, *parts: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if all(p in line for p in parts):
                    return line
            assert self.proc.poll() is None, f"watch exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
            time.sleep(0.05)
        raise AssertionError(f"no line with {parts} in {self.lines[-10:]}")


def test_unreachable_broker_is_one_line_and_exit_2(tmp_path: Path) -> None:
    port = Mosquitto(tmp_path / "never-started").port
    out = subprocess.run(
        [sys.executable, "-m", "serenbox", "watch", "--host", "127.0.0.1", "--port", str(port)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"serenbox watch: cannot reach the MQTT broker 127.0.0.1:{port} (Connection refused)"
    ]


def test_watch_follows_a_real_daemon(tmp_path: Path) -> None:
    video = media.moving_face_video(tmp_path / "face.avi", seconds=4, fps=10)
    with Mosquitto(tmp_path / "broker") as broker, Watcher(broker, ["serenbox/#"]) as recorder:
        view = WatchProcess("--host", broker.host, "--port", str(broker.port), "--plain")
        config = write_config(tmp_path, video, broker, camera={"loop": True}, mqtt={"stats_interval_s": 1})
        daemon = Daemon(config)
        try:
            # Online needs a stats message too (each second here); tracks come and go meanwhile.
            up = view.wait_line(f"{DEVICE} online faces=", "emotions=[#", "last=[")
            assert daemon.finish(signal.SIGTERM) == 0, daemon.stderr
            down = view.wait_line(f"{DEVICE} offline", "faces=0")
        finally:
            daemon.finish(kill=True)
            view.proc.send_signal(signal.SIGTERM)
            rc = view.proc.wait(timeout=30)
        assert rc == 0 and view.proc.stderr is not None and view.proc.stderr.read() == ""
        # The last event shown is one the daemon printed, as it printed it.
        seq = int(re.search(r"last=\[.* seq (\d+) ", up).group(1))
        e = daemon.events[seq - 1]
        assert f"last=[{e['type']} {e['emotion']} {e['confidence']:.2f} #{e['track_id']} seq {seq} " in up
        # One line per change: no line is printed twice in a row for the box.
        box_lines = [line.split(" ", 1)[1] for line in view.lines if f" {DEVICE} " in line]
        assert all(a != b for a, b in itertools.pairwise(box_lines))
        assert box_lines[-1] == down.split(" ", 1)[1]
        # The TTY view, rendered from every message the daemon sent, as the recorder got them.
        recorded = [(m.topic, m.payload) for m in recorder.messages]

    board = Board(started=0.0)
    offline_at = next(i for i, (t, p) in enumerate(recorded) if t.endswith("/availability") and p == b"offline")
    for topic, payload in recorded[:offline_at]:
        board.update(parse(topic, payload), now=100.0)
    last_state = next(parse(t, p) for t, p in reversed(recorded[:offline_at]) if t.endswith("/state"))
    last_event = next(parse(t, p) for t, p in reversed(recorded[:offline_at]) if t.endswith("/events"))
    screen = render_table(board, 101.0, "title")
    lines = screen.splitlines()
    assert lines[0] == "title"
    assert lines[2].split() == ["DEVICE", "STATUS", "FACES", "EMOTIONS", "FPS", "SPOOL", "LAST", "EVENT"]
    row = lines[3]
    assert row.startswith(DEVICE) and " online " in row and f" {last_state.faces} " in row
    for track in last_state.tracks:
        assert f"#{track.track_id} {track.emotion} {track.confidence:.2f}" in row
    assert f"{last_event.type} {last_event.emotion}" in row and f"seq {last_event.seq} " in row
    # Stats stop: after 3 stats intervals (1 s here) without one, `online` is no longer believed.
    assert " stale " in render_table(board, 104.5, "title").splitlines()[3]
    for topic, payload in recorded[offline_at:]:
        board.update(parse(topic, payload), now=102.0)
    assert board.row(board.boxes[DEVICE], 102.5)[1] == "offline"
    assert plain_line(board.row(board.boxes[DEVICE], 102.5)).startswith(f"{DEVICE} offline faces=0 emotions=[-]")
    # Painted in place: home, every line cleared to its end, and what is below cleared.
    painted = redraw(screen)
    assert painted.startswith(HOME) and painted.endswith(CLEAR_BELOW)
    assert painted.count(CLEAR_LINE) == len(lines)


def test_a_terminal_gets_the_table_redrawn_in_place(tmp_path: Path) -> None:
    state = {"faces": 1, "dominant": "sad", "probabilities": None, "paused": True,
             "tracks": [{"track_id": 4, "emotion": "sad", "confidence": 0.61, "box": None}]}  # fmt: skip
    with Mosquitto(tmp_path / "broker") as broker:
        for topic, payload in (("availability", "online"), ("state", json.dumps(state))):
            publish.single(
                f"serenbox/kitchen/{topic}", payload, qos=1, retain=True, hostname=broker.host, port=broker.port
            )
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serenbox",
                "watch",
                "--host",
                broker.host,
                "--port",
                str(broker.port),
                "--seconds",
                "2.5",
            ],
            stdout=slave,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        os.close(slave)
        out = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closes when the process exits
                break
            if not chunk:
                break
            out += chunk
        os.close(master)
        assert proc.wait(timeout=30) == 0
    text = out.decode()
    frames = text.split(HOME)[1:]
    assert len(frames) >= 2  # redrawn (once a second at least), never scrolled
    assert "\n" not in text.split(HOME)[0].replace("\r", "")  # nothing printed before the first frame
    last = frames[-1]
    assert "DEVICE" in last and "kitchen  online?, paused  1      #4 sad 0.61" in last
    assert last.endswith(CLEAR_BELOW + "\x1b[?25h")  # the cursor comes back at the end


def test_plain_view_says_when_the_broker_goes_and_comes_back(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    view = WatchProcess("--host", broker.host, "--port", str(broker.port), "--device", "hall")
    try:
        publish.single(
            "serenbox/hall/availability", "online", qos=1, retain=True, hostname=broker.host, port=broker.port
        )
        publish.single("serenbox/attic/availability", "online", qos=1, hostname=broker.host, port=broker.port)
        view.wait_line("hall online? faces=-")
        broker.stop()
        view.wait_line("broker lost; reconnecting")
        broker.start()
        view.wait_line("broker connected")
        publish.single("serenbox/hall/availability", "offline", qos=1, hostname=broker.host, port=broker.port)
        view.wait_line("hall offline")
    finally:
        view.proc.send_signal(signal.SIGINT)
        rc = view.proc.wait(timeout=30)
        broker.stop()
    assert rc == 0
    assert not [line for line in view.lines if "attic" in line]  # --device: that box only


def test_a_viewer_login_from_the_documented_access_list(tmp_path: Path) -> None:
    with secure_broker(tmp_path / "broker") as broker:
        auth = {"username": "serenbox", "password": USERS["serenbox"]}  # the box's own login
        publish.single(
            "serenbox/hall/availability",
            "offline",
            qos=1,
            retain=True,
            hostname=broker.host,
            port=broker.port,
            auth=auth,
        )
        args = [sys.executable, "-m", "serenbox", "watch", "--host", broker.host, "--port", str(broker.port)]
        args += ["--username", "viewer", "--plain", "--seconds", "1.5"]
        env = {**os.environ, "SERENBOX_MQTT_PASSWORD": USERS["viewer"]}
        ok = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
        env["SERENBOX_MQTT_PASSWORD"] = "wrong"
        refused = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert ok.returncode == 0 and " hall offline " in ok.stdout, ok.stderr
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"serenbox watch: the MQTT broker {broker.host}:{broker.port} refused the connection: not authorized"
    ]


@pytest.mark.parametrize("background", [False, True])
def test_sigint_always_ends_the_view_while_messages_pour_in(tmp_path: Path, background: bool) -> None:
    # The view relied on Python's KeyboardInterrupt: started as a background job (SIGINT inherited
    # as ignored) it never stopped on SIGINT, which hung a CI run. Now it sets its own handler,
    # which only sets a flag the loop checks: SIGINT at random moments while a publisher floods
    # the view must end it cleanly every time.
    broker = Mosquitto(tmp_path / "broker").start()
    flood = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flood")
    flood.connect(broker.host, broker.port)
    flood.loop_start()
    stop_flood = threading.Event()

    def pour() -> None:
        n = 0
        while not stop_flood.is_set() and n < 200_000:
            n += 1
            state = {"device_id": "hall", "faces": n % 3, "dominant": None, "tracks": [], "paused": False}
            flood.publish("serenbox/hall/state", json.dumps(state), qos=1)
            time.sleep(0.0005)

    pourer = threading.Thread(target=pour, daemon=True)
    pourer.start()
    rng = random.Random(5)
    try:
        for _ in range(5):
            view = WatchProcess("--host", broker.host, "--port", str(broker.port), "--plain", background=background)
            view.wait_line("hall")
            time.sleep(rng.uniform(0.0, 0.5))
            view.proc.send_signal(signal.SIGINT)
            try:
                rc = view.proc.wait(timeout=10)
            finally:
                view.proc.kill()
            assert rc == 0
    finally:
        stop_flood.set()
        pourer.join(timeout=5)
        flood.loop_stop()
        broker.stop()
