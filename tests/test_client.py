"""`serenbox.client` against a real mosquitto: typed messages, dedupe, resume, groups.

Events come from the real MQTT sink (device/sinks/mqtt.py, its spool and its reconnects) where
delivery is what is tested; hand-made payloads only where the payload itself is the point.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.publish as publish
import pytest
from serenbox.device.config import from_dict
from serenbox.device.sinks.mqtt import MqttSink

import serenbox.client as sc
from serenbox.client import Availability, CommandError, Dedupe, Event, State, Stats
from tests.mosquitto import Mosquitto, Mqtt311OnlyGateway, mosquitto_binary

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def wait(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def send(broker: Mosquitto, topic: str, payload: str | bytes, retain: bool = False) -> None:
    publish.single(topic, payload, qos=1, retain=retain, hostname=broker.host, port=broker.port)


def event(device: str, seq: int, run_id: str = "run-1", event_id: str | None = None) -> dict[str, Any]:
    return {
        "schema": "serenbox.event/1",
        "id": event_id or str(uuid.uuid4()),
        "type": "new",
        "device_id": device,
        "run_id": run_id,
        "seq": seq,
        "track_id": 1,
        "timestamp": "2026-11-25T10:00:00.419Z",
        "emotion": "happy",
        "confidence": 0.83,
        "probabilities": {"happy": 0.83, "neutral": 0.17},
        "box": {"x": 0.2, "y": 0.2, "w": 0.25, "h": 0.3333},
    }


def sink(broker: Mosquitto | Mqtt311OnlyGateway, tmp: Path, device: str = "box1") -> MqttSink:
    """The daemon's real MQTT sink, connected."""
    m = {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5}
    s = MqttSink(from_dict({"device_id": device, "state_dir": str(tmp / f"state-{device}"), "mqtt": m}, env={}))
    s.start()
    wait(lambda: s.counters()["mqtt_connected"], what="the sink's connection")
    return s


def doc_json(path: Path, after: str) -> dict[str, Any]:
    """The first ```json block after the line that starts with `after` in a docs page."""
    text = path.read_text()
    start = text.index("```json", text.index(after)) + len("```json")
    return json.loads(text[start : text.index("```", start)])


class Collector:
    """Reads a client on its own thread (a client is read from one thread) until stopped."""

    def __init__(self, client: sc.Client) -> None:
        self.client = client
        self.got: list[sc.Message] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self.client.messages(timeout=0.2):
                self.got.append(msg)
                if self._stop.is_set():
                    break

    def events(self) -> list[Event]:
        return [m for m in list(self.got) if isinstance(m, Event)]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()


# --- typed messages, dedupe, malformed, one box or all ---------------------------------------


def test_typed_messages_from_the_documented_payloads(tmp_path: Path) -> None:
    new = doc_json(DOCS / "events.md", "`new`: a person")
    end = doc_json(DOCS / "events.md", "`end`: the person left")
    state = doc_json(DOCS / "mqtt.md", "**state** (retained")
    stats = doc_json(DOCS / "mqtt.md", "**stats** (QoS 0")
    new_with_future_key = {**new, "gaze": "left"}
    with Mosquitto(tmp_path / "broker") as broker, sc.connect(broker.host, broker.port, device="livingroom") as c:
        send(broker, "serenbox/livingroom/events", json.dumps(new_with_future_key))
        send(broker, "serenbox/livingroom/events", json.dumps(end))
        send(broker, "serenbox/livingroom/state", json.dumps(state))
        send(broker, "serenbox/livingroom/stats", json.dumps(stats))
        send(broker, "serenbox/livingroom/availability", "offline")
        send(broker, "serenbox/livingroom/error", json.dumps({"error": "unknown command", "payload": "{}"}))
        got = list(c.messages(timeout=1.0))
    assert [type(m) for m in got] == [Event, Event, State, Stats, Availability, CommandError]
    e, e_end, s, st, a, err = got
    assert (e.id, e.type, e.run_id, e.seq, e.track_id) == (new["id"], "new", new["run_id"], 1, 3)
    assert e.timestamp.isoformat() == "2026-11-25T10:00:00.419000+00:00"
    assert (e.emotion, e.confidence, e.probabilities) == ("happy", 0.83, new["probabilities"])
    assert (e.box.x, e.box.y, e.box.w, e.box.h) == (0.2, 0.2, 0.25, 0.3333)
    assert e.duration_s is None and e.summary is None
    assert e.extra == {"gaze": "left"}  # a key this version does not know is kept, not an error
    assert json.loads(e.raw) == new_with_future_key and e.topic == "serenbox/livingroom/events"
    assert e_end.duration_s == 13.4 and e_end.summary.dominant == "neutral"
    assert e_end.summary.share == end["summary"]["share"] and e_end.extra == {}
    assert (s.device_id, s.faces, s.dominant, s.paused) == ("livingroom", 1, "happy", False)
    assert [(t.track_id, t.emotion, t.confidence) for t in s.tracks] == [(3, "happy", 0.83)]
    assert (st.fps, st.frames, st.spool_depth, st.mqtt_connected) == (9.98, 5990, 0, True)
    assert st.latency_ms == stats["latency_ms"] and st.extra["mqtt_published"] == 212
    assert a == Availability("livingroom", False, "serenbox/livingroom/availability", b"offline")
    assert err.error == "unknown command" and err.device_id == "livingroom"


def test_malformed_payloads_are_counted_and_skipped(tmp_path: Path) -> None:
    bad: list[bytes] = [
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        json.dumps({"schema": "serenbox.event/1", "id": "x"}).encode(),  # keys missing
        json.dumps({**event("box1", 1), "seq": "one"}).encode(),  # wrong type
        json.dumps({**event("box1", 1), "schema": "serenbox.event/2"}).encode(),  # a future schema
        b"[" * 100_000,  # nested too deeply for the JSON parser
    ]
    good = event("box1", 1)
    with Mosquitto(tmp_path / "broker") as broker, sc.connect(broker.host, broker.port, kinds=["events"]) as c:
        for payload in bad:
            send(broker, "serenbox/box1/events", payload)
        send(broker, "serenbox/box1/state", b'{"faces": "many"}')  # not subscribed: never seen
        send(broker, "serenbox/box1/events", json.dumps(good))
        got = list(c.messages(timeout=1.0))
        assert [m.id for m in got] == [good["id"]]
        assert c.counters()["malformed"] == len(bad) and c.connected
        # Skipped messages were acknowledged too: nothing is left for the broker to send again.
        assert c.counters()["acked"] == len(bad) + 1


def test_duplicates_are_dropped_by_event_id(tmp_path: Path) -> None:
    first, second = event("box1", 1), event("box1", 2)
    with Mosquitto(tmp_path / "broker") as broker, sc.connect(broker.host, broker.port, dedupe=2) as c:
        for e in (first, first, second, first):
            send(broker, "serenbox/box1/events", json.dumps(e))
        assert [m.seq for m in c.events(timeout=1.0)] == [1, 2]
        assert c.counters()["duplicates"] == 2


def test_dedupe_memory_is_bounded() -> None:
    d = Dedupe(3)
    for i in range(5):
        d.add(str(i))
    assert len(d) == 3
    assert not d.seen("0") and not d.seen("1") and d.seen("4")
    with pytest.raises(ValueError, match="dedupe"):
        Dedupe(0)


def test_one_box_or_all(tmp_path: Path) -> None:
    with (
        Mosquitto(tmp_path / "broker") as broker,
        sc.connect(broker.host, broker.port, device="kitchen", kinds=["events"]) as one,
        sc.connect(broker.host, broker.port, device="+", kinds=["events"]) as every,
    ):
        a, b = sink(broker, tmp_path, "kitchen"), sink(broker, tmp_path, "hall")
        try:
            for i in range(1, 4):
                a.emit(event("kitchen", i))
                b.emit(event("hall", i))
            everything = list(every.events(timeout=1.5))
            kitchen = list(one.events(timeout=0.5))
        finally:
            a.close()
            b.close()
    assert [(e.device_id, e.seq) for e in kitchen] == [("kitchen", 1), ("kitchen", 2), ("kitchen", 3)]
    assert sorted((e.device_id, e.seq) for e in everything) == sorted(
        [(d, i) for d in ("kitchen", "hall") for i in (1, 2, 3)]
    )


def test_bad_arguments_and_unreachable_broker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device: 'a/b'"):
        sc.connect("127.0.0.1", 1, device="a/b")
    with pytest.raises(ValueError, match="group: 'g#'"):
        sc.connect("127.0.0.1", 1, group="g#")
    with pytest.raises(ValueError, match="kinds"):
        sc.connect("127.0.0.1", 1, kinds=["video"])
    port = Mosquitto(tmp_path / "never-started").port
    with pytest.raises(ConnectionError, match=rf"cannot reach the MQTT broker 127\.0\.0\.1:{port}"):
        sc.connect("127.0.0.1", port, timeout=3)


def test_tls_and_password(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker", users={"viewer": "pw"}, tls=True) as broker:
        tls = sc.Tls(ca_file=str(broker.ca_file))
        with pytest.raises(ConnectionError, match=r"refused the connection: not authori[sz]ed"):
            sc.connect("localhost", broker.port, username="viewer", password="wrong", tls=tls, timeout=5)
        with sc.connect("localhost", broker.port, username="viewer", password="pw", tls=tls) as c:
            publish.single(
                "serenbox/box1/availability",
                "online",
                qos=1,
                hostname="localhost",
                port=broker.port,
                auth={"username": "viewer", "password": "pw"},
                tls={"ca_certs": str(broker.ca_file)},
            )
            assert [m.online for m in c.messages(timeout=1.0)] == [True]


def test_import_stays_light() -> None:
    heavy = "('numpy', 'cv2', 'ai_edge_litert', 'tflite_runtime', 'tensorflow', 'yaml')"
    code = f"import sys, serenbox.client; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# --- resume: broker restarts, a killed application ------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1 fallback"])
def test_broker_restarts_lose_and_duplicate_nothing(tmp_path: Path, protocol: str) -> None:
    broker = Mosquitto(tmp_path / "broker", persistent=True).start()
    # The 3.1.1 case goes through a relay that refuses MQTT 5 like an old broker does.
    gateway = Mqtt311OnlyGateway(broker) if protocol != "5" else None
    where = gateway or broker
    client = sc.connect(where.host, where.port, device="box1", client_id="app", kinds=["events"])
    assert client.protocol == ("5" if gateway is None else "3.1.1")
    collector = Collector(client)
    box = sink(where, tmp_path)
    sent: list[dict[str, Any]] = []

    def emit(n: int, run: str) -> None:
        for _ in range(n):
            sent.append(event("box1", sum(e["run_id"] == run for e in sent) + 1, run_id=run))
            box.emit(sent[-1])

    try:
        emit(10, "run-1")
        wait(lambda: len(collector.events()) == 10, what="events before the outage")
        broker.stop()
        wait(lambda: not client.connected and not box.counters()["mqtt_connected"], what="both to see the outage")
        emit(15, "run-1")  # spooled by the box while the broker is down
        broker.start()
        emit(10, "run-1")  # the box may send these before the client is back: the broker queues them
        wait(lambda: len(collector.events()) == 35, timeout=30, what="events across the first restart")
        broker.stop()
        emit(5, "run-2")  # as if the box had restarted too: a new run, seq from 1
        broker.start()
        emit(5, "run-2")
        wait(lambda: len(collector.events()) == 45, timeout=30, what="events across the second restart")
        time.sleep(0.5)  # a duplicate would have come by now
    finally:
        collector.stop()
        box.close()
        broker.stop()
        if gateway:
            gateway.close()
    got = collector.events()
    assert [e.id for e in got] == [e["id"] for e in sent]  # every one, once, in order
    assert [(e.run_id, e.seq) for e in got] == [("run-1", i) for i in range(1, 36)] + [
        ("run-2", i) for i in range(1, 11)
    ]
    assert client.counters()["reconnects"] >= 2
    assert gateway is None or gateway.refused_v5 >= 1


class Member:
    """tests/client_member.py in a subprocess: prints each event it takes before acknowledging it."""

    def __init__(self, broker: Mosquitto, client_id: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.client_member", broker.host, str(broker.port), client_id, *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait(lambda: "ready" in self.lines or self.proc.poll() is not None, what=f"{client_id} to subscribe")
        assert self.proc.poll() is None, f"{client_id} exited with {self.proc.returncode}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def taken(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def ids(self) -> list[str]:
        return [e["id"] for e in self.taken()]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


def test_a_killed_application_resumes_its_session(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        box = sink(broker, tmp_path)
        first = Member(broker, "app", "--delay", "0.05")
        second: Member | None = None
        try:
            sent = [event("box1", i) for i in range(1, 41)]
            for e in sent:
                box.emit(e)
            wait(lambda: len(first.ids()) >= 10, what="the first run to take 10 events")
            first.kill()  # SIGKILL mid-stream: no goodbye, events in flight
            assert len(first.ids()) < 40
            more = [event("box1", i) for i in range(41, 61)]
            for e in more:
                box.emit(e)  # published while the application is dead: kept in its session
            sent += more
            second = Member(broker, "app")
            wait(lambda: set(first.ids()) | set(second.ids()) == {e["id"] for e in sent}, what="every event")
        finally:
            for m in (first, second):
                if m is not None:
                    m.kill()
            box.close()
    again = [i for i in second.ids() if i in set(first.ids())]
    # Only the event in the application's hands when it died (taken, not yet acknowledged) comes twice.
    assert len(again) <= 1
    assert [e["seq"] for e in second.taken() if e["id"] not in again] == list(range(len(first.ids()) + 1, 61))
    assert [e["seq"] for e in first.taken()] == list(range(1, len(first.ids()) + 1))


def test_a_group_shares_events_and_a_killed_member_loses_none(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        box = sink(broker, tmp_path)
        m1 = Member(broker, "member-1", "--group", "g", "--delay", "0.05")
        m2 = Member(broker, "member-2", "--group", "g", "--delay", "0.05")
        m1_again: Member | None = None
        try:
            sent = [event("box1", i) for i in range(1, 41)]
            for e in sent:
                box.emit(e)
            wait(lambda: len(m1.ids()) >= 8 and len(m2.ids()) >= 8, what="both members to take events")
            m1.kill()
            more = [event("box1", i) for i in range(41, 81)]
            for e in more:
                box.emit(e)
            sent += more
            all_ids = {e["id"] for e in sent}
            wait(lambda: len(m2.ids()) >= 40, what="member 2 to take its share")
            time.sleep(1.0)
            # Measured on mosquitto 2.0: the broker keeps sharing round-robin with the dead member's
            # session, so about half of what comes while it is away waits in that session.
            waiting = all_ids - set(m1.ids()) - set(m2.ids())
            m1_again = Member(broker, "member-1", "--group", "g")
            wait(lambda: set(m1.ids()) | set(m2.ids()) | set(m1_again.ids()) == all_ids, what="every event")
        finally:
            for m in (m1, m2, m1_again):
                if m is not None:
                    m.kill()
            box.close()
    assert not set(m1.ids()) & set(m2.ids())  # shared, not copied
    assert len(waiting) >= 10, "mosquitto no longer queues for a dead member: update docs/mqtt.md"
    assert waiting <= set(m1_again.ids())  # what waited came back with the member
    twice = len(m1.ids()) + len(m2.ids()) + len(m1_again.ids()) - len(all_ids)
    assert twice <= 1  # only the event member 1 had in hand, unacknowledged, when killed
    for m in (m1, m2, m1_again):
        seqs = [e["seq"] for e in m.taken()]
        assert seqs == sorted(seqs)  # each member sees its share in order


def test_logs_say_when_the_session_is_resumed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="serenbox.client")
    with Mosquitto(tmp_path / "broker") as broker:
        sc.connect(broker.host, broker.port, client_id="named").close()
        sc.connect(broker.host, broker.port, client_id="named").close()
    said = re.findall(r"session (new|resumed)", caplog.text)
    assert said == ["new", "resumed"]


def test_a_message_whose_handler_fails_is_not_acknowledged(tmp_path: Path) -> None:
    events = [event("box1", i) for i in (1, 2, 3)]

    def handler(msg: sc.Message) -> None:
        if isinstance(msg, Event) and msg.seq == 2:
            raise RuntimeError("the application broke on seq 2")

    with Mosquitto(tmp_path / "broker") as broker:
        c = sc.connect(broker.host, broker.port, client_id="app", kinds=["events"])
        for e in events:
            send(broker, "serenbox/box1/events", json.dumps(e))
        with pytest.raises(RuntimeError, match="seq 2"), c:
            c.run(handler, timeout=2.0)
        assert c.counters()["acked"] == 1  # seq 1 only
        assert not c._dedupe.seen(events[1]["id"])  # its redelivery will not be taken for a duplicate
        # The same session again: the broker sends what was never acknowledged.
        with sc.connect(broker.host, broker.port, client_id="app", kinds=["events"]) as again:
            assert [m.seq for m in again.events(timeout=1.0)] == [2, 3]


def test_two_processes_with_one_client_id_are_named_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        first = sc.connect(broker.host, broker.port, client_id="shared-id")
        second = sc.connect(broker.host, broker.port, client_id="shared-id")
        try:
            wait(lambda: "is another process using client id 'shared-id'?" in caplog.text, what="the log")
        finally:
            first.close()
            second.close()
