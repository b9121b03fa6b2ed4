"""A fleet of simulated boxes against a 3-node NATS cluster on loopback, with nodes killed as it runs.

    python benchmarks/bench_fleet.py [--boxes 100] [--rate 1] [--duration 60] [--kill-every 15]
                                     [--down-s 5] [--workers 4] [--consumers 1] [--emitters 10]
                                     [--ack-timeout S] [--window N]
    python benchmarks/bench_fleet.py --hosts n1:1883,n2:1883,n3:1883 --nats nats://n1:4222,... \
                                     [--box-prefix gen1] [--group gen1] [--boxes ...]

Each box is the real MQTT sink (device/sinks/mqtt.py) with its own SQLite spool, `mqtt.hosts`
naming all three nodes and a synthetic event source; the boxes run in `--workers` processes,
each emitting from `--emitters` threads (a box's emit waits for its own spool's fsync, as on a
real box, and must not hold back the other boxes of its process).
The back end is `--consumers` members of one NatsGroup (serenbox/nats_group.py). Every
`--kill-every` seconds one node (in turn) is killed with SIGKILL and started again `--down-s`
later. The script starts and stops the cluster itself (tests/nats_cluster.py).

With `--hosts` (the nodes' MQTT listeners) and `--nats` (their NATS client URLs) it runs against
a cluster that is already up, on other machines: it kills no node (kill one by hand and read the
latency and "impaired" figures), and measures no node's CPU. Several load generators can share
one cluster: give each its own `--box-prefix` and `--group` (each group reads every event and
counts only its own generator's boxes).

Prints: events sent, received, lost, duplicated, out of order (per box, at the consumer);
throughput; p50/p99 box-to-consumer latency (all events, and outside failovers); the time for
every box of a killed node to be connected again; how late the simulator emitted; the CPU the
boxes, the nodes and the consumer used per event; the load average seen.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serenbox.device.config import from_dict  # noqa: E402
from serenbox.device.sinks.mqtt import MqttSink  # noqa: E402

from serenbox.nats_group import NatsGroup  # noqa: E402
from tests.nats_cluster import NatsCluster  # noqa: E402

# A failover window: events emitted from a second before a kill until this long after the
# cluster is whole again (or the last box healthy) are "during a failover"; the rest are the
# steady state the latency target is about.
FAILOVER_MARGIN_S = 2.0
DRAIN_TIMEOUT_S = 120.0
BOXES_PER_PROCESS = 100
SAMPLE_EVERY_S = 0.1  # how often each box's health is read (the resolution of the recovery times)


def emit_loop(boxes: list[str], sinks: dict[str, MqttSink], due: dict[str, float], period: float, until: float,
              sent: dict[str, int], lag: list[float]) -> None:  # fmt: skip
    """One emitter thread: its boxes in turn, each when it is due. A box's emit waits for its own
    spool's fsync, as on a real box; several emitters per process keep one box's disk wait from
    holding back the others (a real box has its own disk)."""
    order = sorted(boxes, key=due.__getitem__)  # dues stay in this cyclic order: every box has one period
    i = 0
    while True:
        b = order[i % len(order)]
        i += 1
        if due[b] >= until:
            return
        wait = due[b] - time.time()
        if wait > 0:
            time.sleep(wait)
        sent[b] += 1
        now = time.time()
        lag.append(now - due[b])  # how late the simulator is: a figure of its own, printed
        sinks[b].emit(
            {"schema": "serenbox.event/1", "id": f"{b}:{sent[b]}", "type": "update", "device_id": b,
             "seq": sent[b], "sent_at": now, "emotion": "happy", "confidence": 0.83,
             "probabilities": {"angry": 0.01, "disgust": 0.0, "fear": 0.02, "happy": 0.83,
                               "neutral": 0.1, "sad": 0.03, "surprise": 0.01}}
        )  # fmt: skip
        due[b] += period


def box_worker(
    boxes: list[str], hosts: list[str], rate: float, duration: float, state: str, start_at: float, out: str,
    emitters: int, overrides: dict[str, Any],
) -> None:  # fmt: skip
    """One process: its share of boxes, each a real MqttSink; writes what it sent and saw to `out`."""
    keep = os.environ.get("BENCH_FLEET_KEEP_LOGS")
    if keep:  # the boxes' own log, one file per worker process
        Path(keep).mkdir(parents=True, exist_ok=True)
        fmt = "%(created).3f %(threadName)s %(message)s"  # paho's thread is named after the client id
        logging.basicConfig(level=logging.INFO, filename=f"{keep}/{Path(out).stem}.log", format=fmt)
    else:
        logging.basicConfig(level=logging.ERROR)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sinks: dict[str, MqttSink] = {}
    for b in boxes:
        m = {"hosts": hosts, "reconnect_min_s": 0.5, "reconnect_max_s": 2.0, "keepalive": 10, "protocol": "3.1.1",
             **overrides}  # fmt: skip
        # A company fleet has no Home Assistant: no discovery config retained per box in the cluster.
        cfg = {"device_id": b, "state_dir": f"{state}/{b}", "mqtt": m, "homeassistant": {"discovery": False}}
        sinks[b] = MqttSink(from_dict(cfg, env={}))
        sinks[b].start()
    sent = dict.fromkeys(boxes, 0)
    impaired = dict.fromkeys(boxes, True)
    # (wall time, box, impaired): a box is impaired while it is not connected or its events wait
    # (2 or more in its spool: at one event per second, more than the one just emitted).
    transitions: list[tuple[float, str, bool]] = []

    def sample(now: float) -> None:
        for b, sink in sinks.items():
            c = sink.counters()
            bad = not c["mqtt_connected"] or c["spool_depth"] >= 2
            if bad != impaired[b]:
                impaired[b] = bad
                transitions.append((now, b, bad))

    period = 1.0 / rate
    # Boxes are spread evenly over the period, as real boxes are not in step.
    due = {b: start_at + (i / len(boxes)) * period for i, b in enumerate(boxes)}
    lags: list[list[float]] = [[] for _ in range(emitters)]
    until = start_at + duration
    threads = [
        threading.Thread(target=emit_loop, args=(boxes[i::emitters], sinks, due, period, until, sent, lag), daemon=True)
        for i, lag in enumerate(lags)
        if boxes[i::emitters]
    ]
    cpu_at_start = resource.getrusage(resource.RUSAGE_SELF)
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        now = time.time()
        sample(now)
        if os.environ.get("BENCH_FLEET_TRACE") and int(now * 10) % 10 == 0:
            depth = sum(s.counters()["spool_depth"] for s in sinks.values())
            print(f"trace +{now - start_at:.0f}s {os.getpid()}: impaired {sum(impaired.values())}/{len(boxes)},"
                  f" spooled {depth}", file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(max(0.0, now + SAMPLE_EVERY_S - time.time()))
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = {"user": cpu.ru_utime - cpu_at_start.ru_utime, "sys": cpu.ru_stime - cpu_at_start.ru_stime}
    deadline = time.time() + DRAIN_TIMEOUT_S
    while time.time() < deadline and any(s.counters()["spool_depth"] for s in sinks.values()):
        sample(time.time())
        time.sleep(SAMPLE_EVERY_S)
    sample(time.time())
    depth = {b: s.counters()["spool_depth"] for b, s in sinks.items()}
    stuck = {b: {k: sinks[b].counters()[k] for k in ("mqtt_connected", "mqtt_node", "mqtt_failovers")}
             for b in boxes if depth[b]}  # fmt: skip
    failovers = sum(s.counters()["mqtt_failovers"] for s in sinks.values())
    for s in sinks.values():
        s.close()
    lag = sorted(x for each in lags for x in each)[:: max(1, sum(map(len, lags)) // 2000)]  # quantiles kept
    result = {"sent": sent, "transitions": transitions, "depth": depth, "failovers": failovers, "stuck": stuck}
    Path(out).write_text(json.dumps({**result, "lag": lag, "cpu_s": cpu_s}))


Seen = dict[str, list[tuple[float, float]]]  # event id -> (arrival, sent_at) per delivery


def consume(group: NatsGroup, seen: Seen, stop: threading.Event, prefix: str) -> None:
    """One group member: records every delivery of this run's boxes; ends when told (and idle 2 s).
    A shared cluster carries other events too (real boxes', another generator's): they are skipped."""
    with group:
        while not stop.is_set():
            for e in group.events(idle_timeout_s=2.0):
                if str(e.get("id", "")).startswith(f"{prefix}-") and "sent_at" in e:
                    seen.setdefault(e["id"], []).append((time.time(), e["sent_at"]))
                if stop.is_set():
                    break


def node_cpu_s(node: Any) -> float:
    """CPU seconds (user + system) a running nats-server node has used so far."""
    if not node.running:
        return 0.0
    try:
        fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, default=100)
    ap.add_argument("--rate", type=float, default=1.0, help="events per second per box")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of sending")
    ap.add_argument("--kill-every", type=float, default=15.0)
    ap.add_argument("--down-s", type=float, default=5.0)
    ap.add_argument("--max-kills", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--consumers", type=int, default=1)
    ap.add_argument("--emitters", type=int, default=10, help="emitting threads per worker process")
    ap.add_argument("--ack-timeout", type=float, default=None, help="the boxes' mqtt.ack_timeout_s (default: theirs)")
    ap.add_argument("--window", type=int, default=None, help="the boxes' mqtt.window (default: theirs)")
    ap.add_argument("--hosts", default="", help="an external cluster's MQTT listeners, host:port,...")
    ap.add_argument("--nats", default="", help="the same cluster's NATS client URLs (with --hosts)")
    ap.add_argument("--box-prefix", default="box", help="box names are PREFIX-00000, ...")
    ap.add_argument("--group", default="bench", help="the consumer group's name")
    args = ap.parse_args()
    external = bool(args.hosts or args.nats)
    if external and not (args.hosts and args.nats):
        ap.error("--hosts and --nats go together: the boxes publish to the one, the consumer reads the other")
    if any(c in args.box_prefix + args.group for c in " ./*>+#:") or not args.box_prefix or not args.group:
        ap.error("--box-prefix and --group must be non-empty names without spaces, '.', '/', '*', '>', '+', '#' or ':'")
    if args.boxes < 1 or args.rate <= 0 or args.duration <= 0 or args.workers < 1 or args.consumers < 1 \
            or args.emitters < 1 or (args.ack_timeout or 1) < 1 or (args.window or 1) < 1:  # fmt: skip
        ap.error("--boxes, --rate, --duration, --workers, --consumers, --emitters and --window must be positive, "
                 "--ack-timeout at least 1")  # fmt: skip
    logging.basicConfig(level=logging.ERROR)
    # A `timeout` or a kill of the run must still stop the nodes and box processes (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # paho waits on its sockets with select(), which cannot watch a descriptor above 1023; a box
    # uses about 7 (socket, wake-up pair, SQLite files), so a process holds at most this many.
    workers = max(args.workers, math.ceil(args.boxes / BOXES_PER_PROCESS))

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        cluster = None if external else NatsCluster(Path(tmp) / "nats")
        t = time.monotonic()
        procs: list[Any] = []
        stop = threading.Event()
        try:
            if cluster is not None:
                cluster.start()
                print(f"cluster: 3 nodes ready in {time.monotonic() - t:.1f} s", flush=True)
                mqtt_hosts, nats_urls = cluster.mqtt_hosts(), cluster.nats_urls()
            else:
                mqtt_hosts, nats_urls = args.hosts.split(","), args.nats.split(",")
                print(f"external cluster: MQTT {', '.join(mqtt_hosts)}; NATS {', '.join(nats_urls)}", flush=True)
            seen: list[Seen] = [{} for _ in range(args.consumers)]
            groups = [NatsGroup(nats_urls, args.group, ack_wait_s=5, batch=500) for _ in range(args.consumers)]
            for g in groups:
                g.open()  # the durable consumer exists before the first event
            consumers = [
                threading.Thread(target=consume, args=(g, s, stop, args.box_prefix), daemon=True)
                for g, s in zip(groups, seen, strict=True)
            ]
            for c in consumers:
                c.start()

            names = [f"{args.box_prefix}-{i:05d}" for i in range(args.boxes)]
            shares = [names[i::workers] for i in range(workers)]
            start_at = time.time() + 5.0 + args.boxes / 200  # time to connect every box first
            ctx = mp.get_context("spawn")
            settings = (("ack_timeout_s", args.ack_timeout), ("window", args.window))
            overrides = {k: v for k, v in settings if v is not None}  # unset: the product's defaults
            outs = [f"{tmp}/worker{i}.json" for i in range(workers)]
            procs = [
                ctx.Process(
                    target=box_worker,
                    args=(
                        share,
                        mqtt_hosts,
                        args.rate,
                        args.duration,
                        f"{tmp}/state",
                        start_at,
                        out,
                        args.emitters,
                        overrides,
                    ),
                )
                for share, out in zip(shares, outs, strict=True)
                if share
            ]
            for p in procs:
                p.start()
            kills: list[tuple[float, int, float]] = []  # (killed at, node, whole and current again at)
            load: list[float] = []
            victim = 0
            nodes = cluster.nodes if cluster is not None else []
            nats_cpu = -sum(node_cpu_s(n) for n in nodes)
            main_cpu = resource.getrusage(resource.RUSAGE_SELF)
            while time.time() < start_at + args.duration:
                time.sleep(1.0)
                load.append(os.getloadavg()[0])
                since = time.time() - start_at
                if cluster is not None and since > (len(kills) + 1) * args.kill_every and len(kills) < args.max_kills:
                    if since + args.down_s + 15 > args.duration:
                        continue  # too late for a full kill and return inside the run
                    nats_cpu += node_cpu_s(cluster.nodes[victim])
                    cluster.kill(victim)
                    killed_at = time.time()
                    print(f"killed node n{victim + 1} at +{since:.1f} s", flush=True)
                    time.sleep(args.down_s)
                    cluster.restart(victim)  # returns when its streams are replicated and current again
                    kills.append((killed_at, victim, time.time()))
                    print(f"node n{victim + 1} back, streams current at +{time.time() - start_at:.1f} s", flush=True)
                    victim = (victim + 1) % 3
            nats_cpu += sum(node_cpu_s(n) for n in nodes)
            end_cpu = resource.getrusage(resource.RUSAGE_SELF)
            consumer_cpu = end_cpu.ru_utime + end_cpu.ru_stime - main_cpu.ru_utime - main_cpu.ru_stime
            for p in procs:
                p.join(timeout=args.duration + DRAIN_TIMEOUT_S + 60)
            results = [json.loads(Path(o).read_text()) for o in outs if Path(o).exists()]
            sent = {b: n for r in results for b, n in r["sent"].items()}
            total_sent = sum(sent.values())
            # Wait until the consumers have everything, or stop hearing anything.
            deadline = time.time() + 60
            while time.time() < deadline:
                got = set().union(*seen)
                if len(got) >= total_sent:
                    break
                time.sleep(1.0)
            stop.set()
            for c in consumers:
                c.join(timeout=10)
            if os.environ.get("BENCH_FLEET_KEEP_LOGS"):
                for node in nodes:
                    keep = Path(os.environ["BENCH_FLEET_KEEP_LOGS"])
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / f"{node.name}.log").write_text(node.log())
        finally:  # a failed run must not leave nodes or box processes behind
            stop.set()
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=10)
            if cluster is not None:
                cluster.stop()

    arrivals: Seen = {}
    for member in seen:
        for k, v in member.items():
            arrivals.setdefault(k, []).extend(v)
    received = len(arrivals)
    duplicates = sum(len(v) - 1 for v in arrivals.values())
    spooled = {b: d for r in results for b, d in r["depth"].items()}
    missing = {b: sum(1 for i in range(1, n + 1) if f"{b}:{i}" not in arrivals) for b, n in sent.items()}
    # Not received and not in the box's spool either: gone. Still spooled when the run ended: late.
    lost_by_box = {b: max(0, m - spooled.get(b, 0)) for b, m in missing.items()}
    lost = sum(lost_by_box.values())
    # Order at each member: an event handed out after a later event of the same box.
    out_of_order = 0
    for member in seen:
        last: dict[str, int] = {}
        for _, k in sorted((min(v)[0], k) for k, v in member.items()):
            box, seq = k.rsplit(":", 1)
            if int(seq) < last.get(box, 0):
                out_of_order += 1
            last[box] = max(last.get(box, 0), int(seq))
    transitions = sorted((t, b, bad) for r in results for t, b, bad in r["transitions"])
    recoveries: list[float] = []
    windows: list[tuple[float, float]] = []
    for i, (kill_t, victim, whole_t) in enumerate(kills):
        until = kills[i + 1][0] if i + 1 < len(kills) else float("inf")
        # Per box hit by this kill: when it last became healthy again before the next kill.
        healed: dict[str, float] = {}
        hit: set[str] = set()
        for t, b, bad in transitions:
            if kill_t <= t < until:
                if bad:
                    hit.add(b)
                    healed.pop(b, None)
                elif b in hit:
                    healed[b] = t
        unhealed = hit - set(healed)
        each = sorted(t - kill_t for t in healed.values())
        end = max(healed.values(), default=kill_t)
        if hit:
            recoveries.append(float("inf") if unhealed else end - kill_t)
        print(f"kill of n{victim + 1} at +{kill_t - start_at:.1f} s: {len(hit)} box(es) impaired"
              + (f", healthy again after median {each[len(each) // 2]:.1f} s, max {each[-1]:.1f} s" if each else "")
              + (f", {len(unhealed)} never healthy again" if unhealed else ""))  # fmt: skip
        # Consumers are impaired too (a consumer leader is elected anew): the window lasts until
        # the cluster is whole again, or the last box healthy, whichever is later.
        windows.append((kill_t - 1.0, max(end, whole_t) + FAILOVER_MARGIN_S))
    all_lat, steady_lat = [], []
    for v in arrivals.values():
        arrival, sent_at = min(v)
        all_lat.append(arrival - sent_at)
        if not any(lo <= sent_at <= hi for lo, hi in windows):
            steady_lat.append(arrival - sent_at)
    span = args.duration
    print(f"boxes: {args.boxes} in {len(procs)} processes, {args.rate:g} event/s each, {span:g} s; "
          f"{len(kills)} node kill(s), {args.down_s:g} s down each; {args.consumers} consumer(s)")  # fmt: skip
    print(f"events sent: {total_sent}  received: {received}  lost: {lost}  duplicated: {duplicates}  "
          f"out of order: {out_of_order}  still spooled (late, not lost): {sum(spooled.values())}")  # fmt: skip
    per_box_lost = sum(1 for m in lost_by_box.values() if m)
    print(f"per box: {len(sent)} boxes, {per_box_lost} with a loss, sent {min(sent.values(), default=0)}"
          f"-{max(sent.values(), default=0)} each; box failovers: {sum(r['failovers'] for r in results)}")  # fmt: skip
    stuck = {b: v for r in results for b, v in r.get("stuck", {}).items()}
    if stuck:
        print(f"boxes with events still spooled at the end: {len(stuck)}, e.g. {dict(list(stuck.items())[:3])}")
    print(f"throughput: {total_sent / span:.0f} events/s offered (target {args.boxes * args.rate:.0f}), "
          f"{received / span:.0f} events/s received")  # fmt: skip
    ms = 1000.0
    p50, p99 = percentile(all_lat, 0.5) * ms, percentile(all_lat, 0.99) * ms
    lag = sorted(x for r in results for x in r["lag"])
    print(f"simulator lateness (an emit after its due time): p50 {percentile(lag, 0.5) * 1000:.0f} ms, "
          f"p99 {percentile(lag, 0.99) * 1000:.0f} ms, max {max(lag, default=0) * 1000:.0f} ms")  # fmt: skip
    print(f"latency box->consumer: p50 {p50:.0f} ms, p99 {p99:.0f} ms (all); "
          f"outside failovers p50 {percentile(steady_lat, 0.5) * ms:.0f} ms, "
          f"p99 {percentile(steady_lat, 0.99) * ms:.0f} ms ({len(steady_lat)} events)")  # fmt: skip
    if cluster is None:
        print("recovery after a node kill: not measured (an external cluster: this script kills no node)")
    else:
        print("recovery after a node kill (until every impaired box is connected with an empty spool): "
              + (", ".join(f"{r:.1f} s" for r in recoveries) or "no box was on a killed node"))  # fmt: skip
    box_user = sum(r["cpu_s"]["user"] for r in results)
    box_sys = sum(r["cpu_s"]["sys"] for r in results)
    per_event_us = (box_user + box_sys) / max(1, total_sent) * 1e6
    nats_text = f"{nats_cpu:.1f} s" if cluster is not None else "not measured (an external cluster)"
    print(f"CPU while sending ({span:g} s): boxes {box_user + box_sys:.1f} s (user {box_user:.1f}, "
          f"system {box_sys:.1f}; {per_event_us:.0f} us per event), nats-servers {nats_text}, "
          f"consumer and this script {consumer_cpu:.1f} s")  # fmt: skip
    print(f"load average (1 min) during the run: max {max(load, default=0):.1f}, "
          f"mean {sum(load) / max(1, len(load)):.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    return 0 if lost == 0 and not any(spooled.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
