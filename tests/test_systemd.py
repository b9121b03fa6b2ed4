"""systemd/serenbox.service with the real systemd tooling, and the daemon's side of its contract.

There is no systemd as PID 1 here, so the notify protocol is exercised the way systemd drives it:
the daemon started with NOTIFY_SOCKET (a datagram socket this test reads), WATCHDOG_USEC and
STATE_DIRECTORY set, then SIGTERM. The one fake is a camera whose read never returns (the
hardware boundary), to show that a stuck loop stops the watchdog pings.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from serenbox.device.cameras.live import READ_TIMEOUT_S
from serenbox.device.cli import STOP_DEADLINE_S

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "serenbox.service"
ANALYZE = shutil.which("systemd-analyze")
# The bar. The unit measures 1.3 (systemd 252) with
#   systemd-analyze security --offline=true systemd/serenbox.service
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)")


def directives(text: str) -> dict[str, list[str]]:
    """Key → values in order (systemd allows a key many times: DeviceAllow=, SystemCallFilter=)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "": 1}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|min|)", value)
    assert m, f"unparsed time span {value!r}"
    return float(m.group(1)) * units[m.group(2)]


def runnable_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this environment's serenbox (/opt/serenbox is not here)."""
    serenbox = Path(sys.executable).parent / "serenbox"
    if not serenbox.exists():
        pytest.skip(f"{serenbox} is not installed (pip install -e .)")
    text = UNIT.read_text() if text is None else text
    copy = tmp_path / "serenbox.service"
    copy.write_text(text.replace("/opt/serenbox/venv/bin/serenbox", str(serenbox)))
    return copy


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *map(str, args)], capture_output=True, text=True, timeout=120)


def exposure(unit: Path) -> float:
    proc = analyze("security", "--offline=true", "--no-pager", unit)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1))


# --- the unit file ------------------------------------------------------------------------------


@needs_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    proc = analyze("verify", runnable_copy(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    # Proof that the check above can fail: a misspelt directive and a missing program.
    broken = UNIT.read_text().replace("Type=notify", "Type=notifyy").replace("/opt/serenbox/venv", str(tmp_path / "x"))
    path = tmp_path / "serenbox.service"
    path.write_text(broken)
    proc = analyze("verify", path)
    assert proc.returncode != 0
    assert "Type" in proc.stderr or "not executable" in proc.stderr


@needs_analyze
def test_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    unit = runnable_copy(tmp_path)
    assert exposure(unit) <= MAX_EXPOSURE
    # The same bar through systemd-analyze's own gate (0..100 scale), as an operator would check it.
    gate = analyze("security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", "--no-pager", unit)
    assert gate.returncode == 0, gate.stdout


@needs_analyze
def test_an_unhardened_unit_fails_the_bar(tmp_path: Path) -> None:
    # Only the [Unit] and the start of [Service] (identity and hardening cut off) score far worse.
    text = UNIT.read_text().split("# --- identity")[0]
    assert exposure(runnable_copy(tmp_path, text)) > 5.0


def test_service_contract() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["ExecStart"] == ["/opt/serenbox/venv/bin/serenbox run --config /etc/serenbox/serenbox.yaml"]
    # SIGHUP reloads the configuration, with the shell's builtin kill (no procps on a minimal system).
    assert d["ExecReload"] == ["/bin/sh -c 'kill -HUP \"$$MAINPID\"'"]
    assert d["Restart"] == ["on-failure"]
    assert int(d["StartLimitBurst"][0]) >= 3
    assert seconds(d["StartLimitIntervalSec"][0]) > 0
    assert d["User"] == ["serenbox"]
    assert "video" in d["SupplementaryGroups"][0].split()
    assert d["ConfigurationDirectory"] == ["serenbox"]
    assert d["StateDirectory"] == ["serenbox"]  # the daemon takes $STATE_DIRECTORY as state_dir
    assert d["EnvironmentFile"] == ["-/etc/serenbox/serenbox.env"]
    assert d["WantedBy"] == ["multi-user.target"]


def test_timeouts_fit_the_daemon() -> None:
    d = directives(UNIT.read_text())
    # The daemon exits within STOP_DEADLINE_S of SIGTERM; systemd must not SIGKILL it before.
    assert seconds(d["TimeoutStopSec"][0]) > STOP_DEADLINE_S
    # A failed camera read takes READ_TIMEOUT_S before the reopen logic runs: the watchdog must
    # outlast that and a reopen attempt, or a cable wiggle would restart the service.
    assert seconds(d["WatchdogSec"][0]) >= 2 * READ_TIMEOUT_S + 10


def test_camera_and_broker_stay_reachable() -> None:
    d = directives(UNIT.read_text())
    assert "PrivateDevices" not in d  # would hide /dev/video*
    assert "PrivateNetwork" not in d  # would cut the broker off
    assert d["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in d["DeviceAllow"]}
    assert {"char-video4linux", "char-media", "char-dma_heap", "char-vchiq"} <= allowed
    assert all(v.split()[1] == "rw" for v in d["DeviceAllow"])
    families = d["RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)  # broker, journal, notify socket


# Directives that share one comment (the comment explains the pair).
GROUPS = {
    "AmbientCapabilities": {"CapabilityBoundingSet"},
    "RestrictSUIDSGID": {"NoNewPrivileges"},
    "ProtectHome": {"ProtectSystem"},
    "ProtectKernelModules": {"ProtectKernelTunables"},
    "ProtectKernelLogs": {"ProtectKernelModules"},
    "ProtectControlGroups": {"ProtectKernelLogs"},
    "ProtectClock": {"ProtectControlGroups"},
    "ProtectHostname": {"ProtectClock"},
    "SystemCallFilter": {"SystemCallArchitectures"},
    "SystemCallErrorNumber": {"SystemCallFilter"},
}


def test_every_hardening_line_says_why() -> None:
    lines = UNIT.read_text().split("# --- hardening")[1].split("[Install]")[0].splitlines()
    previous = "#"
    for line in (raw.strip() for raw in lines):
        if not line:
            continue
        if not line.startswith("#"):
            key, before = line.split("=")[0], previous.split("=")[0]
            # A directive follows its own comment, or a directive its comment also explains.
            ok = previous.startswith("#") or before == key or before in GROUPS.get(key, set())
            assert ok, f"no comment says why {line}"
        previous = line


def test_no_user_systemd_manager_here() -> None:
    # The end-to-end run under systemd itself (systemd-run --user -p Type=notify ...) needs a
    # running systemd manager; where one exists the protocol tests below still apply unchanged.
    if Path("/run/systemd/system").is_dir() and os.environ.get("XDG_RUNTIME_DIR"):
        pytest.skip("a systemd manager runs here; covered by the protocol tests below")
    pytest.skip("no systemd manager (not PID 1, no user instance): notify protocol tested directly below")


# --- the daemon under systemd's notify protocol ----------------------------------------------------


@pytest.fixture(scope="module")
def daemon_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("skimage", reason="the demo camera needs scikit-image (.[demo])")
    from tests.tinymodels import brightness_model, convert_tiny

    folder = tmp_path_factory.mktemp("systemd-daemon")
    model = convert_tiny(brightness_model(), folder / "model")
    config = folder / "serenbox.yaml"
    data = {"model": {"path": str(model)}, "state_dir": "/nonexistent", "camera": {"source": "demo", "fps": 20}}
    config.write_text(yaml.safe_dump(data))
    return config


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.got: list[tuple[float, str]] = []

    def wait_for(self, prefix: str, timeout: float) -> float:
        """Collect messages until one starts with `prefix`; its arrival time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            now = time.monotonic()
            self.got.append((now, message))
            if message.startswith(prefix):
                return now
        raise AssertionError(f"no {prefix} within {timeout} s; got {[m for _, m in self.got]}")

    def drain(self, seconds_: float) -> list[tuple[float, str]]:
        end = time.monotonic() + seconds_
        out = []
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                out.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                break
        self.got.extend(out)
        return out

    def close(self) -> None:
        self.sock.close()


def start_daemon(argv: list[str], notify: Path, state: Path, watchdog_usec: int) -> subprocess.Popen[str]:
    # What systemd puts in the environment of a Type=notify service with WatchdogSec= and StateDirectory=.
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify),
        "WATCHDOG_USEC": str(watchdog_usec),
        "STATE_DIRECTORY": str(state),
    }
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str]) -> tuple[int, float]:
    """SIGTERM as `systemctl stop` sends it; the exit status and how long the exit took."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the daemon ignored SIGTERM for 10 s") from None
    return code, time.monotonic() - t0


def test_ready_watchdog_and_stopping_on_sigterm(tmp_path: Path, daemon_config: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    usec = 1_000_000  # a ping every 0.5 s: slack for a loaded test machine
    argv = [sys.executable, "-m", "serenbox", "run", "--config", str(daemon_config)]
    proc = start_daemon(argv, notify.path, tmp_path, usec)
    try:
        ready = notify.wait_for("READY=1", timeout=60)
        pings = [t for t, m in notify.drain(3.0) if m == "WATCHDOG=1"]
        code, took = stop(proc)
        notify.drain(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    messages = [m for _, m in notify.got]
    assert all(t > ready for t in pings)
    # 3 s at one ping per 0.5 s, and never a gap that would trip the watchdog.
    assert len(pings) >= 4, messages
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < usec / 1e6, gaps
    assert messages[-1] == "STOPPING=1"
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    assert took < 5.0


def test_a_stuck_loop_stops_the_watchdog_pings(
    tmp_path: Path, daemon_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A camera read that never returns (a driver stuck in an ioctl): the loop hangs after 10 frames.
    script = tmp_path / "stuck_daemon.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, threading
            import serenbox.device.cameras as cameras
            from serenbox.device.cli import main

            real_open_source = cameras.open_source

            class StuckCamera:
                def __init__(self, inner):
                    self.inner, self.frames = inner, 0
                def __getattr__(self, name):
                    return getattr(self.inner, name)
                def read(self):
                    self.frames += 1
                    if self.frames > 10:
                        print("camera stuck", file=sys.stderr, flush=True)
                        open(os.environ["STUCK_MARKER"], "w").close()
                        threading.Event().wait()
                    return self.inner.read()

            cameras.open_source = lambda spec, cfg: StuckCamera(real_open_source(spec, cfg))
            sys.exit(main(sys.argv[1:]))
            """
        )
    )
    notify = NotifySocket(tmp_path / "notify")
    argv = [sys.executable, str(script), "run", "--config", str(daemon_config)]
    marker = tmp_path / "stuck"
    monkeypatch.setenv("STUCK_MARKER", str(marker))  # the camera touches it when it hangs
    proc = start_daemon(argv, notify.path, tmp_path, 400_000)  # a ping every 0.2 s while it runs
    try:
        notify.wait_for("READY=1", timeout=60)
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            notify.drain(0.1)
        before = [m for _, m in notify.got if m == "WATCHDOG=1"]
        notify.drain(0.2)  # whatever was sent before the hang and still sits in the socket
        after = [m for _, m in notify.drain(1.5) if m == "WATCHDOG=1"]
        alive = proc.poll() is None
        code, took = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "camera stuck" in stderr
    assert before, "no pings before the camera got stuck"
    assert alive  # the process lives on: only the watchdog can tell it hangs
    assert after == []  # 1.5 s = 7 ping intervals without a ping: systemd would restart it
    # Even stuck, it leaves within systemd's stop timeout (the daemon's own deadline, exit 1).
    assert took < STOP_DEADLINE_S + 1.5
    assert code == 1
