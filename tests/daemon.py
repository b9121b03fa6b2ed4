"""`serenbox run` as a real subprocess for end-to-end and fault tests, and configs for it.

d = Daemon(config_path)          # --print-events: stdout events are collected live
d.wait_log("running")            # stderr lines are collected too
d.finish(signal.SIGTERM)         # exit code
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from tests.mosquitto import Mosquitto, Watcher

ROOT = Path(__file__).resolve().parents[1]

USERS = {"serenbox": "box-pw", "viewer": "viewer-pw", "controller": "controller-pw"}


def acl_from_docs() -> str:
    """The ACL block docs/mqtt.md shows, so the tests prove what the docs tell operators."""
    text = (ROOT / "docs" / "mqtt.md").read_text()
    start = text.index("# /etc/mosquitto/acl\n")
    block = text[start : text.index("```", start)]
    return "\n".join(line for line in block.splitlines() if not line.startswith("#")).strip() + "\n"


def secure_broker(workdir: Path, **kwargs: Any) -> Mosquitto:
    """A mosquitto with passwords and the documented ACL."""
    return Mosquitto(workdir, users=USERS, acl=acl_from_docs(), **kwargs)


def publisher(broker: Mosquitto, user: str = "controller") -> mqtt.Client:
    """A connected paho client (MQTT 5) that publishes as `user`; stop it with loop_stop()."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{user}", protocol=mqtt.MQTTv5)
    if broker.users:
        c.username_pw_set(user, USERS[user])
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    if not connected.wait(10):
        raise RuntimeError("test publisher could not connect")
    return c


def watcher(broker: Mosquitto, topics: list[str], user: str = "viewer", **kwargs: Any) -> Watcher:
    auth = {"username": user, "password": USERS[user]} if broker.users else {}
    return Watcher(broker, topics, **auth, **kwargs)


def write_config(tmp: Path, source: str | Path, broker: Mosquitto | None = None, **overrides: Any) -> Path:
    """A daemon configuration on the shipped model; `overrides` are merged one level deep."""
    data: dict[str, Any] = {
        "device_id": "fault-box",
        "log_level": "INFO",
        "state_dir": str(tmp / "state"),
        "camera": {"source": str(source), "fps": 10},
        "tracker": {"confirm_frames": 2, "smoothing_s": 0.2, "switch_after_s": 0.5, "end_after_s": 1.0},
    }
    if broker is not None:
        data["mqtt"] = {
            "host": broker.host,
            "port": broker.port,
            "keepalive": 5,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 0.5,
            "state_interval_s": 0.5,
            **({"username": "serenbox", "password": USERS["serenbox"]} if broker.users else {}),
        }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp / f"serenbox-{len(list(tmp.glob('serenbox-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Daemon:
    """`serenbox run --print-events` in a subprocess; its stdout events and stderr lines are collected."""

    def __init__(
        self,
        config: Path,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        stderr_bytes_per_s: float | None = None,
    ) -> None:
        # A slow reader (like a busy journald) keeps the stderr pipe full, so the daemon's log
        # writes block: the moment a signal lands in the middle of one.
        self._stderr_rate = stderr_bytes_per_s
        self.proc = subprocess.Popen(
            [
                *(prefix or []),
                sys.executable,
                "-m",
                "serenbox",
                "run",
                "--config",
                str(config),
                "--print-events",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.events: list[dict[str, Any]] = []
        self._err: list[str] = []
        # One reader per pipe, so neither can fill up and stall the daemon.
        self._readers = [
            threading.Thread(target=self._read_events, daemon=True),
            threading.Thread(target=self._read_errors, daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        if self._stderr_rate is None:
            for line in self.proc.stderr:
                self._err.append(line)
            return
        fd, chunk = self.proc.stderr.fileno(), 1024
        while data := os.read(fd, chunk):
            self._err.append(data.decode(errors="replace"))
            time.sleep(chunk / self._stderr_rate)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def wait(self, predicate: Callable[[], Any], timeout: float = 60, what: str = "the daemon") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.finish(kill=True)
                raise AssertionError(f"waiting for {what}; stderr:\n{self.stderr[-3000:]}")
            time.sleep(0.02)

    def wait_events(self, n: int, timeout: float = 60) -> None:
        self.wait(lambda: len(self.events) >= n, timeout, f"{n} events ({len(self.events)} printed)")

    def wait_log(self, text: str, timeout: float = 60) -> None:
        self.wait(lambda: text in self.stderr, timeout, f"{text!r} in the log")

    def finish(self, sig: int | None = None, kill: bool = False, timeout: float = 30) -> int:
        if kill and self.proc.poll() is None:
            self.proc.kill()
        elif sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for t in self._readers:
                t.join(timeout=5)
        return self.proc.returncode


def received_events(w: Watcher) -> list[dict[str, Any]]:
    """Events as the subscriber got them, minus the broker's own redeliveries *to the subscriber*
    (dup flag, already seen): those are the test client's session, not the daemon's doing."""
    seen: set[str] = set()
    out = []
    for m in w.on("/events"):
        e = m.json()
        if m.dup and e["id"] in seen:
            continue
        seen.add(e["id"])
        out.append(e)
    return out
