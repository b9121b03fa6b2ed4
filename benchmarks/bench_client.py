"""serenbox.client figures against a real local mosquitto.

    python benchmarks/bench_client.py [--events 3000] [--group-events 200]

Prints: the memory of the default dedupe window; events per second through one client (typed
parsing, dedupe, manual acknowledgement); then, for a consumer group of two member processes
where one is killed (SIGKILL) mid-stream, what the broker does with the dead member's share in
three cases: it comes back with its client id; its session expires first; it had no session.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from serenbox.device.config import from_dict  # noqa: E402
from serenbox.device.sinks.mqtt import MqttSink  # noqa: E402

import serenbox.client  # noqa: E402
from tests.mosquitto import Mosquitto, mosquitto_binary  # noqa: E402

DEVICE = "bench"


def event(seq: int) -> dict:
    return {
        "schema": "serenbox.event/1",
        "id": str(uuid.uuid4()),
        "type": "new",
        "device_id": DEVICE,
        "run_id": "bench-run",
        "seq": seq,
        "track_id": 1,
        "timestamp": "2026-11-25T10:00:00.419Z",
        "emotion": "happy",
        "confidence": 0.83,
        "probabilities": {
            "angry": 0.01,
            "disgust": 0.0,
            "fear": 0.02,
            "happy": 0.83,
            "neutral": 0.1,
            "sad": 0.03,
            "surprise": 0.01,
        },
        "box": {"x": 0.2, "y": 0.2, "w": 0.25, "h": 0.3333},
    }


def dedupe_memory() -> None:
    tracemalloc.start()
    d = serenbox.client.Dedupe(serenbox.client.DEFAULT_DEDUPE)
    for _ in range(serenbox.client.DEFAULT_DEDUPE * 2):  # full, and forgetting the oldest
        d.add(str(uuid.uuid4()))
    used, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"dedupe memory: {len(d)} event ids remembered in {used / 1e6:.2f} MB")


def throughput(broker: Mosquitto, n: int) -> None:
    payloads = [json.dumps(event(i)) for i in range(1, n + 1)]
    with serenbox.client.connect(broker.host, broker.port, device=DEVICE, kinds=["events"]) as c:
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.max_inflight_messages_set(100)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        infos = [pub.publish(f"serenbox/{DEVICE}/events", p, qos=1) for p in payloads]
        got, start = 0, None
        for _ in c.events(timeout=10):
            start = start or time.perf_counter()
            got += 1
            if got == n:
                break
        elapsed = time.perf_counter() - (start or time.perf_counter())
        for info in infos:
            info.wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
    print(f"client throughput: {got} of {n} events in {elapsed:.2f} s = {got / max(elapsed, 1e-9):.0f} events/s "
          f"(first to last, manual acks)")  # fmt: skip


class Member:
    def __init__(self, broker: Mosquitto, client_id: str, *args: str) -> None:
        cmd = [sys.executable, "-m", "tests.client_member", broker.host, str(broker.port), client_id, "--group", "g"]
        self.proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.ids: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(30):
            raise RuntimeError(f"member {client_id} did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ready"):
                self.ready.set()
            elif line.startswith("{"):
                self.ids.append(json.loads(line)["id"])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def settle(member: Member, quiet_s: float = 1.5, limit_s: float = 30.0) -> None:
    """Wait until the member has taken nothing new for `quiet_s` (it works through its backlog)."""
    deadline = time.monotonic() + limit_s
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if len(member.ids) != seen:
            seen, since = len(member.ids), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.05)


def group_case(tmp: Path, name: str, n: int, member_args: list[str], comes_back: bool, wait_s: float) -> None:
    broker = Mosquitto(tmp / name / "broker").start()
    m = {"host": broker.host, "port": broker.port}
    sink = MqttSink(from_dict({"device_id": DEVICE, "state_dir": str(tmp / name / "state"), "mqtt": m}, env={}))
    sink.start()
    m1 = Member(broker, "member-1", "--delay", "0.02", *member_args)
    m2 = Member(broker, "member-2", "--delay", "0.02", *member_args)
    sent = [event(i) for i in range(1, n + 1)]
    late = [event(i) for i in range(n + 1, n + n // 2 + 1)]  # published once the dead session had time to expire
    for e in sent[: n // 2]:
        sink.emit(e)
    deadline = time.monotonic() + 30
    while len(m1.ids) < n // 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    m1.kill()
    taken_by_dead = len(m1.ids)
    for e in sent[n // 2 :]:
        sink.emit(e)
    time.sleep(wait_s)
    for e in late:
        sink.emit(e)
    settle(m2)
    sent += late
    all_ids = {e["id"] for e in sent}
    away = all_ids - set(m1.ids) - set(m2.ids)
    late_to_live = len({e["id"] for e in late} & set(m2.ids))
    back: Member | None = None
    if comes_back:
        back = Member(broker, "member-1", *member_args)
        deadline = time.monotonic() + 20
        while all_ids - set(m1.ids) - set(m2.ids) - set(back.ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    later = back.ids if back else []
    lost = all_ids - set(m1.ids) - set(m2.ids) - set(later)
    twice = len(m1.ids) + len(m2.ids) + len(later) - len(all_ids - lost)
    print(
        f"group, {name}: published {len(sent)} ({len(late)} of them {wait_s:g} s after the kill, {late_to_live} of "
        f"those to the live member); dead member took {taken_by_dead} before SIGKILL; live member took "
        f"{len(m2.ids)}; not delivered while the member was dead: {len(away)}; "
        f"after it came back: {len(later) if back else '-'}; lost {len(lost)}; duplicated {twice}"
    )
    for p in (m2, back):
        if p is not None:
            p.kill()
    sink.close()
    broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--group-events", type=int, default=200)
    args = parser.parse_args()
    if mosquitto_binary() is None:
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)
    dedupe_memory()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with Mosquitto(tmp / "throughput") as broker:
            throughput(broker, args.events)
        n = args.group_events
        group_case(tmp, "persistent member comes back", n, [], comes_back=True, wait_s=3)
        group_case(tmp, "session expires (2 s), never back", n, ["--expiry", "2"], comes_back=False, wait_s=6)
        group_case(tmp, "no persistent session", n, ["--live"], comes_back=False, wait_s=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
