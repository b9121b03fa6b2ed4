"""Fault suite: the disk under the spool fills up, with the broker up and with it down.

The daemon runs in a mount namespace of its own (`unshare --mount`) with its state directory on
a small tmpfs there: the host never sees the mount, and it vanishes with the process. The test
fills and frees that tmpfs from inside the namespace (`nsenter`). Events printed by the daemon
are compared with events the broker delivered: none may be lost."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from serenbox.device.spool import Spool

from tests import media
from tests.daemon import Daemon, received_events, write_config
from tests.mosquitto import Mosquitto, Watcher, mosquitto_binary

BASE = "serenbox/fault-box"
can_mount = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("nsenter")
needs_namespace = pytest.mark.skipif(
    not can_mount or mosquitto_binary() is None, reason="needs root, unshare, nsenter and mosquitto"
)


@pytest.fixture(scope="module")
def face_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "face.avi"
    return media.moving_face_video(path, seconds=6, fps=10, present=lambda t: t % 3 < 2)


def in_namespace(daemon: Daemon, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", "-t", str(daemon.proc.pid), "-m", *command], capture_output=True, text=True, timeout=30
    )


def fill(daemon: Daemon, state: Path, name: str = "fill") -> None:
    in_namespace(daemon, "dd", "if=/dev/zero", f"of={state}/{name}", "bs=4k")  # ends with ENOSPC
    assert "0 " in in_namespace(daemon, "df", "--output=avail", str(state)).stdout.split("\n")[1] + " "


def keep_full_until(daemon: Daemon, state: Path, text: str, timeout: float = 60) -> None:
    """Fill the disk again whenever space comes back, until `text` is logged.

    SQLite gives space back on its own (a checkpoint cuts the WAL to its size limit) and the
    spool then goes on writing; a disk that another writer keeps full leaves it none."""
    deadline = time.monotonic() + timeout
    for k in range(1000):
        assert time.monotonic() < deadline and daemon.proc.poll() is None, f"no {text!r}:\n{daemon.stderr[-3000:]}"
        fill(daemon, state, f"fill-{k}")
        if text in daemon.stderr:
            return
        time.sleep(0.5)


def free(daemon: Daemon, state: Path) -> None:
    in_namespace(daemon, "sh", "-c", f'rm -f "{state}"/fill*')


def start_on_tmpfs(tmp_path: Path, video: Path, broker: Mosquitto, size: str = "2m") -> tuple[Daemon, Path]:
    state = tmp_path / "state"
    state.mkdir()
    config = write_config(tmp_path, video, broker, camera={"loop": True}, mqtt={"stats_interval_s": 1})
    mount = f'mount -t tmpfs -o size={size} tmpfs {state} && exec "$@"'
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mount, "sh"]
    return Daemon(config, prefix=prefix), state


@needs_namespace
def test_a_full_disk_with_the_broker_up_loses_nothing(face_video: Path, tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker, Watcher(broker, [f"{BASE}/#"]) as w:
        daemon, state = start_on_tmpfs(tmp_path, face_video, broker)
        try:
            daemon.wait_events(2)
            keep_full_until(daemon, state, "keeping events in memory")
            n = len(daemon.events)
            daemon.wait_events(n + 10)  # made while nothing could be written
            free(daemon, state)
            n = len(daemon.events)
            daemon.wait_events(n + 4)
        finally:
            code = daemon.finish(signal.SIGTERM)
        assert code == 0, daemon.stderr[-3000:]
        printed = daemon.events
        w.wait_for(lambda: len(received_events(w)) >= len(printed), timeout=30, what="every event")
        assert [e["id"] for e in received_events(w)] == [e["id"] for e in printed]
        assert "Traceback" not in daemon.stderr
        assert daemon.stderr.count("ERROR") <= 3  # once per outage, not once per event
        print(f"disk full, broker up: {len(printed)} printed, {len(received_events(w))} received")


@needs_namespace
def test_a_full_disk_with_the_broker_down_loses_nothing(face_video: Path, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", persistent=True).start()
    w = Watcher(broker, [f"{BASE}/#"], persistent=True).start()
    daemon, state = start_on_tmpfs(tmp_path, face_video, broker)
    try:
        daemon.wait_events(2)
        broker.stop()
        fill(daemon, state)
        n = len(daemon.events)
        daemon.wait_events(n + 10)  # neither the disk nor the broker takes them: memory does
        broker.start()
        n = len(daemon.events)
        daemon.wait_events(n + 4)
    finally:
        code = daemon.finish(signal.SIGTERM)
    try:
        assert code == 0, daemon.stderr[-3000:]
        printed = daemon.events
        w.wait_for(lambda: len(received_events(w)) >= len(printed), timeout=30, what="every event")
        assert [e["id"] for e in received_events(w)] == [e["id"] for e in printed]
        print(f"disk full, broker down: {len(printed)} printed, {len(received_events(w))} received")
    finally:
        w.stop()
        broker.stop()


def test_the_wal_stays_small_and_is_given_back_when_the_spool_empties(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the broker up every event is written and deleted a moment later; SQLite's default
    # WAL grew to 4 MB that way and never shrank, filling a small disk.
    monkeypatch.setattr("serenbox.device.spool._TRUNCATE_EVERY_S", 2.0)  # 5 s in the product
    path = tmp_path / "spool.sqlite"
    spool = Spool(path, 100_000, 3600)
    wal = Path(f"{path}-wal")
    largest = 0
    for i in range(3000):
        spool.delete([spool.append(f'{{"id": "{i}", "pad": "{"x" * 300}"}}')])
        largest = max(largest, wal.stat().st_size if wal.exists() else 0)
    time.sleep(2.1)  # the truncation is rate-limited
    spool.delete([spool.append("last")])
    assert largest <= 400 * 1024, largest
    assert (wal.stat().st_size if wal.exists() else 0) == 0
    spool.close()
    print(f"WAL: largest {largest} bytes over 3000 events")
