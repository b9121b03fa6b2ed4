"""Spool and MQTT delivery figures against a real local mosquitto.

    python benchmarks/bench_spool.py [--events 3000] [--outage-s 10] [--rate 100]

Prints: durable spool writes per second; events per second flushed to the broker (PUBACK'd and
deleted); events lost and duplicated across a broker outage; time from the broker's return to
the spool being drained.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serenbox.device.config import from_dict  # noqa: E402
from serenbox.device.sinks.mqtt import MqttSink  # noqa: E402
from serenbox.device.spool import Spool  # noqa: E402

from tests.mosquitto import Mosquitto, Watcher, mosquitto_binary  # noqa: E402

DEVICE = "bench"
PAYLOAD_PAD = "x" * 400  # a real event is ~500 bytes of JSON


def event(seq: int) -> dict:
    return {"schema": "serenbox.event/1", "id": str(uuid.uuid4()), "seq": seq, "pad": PAYLOAD_PAD}


def config(broker: Mosquitto, state: Path, **mqtt: object):
    m = {"host": broker.host, "port": broker.port, **mqtt}
    return from_dict({"device_id": DEVICE, "state_dir": str(state), "mqtt": m}, env={})


def wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def bench_write(tmp: Path, n: int) -> None:
    s = Spool(tmp / "write.sqlite", max_events=10 * n, max_age_s=3600)
    payloads = [str(event(i)) for i in range(n)]
    t0 = time.perf_counter()
    for p in payloads:
        s.append(p)
    dt = time.perf_counter() - t0
    s.close()
    print(f"spool write (committed, synchronous=FULL, WAL): {n / dt:,.0f} events/s ({dt / n * 1e6:.0f} us/event)")


def bench_flush(tmp: Path, n: int) -> None:
    with Mosquitto(tmp / "b-flush") as broker, Watcher(broker, [f"serenbox/{DEVICE}/events"]) as w:
        state = tmp / "flush-state"
        sink = MqttSink(config(broker, state))
        for i in range(n):  # spooled before the connection exists
            sink.emit(event(i))
        t0 = time.perf_counter()
        sink.start()
        ok = wait(lambda: sink.counters()["spool_depth"] == 0, 120)
        dt = time.perf_counter() - t0
        wait(lambda: len(w.on("/events")) >= n, 30)
        sink.close()
    print(
        f"spool flush to mosquitto (QoS 1, PUBACK'd and deleted, incl. connect): {n / dt:,.0f} events/s"
        f" ({n} events in {dt:.2f} s{'' if ok else ', NOT DRAINED'}); watcher got {len(w.on('/events'))}"
    )


def bench_outage(tmp: Path, outage_s: float, rate: float) -> None:
    broker = Mosquitto(tmp / "b-outage", persistent=True).start()
    w = Watcher(broker, [f"serenbox/{DEVICE}/events"], persistent=True).start()
    sink = MqttSink(config(broker, tmp / "outage-state", reconnect_min_s=1.0, reconnect_max_s=5.0))
    sink.start()
    wait(lambda: sink.counters()["mqtt_connected"], 10)
    sent: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        next_t = time.monotonic()
        while not stop.is_set():
            i += 1
            e = event(i)
            sink.emit(e)
            sent.append(e["id"])
            next_t += 1.0 / rate
            time.sleep(max(0.0, next_t - time.monotonic()))

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(2.0)
    broker.stop()
    time.sleep(outage_s)
    depth_at_return = sink.counters()["spool_depth"]
    broker.start()
    t_back = time.monotonic()
    wait(lambda: sink.counters()["mqtt_connected"], 60)
    t_conn = time.monotonic()
    # The producer keeps going, so "drained" means back to the steady state of a few in flight.
    wait(lambda: sink.counters()["spool_depth"] <= 5, 120)
    t_drained = time.monotonic()
    time.sleep(1.0)
    stop.set()
    t.join()
    wait(lambda: len({m.json()["id"] for m in w.on("/events")}) >= len(sent), 60)
    time.sleep(0.5)
    got = [m.json()["id"] for m in w.on("/events") if not m.dup]
    lost = len(set(sent) - set(got))
    dup = len(got) - len(set(got))
    in_order = [i for i in got if i in set(sent)] == sent
    sink.close()
    w.stop()
    broker.stop()
    print(
        f"broker outage {outage_s:.0f} s at {rate:.0f} events/s: {len(sent)} events, lost {lost}, duplicated {dup},"
        f" in order {in_order}; spool depth at broker return {depth_at_return}"
    )
    print(
        f"broker return -> reconnected {t_conn - t_back:.2f} s (reconnect backoff 1..5 s);"
        f" reconnected -> spool drained {t_drained - t_conn:.2f} s; total {t_drained - t_back:.2f} s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--outage-s", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=100.0, help="events per second during the outage run")
    args = ap.parse_args()
    if mosquitto_binary() is None:
        print("mosquitto is not installed", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bench_write(tmp, args.events)
        bench_flush(tmp, args.events)
        bench_outage(tmp, args.outage_s, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
