"""Home Assistant MQTT discovery: the payload's shape, its templates rendered with Jinja2 (Home
Assistant's template engine) against what the daemon really publishes, and the daemon's
announce / re-announce / `serenbox ha-remove` against a real mosquitto with docs/mqtt.md's ACL.

Home Assistant itself is not run here (current releases need Python >= 3.13)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from serenbox.device.config import ConfigError, from_dict
from serenbox.device.events import EventFactory
from serenbox.device.labels import LABELS
from serenbox.device.sinks import ha_discovery
from serenbox.device.sinks.mqtt_topics import parse_command

from tests import media
from tests.daemon import ROOT, Daemon, publisher, secure_broker, watcher, write_config
from tests.mosquitto import Mosquitto, Watcher, free_port, mosquitto_binary, retained

DEVICE = "fault-box"  # tests/daemon.py's write_config
BASE = f"serenbox/{DEVICE}"
CONFIG_TOPIC = f"homeassistant/device/{DEVICE}/config"
COMPONENTS = {
    "emotion": "sensor",
    "emotion_event": "event",
    "occupancy": "binary_sensor",
    "faces": "sensor",
    "confidence": "sensor",
    "paused": "switch",
    "fps": "sensor",
    "classify_latency": "sensor",
    "cpu_temperature": "sensor",
    "spool_depth": "sensor",
}
DIAGNOSTICS = {"fps", "classify_latency", "cpu_temperature", "spool_depth"}
needs_broker = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


def box_config(**overrides: Any) -> Any:
    data = {"device_id": "livingroom", "mqtt": {"host": "broker.lan", "topic_prefix": "home/serenbox"}}
    return from_dict({**data, **overrides}, env={})


# ----- the payload ------------------------------------------------------------------------------


def test_payload_describes_the_device_and_every_entity() -> None:
    cfg = box_config()
    p = ha_discovery.payload(cfg)
    assert ha_discovery.config_topic(cfg) == "homeassistant/device/livingroom/config"
    assert ha_discovery.status_topic(cfg) == "homeassistant/status"
    assert json.loads(json.dumps(p)) == p  # plain JSON
    assert p["dev"]["identifiers"] == ["serenbox_livingroom"]
    assert p["dev"]["model"] == "SerenBox" and p["dev"]["name"] == "SerenBox livingroom"
    from serenbox.device import __version__

    assert p["dev"]["sw_version"] == __version__ and p["o"]["sw_version"] == __version__
    assert p["o"]["name"] == "serenbox"
    assert p["availability"] == [
        {
            "topic": "home/serenbox/livingroom/availability",
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]
    cmps = p["cmps"]
    assert {cid: c["p"] for cid, c in cmps.items()} == COMPONENTS
    assert {c["unique_id"] for c in cmps.values()} == {f"serenbox_livingroom_{cid}" for cid in COMPONENTS}
    base = "home/serenbox/livingroom"
    topics = {cid: c["state_topic"] for cid, c in cmps.items()}
    assert topics == {
        **dict.fromkeys(("emotion", "occupancy", "faces", "confidence", "paused"), f"{base}/state"),
        "emotion_event": f"{base}/events",
        **dict.fromkeys(DIAGNOSTICS, f"{base}/stats"),
    }
    assert cmps["emotion"]["device_class"] == "enum" and cmps["emotion"]["options"] == list(LABELS)
    assert cmps["emotion_event"]["event_types"] == list(LABELS)
    assert cmps["occupancy"]["device_class"] == "occupancy"
    assert cmps["cpu_temperature"]["device_class"] == "temperature"
    assert cmps["cpu_temperature"]["unit_of_measurement"] == "°C"
    assert cmps["confidence"]["unit_of_measurement"] == "%"
    assert {cid for cid, c in cmps.items() if c.get("entity_category") == "diagnostic"} == DIAGNOSTICS
    switch = cmps["paused"]
    assert switch["command_topic"] == f"{base}/set" and switch["retain"] is False
    # What Home Assistant sends when the switch is flipped is a command the box accepts.
    assert parse_command(switch["payload_on"].encode()) == {"command": "pause"}
    assert parse_command(switch["payload_off"].encode()) == {"command": "resume"}


def test_unique_ids_depend_on_the_device_id_only() -> None:
    first = ha_discovery.payload(box_config())
    # Another broker, prefix, version of the options: a reinstall of the same box keeps its entities.
    again = ha_discovery.payload(
        box_config(mqtt={"host": "10.0.0.2", "topic_prefix": "x"}, homeassistant={"prefix": "ha"})
    )
    ids = {cid: c["unique_id"] for cid, c in first["cmps"].items()}
    assert ids == {cid: c["unique_id"] for cid, c in again["cmps"].items()}
    assert first["dev"]["identifiers"] == again["dev"]["identifiers"]
    other = ha_discovery.payload(box_config(device_id="kitchen"))
    assert not set(ids.values()) & {c["unique_id"] for c in other["cmps"].values()}


def test_discovery_setting_and_prefix() -> None:
    assert ha_discovery.enabled(box_config())  # default: on with a broker
    assert not ha_discovery.enabled(from_dict({}, env={}))  # no broker, nothing to announce to
    assert not ha_discovery.enabled(box_config(homeassistant={"discovery": False}))
    assert ha_discovery.enabled(box_config(homeassistant={"discovery": True}))
    cfg = box_config(homeassistant={"prefix": "ha/discovery/"})
    assert ha_discovery.config_topic(cfg) == "ha/discovery/device/livingroom/config"
    for bad, says in (("ha/+", "homeassistant.prefix"), ("$SYS", "homeassistant.prefix"), ("", "homeassistant.prefix")):
        with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
            box_config(homeassistant={"prefix": bad})
    with pytest.raises(ConfigError, match=r"homeassistant\.discovery: expected true or false"):
        box_config(homeassistant={"discovery": "yes"})
    with pytest.raises(ConfigError, match=r"homeassistant\.nope'?: unknown key"):
        box_config(homeassistant={"nope": 1})


# ----- templates, rendered the way Home Assistant does ------------------------------------------


def render(template: str, payload: bytes | str) -> str:
    """Home Assistant renders MQTT value templates with Jinja2 in a sandbox, `value_json` bound to
    the parsed payload, and strips the result."""
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    text = payload.decode() if isinstance(payload, bytes) else payload
    env: Any = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(value=text, value_json=json.loads(text)).strip()


def templates(cid: str) -> dict[str, str]:
    spec = ha_discovery.payload(box_config())["cmps"][cid]
    return {k: v for k, v in spec.items() if k.endswith("_template")}


def check_state_templates(state: bytes) -> dict[str, str]:
    """Every entity fed by `state`, rendered; checked against the state itself."""
    s = json.loads(state)
    out = {
        cid: render(templates(cid)["value_template"], state)
        for cid in ("emotion", "occupancy", "faces", "confidence", "paused")
    }
    if s["dominant"] is None:
        assert out["emotion"] == "None" and out["confidence"] == "None"  # Home Assistant: unknown
    else:
        assert out["emotion"] == s["dominant"] and out["emotion"] in LABELS
        assert float(out["confidence"]) == pytest.approx(100 * s["probabilities"][s["dominant"]], abs=0.05)
        assert 0 <= float(out["confidence"]) <= 100
    assert out["occupancy"] == ("ON" if s["faces"] > 0 else "OFF")
    assert out["faces"] == str(s["faces"])
    assert out["paused"] == ("ON" if s["paused"] else "OFF")
    attributes = json.loads(render(templates("emotion")["json_attributes_template"], state))
    assert attributes == (s["probabilities"] or {})
    return out


def check_stats_templates(stats: bytes) -> None:
    s = json.loads(stats)
    got = {cid: render(templates(cid)["value_template"], stats) for cid in DIAGNOSTICS}
    assert float(got["fps"]) == s["fps"]
    assert got["classify_latency"] == str(s["latency_ms"]["classify"]["p50"])
    assert got["cpu_temperature"] == str(s["cpu_temp_c"])  # "None" without a thermal zone: unknown
    assert got["spool_depth"] == str(s["spool_depth"]) and int(got["spool_depth"]) >= 0


def check_event_template(event: bytes) -> dict[str, Any] | None:
    e = json.loads(event)
    out = render(templates("emotion_event")["value_template"], event)
    if e["type"] == "end":
        assert out == ""  # Home Assistant ignores an empty rendering: nothing fires
        return None
    fired = json.loads(out)
    assert fired == {
        "event_type": e["emotion"],
        "confidence": e["confidence"],
        "track_id": e["track_id"],
        "type": e["type"],
    }
    assert fired["event_type"] in LABELS
    return fired


def test_event_template_fires_for_new_and_update_only() -> None:
    factory = EventFactory("livingroom")
    probs = [0.05, 0.0, 0.05, 0.7, 0.1, 0.05, 0.05]
    for kind in ("new", "update", "end"):
        event = factory.make(kind, 3, "happy", probs, (10, 10, 50, 50), (640, 480), duration_s=2.0, summary={})
        fired = check_event_template(json.dumps(event).encode())
        assert (fired is None) == (kind == "end")


# ----- the daemon against a real broker ---------------------------------------------------------


@pytest.fixture(scope="module")
def face_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return media.moving_face_video(tmp_path_factory.mktemp("video") / "face.avi", seconds=6, fps=10)


def ha_remove(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serenbox", "ha-remove", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def configs(w: Any) -> list[Any]:
    return [m for m in w.on(CONFIG_TOPIC) if m.payload]


@needs_broker
def test_daemon_announces_reannounces_obeys_the_switch_and_ha_remove_clears(face_video: Path, tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker, Watcher(broker, ["homeassistant/#", f"{BASE}/#"]) as w:
        config = write_config(tmp_path, face_video, broker, camera={"loop": True}, mqtt={"stats_interval_s": 1})
        daemon = Daemon(config)
        try:
            w.wait_for(lambda: configs(w), what="the discovery config")
            first = configs(w)[0]
            expected = ha_discovery.payload(from_dict(yaml.safe_load(config.read_text()), env={}))
            assert first.json() == expected
            assert json.loads(retained(broker, CONFIG_TOPIC)) == expected

            # Home Assistant (re)starts: it says `online`; the box answers after a short random delay.
            ha = publisher(broker)
            said_online = time.monotonic()
            ha.publish("homeassistant/status", "online", qos=1).wait_for_publish(10)
            w.wait_for(lambda: len(configs(w)) >= 2, timeout=10, what="the re-announcement")
            delay = time.monotonic() - said_online
            assert 0.4 <= delay <= 6.0, delay  # 0.5 to 3 s, plus a loaded machine's latency
            assert configs(w)[1].json() == expected
            ha.publish("homeassistant/status", "offline", qos=1).wait_for_publish(10)

            # Real payloads for the templates: a face, its events, stats.
            w.wait_for(lambda: any(m.json()["faces"] > 0 for m in w.on(f"{BASE}/state")), what="a face in state")
            w.wait_for(lambda: w.on(f"{BASE}/events") and len(w.on(f"{BASE}/stats")) >= 2, what="events and stats")
            for m in w.on(f"{BASE}/state"):
                check_state_templates(m.payload)
            fired = [check_event_template(m.payload) for m in w.on(f"{BASE}/events")]
            assert any(f is not None for f in fired)
            for m in w.on(f"{BASE}/stats"):
                check_stats_templates(m.payload)
            assert float(render(templates("fps")["value_template"], w.on(f"{BASE}/stats")[-1].payload)) > 0

            # The switch, as Home Assistant sends it.
            switch = expected["cmps"]["paused"]
            ha.publish(switch["command_topic"], switch["payload_on"], qos=1).wait_for_publish(10)
            w.wait_for(lambda: json.loads(w.on(f"{BASE}/state")[-1].payload)["paused"], timeout=10, what="paused")
            assert check_state_templates(w.on(f"{BASE}/state")[-1].payload)["paused"] == "ON"
            ha.publish(switch["command_topic"], switch["payload_off"], qos=1).wait_for_publish(10)
            w.wait_for(lambda: not json.loads(w.on(f"{BASE}/state")[-1].payload)["paused"], timeout=10, what="resumed")
            ha.loop_stop()
            assert not w.on(f"{BASE}/error")  # nothing Home Assistant sent was refused
        finally:
            code = daemon.finish(signal.SIGTERM)
        assert code == 0, daemon.stderr[-3000:]
        assert "Home Assistant is online" in daemon.stderr and "Traceback" not in daemon.stderr
        # The final state (nobody there) renders `unknown`, not a made-up emotion.
        check_state_templates(retained(broker, f"{BASE}/state"))

        removed = ha_remove(config)
        assert removed.returncode == 0, removed.stderr
        assert CONFIG_TOPIC in removed.stderr
        w.wait_for(lambda: w.on(CONFIG_TOPIC)[-1].payload == b"", what="the empty config")
        assert retained(broker, CONFIG_TOPIC) is None


@needs_broker
def test_the_documented_access_list_lets_the_box_announce_and_home_assistant_ask(
    face_video: Path, tmp_path: Path
) -> None:
    # Home Assistant is the `controller` of docs/mqtt.md's access list; the box logs in as `serenbox`.
    with (
        secure_broker(tmp_path / "broker") as broker,
        watcher(broker, ["homeassistant/#"], user="controller") as w,
    ):
        config = write_config(tmp_path, face_video, broker, camera={"loop": True})
        daemon = Daemon(config)
        try:
            w.wait_for(lambda: configs(w), what="the discovery config")
            ha = publisher(broker, "controller")
            ha.publish("homeassistant/status", "online", qos=1).wait_for_publish(10)
            ha.loop_stop()
            w.wait_for(lambda: len(configs(w)) >= 2, timeout=10, what="the re-announcement")
        finally:
            assert daemon.finish(signal.SIGTERM) == 0, daemon.stderr[-3000:]
        removed = ha_remove(config)
        assert removed.returncode == 0, removed.stderr
        w.wait_for(lambda: w.on(CONFIG_TOPIC)[-1].payload == b"", what="the empty config")


@needs_broker
def test_discovery_off_publishes_nothing_for_home_assistant(face_video: Path, tmp_path: Path) -> None:
    with (
        secure_broker(tmp_path / "broker") as broker,
        watcher(broker, ["homeassistant/#", f"{BASE}/#"], user="controller") as w,
    ):
        config = write_config(tmp_path, face_video, broker, homeassistant={"discovery": False})
        daemon = Daemon(config, "--max-frames", "20")
        assert daemon.finish(timeout=60) == 0, daemon.stderr[-3000:]
        assert w.on(f"{BASE}/availability")  # it did talk to the broker
        assert not w.on("homeassistant/")


def test_ha_remove_errors_are_one_line(tmp_path: Path) -> None:
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(f"mqtt: {{host: 127.0.0.1, port: {free_port()}}}\n")
    result = ha_remove(unreachable)
    assert result.returncode == 2
    assert result.stderr.startswith("serenbox ha-remove: cannot reach the MQTT broker 127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1

    bad = tmp_path / "bad.yaml"
    bad.write_text("homeassistant: {prefix: 'a/#'}\n")
    result = ha_remove(bad)
    assert result.returncode == 2 and "homeassistant.prefix" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    nothing = tmp_path / "nobroker.yaml"
    nothing.write_text("{}\n")
    result = ha_remove(nothing)
    assert result.returncode == 0 and "nothing to remove" in result.stderr


@needs_broker
def test_ha_remove_refused_login_is_one_line(tmp_path: Path) -> None:
    with secure_broker(tmp_path / "broker") as broker:
        config = tmp_path / "wrong.yaml"
        config.write_text(f"mqtt: {{host: {broker.host}, port: {broker.port}, username: serenbox, password: wrong}}\n")
        result = ha_remove(config)
    assert result.returncode == 2, result.stderr
    assert "refused the connection" in result.stderr and len(result.stderr.strip().splitlines()) == 1
