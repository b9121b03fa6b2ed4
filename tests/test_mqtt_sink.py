"""The MQTT sink driven directly, against a real mosquitto (one per test, free port)."""

from __future__ import annotations

import json
import logging
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
from serenbox.device.config import from_dict
from serenbox.device.sinks.mqtt import MqttSink

from tests.mosquitto import Mosquitto, Mqtt311OnlyGateway, Watcher, mosquitto_binary, retained

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "box1"


def config(broker: Mosquitto, tmp: Path, **mqtt: Any) -> Any:
    m = {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5, **mqtt}
    return from_dict({"device_id": DEVICE, "state_dir": str(tmp / "state"), "mqtt": m}, env={})


def event(seq: int, run_id: str = "run") -> dict[str, Any]:
    return {
        "schema": "serenbox.event/1",
        "id": str(uuid.uuid4()),
        "type": "new",
        "device_id": DEVICE,
        "run_id": run_id,
        "seq": seq,
        "track_id": 1,
        "timestamp": "2026-11-24T10:00:00.123Z",
        "emotion": "happy",
        "confidence": 0.9,
    }


def ids(w: Watcher) -> list[str]:
    return [m.json()["id"] for m in w.on("/events")]


def wait(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def broker(tmp_path: Path):
    with Mosquitto(tmp_path / "broker") as b:
        yield b


def test_events_in_order_state_stats_availability(broker: Mosquitto, tmp_path: Path) -> None:
    with Watcher(broker, [f"serenbox/{DEVICE}/#"]) as w:
        sink = MqttSink(config(broker, tmp_path, state_interval_s=0.5))
        sink.start()
        wait(lambda: sink.counters()["mqtt_connected"], what="connection")
        sent = [event(i) for i in range(1, 101)]
        for e in sent:
            sink.emit(e)
        w.wait_for(lambda: len(ids(w)) >= 100, what="100 events")
        assert ids(w) == [e["id"] for e in sent]
        got = w.on("/events")
        assert all(not m.retain for m in got) and got[0].json() == sent[0]
        wait(lambda: sink.counters()["spool_depth"] == 0, what="spool drained")
        assert sink.counters()["mqtt_published"] == 100
        assert [m.payload for m in w.on("/availability")][:1] == [b"online"]

        # State: retained; a burst of changes is rate-limited but the latest always goes out.
        for faces in range(1, 6):
            sink.state({"faces": faces, "dominant": "happy", "paused": False})
        w.wait_for(lambda: any(m.json()["faces"] == 5 for m in w.on("/state")), what="latest state")
        assert len(w.on("/state")) <= 3
        assert json.loads(retained(broker, f"serenbox/{DEVICE}/state"))["faces"] == 5

        sink.stats({"fps": 9.5, "frames": 10})
        w.wait_for(lambda: w.on("/stats"), what="stats")
        stats = w.on("/stats")[0].json()
        assert stats["fps"] == 9.5 and stats["spool_depth"] == 0 and stats["mqtt_connected"] is True
        assert stats["spool_dropped"] == 0 and stats["mqtt_published"] == 100

        # A change inside the rate limit is still the retained state after a clean close.
        sink.state({"faces": 6, "dominant": "sad", "paused": False})
        sink.state({"faces": 0, "dominant": None, "paused": False})
        sink.close()
    assert retained(broker, f"serenbox/{DEVICE}/availability") == b"offline"
    assert json.loads(retained(broker, f"serenbox/{DEVICE}/state"))["faces"] == 0


def test_broker_restart_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    # The broker keeps the watcher's session across its restart, so the watcher misses nothing
    # whichever client reconnects first; the sink itself always uses a clean session.
    broker = Mosquitto(tmp_path / "broker", persistent=True).start()
    w = Watcher(broker, [f"serenbox/{DEVICE}/events"], persistent=True).start()
    sink = MqttSink(config(broker, tmp_path))
    sink.start()
    sent: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            e = event(i)
            sink.emit(e)
            sent.append(e["id"])
            time.sleep(0.004)

    t = threading.Thread(target=produce)
    t.start()
    try:
        wait(lambda: len(ids(w)) > 50, what="first events")
        broker.stop()
        wait(lambda: not sink.counters()["mqtt_connected"], what="disconnect seen")
        time.sleep(0.5)  # events pile up in the spool
        assert sink.counters()["spool_depth"] > 10
        broker.start()
        wait(lambda: sink.counters()["mqtt_connected"], what="reconnect")
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    w.wait_for(lambda: len(set(ids(w))) >= len(sent), timeout=30, what="all events")
    time.sleep(0.3)  # anything duplicated would show up by now
    got = [m for m in w.on("/events") if not m.dup]  # dup=True: the broker's own redelivery to the watcher
    got_ids = [m.json()["id"] for m in got]
    assert set(got_ids) == set(sent), "lost events"
    assert len(got_ids) == len(sent), f"{len(got_ids) - len(sent)} duplicated events"
    assert got_ids == sent, "out of order"
    sink.close()
    w.stop()
    broker.stop()


CHILD = """
import os, signal, sys, time
from serenbox.device.config import from_dict
from serenbox.device.sinks.mqtt import MqttSink
cfg = from_dict({"device_id": "box1", "state_dir": sys.argv[1],
                 "mqtt": {"host": "127.0.0.1", "port": int(sys.argv[2]), "keepalive": 5,
                          "reconnect_min_s": 0.2, "reconnect_max_s": 0.5}}, env={})
sink = MqttSink(cfg)
sink.start()
mode = sys.argv[3]
if mode == "online":
    while not sink.counters()["mqtt_connected"]:
        time.sleep(0.05)
else:
    for i in range(30):
        sink.emit({"id": f"ev-{i}", "seq": i + 1})
print("ready", sink.counters()["spool_depth"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def run_child(tmp: Path, broker: Mosquitto, mode: str) -> str:
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp / "state"), str(broker.port), mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    return p.stdout


def test_last_will_says_offline_after_sigkill(broker: Mosquitto, tmp_path: Path) -> None:
    with Watcher(broker, [f"serenbox/{DEVICE}/availability"]) as w:
        assert run_child(tmp_path, broker, "online").startswith("ready")
        # The kernel closes the dead process's socket, so the broker sends the will at once
        # (after 1.5 keepalives when the box loses power instead).
        w.wait_for(lambda: len(w.on("/availability")) >= 2, what="online then the will")
        assert [m.payload for m in w.on("/availability")] == [b"online", b"offline"]
    assert retained(broker, f"serenbox/{DEVICE}/availability") == b"offline"


def test_spool_of_killed_process_is_replayed(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")  # not started: the first process only spools
    assert run_child(tmp_path, broker, "spool").strip() == "ready 30"
    with broker, Watcher(broker, [f"serenbox/{DEVICE}/events"]) as w:
        sink = MqttSink(config(broker, tmp_path))
        assert sink.counters()["spool_depth"] == 30
        sink.start()
        w.wait_for(lambda: len(ids(w)) >= 30, what="replayed events")
        time.sleep(0.2)
        assert ids(w) == [f"ev-{i}" for i in range(30)]
        wait(lambda: sink.counters()["spool_depth"] == 0, what="spool drained")
        sink.close()


def test_tls_and_password(tmp_path: Path) -> None:
    users = {"serenbox": "s3cret", "watcher": "w"}
    with (
        Mosquitto(tmp_path / "broker", users=users, tls=True) as broker,
        Watcher(broker, [f"serenbox/{DEVICE}/#"], username="watcher", password="w") as w,
    ):
        tls = {"enabled": True, "ca_file": str(broker.ca_file)}
        cfg = from_dict(
            {
                "device_id": DEVICE,
                "state_dir": str(tmp_path / "state"),
                "mqtt": {"host": "localhost", "port": broker.port, "username": "serenbox", "tls": tls},
            },
            env={"SERENBOX_MQTT_PASSWORD": "s3cret"},
        )
        sink = MqttSink(cfg)
        sink.start()
        e = event(1)
        sink.emit(e)
        w.wait_for(lambda: ids(w) == [e["id"]], what="event over TLS")
        sink.close()
        assert "serenbox" in broker.log()


def test_unverifiable_certificate_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="serenbox.mqtt")
    # No ca_file: the system CAs do not know the test CA, so verification (on by default) fails.
    with Mosquitto(tmp_path / "broker", tls=True) as broker:
        sink = MqttSink(config(broker, tmp_path, tls={"enabled": True}))
        sink.start()
        sink.emit(event(1))
        wait(lambda: "could not connect" in caplog.text, what="failure logged")
        assert not sink.counters()["mqtt_connected"] and sink.counters()["spool_depth"] == 1
        sink.close()
        # `insecure: true` skips verification (and says so): it connects and delivers.
        with Watcher(broker, [f"serenbox/{DEVICE}/events"], client_id="w-insecure") as w:
            sink = MqttSink(config(broker, tmp_path, tls={"enabled": True, "insecure": True}))
            sink.start()
            w.wait_for(lambda: len(ids(w)) == 1, what="the spooled event over unverified TLS")
            sink.close()
        assert "NOT verified" in caplog.text


def test_client_certificate(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker", tls=True, require_client_cert=True) as broker:
        f = broker.tls_files
        assert f is not None
        with Watcher(broker, [f"serenbox/{DEVICE}/events"]) as w:
            tls = {
                "enabled": True,
                "ca_file": str(f["ca"]),
                "cert_file": str(f["client"]),
                "key_file": str(f["client_key"]),
            }
            sink = MqttSink(config(broker, tmp_path, host="localhost", tls=tls))
            sink.start()
            e = event(1)
            sink.emit(e)
            w.wait_for(lambda: ids(w) == [e["id"]], what="event over mutual TLS")
            sink.close()
        # Without the client certificate the broker hangs up during the handshake.
        sink = MqttSink(
            config(broker, tmp_path / "other", host="localhost", tls={"enabled": True, "ca_file": str(f["ca"])})
        )
        sink.start()
        sink.emit(event(2))
        time.sleep(1.0)
        assert not sink.counters()["mqtt_connected"] and sink.counters()["spool_depth"] == 1
        sink.close()


def test_wrong_password_logs_and_keeps_spooling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="serenbox.mqtt")
    with Mosquitto(tmp_path / "broker", users={"serenbox": "right"}) as broker:
        sink = MqttSink(config(broker, tmp_path, username="serenbox", password="wrong"))
        sink.start()
        wait(lambda: "refused the connection" in caplog.text, what="refusal logged")
        for i in range(5):
            sink.emit(event(i))
        assert sink.counters()["spool_depth"] == 5 and not sink.counters()["mqtt_connected"]
        line = next(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
        assert "not authorized" in line and "password" in line
        time.sleep(1.0)  # several retries, still one line
        assert sum("refused" in r.getMessage() for r in caplog.records) == 1
        sink.close()


def test_commands(broker: Mosquitto, tmp_path: Path) -> None:
    import paho.mqtt.publish as publish

    got: list[dict] = []

    def handler(cmd: dict) -> None:
        if cmd["command"] == "fps" and cmd["value"] > 60:
            raise ValueError("fps must be at most 60")
        got.append(cmd)

    with Watcher(broker, [f"serenbox/{DEVICE}/error"]) as w:
        sink = MqttSink(config(broker, tmp_path))
        sink.on_command(handler)
        sink.start()
        wait(lambda: sink.counters()["mqtt_connected"], what="connection")
        time.sleep(0.2)  # the SUBSCRIBE to `set` follows CONNACK
        topic = f"serenbox/{DEVICE}/set"
        bad = [b"{not json", b'"pause"', b'{"command": "explode"}', b'{"command": "fps"}', b"\xff\xfe", b"x" * 5000]
        good = [b'{"command": "pause"}', b'{"command": "fps", "value": 5}', b'{"command": "resume"}']
        msgs = [*bad, b'{"command": "fps", "value": 100}', *good]
        publish.multiple(
            [{"topic": topic, "payload": p, "qos": 1} for p in msgs], hostname=broker.host, port=broker.port
        )
        w.wait_for(lambda: len(w.on("/error")) >= len(bad) + 1, what="error replies")
        wait(lambda: len(got) == 3, what="valid commands")
        assert got == [{"command": "pause"}, {"command": "fps", "value": 5.0}, {"command": "resume"}]
        errors = [m.json() for m in w.on("/error")]
        assert "not valid JSON" in errors[0]["error"] and errors[0]["payload"] == "{not json"
        assert "unknown command 'explode'" in errors[2]["error"]
        assert "fps must be at most 60" in errors[-1]["error"]
        assert all(len(e["payload"]) <= 201 for e in errors)
        # still alive: events flow after all that
        e = event(1)
        with Watcher(broker, [f"serenbox/{DEVICE}/events"], client_id="w2") as w2:
            sink.emit(e)
            w2.wait_for(lambda: ids(w2) == [e["id"]], what="event after bad commands")
        sink.close()


def test_missing_ca_file_is_a_config_error(broker: Mosquitto, tmp_path: Path) -> None:
    from serenbox.device.config import ConfigError

    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca_file"):
        MqttSink(config(broker, tmp_path, tls={"enabled": True, "ca_file": str(tmp_path / "nope.pem")}))


def test_startup_does_not_block_without_broker(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")  # never started
    sink = MqttSink(config(broker, tmp_path))
    t0 = time.monotonic()
    sink.start()
    sink.emit(event(1))
    assert time.monotonic() - t0 < 1.0
    assert sink.counters()["spool_depth"] == 1
    sink.close()


@pytest.mark.parametrize(("protocol", "logged"), [("5", "p5"), ("3.1.1", "p2"), ("auto", "p5")])
def test_protocol_versions(broker: Mosquitto, tmp_path: Path, protocol: str, logged: str) -> None:
    with Watcher(broker, [f"serenbox/{DEVICE}/events"]) as w:
        sink = MqttSink(config(broker, tmp_path, protocol=protocol))
        sink.start()
        e = event(1)
        sink.emit(e)
        w.wait_for(lambda: ids(w) == [e["id"]], what=f"event over MQTT {protocol}")
        sink.close()
    # mosquitto logs its own code for the protocol it accepted: p2 = 3.1.1, p5 = 5.
    line = next(li for li in broker.log().splitlines() if f"as serenbox-{DEVICE} " in li)
    assert f"({logged}," in line, line


def test_falls_back_to_311_when_the_broker_refuses_mqtt5(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="serenbox.mqtt")
    gateway = Mqtt311OnlyGateway(broker)
    try:
        with Watcher(broker, [f"serenbox/{DEVICE}/#"]) as w:
            cfg = config(broker, tmp_path)
            cfg.mqtt.port = gateway.port
            sink = MqttSink(cfg)
            sink.start()
            sent = [event(i) for i in range(1, 11)]
            for e in sent:
                sink.emit(e)
            w.wait_for(lambda: len(ids(w)) >= 10, what="events after the fallback")
            assert ids(w) == [e["id"] for e in sent]
            assert gateway.refused_v5 >= 1 and gateway.relayed >= 1
            assert "falling back to 3.1.1" in caplog.text
            sink.close()
            w.wait_for(lambda: [m.payload for m in w.on("/availability")][-1:] == [b"offline"], what="offline")
    finally:
        gateway.close()


def test_spool_bound_drops_oldest_and_reports_it(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")  # down while the events pile up
    sink = MqttSink(config(broker, tmp_path, spool={"max_events": 5}))
    sink.start()
    sent = [event(i) for i in range(1, 9)]
    for e in sent:
        sink.emit(e)
    assert sink.counters()["spool_depth"] == 5 and sink.counters()["spool_dropped"] == 3
    with broker, Watcher(broker, [f"serenbox/{DEVICE}/#"]) as w:
        w.wait_for(lambda: len(ids(w)) >= 5, what="the newest five events")
        assert ids(w) == [e["id"] for e in sent[3:]]  # the three oldest were dropped, the rest in order
        sink.stats({"fps": 1.0})
        w.wait_for(lambda: w.on("/stats"), what="stats")
        assert w.on("/stats")[0].json()["spool_dropped"] == 3
        sink.close()


def test_close_survives_the_network_thread_ending_inside_loop_stop(
    broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # paho 2.2's loop_stop() checks its thread, then joins it; the thread clears that attribute as it
    # ends, which it does on its own after disconnect(). On a loaded machine it ended in between and
    # close() raised AttributeError (one of ten simulator processes at 1 000 boxes). Here the thread
    # is made to end exactly there: loop_stop() asks threading.current_thread() between the two.
    import paho.mqtt.client as paho

    sink = MqttSink(config(broker, tmp_path))
    sink.start()
    wait(lambda: sink.counters()["mqtt_connected"], what="connection")
    sink.emit(event(1))
    wait(lambda: sink.counters()["spool_depth"] == 0, what="event delivered")
    network = sink._client._thread
    real = threading.current_thread

    def network_thread_ends_first() -> threading.Thread:
        me = real()
        if sys._getframe(1).f_code.co_name == "loop_stop" and network is not None and me is not network:
            network.join(timeout=10)
        return me

    monkeypatch.setattr(paho.threading, "current_thread", network_thread_ends_first)
    sink.close()  # raised AttributeError: 'NoneType' object has no attribute 'join'
    monkeypatch.undo()
    assert network is not None and not network.is_alive()
    assert sink.counters()["spool_depth"] == 0


def test_a_lost_connection_never_waits_for_the_publisher(broker: Mosquitto, tmp_path: Path) -> None:
    # paho may report a lost connection from inside its own message lock (a write failing while it
    # handles a CONNACK). The handler used to take the publisher's lock there, while the publisher,
    # holding it, waited for paho's lock in publish(): 1 000 boxes hung for good that way. So the
    # network thread must get through a disconnect while the publisher's lock is held.
    with Watcher(broker, [f"serenbox/{DEVICE}/events"]) as w:
        sink = MqttSink(config(broker, tmp_path))
        sink.start()
        wait(lambda: sink.counters()["mqtt_connected"], what="connection")
        with sink._pub:  # the publisher, busy handing events to paho
            sock = sink._client.socket()
            assert sock is not None
            sock.shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + 5
            while sink.counters()["mqtt_connected"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not sink.counters()["mqtt_connected"], "the network thread waited for the publisher's lock"
            sink.emit(event(1))
        wait(lambda: sink.counters()["mqtt_connected"], what="reconnection")
        w.wait_for(lambda: len(ids(w)) >= 1, what="the event sent after the reconnection")
        sink.close()
