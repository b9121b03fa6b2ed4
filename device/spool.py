"""Durable event spool: SQLite (WAL) on disk, oldest first, bounded by count and age.

An event is appended (and committed) before anyone tries to publish it and deleted only once the
broker has acknowledged it, so a crash, a power cut or a long broker outage loses nothing that
fits within the bounds. Rowids come from AUTOINCREMENT so they never repeat: they are the
publication order, even across restarts.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from device.config import ConfigError

log = logging.getLogger("serenbox.spool")

# Age bounds are enforced on append, but a scan per event would be wasted work.
_AGE_CHECK_EVERY_S = 30.0


class SpoolError(ConfigError):
    """The spool cannot be opened or written (a path or permission problem, not a bug)."""


class Spool:
    """Thread-safe FIFO of JSON payloads. One writer thread and one reader thread share it."""

    def __init__(self, path: str | Path, max_events: int, max_age_s: float, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.dropped = 0  # events removed by the bounds during this run
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives a power cut, not only a killed process (NORMAL would).
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS events ("
                " id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, payload TEXT NOT NULL)"
            )
            self._count = self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        except (OSError, sqlite3.Error) as e:
            raise SpoolError(f"{self.path}: cannot open the event spool ({e})") from None
        self._last_age_check = 0.0
        with self._lock:
            self._enforce_bounds(time.time())
        if self._count:
            log.info("spool %s holds %d unsent event(s) from an earlier run; they go out first", self.path, self._count)

    def __len__(self) -> int:
        return self._count

    def append(self, payload: str, now: float | None = None) -> int:
        """Store one payload durably; returns its rowid (the publication order)."""
        now = time.time() if now is None else now
        with self._lock:
            try:
                cur = self._db.execute("INSERT INTO events (created, payload) VALUES (?, ?)", (now, payload))
            except sqlite3.Error as e:
                raise SpoolError(f"{self.path}: cannot write to the event spool ({e})") from None
            self._count += 1
            self._enforce_bounds(now)
            return int(cur.lastrowid)

    def after(self, rowid: int, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` rows with an id greater than `rowid`, oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT id, payload FROM events WHERE id > ? ORDER BY id LIMIT ?", (rowid, limit)
            ).fetchall()

    def delete(self, rowids: Iterable[int]) -> None:
        ids = list(rowids)
        if not ids:
            return
        with self._lock:
            self._db.execute("BEGIN")
            cur = self._db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in ids])
            self._db.execute("COMMIT")
            self._count -= max(cur.rowcount, 0)

    def _enforce_bounds(self, now: float) -> None:
        dropped = 0
        if self._count > self.max_events:
            cur = self._db.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)",
                (self._count - self.max_events,),
            )
            dropped += max(cur.rowcount, 0)
        if not 0 <= now - self._last_age_check < _AGE_CHECK_EVERY_S:  # also when the clock went back
            self._last_age_check = now
            cur = self._db.execute("DELETE FROM events WHERE created < ?", (now - self.max_age_s,))
            dropped += max(cur.rowcount, 0)
        if dropped:
            self._count -= dropped
            self.dropped += dropped
            log.warning("spool full or events too old: dropped the %d oldest unsent event(s)", dropped)

    def close(self) -> None:
        with self._lock:
            self._db.close()
