"""The spool's write-ahead log over a long run with the broker up: how large does it get?

    python benchmarks/bench_wal.py [--minutes 10]

Runs the real daemon (`serenbox run`) on a looping face video, as fast as it decodes, against a
local mosquitto, samples the size of spool.sqlite and spool.sqlite-wal every 0.2 s, and prints
the largest, the last, and the events sent.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import media  # noqa: E402
from tests.daemon import Daemon, received_events, write_config  # noqa: E402
from tests.mosquitto import Mosquitto, Watcher  # noqa: E402


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        video = media.moving_face_video(tmp / "face.avi", seconds=6, fps=10, present=lambda t: t % 3 < 2)
        with Mosquitto(tmp / "broker") as broker, Watcher(broker, ["serenbox/#"]) as w:
            daemon = Daemon(write_config(tmp, video, broker, camera={"loop": True}))
            spool = tmp / "state" / "spool.sqlite"
            wal = Path(f"{spool}-wal")
            largest_wal = largest_db = samples = 0
            end = time.monotonic() + args.minutes * 60
            try:
                while time.monotonic() < end and daemon.proc.poll() is None:
                    largest_wal = max(largest_wal, size(wal))
                    largest_db = max(largest_db, size(spool))
                    samples += 1
                    time.sleep(0.2)
            finally:
                code = daemon.finish(signal.SIGTERM)
            w.wait_for(lambda: len(received_events(w)) >= len(daemon.events), timeout=60, what="every event")
            got = len(received_events(w))
        print(f"run: {args.minutes:g} min, exit {code}, {len(daemon.events)} events printed, {got} received")
        last = size(wal) / 1024
        print(f"WAL: largest {largest_wal / 1024:.1f} KiB over {samples} samples; at the end {last:.1f} KiB")
        print(f"database file: largest {largest_db / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
