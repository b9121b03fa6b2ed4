"""The fleet path: `mqtt.hosts` failover, NATS consumer groups, a small fleet through node kills.

Real brokers only: a 3-node nats-server cluster on loopback (tests/nats_cluster.py, shared by the
module and restored after each test) and mosquitto (tests/mosquitto.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from serenbox.device.config import ConfigError, from_dict
from serenbox.device.sinks.mqtt import MqttSink

from tests.mosquitto import Mosquitto, Watcher, mosquitto_binary, pipe, read_packet, retained

pytest.importorskip("nats", reason="the fleet extra (nats-py) is not installed")
from serenbox.nats_group import NatsGroup
from tests.nats_cluster import NatsCluster, nats_binary

ROOT = Path(__file__).resolve().parents[1]
needs_nats = pytest.mark.skipif(nats_binary() is None, reason="nats-server is not installed")
needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


def config(tmp: Path, device: str, hosts: list[str], **mqtt: Any) -> Any:
    m = {"hosts": hosts, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "keepalive": 5, **mqtt}
    return from_dict({"device_id": device, "state_dir": str(tmp / device), "mqtt": m}, env={})


def event(device: str, seq: int) -> dict[str, Any]:
    return {"schema": "serenbox.event/1", "id": str(uuid.uuid4()), "type": "new", "device_id": device, "seq": seq}


def wait(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def node_of(sink: MqttSink, hosts: list[str]) -> int:
    return hosts.index(sink.counters()["mqtt_node"])


def collect(group: NatsGroup, want: set[str], timeout: float) -> list[dict[str, Any]]:
    """Events from `group` until every id in `want` has come (or `timeout`)."""
    got: list[dict[str, Any]] = []
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    for e in group.events(idle_timeout_s=timeout):
        got.append(e)
        seen.add(e["id"])
        if want <= seen or time.monotonic() > deadline:
            break
    return got


def check_per_box_order(got: list[dict[str, Any]]) -> None:
    last: dict[str, int] = {}
    for e in got:
        assert e["seq"] > last.get(e["device_id"], 0), f"{e['device_id']}: seq {e['seq']} after {last[e['device_id']]}"
        last[e["device_id"]] = e["seq"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if nats_binary() is None:
        pytest.skip("nats-server is not installed")
    c = NatsCluster(tmp_path_factory.mktemp("nats")).start()
    yield c
    c.stop()


@pytest.fixture
def healthy(cluster: NatsCluster):
    """The cluster with every node up, before and after the test (a test may kill nodes)."""
    for i, node in enumerate(cluster.nodes):
        if not node.running:
            cluster.restart(i)
    yield cluster
    for i, node in enumerate(cluster.nodes):
        if not node.running:
            cluster.restart(i)


@pytest.mark.parametrize(
    ("hosts", "host", "message"),
    [
        ("a:1", None, "mqtt.hosts: expected a list"),
        (["a:1"], "b", "set either mqtt.host (one broker) or mqtt.hosts"),
        (["a:99999"], None, "mqtt.hosts[0]: port 99999 is out of range"),
        (["ok:1", "a b"], None, "mqtt.hosts[1]: 'a b' is not host:port"),
        (["::1"], None, "mqtt.hosts[0]: '::1' is not host:port (an IPv6 address goes in brackets"),
        (["a:1", "a:1"], None, "mqtt.hosts: the same node is listed twice"),
        ([f"n{i}:1" for i in range(33)], None, "mqtt.hosts: more than 32 entries"),
    ],
)
def test_bad_mqtt_hosts_are_refused_naming_the_key(hosts: Any, host: str | None, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict({"mqtt": {"hosts": hosts, "host": host}}, env={})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_mqtt_hosts_parse_to_nodes_with_the_default_port() -> None:
    cfg = from_dict({"mqtt": {"hosts": ["n1.example:1884", "[fd00::2]:8883", "n3"], "port": 1999}}, env={})
    assert cfg.mqtt.nodes() == [("n1.example", 1884), ("fd00::2", 8883), ("n3", 1999)]
    assert from_dict({"mqtt": {"host": "one"}}, env={}).mqtt.nodes() == [("one", 1883)]
    assert from_dict({}, env={}).mqtt.nodes() == []


@needs_nats
def test_box_fails_over_to_the_next_node_and_comes_back(healthy: NatsCluster, tmp_path: Path) -> None:
    cluster = healthy
    hosts = cluster.mqtt_hosts()[:2]  # two nodes: the way back can only be the first one
    with NatsGroup(cluster.nats_urls(), "failover", ack_wait_s=2) as group:
        started = time.monotonic()
        sink = MqttSink(config(tmp_path, "box-a", hosts))  # protocol auto: MQTT 5 first
        sink.start()
        try:
            wait(lambda: sink.counters()["mqtt_connected"], what="first connection")
            # NATS refuses MQTT 5; the fallback to 3.1.1 is one round trip, not a reconnect backoff.
            assert time.monotonic() - started < 5.0
            sent = [event("box-a", i) for i in range(1, 31)]
            for e in sent[:10]:
                sink.emit(e)
            first = node_of(sink, hosts)
            wait(lambda: sink.counters()["spool_depth"] == 0, what="first events acknowledged")

            cluster.kill(first)
            for e in sent[10:20]:
                sink.emit(e)  # spooled while the box finds the other node
            wait(lambda: sink.counters()["mqtt_connected"] and node_of(sink, hosts) != first, what="failover")
            wait(lambda: sink.counters()["spool_depth"] == 0, what="spool drained on the second node")

            cluster.restart(first)
            cluster.kill(1 - first)
            for e in sent[20:]:
                sink.emit(e)
            wait(lambda: sink.counters()["mqtt_connected"] and node_of(sink, hosts) == first, what="way back")
            wait(lambda: sink.counters()["spool_depth"] == 0, what="spool drained back on the first node")
            assert sink.counters()["mqtt_failovers"] >= 2
        finally:
            sink.close()
        got = collect(group, {e["id"] for e in sent}, timeout=30)
    assert {e["id"] for e in got} == {e["id"] for e in sent}  # nothing lost
    check_per_box_order(got)  # nothing reordered (duplicates were dropped by id)


@needs_mosquitto
def test_failover_between_two_mosquittos_and_back(tmp_path: Path) -> None:
    a = Mosquitto(tmp_path / "a").start()
    b = Mosquitto(tmp_path / "b").start()
    hosts = [f"{a.host}:{a.port}", f"{b.host}:{b.port}"]
    wa, wb = Watcher(a, ["serenbox/box-m/events"]).start(), Watcher(b, ["serenbox/box-m/events"]).start()
    sink = MqttSink(config(tmp_path, "box-m", hosts))
    sink.start()
    try:
        wait(lambda: sink.counters()["mqtt_connected"], what="connection")
        brokers = [a, b]
        first = node_of(sink, hosts)
        sent = [event("box-m", i) for i in range(1, 31)]
        for e in sent[:10]:
            sink.emit(e)
        wait(lambda: sink.counters()["spool_depth"] == 0, what="first events acknowledged")
        brokers[first].stop()
        for e in sent[10:20]:
            sink.emit(e)
        wait(lambda: sink.counters()["mqtt_connected"] and node_of(sink, hosts) != first, what="failover")
        wait(lambda: sink.counters()["spool_depth"] == 0, what="spool drained")
        brokers[first].start()
        back = wa if first == 0 else wb
        wait(back.client.is_connected, what="the watcher back on the restarted broker")
        time.sleep(0.5)  # and subscribed again
        brokers[1 - first].stop()
        for e in sent[20:]:
            sink.emit(e)
        wait(lambda: sink.counters()["mqtt_connected"] and node_of(sink, hosts) == first, what="way back")
        wait(lambda: sink.counters()["spool_depth"] == 0, what="spool drained back")
    finally:
        sink.close()
        for w in (wa, wb):
            w.stop()
        a.stop()
        b.stop()
    got = [json.loads(m.payload) for m in wa.messages + wb.messages]
    assert {e["id"] for e in got} == {e["id"] for e in sent}
    for w in (wa, wb):  # each broker saw its share in order
        check_per_box_order([json.loads(m.payload) for m in w.messages])


@needs_mosquitto
def test_a_late_last_will_is_answered_with_online(tmp_path: Path) -> None:
    # What a node the box left behind does when it notices late: publishes the Last Will, retained.
    with Mosquitto(tmp_path / "broker") as broker:
        sink = MqttSink(config(tmp_path, "box-w", [f"{broker.host}:{broker.port}"]))
        sink.start()
        try:
            wait(lambda: sink.counters()["mqtt_connected"], what="connection")
            with Watcher(broker, ["serenbox/box-w/availability"], client_id="stale-node") as w:
                w.client.publish("serenbox/box-w/availability", "offline", qos=1, retain=True)

                def answered() -> bool:
                    said = [m.payload for m in w.messages]
                    return b"offline" in said and b"online" in said[said.index(b"offline") :]

                w.wait_for(answered, what="online after the stale offline")
            assert retained(broker, "serenbox/box-w/availability") == b"online"
        finally:
            sink.close()
        assert retained(broker, "serenbox/box-w/availability") == b"offline"  # a clean stop still says so


class Relay:
    """Loopback relays (one per "node") in front of one real broker, each connection relayed
    through `_serve`, which subclasses give a fault; `connections` counts every connection made."""

    def __init__(self, broker: Mosquitto, nodes: int = 1) -> None:
        self.broker = broker
        self._servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(nodes)]
        self.connections = 0
        for server in self._servers:
            threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in self._servers]

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections == 1), daemon=True).start()

    def _serve(self, conn: socket.socket, first: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for server in self._servers:
            server.close()


class AckEater(Relay):
    """Swallows every PUBACK on its first connection (pings still answered): a broker that took
    the events and never acknowledges."""

    swallowed = 0

    def _serve(self, conn: socket.socket, first: bool) -> None:
        with contextlib.suppress(OSError), conn, socket.create_connection((self.broker.host, self.broker.port)) as up:
            threading.Thread(target=pipe, args=(conn, up), daemon=True).start()  # box -> broker
            while packet := read_packet(up):
                if first and packet[0] >> 4 == 4:  # PUBACK
                    self.swallowed += 1
                    continue
                conn.sendall(packet)


class StoreDropper(Relay):
    """Two nodes. On the first connection the first event PUBLISH is dropped before the broker
    sees it, and everything after it goes through: a NATS gateway that gave up on one store
    (`timeout for request type "MS"`) and stored the next ones of the same connection."""

    dropped = 0

    def __init__(self, broker: Mosquitto) -> None:
        super().__init__(broker, nodes=2)

    def _serve(self, conn: socket.socket, first: bool) -> None:
        with contextlib.suppress(OSError), conn, socket.create_connection((self.broker.host, self.broker.port)) as up:
            threading.Thread(target=pipe, args=(up, conn), daemon=True).start()  # broker -> box
            while packet := read_packet(conn):
                if first and packet[0] >> 4 == 3 and b"/events" in packet[:200]:  # the first event PUBLISH
                    first = False
                    self.dropped += 1
                    continue
                up.sendall(packet)


def through_relay(
    tmp_path: Path, broker: Mosquitto, relay: Relay, device: str, drain_s: float
) -> tuple[list[str], list[str]]:
    """Ten events from a box behind `relay` (ack timeout 2 s), its spool drained within `drain_s`:
    (the ids sent, the ids the broker delivered, in arrival order)."""
    events = [event(device, i) for i in range(1, 11)]
    sent = [e["id"] for e in events]
    with Watcher(broker, [f"serenbox/{device}/events"]) as w:
        sink = MqttSink(config(tmp_path, device, relay.hosts(), ack_timeout_s=2))
        sink.start()
        try:
            wait(lambda: sink.counters()["mqtt_connected"], what="connection")
            for e in events:
                sink.emit(e)
            wait(lambda: sink.counters()["spool_depth"] == 0, timeout=drain_s, what="spool drained")
        finally:
            sink.close()
            relay.close()
        w.wait_for(lambda: set(sent) <= set(ids_of(w)), what="every event at the broker")
        return sent, ids_of(w)


def ids_of(w: Watcher) -> list[str]:
    return [json.loads(m.payload)["id"] for m in w.messages]


@needs_mosquitto
def test_a_broker_that_never_acknowledges_is_left_and_nothing_is_lost(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        relay = AckEater(broker)
        # Held without PUBACK on the first connection; dropped after 2 s, sent again on the next.
        through_relay(tmp_path, broker, relay, "box-s", drain_s=20)  # every event reached the broker
    assert relay.swallowed >= 1 and relay.connections >= 2


@needs_mosquitto
def test_a_node_that_gives_up_on_one_store_does_not_reorder_a_cluster_box(tmp_path: Path) -> None:
    # With 20 events in flight, the 9 after the dropped one reached consumers before it was resent
    # (1 of 27 000 out of order in bench_fleet at 300 boxes; 312 at 1 000). A cluster box sends one
    # at a time (mqtt.window), so a resent event always comes before the later ones.
    with Mosquitto(tmp_path / "broker") as broker:
        relay = StoreDropper(broker)
        sent, arrived = through_relay(tmp_path, broker, relay, "box-o", drain_s=30)
    assert relay.dropped == 1 and relay.connections >= 2
    assert list(dict.fromkeys(arrived)) == sent  # first arrivals, in order


def test_a_cluster_box_defaults_to_one_event_in_flight_and_a_short_ack_timeout(tmp_path: Path) -> None:
    one, many = config(tmp_path, "a", ["b1:1883"]).mqtt, config(tmp_path, "a", ["b1:1883", "b2:1883"]).mqtt
    assert (one.effective_window(), one.effective_ack_timeout_s()) == (20, 30.0)
    assert (many.effective_window(), many.effective_ack_timeout_s()) == (1, 5.0)
    set_ = config(tmp_path, "a", ["b1:1883", "b2:1883"], window=8, ack_timeout_s=12).mqtt
    assert (set_.effective_window(), set_.effective_ack_timeout_s()) == (8, 12.0)
    with pytest.raises(ConfigError, match=r"mqtt\.window"):
        config(tmp_path, "a", ["b1:1883"], window=0)


MEMBER = """
import sys
from serenbox.nats_group import NatsGroup
with NatsGroup(sys.argv[1].split(","), "members", ack_wait_s=2, batch=10) as group:
    for event in group.events(idle_timeout_s=20):
        print(event["id"], flush=True)
"""


@needs_nats
def test_a_group_member_dies_and_the_group_loses_nothing(healthy: NatsCluster, tmp_path: Path) -> None:
    cluster = healthy
    urls = ",".join(cluster.nats_urls())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sent = [event("box-g", i) for i in range(1, 201)]
    # Entering opens the durable consumer, so it exists before the box publishes.
    with NatsGroup(cluster.nats_urls(), "members", ack_wait_s=2, batch=10) as survivor:
        doomed = subprocess.Popen(
            [sys.executable, "-c", MEMBER, urls], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        try:
            sink = MqttSink(config(tmp_path, "box-g", cluster.mqtt_hosts()))
            sink.start()
            for e in sent:
                sink.emit(e)
            handled_by_doomed: list[str] = []
            assert doomed.stdout is not None
            while len(handled_by_doomed) < 20:  # it handles some, then dies holding a batch
                line = doomed.stdout.readline()
                assert line, "the member exited before handling 20 events"
                handled_by_doomed.append(line.split()[0])
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=10)
            # What it printed meanwhile (still in the pipe) it had handled too; it acknowledges an
            # event only after printing it, so everything acknowledged is in this list.
            handled_by_doomed += [line.split()[0] for line in doomed.stdout.read().splitlines() if line.strip()]
            wait(lambda: sink.counters()["spool_depth"] == 0, what="all events acknowledged by the cluster")
            sink.close()
            want = {e["id"] for e in sent} - set(handled_by_doomed)
            got = collect(survivor, want, timeout=30)
        finally:
            if doomed.poll() is None:
                doomed.kill()
                doomed.wait()
    assert want <= {e["id"] for e in got}  # what the dead member had not acknowledged came to the survivor
    assert len(got) == len({e["id"] for e in got})  # no duplicate within a member


@needs_nats
def test_twenty_boxes_through_two_node_kills_lose_nothing(healthy: NatsCluster, tmp_path: Path) -> None:
    cluster = healthy
    boxes = [f"box-{i:02d}" for i in range(20)]
    sinks = {b: MqttSink(config(tmp_path, b, cluster.mqtt_hosts())) for b in boxes}
    sent: dict[str, list[dict[str, Any]]] = {b: [] for b in boxes}
    stop = threading.Event()

    def produce() -> None:
        seq = 0
        while not stop.is_set() and seq < 200:  # 10 events/s per box, 20 s at most
            seq += 1
            for b, sink in sinks.items():
                e = event(b, seq)
                sent[b].append(e)
                sink.emit(e)
            time.sleep(0.1)

    with NatsGroup(cluster.nats_urls(), "fleet", ack_wait_s=2, batch=200) as group:
        for sink in sinks.values():
            sink.start()
        producer = threading.Thread(target=produce, daemon=True)
        try:
            wait(lambda: all(s.counters()["mqtt_connected"] for s in sinks.values()), what="all boxes connected")
            producer.start()
            for victim in (0, 1):
                time.sleep(2)
                cluster.kill(victim)
                time.sleep(2)
                cluster.restart(victim)
            stop.set()
            producer.join(timeout=10)
            wait(
                lambda: all(s.counters()["spool_depth"] == 0 for s in sinks.values()),
                timeout=60,
                what="every spool drained",
            )
            failovers = sum(s.counters()["mqtt_failovers"] for s in sinks.values())
        finally:
            stop.set()
            for sink in sinks.values():
                sink.close()
        want = {e["id"] for b in boxes for e in sent[b]}
        got = collect(group, want, timeout=60)
    assert len(want) >= 20 * 20
    assert want - {e["id"] for e in got} == set()  # 0 lost
    check_per_box_order(got)
    assert failovers >= 1  # the boxes on the killed nodes moved


@needs_nats
def test_serenbox_client_gives_a_nats_group_typed_events(healthy: NatsCluster, tmp_path: Path) -> None:
    # serenbox.client is where app developers look: the NATS group is there, with the same typed
    # events as connect() gives (serenbox.client.Event), in each box's order.
    import serenbox.client

    cluster = healthy
    sink = MqttSink(config(tmp_path, "box-t", cluster.mqtt_hosts()))
    sink.start()
    try:
        probabilities = dict.fromkeys(("angry", "disgust", "fear", "neutral", "sad", "surprise"), 0.02) | {
            "happy": 0.88
        }
        full = {"run_id": str(uuid.uuid4()), "track_id": 1, "timestamp": "2026-12-06T03:00:00.000Z", "emotion": "happy"}
        full |= {"confidence": 0.88, "probabilities": probabilities, "box": {"x": 0.1, "y": 0.1, "w": 0.2, "h": 0.3}}
        sent = [event("box-t", i) | full for i in range(1, 6)]
        with serenbox.client.nats_group(cluster.nats_urls(), "typed", ack_wait_s=2) as group:
            for e in sent:
                sink.emit(e)
            got = []
            for message in group.messages(idle_timeout_s=20):
                got.append(message)
                if len(got) == len(sent):
                    break
    finally:
        sink.close()
    assert all(isinstance(m, serenbox.client.Event) for m in got)
    assert [m.id for m in got] == [e["id"] for e in sent]
    assert {(m.device_id, m.topic, m.emotion) for m in got} == {("box-t", "serenbox/box-t/events", "happy")}


def test_nats_group_without_the_fleet_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import serenbox.client

    monkeypatch.setitem(sys.modules, "nats", None)  # as if nats-py were not installed
    monkeypatch.delitem(sys.modules, "serenbox.nats_group", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'serenbox\[fleet\]'"):
        serenbox.client.nats_group(["nats://127.0.0.1:4222"], "g")


@needs_nats
def test_two_load_generators_share_an_external_cluster(healthy: NatsCluster, tmp_path: Path) -> None:
    # bench_fleet against nodes it did not start (a production cluster, several load machines):
    # each generator counts its own boxes only, though its group reads every event.
    hosts, urls = ",".join(healthy.mqtt_hosts()), ",".join(healthy.nats_urls())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bench = [sys.executable, str(ROOT / "benchmarks/bench_fleet.py"), "--hosts", hosts, "--nats", urls]
    runs = [
        subprocess.Popen(
            [*bench, *f"--box-prefix {name} --group {name} --boxes {boxes} --duration 4 --workers 1".split()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for name, boxes in (("gen1", 5), ("gen2", 3))
    ]
    # The bench's own lines only: nats-py prints its event loop's teardown to stderr at exit.
    outs = ["\n".join(line for line in r.communicate(timeout=150)[0].splitlines() if line[:1].isalpha()) for r in runs]
    for out, boxes, r in zip(outs, (5, 3), runs, strict=True):
        assert r.returncode == 0, out[-3000:]
        assert "external cluster" in out and "killed node n" not in out
        sent = int(out.split("events sent: ")[1].split()[0])
        assert sent >= boxes * 3, out[-2000:]  # about one event per box per second, for 4 s
        assert f"received: {sent}  lost: 0  duplicated: 0  out of order: 0" in out, out[-2000:]
        assert f"per box: {boxes} boxes, 0 with a loss" in out, out[-2000:]


@needs_nats
def test_bench_fleet_refuses_half_an_external_cluster() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_fleet.py"), "--hosts", "127.0.0.1:1883"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--hosts and --nats go together" in out.stderr.strip().splitlines()[-1]


@needs_nats
def test_a_member_closes_at_once_and_its_acks_hold(
    healthy: NatsCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # close() used nats-py's drain(), which waits for the pull inbox to empty; the server's answer
    # to an expired fetch sits there unread, so about every other close waited out the 30 s drain
    # timeout and logged "draining connection timed out".
    sent = [event("box-c", i) for i in range(1, 31)]
    sink = MqttSink(config(tmp_path, "box-c", healthy.mqtt_hosts()))
    with NatsGroup(healthy.nats_urls(), "closers", ack_wait_s=2, batch=10):
        pass  # the durable consumer exists before the box publishes
    sink.start()
    for e in sent:
        sink.emit(e)
    wait(lambda: sink.counters()["spool_depth"] == 0, what="all events acknowledged by the cluster")
    sink.close()
    got: list[str] = []
    for _ in range(4):  # the hang came with an expired fetch: each round ends on one
        member = NatsGroup(healthy.nats_urls(), "closers", ack_wait_s=2, batch=10)
        # The module's cluster holds earlier tests' events too: this box's are the ones counted.
        got += [e["id"] for e in member.events(idle_timeout_s=1.0) if e.get("device_id") == "box-c"]
        started = time.monotonic()
        member.close()
        assert time.monotonic() - started < 10, "close() waited out the drain timeout"
    assert sorted(got) == sorted(e["id"] for e in sent)  # each once: what the first member acked stayed acked
    assert "drain" not in caplog.text


OPENED_TWICE = """
import sys
from serenbox.nats_group import NatsGroup
group = NatsGroup(sys.argv[1].split(","), "twice")
group.open()
with group:  # enters an open group: the same connection
    list(group.events(idle_timeout_s=1.0))
print("closed", flush=True)
"""


@needs_nats
def test_a_group_opened_then_entered_holds_one_connection_and_closes_it(healthy: NatsCluster) -> None:
    # open() then `with group:` made a second connection; the first was never closed, and its
    # tasks were torn down at exit ("Task was destroyed but it is pending!", "Event loop is closed").
    out = subprocess.run(
        [sys.executable, "-c", OPENED_TWICE, ",".join(healthy.nats_urls())],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0 and "closed" in out.stdout, out.stderr[-2000:]
    assert "destroyed but it is pending" not in out.stderr, out.stderr[-2000:]
    assert "Event loop is closed" not in out.stderr, out.stderr[-2000:]
