"""`serenbox watch`: a live view of every SerenBox on a broker, in a terminal or as lines.

The view is built from what `serenbox.client` yields: `availability` and `stats` decide whether a
box is up (docs/mqtt.md: `online` retained *and* stats younger than 3 stats intervals), `state`
gives the faces and the emotion of each, `events` the last event. On a TTY the table is redrawn in
place with ANSI escapes; otherwise (or with --plain) one line is printed whenever a box's line
changes.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from serenbox.client import Availability, Client, Event, Message, State, Stats, Track

# What a box that has not said its stats interval yet is assumed to use (mqtt.stats_interval_s).
DEFAULT_STATS_INTERVAL_S = 60.0
STALE_AFTER_INTERVALS = 3
REDRAW_EVERY_S = 1.0  # clocks and staleness move even when no message comes
STOP_POLL_S = 0.2  # how soon a stop request (Ctrl-C, SIGTERM) is seen
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
HIDE_CURSOR, SHOW_CURSOR, CLEAR_SCREEN = "\x1b[?25l", "\x1b[?25h", "\x1b[2J"
COLUMNS = ("DEVICE", "STATUS", "FACES", "EMOTIONS", "FPS", "SPOOL", "LAST EVENT")


@dataclass
class BoxView:
    device_id: str
    availability: bool | None = None  # None: nothing retained or received yet
    stats_at: float | None = None  # monotonic time of the last stats message
    stats_interval_s: float | None = None
    fps: float | None = None
    spool_depth: int | None = None
    faces: int | None = None
    tracks: tuple[Track, ...] = ()
    paused: bool = False
    last_event: Event | None = None


class Board:
    """Every box seen so far; `update` takes a message and `row` says what to show."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.boxes: dict[str, BoxView] = {}

    def update(self, msg: Message, now: float) -> None:
        box = self.boxes.setdefault(msg.device_id, BoxView(msg.device_id))
        if isinstance(msg, Availability):
            box.availability = msg.online
        elif isinstance(msg, Stats):
            box.stats_at = now
            box.stats_interval_s = msg.stats_interval_s
            box.fps = msg.fps
            box.spool_depth = msg.spool_depth
        elif isinstance(msg, State):
            box.faces, box.tracks, box.paused = msg.faces, msg.tracks, msg.paused
        elif isinstance(msg, Event):
            box.last_event = msg

    def status(self, box: BoxView, now: float) -> str:
        """online | online? (announced, no stats yet) | stale (online, no stats for 3 intervals) | offline | unknown."""
        if box.availability is False:
            return "offline"
        if box.availability is None:
            return "unknown"
        limit = STALE_AFTER_INTERVALS * (box.stats_interval_s or DEFAULT_STATS_INTERVAL_S)
        if box.stats_at is None:
            # Stats come once per interval: until one could have come, `online` is taken on trust.
            return "online?" if now - self.started <= limit else "stale"
        return "online" if now - box.stats_at <= limit else "stale"

    def row(self, box: BoxView, now: float) -> tuple[str, ...]:
        status = self.status(box, now)
        if box.paused and status in ("online", "online?"):
            status += ", paused"
        emotions = " ".join(f"#{t.track_id} {t.emotion} {t.confidence:.2f}" for t in box.tracks) or "-"
        return (
            box.device_id,
            status,
            "-" if box.faces is None else str(box.faces),
            emotions,
            "-" if box.fps is None else f"{box.fps:.1f}",
            "-" if box.spool_depth is None else str(box.spool_depth),
            _event_text(box.last_event),
        )

    def rows(self, now: float) -> list[tuple[str, ...]]:
        return [self.row(self.boxes[d], now) for d in sorted(self.boxes)]


def _event_text(e: Event | None) -> str:
    if e is None:
        return "-"
    return f"{e.type} {e.emotion} {e.confidence:.2f} #{e.track_id} seq {e.seq} {e.timestamp:%H:%M:%S}Z"


def render_table(board: Board, now: float, title: str) -> str:
    """The TTY screen: a title line, then one aligned row per box (no escapes: see `redraw`)."""
    rows = [COLUMNS, *board.rows(now)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [title, ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append("(no SerenBox has said anything yet)")
    return "\n".join(lines)


def redraw(screen: str) -> str:
    """Escapes that paint `screen` over the previous one without flicker: home, each line cleared
    to its end, and everything below cleared (a box that went away leaves no stale line)."""
    return HOME + "".join(f"{line}{CLEAR_LINE}\n" for line in screen.split("\n")) + CLEAR_BELOW


def plain_line(row: tuple[str, ...]) -> str:
    device, status, faces, emotions, fps, spool, last = row
    return f"{device} {status} faces={faces} emotions=[{emotions}] fps={fps} spool={spool} last=[{last}]"


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def watch(
    client: Client,
    out: TextIO,
    plain: bool,
    title: str,
    seconds: float | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Show the boxes until `stop` is set (or for `seconds`): one line per change when `plain`.

    The caller's signal handlers set `stop` rather than raise (`serenbox watch` installs its own,
    since a background job inherits SIGINT ignored): an exception thrown into paho's code mid-call
    could leave its locks taken and the close hanging.
    """
    stop = stop or threading.Event()
    board = Board(time.monotonic())
    shown: dict[str, str] = {}
    connected = True
    stop_at = None if seconds is None else time.monotonic() + seconds
    next_draw = 0.0
    if not plain:
        out.write(HIDE_CURSOR + CLEAR_SCREEN)
    try:
        while not stop.is_set() and (stop_at is None or time.monotonic() < stop_at):
            msg = client.next(timeout=min(STOP_POLL_S, max(0.05, next_draw - time.monotonic())))
            now = time.monotonic()
            if msg is not None:
                board.update(msg, now)
                client.ack()
            if plain:
                if client.connected != connected:
                    connected = client.connected
                    out.write(f"{_utc_now()} broker {'connected' if connected else 'lost; reconnecting'}\n")
                for row in board.rows(now):
                    line = plain_line(row)
                    if shown.get(row[0]) != line:
                        shown[row[0]] = line
                        out.write(f"{_utc_now()} {line}\n")
                out.flush()
            elif now >= next_draw or msg is not None:
                head = f"{title}   {_utc_now()}" + ("" if client.connected else "   (broker lost; reconnecting)")
                out.write(redraw(render_table(board, now, head)))
                out.flush()
            if now >= next_draw:
                next_draw = now + REDRAW_EVERY_S
    finally:
        if not plain:
            out.write(SHOW_CURSOR)
            out.flush()


def is_tty(out: TextIO = sys.stdout) -> bool:
    return hasattr(out, "isatty") and out.isatty()
