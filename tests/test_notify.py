"""systemd's notify protocol over a real AF_UNIX datagram socket, from the Notifier and from `serenbox run`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from serenbox.device.notify import Notifier

from tests.tinymodels import brightness_model, convert_tiny


class Listener:
    """A datagram socket standing in for systemd's notify socket (a real socket, as systemd uses)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)

    def messages(self, timeout: float = 0.2) -> list[str]:
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                out.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Listener, str]]:
    path = str(tmp_path / "notify.sock")
    lis = Listener(path)
    yield lis, path
    lis.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier(env={})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_ready_status_stopping_reach_the_socket(listener: tuple[Listener, str]) -> None:
    lis, path = listener
    notifier = Notifier(env={"NOTIFY_SOCKET": path})
    assert notifier.ready("10.0 fps, 1 faces")
    assert notifier.status("9.5 fps")
    assert notifier.reloading()
    assert notifier.stopping()
    assert lis.messages() == ["READY=1\nSTATUS=10.0 fps, 1 faces", "STATUS=9.5 fps", "RELOADING=1", "STOPPING=1"]
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"serenbox-test-{uuid.uuid4().hex}"
    lis = Listener("\0" + name)
    try:
        notifier = Notifier(env={"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert lis.messages() == ["READY=1"]
    finally:
        lis.close()


def test_watchdog_pings_at_half_the_timeout(listener: tuple[Listener, str]) -> None:
    lis, path = listener
    now = [100.0]
    notifier = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock=lambda: now[0])
    assert notifier.watchdog_interval_s == pytest.approx(1.0)
    sent = []
    for _ in range(25):  # 2.5 s of loop iterations every 0.1 s
        sent.append(notifier.watchdog())
        now[0] += 0.1
    assert sum(sent) == 3  # at 0.0, 1.0 and 2.0 s
    assert lis.messages() == ["WATCHDOG=1"] * 3


def test_watchdog_meant_for_another_process_is_ignored(listener: tuple[Listener, str]) -> None:
    _, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(env=env).watchdog() is False
    assert Notifier(env={**env, "WATCHDOG_PID": str(os.getpid())}).watchdog() is True


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.enabled
    assert notifier.ready() is False


# --- the daemon -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("notify-run")
    model = convert_tiny(brightness_model(), folder / "model")
    config = folder / "serenbox.yaml"
    # The demo camera paces itself in real time: 30 frames at 20 fps run for 1.5 s.
    data = {"model": {"path": str(model)}, "state_dir": str(folder / "state"), "camera": {"source": "demo", "fps": 20}}
    config.write_text(yaml.safe_dump(data))
    return config


def collect(lis: Listener, stop: threading.Event, into: list[str]) -> None:
    while not stop.is_set():
        try:
            into.append(lis.sock.recv(4096).decode())
        except TimeoutError:
            continue


def test_serenbox_run_speaks_the_protocol(listener: tuple[Listener, str], tmp_path: Path, run_config: Path) -> None:
    lis, path = listener
    got: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=collect, args=(lis, stop, got), daemon=True)
    thread.start()
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    proc = subprocess.run(
        [sys.executable, "-m", "serenbox", "run", "--config", str(run_config), "--max-frames", "30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    time.sleep(0.3)
    stop.set()
    thread.join()
    assert proc.returncode == 0, proc.stderr
    kinds = [m.split("=", 1)[0] for m in got]
    assert got[0].startswith("READY=1")
    assert "STATUS" in got[0] or any(m.startswith("STATUS=") for m in got)
    assert kinds.count("WATCHDOG") >= 5  # pinged repeatedly by the running loop (every 0.1 s for 1.5 s)
    assert got[-1] == "STOPPING=1"
    assert kinds.index("WATCHDOG") > 0  # no ping before READY
