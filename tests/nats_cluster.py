"""A real 3-node NATS cluster with JetStream and the MQTT gateway, on loopback, for tests and benchmarks.

    cluster = NatsCluster(tmp_path).start()      # waits until MQTT answers on every node
    cluster.kill(1); cluster.restart(1)          # same ports, same store: the node rejoins
    cluster.mqtt_hosts()                         # ["127.0.0.1:port", ...] for mqtt.hosts
    cluster.stop()

Each node has its own free client, cluster and MQTT port and its own JetStream store directory;
the MQTT streams are replicated on all three nodes, so a QoS 1 message survives one node's death.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import nats
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

HOST = "127.0.0.1"
# A fresh cluster elects its JetStream meta leader and creates the MQTT streams in about 10 s here.
READY_TIMEOUT_S = 60.0
# A CONNECT waits for JetStream (the session record) up to the gateway's 4 s request timeout: on a
# loaded cluster (1 000 boxes reconnecting to a restarted node) a 2 s probe never saw it ready.
PROBE_TIMEOUT_S = 6.0
MQTT_STREAMS = ("$MQTT_msgs", "$MQTT_sess", "$MQTT_rmsgs")  # what the gateway keeps in JetStream


def nats_binary() -> str | None:
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if Path(p).exists()), None
    )


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _free_ports(n: int) -> list[int]:
    """Free loopback ports below the kernel's ephemeral range.

    A killed node is restarted on its ports; with hundreds of clients reconnecting meanwhile, a
    port from the ephemeral range can be taken as some client's local port and the restart fails.
    """
    low, _ = _ephemeral_range()
    lo = 10_000 if low > 12_000 else 1024
    hi = low if low > 12_000 else 65_535
    chosen: list[int] = []
    for port in random.sample(range(lo, hi), min(hi - lo, 2000)):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == n:
            return chosen
    raise RuntimeError(f"no {n} free loopback ports between {lo} and {hi}")


class NatsNode:
    def __init__(self, cluster: NatsCluster, index: int, ports: list[int]) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"n{index + 1}"
        self.client_port, self.cluster_port, self.mqtt_port = ports
        self.dir = cluster.dir / self.name
        self.store = self.dir / "js"
        self.conf = self.dir / "nats.conf"
        self.log_path = self.dir / "nats.log"
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://{HOST}:{n.cluster_port}" for n in self.cluster.nodes if n is not self)
        self.conf.write_text(
            f"""server_name: {self.name}
listen: {HOST}:{self.client_port}
jetstream {{ store_dir: "{self.store}" }}
cluster {{
  name: serenbox-test
  listen: {HOST}:{self.cluster_port}
  routes: [{routes}]
}}
mqtt {{
  listen: {HOST}:{self.mqtt_port}
  # How long the gateway waits for JetStream (stores, replicas) before it gives up on a request.
  ack_wait: "30s"
  stream_replicas: {len(self.cluster.nodes)}
}}
"""
        )

    def start(self) -> None:
        assert self.proc is None, f"{self.name} is already running"
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.cluster.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def mqtt_ready(self, timeout: float = PROBE_TIMEOUT_S) -> bool:
        """True when an MQTT 3.1.1 client with a persistent session is accepted (JetStream is up)."""
        ok: list[bool] = []
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"ready-{self.name}", protocol=mqtt.MQTTv311, clean_session=True
        )
        c.on_connect = lambda _c, _u, _f, reason, _p: ok.append(not reason.is_failure)
        try:
            c.connect(HOST, self.mqtt_port, keepalive=10)
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        while not ok and time.monotonic() < deadline:
            c.loop(timeout=0.1)
        with contextlib.suppress(Exception):
            c.disconnect()
        return bool(ok and ok[0])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class NatsCluster:
    def __init__(self, workdir: Path, size: int = 3) -> None:
        binary = nats_binary()
        if binary is None:
            raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
        self.binary = binary
        self.dir = Path(workdir)
        self.host = HOST
        ports = _free_ports(3 * size)
        self.nodes: list[NatsNode] = []
        for i in range(size):
            self.nodes.append(NatsNode(self, i, ports[3 * i : 3 * i + 3]))

    def start(self, timeout: float = READY_TIMEOUT_S) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout=timeout)
        return self

    def streams_healthy(self) -> bool:
        """True when each MQTT stream has a leader and every other node's replica is current.

        A restarted node accepts clients before it has caught up; killing another node then would
        leave a stream without a quorum, which no client can work around (docs/fleet.md)."""

        async def check() -> bool:
            async def quiet(_e: Exception) -> None:
                return None

            urls = [f"nats://{HOST}:{n.client_port}" for n in self.nodes if n.running]
            nc = await nats.connect(servers=urls, connect_timeout=2, allow_reconnect=False, error_cb=quiet)
            try:
                js = nc.jetstream(timeout=2)
                for name in MQTT_STREAMS:
                    cluster = (await js.stream_info(name)).cluster
                    replicas = (cluster.replicas or []) if cluster else []
                    if not cluster or not cluster.leader or len(replicas) != len(self.nodes) - 1:
                        return False
                    if not all(r.current and not r.offline for r in replicas):
                        return False
                return True
            finally:
                await nc.close()

        try:
            return asyncio.run(check())
        except Exception:  # no leader yet, a node still starting: not healthy
            return False

    def wait_ready(self, nodes: list[int] | None = None, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds until every named node (default: every running one) accepts MQTT clients and,
        with the whole cluster up, every MQTT stream is replicated on all nodes again."""
        started = time.monotonic()
        waiting = [self.nodes[i] for i in nodes] if nodes is not None else [n for n in self.nodes if n.proc]
        while waiting:
            for node in list(waiting):
                if not node.running:
                    code = node.proc.returncode if node.proc else None
                    raise RuntimeError(f"nats-server {node.name} exited ({code}):\n{node.log()[-3000:]}")
                if node.mqtt_ready():
                    waiting.remove(node)
            if waiting and time.monotonic() - started > timeout:
                names = ", ".join(n.name for n in waiting)
                tail = waiting[0].log()[-3000:]
                raise RuntimeError(f"NATS nodes {names} not ready for MQTT within {timeout} s:\n{tail}")
            if waiting:
                time.sleep(0.2)
        while all(n.running for n in self.nodes) and not self.streams_healthy():
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"NATS streams not replicated on every node within {timeout} s")
            time.sleep(0.2)
        return time.monotonic() - started

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        self.nodes[index].kill(sig)

    def restart(self, index: int, wait: bool = True) -> None:
        node = self.nodes[index]
        node.kill()
        node.start()
        if wait:
            self.wait_ready([index])

    def mqtt_hosts(self) -> list[str]:
        return [f"{HOST}:{n.mqtt_port}" for n in self.nodes]

    def nats_urls(self) -> list[str]:
        return [f"nats://{HOST}:{n.client_port}" for n in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.kill(signal.SIGTERM)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
