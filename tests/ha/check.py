"""SerenBox's MQTT discovery read by Home Assistant itself; run by systemd/ha_check.sh (as root).

A mosquitto with docs/mqtt.md's access list, Home Assistant (see homeassistant.py) logged in as
`controller`, and the real `serenbox run` as `serenbox` on a clip whose face turns happy, then sad,
then leaves (the brightness model: its emotion follows the face's brightness, so the clip fixes
the answer).
Each check prints `ok` or `FAIL` with what it saw; the exit status is 1 when any failed.

    python -m tests.ha.check --root ROOT --venv VENV --workdir DIR [--machine NAME]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from serenbox.device import __version__
from serenbox.device.config import load
from serenbox.device.labels import LABELS
from serenbox.device.sinks import ha_discovery

from tests import media
from tests.daemon import ROOT, USERS, Daemon, acl_from_docs, watcher
from tests.ha.homeassistant import HomeAssistant, PortTaken, http_port
from tests.mosquitto import Mosquitto, Watcher
from tests.tinymodels import BRIGHTNESS_OF, brightness_model, convert_tiny

DEVICE = "ha-check"
FPS = 10
SECONDS_EACH = 6  # happy, then sad, looped: the sensor must show both within a minute
SECONDS_EMPTY = 20  # then nobody: files play as fast as the box classifies, a few seconds here
START_TIMEOUT_S = 900  # HA's first start on a busy 2-core host compiles and loads a lot
WAIT_S = 90


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def run(self, name: str, fn: Callable[[], str]) -> bool:
        """`fn` returns what it saw, or raises AssertionError (a failed check) or anything else."""
        t0 = time.monotonic()
        try:
            detail, held = fn(), True
        except AssertionError as e:
            detail, held = str(e), False
        except Exception as e:  # a check that crashed failed, with its reason
            detail, held = f"{type(e).__name__}: {e}", False
            traceback.print_exc(file=sys.stderr)
        self.results.append((name, held, detail))
        print(f"{'ok  ' if held else 'FAIL'}  {name} ({time.monotonic() - t0:.1f} s): {detail}", flush=True)
        return held

    @property
    def failed(self) -> int:
        return sum(not held for _, held, _ in self.results)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


def face(level: float | None) -> np.ndarray:
    """640×480 mid-gray with the astronaut's head at mean brightness `level` (None: nobody), low
    contrast so nothing clips: the brightness model reads `level` as the emotion."""
    gray = np.full((480, 640), 128, np.uint8)
    if level is not None:
        head = cv2.cvtColor(media.head(210), cv2.COLOR_BGR2GRAY).astype(np.float32)
        gray[100:310, 200:410] = np.clip((head - head.mean()) * 0.35 + level, 0, 255).astype(np.uint8)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


def prepare_box(work: Path, broker: Mosquitto) -> Path:
    """The model, the clip and the daemon's configuration; the configuration's path."""
    model = convert_tiny(brightness_model(), work / "model")
    frames = [face(BRIGHTNESS_OF[e]) for e in ("happy", "sad") for _ in range(FPS * SECONDS_EACH)]
    frames += [face(None)] * (FPS * SECONDS_EMPTY)
    clip = media.write_video(work / "happy-sad-nobody.avi", frames, fps=FPS)
    config = {
        "device_id": DEVICE,
        "log_level": "INFO",
        "state_dir": str(work / "state"),
        "model": {"path": str(model)},
        "camera": {"source": str(clip), "fps": FPS, "loop": True},
        "tracker": {"confirm_frames": 2, "smoothing_s": 0.2, "switch_after_s": 0.5, "end_after_s": 1.0},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "username": "serenbox",
            "password": USERS["serenbox"],
            "state_interval_s": 0.5,
            "stats_interval_s": 1,
        },
    }
    path = work / "serenbox.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="the Debian root Home Assistant runs in")
    ap.add_argument("--venv", type=Path, required=True, help="Home Assistant's venv (bound at /opt/ha)")
    ap.add_argument("--workdir", type=Path, required=True, help="an empty directory for this run")
    ap.add_argument("--machine", default="serenbox-ha-check", help="systemd-nspawn machine name")
    args = ap.parse_args(argv)
    work = args.workdir.resolve()
    checks = Checks()
    broker = Mosquitto(work / "broker", users=USERS, acl=acl_from_docs())
    ha = HomeAssistant(args.root, args.venv, work / "ha-config", http_port(), args.machine)
    box: Daemon | None = None
    watch: Watcher | None = None
    announces: Watcher | None = None
    try:
        broker.start()
        watch = watcher(broker, [f"serenbox/{DEVICE}/#"]).start()
        # Home Assistant's side of the broker, as docs/mqtt.md's access list lets it see it.
        announces = watcher(
            broker, ["homeassistant/device/+/config"], user="controller", client_id="ha-check-announces"
        )
        announces.start()
        config_path = prepare_box(work, broker)
        cfg = load(config_path)
        expected = ha_discovery.payload(cfg)
        scenario = Scenario(ha, broker, watch, announces, cfg, expected)
        # The rest needs all three.
        if (
            checks.run("Home Assistant answers", lambda: start(ha))
            and checks.run("HA on 127.0.0.1, own network namespace", lambda: local_only(ha))
            and checks.run("owner onboarded (REST)", lambda: (ha.onboard(), "access token issued")[1])
            and checks.run("MQTT set up by config flow", scenario.mqtt_config_flow)
        ):
            box = Daemon(config_path)
            for name, fn in scenario.steps(box, config_path):
                checks.run(name, fn)
    finally:
        if box is not None:
            box.finish(kill=box.proc.poll() is None)
        ha.stop()
        for w in (watch, announces):
            if w is not None:
                w.stop()
        broker.stop()
    held = len(checks.results) - checks.failed
    print(f"ha_check: {held} of {len(checks.results)} checks held (Home Assistant {ha_version(ha)})")
    return 1 if checks.failed else 0


def start(ha: HomeAssistant, tries: int = 3) -> str:
    """Start Home Assistant; on a port taken meanwhile by someone else, again on another."""
    for attempt in range(1, tries + 1):
        ha.start()
        try:
            return f"API up after {ha.wait_ready(START_TIMEOUT_S):.0f} s on {ha.base} (try {attempt})"
        except PortTaken:
            ha.stop()
            if attempt == tries:
                raise
            ha.port = http_port()
    raise AssertionError("unreachable")


def local_only(ha: HomeAssistant) -> str:
    """HTTP on 127.0.0.1 only, and nothing else of Home Assistant's on the host's network: the
    check runs in a network namespace of its own (ha_check.sh), where only loopback exists."""
    found = ha.sockets()
    tcp = [addr for proto, addr in found if proto == "tcp"]
    assert tcp == [f"127.0.0.1:{ha.port}"], f"TCP listeners {tcp}, want only 127.0.0.1:{ha.port}"
    interfaces = ha.interfaces()
    assert interfaces == ["lo"], f"Home Assistant sees interfaces {interfaces}: not the check's own namespace"
    udp = [addr for proto, addr in found if proto == "udp"]
    return f"TCP {tcp}, UDP {udp}; interfaces {interfaces}"


def ha_version(ha: HomeAssistant) -> str:
    found = sorted(ha.venv.glob("lib/python3*/site-packages/homeassistant-*.dist-info"))
    return found[0].name.removesuffix(".dist-info").split("-")[1] if found else "?"


class Scenario:
    """The checks after Home Assistant is up, in order; each returns what it saw."""

    def __init__(
        self, ha: HomeAssistant, broker: Mosquitto, watch: Watcher, announces: Watcher, cfg: Any, expected: dict
    ) -> None:
        self.ha, self.broker, self.watch, self.announces = ha, broker, watch, announces
        self.cfg, self.expected = cfg, expected
        self.device_id = ""
        self.entities: dict[str, str] = {}  # component id -> entity_id

    def steps(self, box: Daemon, config_path: Path) -> list[tuple[str, Callable[[], str]]]:
        return [
            ("device in the registry", self.device),
            ("every entity from cmps", self.entity_registry),
            ("entities available", self.available),
            ("emotion sensor follows the clip", self.emotion_follows),
            ("event entity fires", self.event_fires),
            ("occupancy on and faces > 0 with a face", self.occupancy),
            ("nobody: emotion unknown, occupancy off", self.nobody),
            ("diagnostic sensors report", self.diagnostics),
            ("switch on pauses SerenBox", self.pause),
            ("switch off resumes SerenBox", self.resume),
            ("HA restarted: the box announces again", self.reannounce),
            ("no discovery or template errors, no repair issue", self.log_clean),
            ("box stopped: entities unavailable", lambda: self.stopped(box)),
            ("serenbox ha-remove deletes the device", lambda: self.removed(config_path)),
        ]

    # --- set-up ------------------------------------------------------------------------------

    def mqtt_config_flow(self) -> str:
        result = self.ha.add_mqtt(self.broker.host, self.broker.port, "controller", USERS["controller"])
        assert result.get("type") == "create_entry", f"flow ended with {result}"
        entry_id = result["result"]["entry_id"]

        def loaded() -> bool:
            entries = self.ha.get("/api/config/config_entries/entry")
            return any(e["entry_id"] == entry_id and e["state"] == "loaded" for e in entries)

        wait_until(loaded, WAIT_S, "the MQTT entry loaded")
        return f"entry {entry_id} loaded, logged in as controller (docs/mqtt.md's access list)"

    # --- registries --------------------------------------------------------------------------

    def _our_device(self) -> dict[str, Any] | None:
        ident = ["mqtt", self.expected["dev"]["identifiers"][0]]
        devices = self.ha.ws("config/device_registry/list")
        return next((d for d in devices if ident in d["identifiers"]), None)

    def device(self) -> str:
        dev = wait_until(self._our_device, WAIT_S, "the device in HA's device registry")
        self.device_id = dev["id"]
        want = self.expected["dev"]
        got = {k: dev.get(k) for k in ("name", "manufacturer", "model", "sw_version")}
        assert got == {k: want[k] for k in got}, f"device {got} != discovery {want}"
        assert want["sw_version"] == __version__
        return f"{dev['identifiers']}, {got}"

    def entity_registry(self) -> str:
        want = {spec["unique_id"]: (cid, spec["p"]) for cid, spec in self.expected["cmps"].items()}

        def ours() -> list[dict[str, Any]]:
            entries = [e for e in self.ha.ws("config/entity_registry/list") if e.get("device_id") == self.device_id]
            return entries if len(entries) >= len(want) else []

        entries = wait_until(ours, WAIT_S, f"{len(want)} entities on the device (see the log check)")
        got = {e["unique_id"]: e for e in entries}
        assert set(got) == set(want), f"unique ids differ: missing {set(want) - set(got)}, extra {set(got) - set(want)}"
        for uid, (cid, platform) in want.items():
            e = got[uid]
            assert e["platform"] == "mqtt" and e["entity_id"].split(".")[0] == platform, f"{uid}: {e['entity_id']}"
            category = self.expected["cmps"][cid].get("entity_category")
            assert e.get("entity_category") == category, f"{e['entity_id']}: category {e.get('entity_category')}"
            self.entities[cid] = e["entity_id"]
        return ", ".join(sorted(self.entities.values()))

    # --- live states -------------------------------------------------------------------------

    def _state(self, cid: str) -> dict[str, Any]:
        assert cid in self.entities, f"no entity for component {cid!r} in HA's registry"
        state = self.ha.state(self.entities[cid])
        assert state is not None, f"{self.entities[cid]} has no state"
        return state

    def available(self) -> str:
        def all_up() -> dict[str, str]:
            states = {cid: self._state(cid)["state"] for cid in self.entities}
            return states if "unavailable" not in states.values() else {}

        states = wait_until(all_up, WAIT_S, "every entity available")
        return ", ".join(f"{cid}={s}" for cid, s in states.items())

    def emotion_follows(self) -> str:
        seen: list[str] = []
        options = self._state("emotion")["attributes"].get("options")
        assert options == list(LABELS), f"options {options}"

        def both() -> bool:
            s = self._state("emotion")
            if not seen or seen[-1] != s["state"]:
                seen.append(s["state"])
            return {"happy", "sad"} <= set(seen)

        wait_until(both, 4 * SECONDS_EACH + WAIT_S, f"happy and sad (seen {seen})")
        odd = set(seen) - set(LABELS) - {"unknown"}
        assert not odd, f"states outside the 7 emotions: {odd}"
        attrs = self._state("emotion")["attributes"]
        assert set(LABELS) <= attrs.keys(), f"attributes {attrs}"
        return f"states in order: {seen}; attributes carry the 7 probabilities"

    def event_fires(self) -> str:
        fired: dict[str, str] = {}  # event_type -> state (a timestamp)

        def both() -> bool:
            s = self._state("emotion_event")
            if s["state"] not in ("unknown", "unavailable"):
                datetime.fromisoformat(s["state"])  # the state of an event entity is when it fired
                fired[s["attributes"]["event_type"]] = s["state"]
            return {"happy", "sad"} <= fired.keys()

        wait_until(both, 4 * SECONDS_EACH + WAIT_S, f"events happy and sad (fired {fired})")
        attrs = self._state("emotion_event")["attributes"]
        assert attrs.get("event_types") == list(LABELS), attrs
        assert set(fired) <= set(LABELS) and {"confidence", "track_id", "type"} <= attrs.keys(), attrs
        return f"fired {fired}; last attributes {attrs}"

    def occupancy(self) -> str:
        def seen() -> dict[str, str]:
            s = {cid: self._state(cid)["state"] for cid in ("occupancy", "faces", "confidence")}
            return s if s["occupancy"] == "on" and s["faces"] not in ("unknown", "unavailable") else {}

        s = wait_until(seen, WAIT_S, "occupancy on")
        assert float(s["faces"]) > 0 and 0 < float(s["confidence"]) <= 100, s
        return str(s)

    def nobody(self) -> str:
        """The templates' None (no dominant emotion) must read as unknown, not as a made-up state."""
        want = {"occupancy": "off", "faces": "0", "emotion": "unknown", "confidence": "unknown"}
        last: dict[str, Any] = {}

        def empty() -> bool:
            last.update({cid: self._state(cid)["state"] for cid in want})
            last["box"] = {k: self._retained_state().get(k) for k in ("faces", "dominant")}
            return all(last[cid] == v for cid, v in want.items())

        wait_until(empty, 4 * SECONDS_EMPTY + WAIT_S, f"{want} with nobody there (last: {last})")
        return str(last)

    def diagnostics(self) -> str:
        needed = ("fps", "classify_latency", "spool_depth")

        def numbers() -> dict[str, str]:
            s = {cid: self._state(cid)["state"] for cid in (*needed, "cpu_temperature")}
            return s if all(s[c] not in ("unknown", "unavailable") for c in needed) else {}

        s = wait_until(numbers, WAIT_S, "fps, latency and spool depth")
        assert float(s["fps"]) > 0 and float(s["classify_latency"]) >= 0 and float(s["spool_depth"]) >= 0, s
        if s["cpu_temperature"] not in ("unknown",):
            float(s["cpu_temperature"])
        return str(s)

    # --- the switch --------------------------------------------------------------------------

    def _retained_state(self) -> dict[str, Any]:
        msgs = self.watch.on("/state")
        return msgs[-1].json() if msgs else {}

    def _frames(self) -> int:
        msgs = self.watch.on("/stats")
        return int(msgs[-1].json()["frames"]) if msgs else -1

    def _frames_after(self, seconds: float) -> tuple[int, int]:
        """The `frames` counter of two stats messages `seconds` apart."""
        n = len(self.watch.on("/stats"))
        wait_until(lambda: len(self.watch.on("/stats")) > n, WAIT_S, "a stats message")
        first = self._frames()
        time.sleep(seconds)
        n = len(self.watch.on("/stats"))
        wait_until(lambda: len(self.watch.on("/stats")) > n, WAIT_S, "a stats message")
        return first, self._frames()

    def pause(self) -> str:
        assert "paused" in self.entities, "no switch in HA's registry"
        self.ha.post("/api/services/switch/turn_on", {"entity_id": self.entities["paused"]})
        wait_until(lambda: self._retained_state().get("paused") is True, WAIT_S, "state.paused true from the box")
        wait_until(lambda: self._state("paused")["state"] == "on", WAIT_S, "the switch on in HA")
        a, b = self._frames_after(3)
        assert a == b, f"frames went on while paused: {a} -> {b}"
        return f"state.paused true, switch on, frames stayed at {a} over 3 s"

    def resume(self) -> str:
        assert "paused" in self.entities, "no switch in HA's registry"
        self.ha.post("/api/services/switch/turn_off", {"entity_id": self.entities["paused"]})
        wait_until(lambda: self._retained_state().get("paused") is False, WAIT_S, "state.paused false from the box")
        wait_until(lambda: self._state("paused")["state"] == "off", WAIT_S, "the switch off in HA")
        a, b = self._frames_after(3)
        assert b > a, f"frames did not advance after resume: {a} -> {b}"
        return f"state.paused false, switch off, frames {a} -> {b} over 3 s"

    def reannounce(self) -> str:
        """Home Assistant's own birth message (not a test's imitation) makes the box announce again."""
        topic = ha_discovery.config_topic(self.cfg)
        before = len(self.announces.on(topic))
        assert before >= 1 and json.loads(self.announces.on(topic)[0].payload) == self.expected, "first announce"
        self.ha.stop()
        self.ha.start()
        up = self.ha.wait_ready(START_TIMEOUT_S)
        t0 = time.monotonic()
        fresh = wait_until(
            lambda: [m for m in self.announces.on(topic)[before:] if not m.retain], WAIT_S, "a live announce"
        )
        took = time.monotonic() - t0
        assert json.loads(fresh[0].payload) == self.expected, "the re-announce differs"
        wait_until(lambda: self._state("emotion")["state"] in LABELS, WAIT_S, "the emotion sensor back")
        return f"HA up again after {up:.0f} s; the box announced again {took:.1f} s later; emotion sensor back"

    def log_clean(self) -> str:
        lines = [line for line in self.ha.log().splitlines() if " ERROR " in line or " WARNING " in line]
        ours = [line for line in lines if any(w in line.lower() for w in ("mqtt", "serenbox", "template", DEVICE))]
        assert not ours, " | ".join(ours[:5])
        # MQTT files a repair issue for a deprecated or doubtful discovery option.
        issues = [i for i in self.ha.ws("repairs/list_issues")["issues"] if i["domain"] == "mqtt"]
        assert not issues, f"MQTT repair issues: {issues}"
        others = "; ".join(line[:160] for line in lines[:3])
        return f"none about mqtt, templates or the box; no MQTT repair issue; {len(lines)} other(s): {others}"

    # --- the end -----------------------------------------------------------------------------

    def stopped(self, box: Daemon) -> str:
        import signal

        code = box.finish(signal.SIGTERM)
        assert code == 0, f"serenbox exited {code}"

        assert len(self.entities) == len(self.expected["cmps"]), f"only {len(self.entities)} entities to watch"

        def all_down() -> bool:
            return all(self._state(cid)["state"] == "unavailable" for cid in self.entities)

        wait_until(all_down, WAIT_S, "every entity unavailable after the box's offline")
        return f"serenbox exited 0; all {len(self.entities)} entities unavailable"

    def removed(self, config_path: Path) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "serenbox", "ha-remove", "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: self._our_device() is None, WAIT_S, "the device gone from HA's registry")
        left = [e for e in self.ha.ws("config/entity_registry/list") if e.get("device_id") == self.device_id]
        assert not left, f"entities left: {[e['entity_id'] for e in left]}"
        assert all(self.ha.state(e) is None for e in self.entities.values()), "states left behind"
        return f"{proc.stderr.strip()}; device and its {len(self.entities)} entities gone"


if __name__ == "__main__":
    sys.exit(main())
