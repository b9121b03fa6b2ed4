"""A `serenbox.client` subscriber in its own process, for tests that kill it (SIGKILL) mid-stream.

    python -m tests.client_member HOST PORT CLIENT_ID [--group G] [--delay S] [--expiry S] [--live]

Prints `ready` once subscribed, then one JSON line per event it takes (id, seq, run_id), flushed
before the event is acknowledged: a line printed is an event the application had in hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import serenbox.client


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("client_id")
    parser.add_argument("--group")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds spent on each event")
    parser.add_argument("--seconds", type=float, default=60.0, help="give up after this long")
    parser.add_argument("--expiry", type=int, help="session expiry in seconds (default: the client's)")
    parser.add_argument("--live", action="store_true", help="no persistent session")
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    with serenbox.client.connect(
        args.host,
        args.port,
        client_id=args.client_id,
        group=args.group,
        kinds=["events"],
        persistent=not args.live,
        session_expiry_s=args.expiry,
    ) as c:
        print("ready", flush=True)
        while time.monotonic() < deadline:
            for e in c.events(timeout=0.5):
                print(json.dumps({"id": e.id, "seq": e.seq, "run_id": e.run_id}), flush=True)
                time.sleep(args.delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
