"""A real mosquitto broker for tests: free loopback port, generated config, stop/restart on the same port.

    broker = Mosquitto(tmp_path, users={"serenbox": "pw"}, tls=True).start()
    broker.stop(); broker.start()   # same port, nothing kept unless persistent=True

Also `Watcher`, a paho subscriber that records every message it receives.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

HOST = "127.0.0.1"


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_tls_files(d: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, signed by it (openssl)."""
    d.mkdir(parents=True, exist_ok=True)
    f = {k: d / f"{k}.pem" for k in ("ca_key", "ca", "server_key", "server_csr", "server")}
    ext = d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")

    def ssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=SerenBox test CA",
        "-keyout", f["ca_key"], "-out", f["ca"])  # fmt: skip
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", f["server_key"],
        "-out", f["server_csr"])  # fmt: skip
    ssl("x509", "-req", "-in", f["server_csr"], "-CA", f["ca"], "-CAkey", f["ca_key"], "-CAcreateserial",
        "-days", "2", "-extfile", ext, "-out", f["server"])  # fmt: skip
    # A client certificate from the same CA, for brokers that require one (mutual TLS).
    f |= {k: d / f"{k}.pem" for k in ("client_key", "client_csr", "client")}
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=serenbox-client", "-keyout", f["client_key"],
        "-out", f["client_csr"])  # fmt: skip
    ssl("x509", "-req", "-in", f["client_csr"], "-CA", f["ca"], "-CAkey", f["ca_key"], "-CAcreateserial",
        "-days", "2", "-out", f["client"])  # fmt: skip
    return f


class Mosquitto:
    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        tls: bool = False,
        require_client_cert: bool = False,
        persistent: bool = False,
        port: int | None = None,
        acl: str | None = None,
    ) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port or free_port()
        self.users = dict(users or {})
        self.persistent = persistent
        self.acl = acl  # the text of a mosquitto acl_file, e.g. docs/mqtt.md's
        self.require_client_cert = require_client_cert
        self.tls_files = make_tls_files(self.dir / "tls") if tls else None
        self.log_path = self.dir / "mosquitto.log"
        self.conf_path = self.dir / "mosquitto.conf"
        self.proc: subprocess.Popen | None = None

    @property
    def ca_file(self) -> Path:
        assert self.tls_files is not None
        return self.tls_files["ca"]

    def _write_config(self) -> None:
        lines = [f"listener {self.port} {self.host}"]
        if self.tls_files:
            lines += [
                f"cafile {self.tls_files['ca']}",
                f"certfile {self.tls_files['server']}",
                f"keyfile {self.tls_files['server_key']}",
            ]
            if self.require_client_cert:
                lines.append("require_certificate true")
        if self.users:
            pwfile = self.dir / "passwd"
            pwfile.write_text("")
            for user, pw in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, pw], check=True, capture_output=True)
            pwfile.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl_path = self.dir / "acl"
            acl_path.write_text(self.acl)
            lines.append(f"acl_file {acl_path}")
        lines += [
            f"persistence {'true' if self.persistent else 'false'}",
            f"persistence_location {self.dir}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_queued_messages 1000000",
            "max_inflight_messages 100",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto drops to `mosquitto`, who cannot read tmp files
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        assert self.proc is None, "already running"
        self._write_config()
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start: {err}{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    dup: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Watcher:
    """A subscriber that records messages; reconnects by itself.

    `persistent=True` (with a broker started `persistent=True`) keeps the subscription and queues
    messages across a broker restart, so nothing published while the watcher is away is missed.
    """

    broker: Mosquitto
    topics: list[str]
    username: str | None = None
    password: str | None = None
    persistent: bool = False
    client_id: str = "serenbox-test-watcher"
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=not self.persistent,
        )
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.broker.tls_files:
            f = self.broker.tls_files
            client_cert = (str(f["client"]), str(f["client_key"])) if self.broker.require_client_cert else (None, None)
            c.tls_set(ca_certs=str(self.broker.ca_file), certfile=client_cert[0], keyfile=client_cert[1])
        c.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: self._subscribed.set()
        self.client = c

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), bool(msg.dup)))

    def start(self, timeout: float = 10.0) -> Watcher:
        self.client.connect(self.broker.host, self.broker.port, keepalive=60)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError("watcher did not subscribe")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, suffix: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(self, predicate: Any, timeout: float = 20.0, what: str = "messages") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def __enter__(self) -> Watcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def retained(broker: Mosquitto, topic: str, timeout: float = 5.0, **auth: Any) -> bytes | None:
    """The retained payload on `topic` now (None if nothing is retained)."""
    got: list[bytes] = []
    marker = f"serenbox-test/marker/{os.getpid()}/{time.monotonic_ns()}"
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if auth.get("username"):
        c.username_pw_set(auth["username"], auth.get("password"))
    if broker.tls_files:
        c.tls_set(ca_certs=str(broker.ca_file))

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == marker:
            done.set()
        elif msg.retain:
            got.append(msg.payload)

    c.on_message = on_message
    c.connect(broker.host, broker.port)
    c.loop_start()
    # The broker answers in order on one connection: retained messages for the first subscription
    # are delivered before our own marker comes back.
    c.subscribe(topic, qos=1)
    c.subscribe(marker, qos=1)
    c.publish(marker, b"x", qos=1)
    ok = done.wait(timeout)
    c.disconnect()
    c.loop_stop()
    if not ok:
        raise TimeoutError(f"no answer from the broker on {marker}")
    return got[-1] if got else None


def read_packet(conn: socket.socket) -> bytes:
    """One whole MQTT packet from `conn`; OSError when it closes."""
    head = conn.recv(1)
    length, shift, raw = 0, 0, bytearray(head)
    while True:  # MQTT's variable-length "remaining length"
        b = conn.recv(1)
        if not b:
            raise OSError("closed")
        raw += b
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise OSError("closed")
        body += chunk
    return bytes(raw) + body


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy `src` to `dst` until `src` ends, then end `dst`'s sending side (a relay's one direction)."""
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class Mqtt311OnlyGateway:
    """A loopback TCP relay in front of a real broker that answers an MQTT 5 CONNECT the way a
    3.1.1-only broker (mosquitto < 1.6, many embedded brokers) does: CONNACK "unacceptable protocol
    version" and close. Anything else is relayed byte for byte, so the session is the real broker's.
    """

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.host = HOST
        self._server = socket.create_server((HOST, 0))
        self.port = self._server.getsockname()[1]
        self.refused_v5 = 0
        self.relayed = 0
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            first = read_packet(conn)
            # CONNECT: fixed header, remaining length, protocol name (2-byte length + "MQTT"), level.
            i = 1
            while first[i] & 0x80:
                i += 1
            name_len = int.from_bytes(first[i + 1 : i + 3], "big")
            level = first[i + 3 + name_len]
            if level == 5:
                self.refused_v5 += 1
                conn.sendall(b"\x20\x02\x00\x01")  # 3.1.1 CONNACK: unacceptable protocol version
                return
            self.relayed += 1
            upstream = socket.create_connection((self.broker.host, self.broker.port))
            with upstream:
                upstream.sendall(first)
                t = threading.Thread(target=pipe, args=(upstream, conn), daemon=True)
                t.start()
                pipe(conn, upstream)
                t.join(timeout=5)

    def close(self) -> None:
        self._closing = True
        self._server.close()
