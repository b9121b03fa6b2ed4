"""Which NATS consumer group is at-least-once: a core NATS queue group or a JetStream durable consumer?

    python benchmarks/bench_nats_groups.py [--events 3000] [--rate 200]

One box (the real MQTT sink, `mqtt.hosts` = a 3-node NATS cluster on loopback that the script
starts) publishes `--events` events at `--rate` per second. Two groups of two member processes
read them at the same time: a queue group on the plain subject `serenbox.*.events`, and a
NatsGroup (JetStream durable pull consumer, explicit acks). A third of the way in, one member of
each group is killed with SIGKILL; two thirds in, one node is killed (and restarted). Prints, per
group: events received, lost, duplicated.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serenbox.device.config import from_dict  # noqa: E402
from serenbox.device.sinks.mqtt import MqttSink  # noqa: E402

from tests.nats_cluster import NatsCluster  # noqa: E402

QUEUE_MEMBER = """
import asyncio, json, sys
import nats

async def main():
    async def quiet(e): pass
    nc = await nats.connect(servers=sys.argv[1].split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                            error_cb=quiet)
    async def on(msg):
        print(json.loads(msg.data)["id"], flush=True)
    await nc.subscribe("serenbox.*.events", queue="bench-queue", cb=on)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""

JETSTREAM_MEMBER = """
import logging, sys
from serenbox.nats_group import NatsGroup
logging.disable(logging.WARNING)
with NatsGroup(sys.argv[1].split(","), "bench-durable", ack_wait_s=3, batch=20) as group:
    print("ready", flush=True)
    for event in group.events():
        print(event["id"], flush=True)
"""


class Member:
    def __init__(self, code: str, urls: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, urls], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.ids: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "ready":
                self.ready.set()
            else:
                self.ids.append(line.strip())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=200.0)
    args = ap.parse_args()
    if args.events < 3 or args.rate <= 0:
        ap.error("--events must be at least 3 and --rate positive")
    with tempfile.TemporaryDirectory(prefix="bench-groups-") as tmp:
        cluster = NatsCluster(Path(tmp) / "nats").start()
        urls = ",".join(cluster.nats_urls())
        groups = {
            "queue group (core NATS)": [Member(QUEUE_MEMBER, urls) for _ in range(2)],
            "JetStream durable consumer (NatsGroup)": [Member(JETSTREAM_MEMBER, urls) for _ in range(2)],
        }
        for members in groups.values():
            for m in members:
                if not m.ready.wait(60):
                    raise SystemExit("a group member did not start")
        m = {"hosts": cluster.mqtt_hosts(), "reconnect_min_s": 0.5, "reconnect_max_s": 2.0}
        cfg = {"device_id": "bench-box", "state_dir": f"{tmp}/box", "mqtt": m, "homeassistant": {"discovery": False}}
        sink = MqttSink(from_dict(cfg, env={}))
        sink.start()
        sent: list[str] = []
        node_killed = -1
        for i in range(1, args.events + 1):
            event_id = f"bench-box:{i}"
            sink.emit({"schema": "serenbox.event/1", "id": event_id, "device_id": "bench-box", "seq": i})
            sent.append(event_id)
            if i == args.events // 3:
                for members in groups.values():
                    members[0].kill()
                print(f"killed one member of each group after event {i}", flush=True)
            if i == 2 * args.events // 3:
                node_killed = 1
                cluster.kill(node_killed)
                print(f"killed node n{node_killed + 1} after event {i}", flush=True)
            time.sleep(1.0 / args.rate)
        deadline = time.monotonic() + 60
        while sink.counters()["spool_depth"] and time.monotonic() < deadline:
            time.sleep(0.2)
        sink.close()
        if node_killed >= 0:
            cluster.restart(node_killed)
        time.sleep(8)  # JetStream redelivers the dead member's unacknowledged events after ack_wait
        for name, members in groups.items():
            got = [i for m in members for i in m.ids]
            lost = len(set(sent) - set(got))
            dup = len(got) - len(set(got))
            print(f"{name}: sent {len(sent)}, received {len(set(got))}, lost {lost}, duplicated {dup}")
        for members in groups.values():
            for m in members:
                m.kill()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
