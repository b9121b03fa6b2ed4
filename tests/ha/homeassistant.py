"""Home Assistant core as a process in a systemd-nspawn root, and a small client for its APIs.

The root (Debian trixie) and Home Assistant's venv are built by systemd/ha_check.sh; here HA is
started on a fresh configuration directory, its owner is created through the onboarding API (no
browser), and the REST and websocket APIs are called with the owner's access token.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import requests
from websockets.sync.client import ClientConnection, connect

HOST = "127.0.0.1"  # HA's HTTP server binds here only
CLIENT_ID = f"http://{HOST}/"  # onboarding wants an IndieAuth client id; any URL of ours will do
OWNER = {"name": "SerenBox check", "username": "check", "password": "serenbox-ha-check", "language": "en"}


def configuration(port: int) -> str:
    """A minimal configuration.yaml: no default_config (it pulls in dozens of integrations), just
    the APIs the check calls; MQTT comes as a config entry, its platforms with it."""
    return f"""\
homeassistant:
  name: SerenBox check
  time_zone: UTC
  country: DE
  unit_system: metric
  latitude: 0
  longitude: 0
  elevation: 0
http:
  server_host: {HOST}
  server_port: {port}
api:
config:
onboarding:
websocket_api:
logger:
  default: warning
  logs:
    homeassistant.components.mqtt: info
"""


class PortTaken(RuntimeError):
    """Another process took the HTTP port between choosing it and Home Assistant binding it."""


def http_port() -> int:
    """A free port below the kernel's ephemeral range, where no outgoing connection can take it
    while Home Assistant starts (seconds later)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(20000, min(low, 32768)), 200):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for Home Assistant's HTTP server")


class HomeAssistant:
    """`hass --skip-pip` in `root` (read-only) with `venv` at /opt/ha and `config_dir` at /config."""

    def __init__(self, root: Path, venv: Path, config_dir: Path, port: int, machine: str) -> None:
        self.root, self.venv, self.config_dir, self.port, self.machine = root, venv, config_dir, port, machine
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.config_dir / "home-assistant.log"

    def start(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "configuration.yaml").write_text(configuration(self.port))
        console = (self.config_dir.parent / "nspawn-console.log").open("wb")
        # The host's network (no --private-network): HA reaches the broker on 127.0.0.1 and the
        # check reaches HA there. --kill-signal: HA shuts down cleanly when nspawn gets SIGTERM.
        cmd = [
            "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", f"--machine={self.machine}",
            "-D", str(self.root), "--read-only", "--tmpfs=/tmp", "--resolv-conf=off", "--timezone=off",
            "--link-journal=no", "--kill-signal=SIGTERM", f"--bind-ro={self.venv}:/opt/ha",
            f"--bind={self.config_dir}:/config", "--setenv=HOME=/tmp",
            "/opt/ha/bin/python", "-m", "homeassistant", "--skip-pip", "--config", "/config",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        console.close()

    def wait_ready(self, timeout: float) -> float:
        """Seconds until the onboarding API answers; PortTaken if another process bound the port
        first, RuntimeError if HA exits or times out."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"Home Assistant exited at start: {self.tail()}")
            current = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            if "Failed to create HTTP server" in current:
                raise PortTaken(f"Home Assistant could not bind {HOST}:{self.port}: {self.tail(1)}")
            try:
                if requests.get(f"{self.base}/api/onboarding", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except requests.ConnectionError:
                pass
            time.sleep(1)
        raise RuntimeError(f"Home Assistant did not answer within {timeout:.0f} s: {self.tail()}")

    def onboard(self) -> None:
        """Create the owner (onboarding's first step) and trade its auth code for an access token."""
        r = requests.post(f"{self.base}/api/onboarding/users", json={**OWNER, "client_id": CLIENT_ID}, timeout=60)
        r.raise_for_status()
        r = requests.post(
            f"{self.base}/auth/token",
            data={"grant_type": "authorization_code", "code": r.json()["auth_code"], "client_id": CLIENT_ID},
            timeout=60,
        )
        r.raise_for_status()
        self.token = r.json()["access_token"]

    # --- REST --------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str) -> Any:
        r = requests.get(f"{self.base}{path}", headers=self._headers(), timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        r = requests.post(f"{self.base}{path}", headers=self._headers(), json=body, timeout=60)
        r.raise_for_status()
        return r.json()

    def state(self, entity_id: str) -> dict[str, Any] | None:
        r = requests.get(f"{self.base}/api/states/{entity_id}", headers=self._headers(), timeout=30)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    def add_mqtt(self, broker: str, port: int, username: str, password: str) -> dict[str, Any]:
        """The MQTT integration through its config flow, as the UI does it; the flow's last answer."""
        flow = self.post("/api/config/config_entries/flow", {"handler": "mqtt", "show_advanced_options": False})
        if flow.get("type") != "form" or flow.get("step_id") != "broker":
            raise RuntimeError(f"the MQTT config flow did not ask for the broker: {flow}")
        body = {"broker": broker, "port": port, "username": username, "password": password}
        return self.post(f"/api/config/config_entries/flow/{flow['flow_id']}", body)

    # --- websocket ---------------------------------------------------------------------------

    def ws(self, command: str, **fields: Any) -> Any:
        """One websocket command's result (the registries have no REST API)."""
        if self._ws is None:
            self._ws = connect(f"ws://{HOST}:{self.port}/api/websocket", open_timeout=30, max_size=None)
            hello = json.loads(self._ws.recv(timeout=30))
            if hello.get("type") != "auth_required":
                raise RuntimeError(f"unexpected websocket greeting: {hello}")
            self._ws.send(json.dumps({"type": "auth", "access_token": self.token}))
            answer = json.loads(self._ws.recv(timeout=30))
            if answer.get("type") != "auth_ok":
                raise RuntimeError(f"websocket authentication failed: {answer}")
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "type": command, **fields}))
        while True:
            msg = json.loads(self._ws.recv(timeout=60))
            if msg.get("id") == msg_id and msg.get("type") == "result":
                if not msg.get("success"):
                    raise RuntimeError(f"{command} failed: {msg.get('error')}")
                return msg["result"]

    def sockets(self) -> list[tuple[str, str]]:
        """(protocol, local address) of every socket Home Assistant's processes listen on, from `ss`."""
        assert self.proc is not None
        pids = {str(p) for p in descendants(self.proc.pid)}
        out = subprocess.run(["ss", "-lntupH"], capture_output=True, text=True, timeout=30, check=True).stdout
        return [
            (line.split()[0], line.split()[4])
            for line in out.splitlines()
            if set(re.findall(r"pid=(\d+),", line)) & pids
        ]

    def interfaces(self) -> list[str]:
        """The network interfaces Home Assistant sees (its network namespace's)."""
        assert self.proc is not None
        pid = descendants(self.proc.pid)[-1]
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
        return [line.split(":")[0].strip() for line in lines]

    # --- logs and shutdown -------------------------------------------------------------------

    def log(self) -> str:
        """The whole log: Home Assistant moves the last start's log to `.1` when it starts again."""
        parts = (self.log_path.with_name(self.log_path.name + ".1"), self.log_path)
        return "".join(p.read_text(errors="replace") for p in parts if p.exists())

    def tail(self, lines: int = 15) -> str:
        console = self.config_dir.parent / "nspawn-console.log"
        text = console.read_text(errors="replace") if console.exists() else ""
        return "\n".join((text + self.log()).splitlines()[-lines:])

    def stop(self, timeout: float = 60) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Killing the container's PID 1 kills its whole PID namespace; then nspawn exits.
                for pid in descendants(self.proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
